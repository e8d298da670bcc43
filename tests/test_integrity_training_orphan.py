"""The training subprocess a model step launches never outlives the step (issue 12.4, 12.13: "training
subprocess terminated on cancel"). A real launcher starts ``python -m geopak_model.train`` the way
``pipeline/defs/model.py`` does (``GEOPAK_EXIT_WITH_PARENT=1``), on a run long enough never to end by itself;
the launcher is SIGKILLed (no chance to clean up) and the trainer must be gone within a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from geopak_model.config import preset
from tests.model_world import build_world
from tests.process_support import running, wait_until

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 20.0

LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, "PYTHONPATH": sys.argv[2]}
if sys.argv[3] == "watch":
    env["GEOPAK_EXIT_WITH_PARENT"] = "1"
child = subprocess.Popen([sys.executable, "-m", "geopak_model.train", "--config", sys.argv[1]], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(sys.argv[4], "w"))
print(child.pid, flush=True)
time.sleep(600)
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int]:
    build_world(tmp_path, per_cell=4, size=40)
    cfg = preset("test-tiny", data_root=str(tmp_path), cpu_threads=1,
                 phases=[{"epochs": 100000}, {"epochs": 1}, {"epochs": 1}])  # never ends by itself
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(cfg_path), str(REPO), mode,
                                 str(tmp_path / "train.err")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert launcher.stdout is not None
    trainer = int(launcher.stdout.readline())
    deadline = time.monotonic() + 60
    while not (tmp_path / "model" / "geopak" / "metrics.jsonl").exists():  # training is under way
        assert running(trainer) and time.monotonic() < deadline, (tmp_path / "train.err").read_text()[-2000:]
        time.sleep(0.2)
    return launcher, trainer


def test_trainer_dies_with_its_killed_launcher(tmp_path):
    launcher, trainer = _start(tmp_path, "watch")
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    still = not wait_until(lambda: not running(trainer), DEADLINE_S)
    if still:
        os.kill(trainer, signal.SIGKILL)
    assert not still, "the training subprocess outlived its killed launcher"


def test_without_the_watch_a_trainer_would_be_orphaned(tmp_path):
    """The control: the same launch without ``GEOPAK_EXIT_WITH_PARENT`` leaves the trainer running (so the test
    above measures the watchdog, not an accident of the run)."""
    launcher, trainer = _start(tmp_path, "plain")
    metrics = tmp_path / "model" / "geopak" / "metrics.jsonl"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    size_at_kill = metrics.stat().st_size
    try:
        # no fixed sleep: the orphan is seen working on (a new epoch row) after its launcher is gone
        assert wait_until(lambda: metrics.stat().st_size > size_at_kill or not running(trainer), DEADLINE_S)
        assert running(trainer) and metrics.stat().st_size > size_at_kill
    finally:
        os.kill(trainer, signal.SIGKILL)
