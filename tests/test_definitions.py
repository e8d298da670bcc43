"""The code location loads, every job resolves, and the CLI answers."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def test_definitions_load_and_jobs_resolve():
    from pipeline.definitions import defs
    from pipeline.defs.jobs import JOBS, MAIN_JOB

    for job in JOBS:
        assert defs.resolve_job_def(job.name).name == job.name
    main = defs.resolve_job_def(MAIN_JOB)
    assert {"sample_world_images", "image_catalog", "labelled_catalog"} <= {n.name for n in main.nodes_in_topological_order}


def test_workspace_and_instance_files():
    ws = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert ws["load_from"][0]["python_module"]["module_name"] == "pipeline.definitions"
    inst = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    assert inst["telemetry"]["enabled"] is False and inst["run_monitoring"]["enabled"] is True


def test_cli_locate(capsys):
    assert cli_main(["locate", "24.86", "67.01", "34.53", "69.17"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["province"] == "Sindh" and lines[0]["koppen"] == "BWh" and lines[0]["nearest_place"] == "Karachi"
    assert lines[1]["province"] is None  # Kabul
    assert cli_main(["locate", "24.86"]) == 2
