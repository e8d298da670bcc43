"""One end-to-end `dagster job execute` of the main job on a small sample world, with a temporary DAGSTER_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.shards import ShardSet
from pipeline.defs.jobs import MAIN_JOB

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dagster_job_execute_main_job(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    data = tmp_path / "data"
    config = tmp_path / "run.yaml"
    config.write_text(
        "ops:\n  sample_world_images:\n    config:\n      n_images: 200\n      image_size: 160\n      workers: 2\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(home), "GEOPAK_DATA_ROOT": str(data), "HF_HUB_OFFLINE": "1"}
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster), "job", "execute", "-m", "pipeline.definitions", "-j", MAIN_JOB, "-c", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    labelled = pd.read_parquet(data / "labels" / "labelled_catalog.parquet")
    assert len(labelled) > 150 and labelled["province_key"].nunique() == 7
    cells = pd.read_parquet(data / "geocells" / "cells.parquet")
    assigned = pd.read_parquet(data / "geocells" / "assignments.parquet")
    assert len(cells) > 0 and set(assigned["image_id"]) == set(labelled["image_id"])
    assert (data / "model" / "geopak" / "model.pt").is_file()
    # the image shards (issue 22): every train/val/test image once, the datasheet beside them
    shards = ShardSet.find(data)
    splits = pd.read_parquet(data / "splits" / "splits.parquet")
    kept = splits[splits["split"].isin(["train", "val", "test"])]
    assert sorted(shards.index()["key"]) == sorted(kept["image_id"]) and shards.urls("train")
    assert "synthetic sample world** (entirely)" in (data / "shards" / "DATASHEET.md").read_text()
    reports = list((data / "evaluation").glob("*/report.html"))
    assert len(reports) == 1 and "ORACLE" in reports[0].read_text()
    assert list(home.glob("history/runs.db")) or list(home.glob("storage/**")), "run history kept in DAGSTER_HOME"
