"""Issue 14.5: two runs that would write the same stage of one data root never both write at once.

Two real runs of ``sample_world_images`` (it writes raw/sample_world/ and the image store), each in its own process
(tests/race_driver.py: the code location, the instance on disk), on one data root. Run B starts while run A's step
is writing (A holds the stage lock):

* one instance with the shipped dagster.yaml: the stage's concurrency pool (limit 1) makes B's step wait until A's
  is done; both succeed, one after the other, and B's files are the ones left;
* two instances (their pools cannot see each other) on one data root: the stage lock is the backstop; with no
  waiting allowed, B fails at once naming the run that holds the lock, and A's files stand.

Either way the manifest left behind is whole and every image it names is in the store. (Threads in one process
cannot stand in for the two runs: Dagster's log setup deadlocks when two runs start at once in one process.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from pipeline.defs.resources import STAGE_LOCK_NAME
from tests.cluster_support import REPO

N_A, N_B = 240, 60  # A renders for a few seconds: B starts (at once: its process is ready) while A writes


def _home(path: Path, pool_limit: int | None = None) -> Path:
    path.mkdir(parents=True)
    text = (REPO / "dagster_home" / "dagster.yaml").read_text()
    if pool_limit is not None:
        text = text.replace("default_limit: 1", f"default_limit: {pool_limit}")
    (path / "dagster.yaml").write_text(text)
    dg.DagsterInstance.from_config(str(path)).dispose()  # create its tables before two processes open it
    return path


class Run:
    """A race_driver process: imported and waiting; ``go()`` starts its run, ``result()`` is its JSON line."""

    def __init__(self, home: Path, data: Path, n_images: int, go: Path, lock_wait_s: float | None = None):
        cmd = [sys.executable, "-m", "tests.race_driver", "--home", str(home), "--data", str(data), "--images",
               str(n_images), "--go", str(go)]
        if lock_wait_s is not None:
            cmd += ["--lock-wait", str(lock_wait_s)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
        self.go_file = go
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        for line in self.proc.stdout:  # wait until it has loaded the code location and opened the instance
            self.lines.append(line)
            if line.strip() == "ready":
                break
        else:
            raise AssertionError(f"race_driver did not get ready:\n{''.join(self.lines)[-3000:]}")

    def go(self) -> None:
        self.go_file.touch()

    def result(self) -> dict:
        out, _ = self.proc.communicate(timeout=300)
        lines = (''.join(self.lines) + out).strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            raise AssertionError(f"race_driver printed no result:\n{''.join(lines)[-3000:]}") from None


def _wait_for_lock(lock: Path, run: Run, timeout_s: float = 120) -> str:
    """Wait until the stage lock holds a writer (its content is '<pid> (run <id>)'); return that content."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        holder = lock.read_text().strip() if lock.exists() else ""
        if "(run " in holder:
            return holder
        assert run.proc.poll() is None, f"run A ended before it took the stage lock: {run.result()}"
        time.sleep(0.02)
    raise AssertionError(f"run A did not take {lock} within {timeout_s} s")


def _step_times(home: Path, run_id: str) -> dict[dg.DagsterEventType, float]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        logs = instance.all_logs(run_id)
    return {e.dagster_event.event_type: e.timestamp for e in logs if e.dagster_event is not None}


def _manifest_whole(data: Path, n_images: int) -> None:
    manifest = pd.read_parquet(data / "raw" / "sample_world" / "manifest.parquet")
    assert len(manifest) == n_images  # (planted duplicates share an image_id by design)
    assert all((data / p).is_file() for p in manifest["path"])
    assert not list(data.rglob(".*.tmp")), "no half-written file left"
    assert (data / "raw" / "sample_world" / STAGE_LOCK_NAME).read_text() == "", "the lock was released"


def test_pool_makes_the_second_run_wait(tmp_path):
    home, data = _home(tmp_path / "home"), tmp_path / "data"
    a = Run(home, data, N_A, tmp_path / "go_a")
    b = Run(home, data, N_B, tmp_path / "go_b")
    a.go()
    _wait_for_lock(data / "raw" / "sample_world" / STAGE_LOCK_NAME, a)
    b.go()
    res_a, res_b = a.result(), b.result()
    assert res_a["success"] and res_b["success"], (res_a, res_b)
    ta, tb = _step_times(home, res_a["run_id"]), _step_times(home, res_b["run_id"])
    start, step_start, step_end = (dg.DagsterEventType.RUN_START, dg.DagsterEventType.STEP_START,
                                   dg.DagsterEventType.STEP_SUCCESS)
    assert tb[start] < ta[step_end], "B was running while A wrote (else this test proves nothing)"
    assert tb[step_start] >= ta[step_end], "B's step waited for A's to finish"
    _manifest_whole(data, N_B)  # B wrote last, after A


def test_stage_lock_stops_a_run_of_another_instance(tmp_path):
    home_a, home_b, data = _home(tmp_path / "a", pool_limit=10), _home(tmp_path / "b", pool_limit=10), tmp_path / "d"
    lock = data / "raw" / "sample_world" / STAGE_LOCK_NAME
    a = Run(home_a, data, N_A, tmp_path / "go_a")
    b = Run(home_b, data, N_B, tmp_path / "go_b", lock_wait_s=0)
    a.go()
    holder = _wait_for_lock(lock, a)
    b.go()
    res_b, res_a = b.result(), a.result()
    assert holder.endswith(f"(run {res_a['run_id']})")
    assert res_a["success"], res_a
    assert not res_b["success"], f"B must not write while A holds the stage: {res_b}"
    assert "LockHeldError" in res_b["error"] and f"(run {res_a['run_id']})" in res_b["error"], res_b["error"]
    assert "writing raw/sample_world/ under the data root" in res_b["error"]
    _manifest_whole(data, N_A)  # A's files, untouched by B
