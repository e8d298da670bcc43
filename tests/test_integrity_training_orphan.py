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
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    time.sleep(1.0)
    try:
        assert running(trainer)
    finally:
        os.kill(trainer, signal.SIGKILL)


class _CancelledRun(BaseException):
    """What Dagster raises in a step when the run is terminated from the UI (a BaseException, like ours)."""


def test_cancelled_model_step_terminates_its_training_subprocess(tmp_path):
    """Terminating the run while the model step streams the trainer's log: the step terminates the trainer."""
    from types import SimpleNamespace

    from pipeline.defs.model import ModelParams, run_training

    build_world(tmp_path, per_cell=4, size=40)
    cfg = preset("test-tiny", data_root=str(tmp_path), cpu_threads=1,
                 phases=[{"epochs": 100000}, {"epochs": 1}, {"epochs": 1}])

    def info(msg: str) -> None:
        if msg.startswith("phase 0 epoch"):  # training is under way: the run is terminated now
            raise _CancelledRun()

    context = SimpleNamespace(log=SimpleNamespace(info=info))
    pids_before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    try:
        run_training(context, cfg, ModelParams(preset="test-tiny"), tmp_path / "model" / "geopak", [])
    except _CancelledRun:
        pass
    else:
        raise AssertionError("the cancellation did not reach the step")
    # this test's trainer only (its config lies under tmp_path): other test files may be training in parallel
    left = [p for p in _new_pids(pids_before) if running(p) and "geopak_model.train" in _cmdline(p)
            and str(tmp_path) in _cmdline(p)]
    assert not left, "the training subprocess outlived the cancelled step"


def _new_pids(before: set[int]) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in before]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
