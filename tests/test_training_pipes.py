"""Training through Dagster Pipes and torchrun (issue 14.4), on the tiny model world.

* The entry module the step launches (``pipeline.train_entry``) never imports ``dagster``: ``geopak_model`` and
  the training processes stay free of it (only the dependency-free ``dagster_pipes``).
* A step running ``run_training`` with torchrun (2 processes, DDP on gloo) gets the trainer's log lines as Dagster
  logs, every epoch row as a Pipes message and rank 0's headline as materialization metadata (world size 2:
  the numbers came from the torchrun ranks, not from the step).
* Cancelling: the run's process gets SIGINT (what terminating a run does), ``PipesSubprocessClient`` forwards
  it to torchrun's agent, which stops its workers: the agent and both workers are gone within a deadline. A
  SIGKILLed step (no chance to forward anything) takes them along too (``GEOPAK_EXIT_WITH_PARENT``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from geopak_model.config import preset
from pipeline.defs import model
from pipeline.defs.resources import TorchrunResource
from tests.model_world import build_world
from tests.process_support import running, wait_until

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0  # torchrun's agent gives its workers 30 s after SIGINT before SIGKILL


def test_train_entry_imports_no_dagster():
    code = ("import sys, pipeline.train_entry, geopak_model.train, dagster_pipes\n"
            "from pipeline.train_entry import _pipes_session\n"
            "with _pipes_session() as p: assert p is None  # not launched by Dagster: no Pipes, no warning\n"
            "bad = [m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')]\n"
            "assert not bad, bad[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_torchrun_launch_args():
    assert TorchrunResource().launch_args(1, "r1") == []
    assert TorchrunResource().launch_args(4, "r1") == ["--standalone", "--nnodes", "1", "--nproc-per-node", "4"]
    multi = TorchrunResource(nnodes="2", rdzv_endpoint="node0:29400").launch_args(8, "run-7")
    assert multi[:8] == ["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "node0:29400"]
    assert multi[8:10] == ["--rdzv-id", "run-7"]
    with pytest.raises(dg.Failure, match="rendezvous endpoint"):
        TorchrunResource(nnodes="2").launch_args(8, "run-7")


def _config(root: Path, epochs0: int):
    return preset("test-tiny", data_root=str(root), cpu_threads=1, run_phases=[0, 1],
                  phases=[{"epochs": epochs0}, {"epochs": 1}, {"epochs": 1}])


@pytest.mark.slow
def test_pipes_brings_back_logs_epochs_and_metadata_from_torchrun(tmp_path):
    build_world(tmp_path, per_cell=4, size=40)
    cfg = _config(tmp_path, 2)
    run_dir = tmp_path / "model" / "geopak"

    @dg.asset
    def trained(context):  # (no annotation: this module has postponed annotations)
        launch = ["--timeout-s", "300", *TorchrunResource().launch_args(2, context.run_id)]
        run = model.run_training(context, cfg, run_dir, [], dg.PipesSubprocessClient(), launch)
        return dg.MaterializeResult(metadata=run.metadata())

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([trained], instance=instance)
    assert result.success
    md = result.asset_materializations_for_node("trained")[0].metadata
    summary = json.loads((run_dir / "result.json").read_text())
    assert md["trainer_world_size"].value == 2 == summary["world_size"]  # reported by rank 0 of two
    assert md["trainer_final_phase"].value == summary["final"]["phase"]
    assert md["trainer_val_median_km"].value == pytest.approx(summary["final"]["val_median_km"])
    assert md["epochs_reported_via_pipes"].value == 3  # 2 epochs of phase 0 + 1 of phase 1, once each
    logs = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(m.startswith("phase 0 epoch 2:") for m in logs), logs[-20:]  # the trainer's lines, as they ran
    assert (run_dir / "model.pt").is_file() and (run_dir / "metrics.jsonl").is_file()


CANCEL_SCRIPT = """
import sys
from pathlib import Path
import dagster as dg
from geopak_model.config import preset
from pipeline.defs import model
from pipeline.defs.resources import TorchrunResource

root = Path(sys.argv[1])
cfg = preset("test-tiny", data_root=str(root), cpu_threads=1, run_phases=[0],
             phases=[{"epochs": 100000}, {"epochs": 1}, {"epochs": 1}])  # never ends by itself

@dg.asset
def trained(context):
    launch = ["--timeout-s", "600", *TorchrunResource().launch_args(2, context.run_id)]
    model.run_training(context, cfg, root / "model" / "geopak", [], dg.PipesSubprocessClient(
        termination_timeout_seconds=60), launch)

result = dg.materialize([trained], raise_on_error=False)
print("RUN", "SUCCESS" if result.success else "FAILURE", flush=True)
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _training_processes(tmp_path: Path) -> tuple[list[int], list[int]]:
    """(agents, workers) of this test's training: ``pipeline.train_entry`` processes whose config is ours."""
    agents, workers = [], []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        cmd = _cmdline(int(p)).replace("\0", " ")
        if "pipeline.train_entry" in cmd and str(tmp_path) in cmd and running(int(p)):
            (workers if "--worker" in cmd else agents).append(int(p))
    return agents, workers


def _start_cancellable(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    build_world(tmp_path, per_cell=4, size=40)
    step = subprocess.Popen([sys.executable, "-c", CANCEL_SCRIPT, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = tmp_path / "model" / "geopak" / "metrics.jsonl"
    ok = wait_until(lambda: metrics.exists() or step.poll() is not None, 180)
    if not ok or step.poll() is not None:
        step.kill()
        raise AssertionError(f"training never got under way: {step.communicate()[0][-3000:]}")
    agents, workers = _training_processes(tmp_path)
    assert len(agents) == 1 and len(workers) == 2, (agents, workers)
    return step, agents + workers


def _reap(pids: list[int]) -> list[int]:
    left = [p for p in pids if running(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.slow
def test_cancelled_run_stops_torchrun_and_its_workers(tmp_path):
    step, pids = _start_cancellable(tmp_path)
    os.kill(step.pid, signal.SIGINT)  # what terminating the run does to its process
    try:
        out, _ = step.communicate(timeout=DEADLINE_S + 30)
    finally:
        if step.poll() is None:
            step.kill()
    gone = wait_until(lambda: not any(running(p) for p in pids), DEADLINE_S)
    left = _reap(pids)
    assert gone and not left, f"outlived the cancelled run: {left}"
    assert "sending SIGINT to subprocess" in out, out[-3000:]  # the Pipes client forwarded the cancel
    assert "RUN FAILURE" in out or step.returncode != 0


@pytest.mark.slow
def test_sigkilled_step_takes_torchrun_and_its_workers_along(tmp_path):
    step, pids = _start_cancellable(tmp_path)
    os.kill(step.pid, signal.SIGKILL)  # no chance to forward anything: the watchdogs must do it
    step.wait()
    gone = wait_until(lambda: not any(running(p) for p in pids), 20)
    left = _reap(pids)
    assert gone and not left, f"outlived the killed step: {left}"


def test_a_trainer_that_ignores_its_time_limit_is_killed():
    """Past ``--timeout-s`` the trainer is interrupted; one that does not stop (SIGINT ignored here, as a rank stuck
    in a collective) is killed after the grace time, so the step's wait on it ends."""
    code = ("import signal, sys, time\nfrom pipeline.train_entry import _interrupt_after\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "_interrupt_after(0.5, lambda m: print(m, file=sys.stderr, flush=True), grace_s=1.0)\ntime.sleep(60)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - start < 20
    assert "ran past its 0.5 s limit" in proc.stderr and "did not stop within 1 s" in proc.stderr
