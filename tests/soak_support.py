"""Soak test of the real job flow (issue 21.4): crawl → catalog → filter → labels, killed and run again.

Its ten rounds run from two files of five (``test_soak_kill_rerun.py``: ``HALVES[0]``, ``test_soak_kill_rerun_b.py``:
``HALVES[1]``), each with its own uninterrupted reference run, so that ``--dist loadfile`` places them on both
workers (one file of ten rounds alone set the suite's floor).

Each round crawls a Sindh partition from the fake Flickr (camera-like JPEGs, enough of them that the filter
measures with its 2-process pool) into a fresh data root with a real ``dagster job execute``, SIGKILLs that
launcher alone (as an OOM kill or a closed laptop would) at a seeded random moment of start-up or of one of the
four steps (found through the run's event log, so the points do not drift with the machine's load), then runs the
same job again on the same root. Rounds use both executors: multiprocess (each step in its own process, as the
crawl job and the UI run it) and in-process (as the main job runs). After each rerun:

* it succeeded, after sweeping the killed run (marked failed, its pool slots freed);
* the manifest, catalog (and its rejections), filtered catalog, filter rejections and labelled catalog equal an
  uninterrupted run's (sorted by image id, timing columns aside), and each photo is in them exactly once;
* no process the killed run started is left (its process group is empty), no pool slot is claimed, no run is
  left STARTED.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests import soak_defs
from tests.crawl_support import FLICKR_KEY, FLICKR_SECRET
from geopak_testkit.fake_apis import FakeServer, FlickrPhoto, flickr_routes
from tests.process_support import described, live_processes, wait_until

REPO = Path(__file__).resolve().parents[1]
PROVINCE = "sindh"
MP, IP = "multiprocess", "in_process"
# the 10 rounds: where the kill lands (start-up: None; else a seeded fraction of a second after that step started:
# the crawl downloading, the filter measuring with its pool, ...) and with which executor; the filter, with the
# most processes, three times; the multiprocess runs, slow to start each step, four times
ROUNDS = [(None, IP), ("flickr_photos", MP), ("flickr_photos", IP), ("image_catalog", MP), ("image_catalog", IP),
          ("filtered_catalog", MP), ("filtered_catalog", IP), ("filtered_catalog", IP), ("labelled_catalog", MP),
          ("labelled_catalog", IP)]
# the two files' rounds: two multiprocess rounds each (the slow ones), and each step killed in both
HALVES = ([0, 1, 4, 6, 8], [2, 3, 5, 7, 9])
N_PHOTOS = 210  # ~30 % dropped by the crawl (licence, accuracy), so ≥ 128 reach the filter, which then uses its pool
SEED = 21
RUN_DEADLINE_S = 240.0
EXIT_DEADLINE_S = 20.0  # the killed launcher's step and pool processes watch it and stop within about a second
INSTANCE_YAML = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"
# (table, file under the data root); rows compared by image id, these columns aside (when a run wrote them)
TABLES = {"manifest": f"raw/flickr/{PROVINCE}/manifest.parquet", "catalog": "catalog/image_catalog.parquet",
          "catalog_rejections": "catalog/rejections.parquet", "filtered": "filter/filtered_catalog.parquet",
          "filter_rejections": "filter/rejections.parquet", "labelled": "labels/labelled_catalog.parquet"}
TIMING_COLUMNS = {"fetched_at", "ingested_at", "crawled_at", "rejected_at", "measured_at"}


@functools.lru_cache(maxsize=None)
def camera_jpeg(name: str) -> bytes:
    """A 320 × 240 JPEG that decodes and measures like a photo (smooth light, texture, sensor noise), unique per
    name and the same on every request; every 40th photo is a blank frame (the filter rejects it) and every 40th
    another the same bytes as the photo before it (the catalog keeps one). Cached: every run downloads the same
    bytes, and rendering them took ~3 s of CPU per run."""
    number = int(name.split(".")[0])
    if number % 40 == 7:
        return _jpeg(np.full((240, 320, 3), 128, "uint8"))
    if number % 40 == 19:
        name = f"{number - 1}.jpg"
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
    y, x = np.mgrid[0:240, 0:320] / 240.0
    waves = x[..., None] * rng.uniform(2, 9, 3) + y[..., None] * rng.uniform(1, 6, 3)
    base = rng.uniform(40, 200, 3) + 50 * np.sin(waves)
    return _jpeg(np.clip(base + rng.normal(0, 14, (240, 320, 3)), 0, 255).astype("uint8"))


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _photos() -> list[FlickrPhoto]:
    """Photos around Hyderabad (Sindh, inland): most open-licensed and street-accurate, a few that the crawl drops."""
    rng = random.Random(SEED)
    out = []
    for i in range(N_PHOTOS):
        taken = f"{rng.randrange(2008, 2023)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} 10:{i % 60:02d}:00"
        out.append(FlickrPhoto(str(60_000_000 + i), 25.39 + rng.uniform(-0.12, 0.12), 68.37 + rng.uniform(-0.12, 0.12),
                               taken, license=rng.choice(["4", "4", "4", "5", "9", "9", "0"]),
                               accuracy=rng.choice([16, 16, 16, 14, 6])))
    return out


def _run_config(rest_url: str, executor: str) -> dict:
    return {
        "resources": {"flickr": {"config": {"rest_url": rest_url, "queries_per_hour": 3.6e6, "timeout_s": 10.0,
                                            "min_taken_date": "2005-01-01", "max_taken_date": "2024-01-01"}},
                      "compute": {"config": {"workers": 2}}},
        "execution": {"config": {executor: {}}},
    }


class Soak:
    """One instance (DAGSTER_HOME) for every run, a data root per round, the fake Flickr and the launchers."""

    def __init__(self, tmp: Path, boundaries_path: Path, rest_url: str):
        self.tmp, self.rest_url = tmp, rest_url
        self.home = tmp / "dagster_home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(INSTANCE_YAML)
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "GEOPAK_BOUNDARIES": str(boundaries_path),
                    "FLICKR_API_KEY": FLICKR_KEY, "FLICKR_API_SECRET": FLICKR_SECRET}
        self.instance = dg.DagsterInstance.from_config(str(self.home))

    def start(self, root: Path, executor: str) -> subprocess.Popen:
        """``dagster job execute`` of the soak job on ``root``, in a session of its own (its process group)."""
        config = self.tmp / f"{root.name}-{executor}.yaml"
        config.write_text(json.dumps(_run_config(self.rest_url, executor)))
        cmd = [str(Path(sys.executable).with_name("dagster")), "job", "execute", "-f", soak_defs.__file__,
               "-j", soak_defs.SOAK_JOB, "-c", str(config), "--tags", json.dumps({"dagster/partition": PROVINCE})]
        log = open(self.tmp / f"{root.name}-{executor}-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        try:
            return subprocess.Popen(cmd, cwd=REPO, env={**self.env, "GEOPAK_DATA_ROOT": str(root)}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def finish(self, proc: subprocess.Popen, what: str) -> None:
        """Wait for a run that must succeed."""
        try:
            proc.wait(RUN_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{what} did not finish within {RUN_DEADLINE_S:g} s:\n{self.last_log()}")
        assert proc.returncode == 0, f"{what} failed:\n{self.last_log()}"

    def last_log(self) -> str:
        newest = max(self.tmp.glob("*.log"), key=lambda p: p.stat().st_mtime)
        return newest.read_text(errors="replace")[-4000:]

    def check_instance_clean(self) -> None:
        """No pool slot claimed or pending, no run STARTED."""
        storage = self.instance.event_log_storage
        for pool in storage.get_concurrency_keys():
            info = storage.get_concurrency_info(pool)
            assert not info.claimed_slots and not info.pending_steps, f"pool {pool}: {info}"
        started = self.instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        assert not started, [r.run_id for r in started]


def _kill_during(soak: Soak, proc: subprocess.Popen, step: str | None, draw: float, known: set[str]) -> str:
    """SIGKILL the launcher alone (its children must notice by themselves) a seeded moment (``draw`` in [0, 1))
    into ``step`` of its run (None: into start-up); say where it landed."""
    if step is None:
        time.sleep(0.2 + 2.8 * draw)
    else:
        def started() -> bool:
            runs = [r for r in soak.instance.get_runs(limit=1) if r.run_id not in known]
            return bool(runs) and any(e.step_key == step for e in soak.instance.all_logs(
                runs[0].run_id, of_type=dg.DagsterEventType.STEP_START))

        assert wait_until(lambda: started() or proc.poll() is not None, RUN_DEADLINE_S), f"{step} never started"
        time.sleep(0.6 * draw)
    landed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"{'into' if landed else 'after the end of'} {step or 'start-up'}"


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    """Each final table, timing columns dropped, sorted by image id, with paths relative to the data root."""
    out = {}
    for name, rel in TABLES.items():
        df = pd.read_parquet(root / rel)
        df = df.drop(columns=[c for c in df.columns if c in TIMING_COLUMNS])
        for col in df.columns:
            if df[col].dtype == object and df[col].astype(str).str.startswith(str(root)).any():
                df[col] = df[col].astype(str).str.replace(str(root), "<root>", regex=False)
        out[name] = df.sort_values(["image_id", *[c for c in ("source_id",) if c in df]]).reset_index(drop=True)
    return out


def _check_once(tables: dict[str, pd.DataFrame]) -> None:
    """Every photo exactly once: once in the manifest; in the catalog or (a copy of another photo's bytes) in its
    rejections; kept or rejected by the filter, never both; each image once in every table after the crawl."""
    assert tables["manifest"]["source_id"].is_unique, "the manifest lists a photo twice"
    for name in ("catalog", "filtered", "labelled"):
        assert tables[name]["image_id"].is_unique and tables[name]["source_id"].is_unique, f"{name}: duplicates"
    catalogued, dropped = set(tables["catalog"]["source_id"]), set(tables["catalog_rejections"]["source_id"])
    assert not catalogued & dropped and catalogued | dropped == set(tables["manifest"]["source_id"])
    kept, rejected = set(tables["filtered"]["image_id"]), set(tables["filter_rejections"]["image_id"])
    assert not kept & rejected and kept | rejected == set(tables["catalog"]["image_id"])
    assert set(tables["labelled"]["image_id"]) <= kept




def run_soak(tmp_path: Path, boundaries_path: Path, rounds: list[int]) -> None:
    """An uninterrupted reference run, then the given rounds of ``ROUNDS``, each killed and run again and checked
    against the reference. Each round's kill moment is its own draw of one seeded sequence, so a round lands at
    the same moment whichever file runs it."""
    rng = random.Random(SEED)
    draws = [rng.random() for _ in ROUNDS]
    with FakeServer() as srv:
        flickr_routes(srv, _photos(), FLICKR_KEY, jpeg=camera_jpeg)
        soak = Soak(tmp_path, boundaries_path, srv.url + "/services/rest/")
        # in process: a multiprocess run starts a process per step, ~20 s more; the multiprocess rounds still
        # compare their tables with it
        soak.finish(soak.start(tmp_path / "reference", IP), "the uninterrupted run")
        reference = _tables(tmp_path / "reference")
        _check_once(reference)
        assert len(reference["catalog"]) >= 128, "too few photos reach the filter for its pool to be used"
        assert len(reference["labelled"]) > 0.8 * len(reference["catalog"])
        assert len(reference["catalog_rejections"]) and len(reference["filter_rejections"])
        soak.check_instance_clean()
        landed = []
        for i in rounds:
            step, executor = ROUNDS[i]
            root = tmp_path / f"round{i}"
            known = {r.run_id for r in soak.instance.get_runs()}
            killed = soak.start(root, executor)
            where = _kill_during(soak, killed, step, draws[i], known)
            landed.append(where.startswith("into"))
            assert wait_until(lambda: not live_processes(group=killed.pid), EXIT_DEADLINE_S), (
                f"round {i}: processes of the run killed {where} left after {EXIT_DEADLINE_S:g} s:\n"
                + described(live_processes(group=killed.pid)))
            rerun = soak.start(root, executor)
            soak.finish(rerun, f"round {i}'s rerun ({executor}, killed {where})")
            assert wait_until(lambda: not live_processes(group=rerun.pid), EXIT_DEADLINE_S), (
                f"round {i}: the rerun left processes behind:\n" + described(live_processes(group=rerun.pid)))
            soak.check_instance_clean()
            tables = _tables(root)
            _check_once(tables)
            for name, want in reference.items():  # the multiprocess reruns against the in-process run, too
                pd.testing.assert_frame_equal(tables[name], want, obj=f"round {i} (killed {where}): {name}")
        assert sum(landed) >= len(landed) - 1, f"kills that landed while the run went on: {landed}"
