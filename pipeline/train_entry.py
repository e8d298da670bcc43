"""The training subprocess's entry point: Dagster Pipes on one side, ``geopak_model.train`` (optionally under
``torchrun``) on the other (issue 14.4).

    python -m pipeline.train_entry [--timeout-s T] [torchrun options] -- <geopak_model.train arguments>

Why a module of its own: the model step launches it with ``dg.PipesSubprocessClient``, and it must stay light.
It imports ``dagster_pipes`` (a separate, dependency-free package) and ``geopak_model.train``, never ``dagster``
(``tests/test_training_pipes.py`` checks), so ``geopak_model`` keeps knowing nothing of Dagster and the same
command runs standalone (no Pipes environment: nothing is reported, the trainer just prints).

* No torchrun options: the trainer runs in this process (one rank).
* torchrun options (``--standalone --nnodes 1 --nproc-per-node 2``, or ``--nnodes 2 --rdzv-backend c10d
  --rdzv-endpoint host:29400 --rdzv-id job7 ...``: any of ``torchrun``'s): this process becomes torchrun's
  elastic agent (``torch.distributed.run.main``, in process) and starts ``python -m pipeline.train_entry
  --worker -- <arguments>`` once per local rank.
* Only global rank 0 opens Pipes: its log lines, one custom message per epoch (the metrics row) and, at the
  end, a materialization with the run's headline numbers go back to the step. The other ranks report nothing.
* ``GEOPAK_EXIT_WITH_PARENT=1`` (the step sets it): this process, agent or trainer, ends within a fraction of a
  second of its parent's death (a SIGKILLed step), and torchrun's workers end with the agent the same way.
  A run terminated from Dagster reaches the agent as SIGINT (``PipesSubprocessClient`` forwards it); torchrun
  then stops its workers (SIGINT, SIGKILL after 30 s).
* ``--timeout-s``: after that long this process interrupts itself (same path as a cancel); if it is still there
  ``KILL_GRACE_S`` later (a rank stuck in a collective, a data loader that never joins), it kills itself, and
  its torchrun workers follow it. So the step's wait on this process (Pipes waits without a limit) ends too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

EPOCH_MESSAGE = "epoch"  # the ``kind`` of the per-epoch custom Pipes message
KILL_GRACE_S = 120.0  # after the interrupt at --timeout-s: time to save and stop before SIGKILL


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as JSON Pipes can carry (numpy scalars to floats; NaN/inf to None)."""
    out = json.loads(json.dumps(row, default=float))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def headline(result: dict[str, Any], embed_only: bool) -> dict[str, Any]:
    """What rank 0 reports as the materialization's metadata (the step adds its tables and plots)."""
    if embed_only:
        keys = ("weights_id", "cached_images", "computed", "reused", "unreadable", "bytes_changed",
                "shards_written", "seconds")
        return {f"trainer_{k}": result[k] for k in keys if k in result}
    final = result.get("final", {})
    out = {"trainer_device": result.get("device"), "trainer_world_size": result.get("world_size"),
           "trainer_precision": result.get("precision"), "trainer_final_phase": final.get("phase"),
           "trainer_val_median_km": final.get("val_median_km"),
           "trainer_bytes_changed": result.get("cache", {}).get("bytes_changed", 0)}
    return _plain({k: v for k, v in out.items() if v is not None})


class _Reporter:
    """Rank 0's channel to Dagster: a Pipes context when launched through Pipes, else print only."""

    def __init__(self, pipes: Any | None):
        self.pipes = pipes

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        if self.pipes is not None:
            self.pipes.log.info(msg)

    def epoch(self, row: dict[str, Any]) -> None:
        if self.pipes is not None:
            self.pipes.report_custom_message({"kind": EPOCH_MESSAGE, **_plain(row)})

    def done(self, result: dict[str, Any] | None, embed_only: bool) -> None:
        if self.pipes is not None and result is not None:
            self.pipes.report_asset_materialization(metadata=headline(result, embed_only))


def _pipes_session() -> AbstractContextManager[Any]:
    """``open_dagster_pipes()`` on global rank 0 of a process Dagster launched through Pipes; else nothing."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if os.environ.get("RANK", "0") != "0" or DAGSTER_PIPES_CONTEXT_ENV_VAR not in os.environ:
        return nullcontext(None)
    return open_dagster_pipes()


def run_trainer(trainer_args: list[str]) -> int:
    """One rank: ``geopak_model.train`` in this process, reporting through Pipes on rank 0."""
    from geopak_model.train import run_cli

    with _pipes_session() as pipes:
        rep = _Reporter(pipes)
        result = run_cli(trainer_args, log=rep.log, on_epoch=rep.epoch)
        rep.done(result, "--embed-only" in trainer_args)
    return 0


def run_torchrun(torchrun_args: list[str], trainer_args: list[str]) -> int:
    """torchrun's agent in this process; each worker is this module in ``--worker`` mode."""
    from torch.distributed.run import main as torchrun_main

    torchrun_main([*torchrun_args, "--module", "pipeline.train_entry", "--worker", "--", *trainer_args])
    return 0


def _interrupt_after(seconds: float, log: Callable[[str], None], grace_s: float = KILL_GRACE_S) -> threading.Thread:
    """Interrupt this process after ``seconds`` (SIGINT, as a cancel); kill it if it has not ended ``grace_s``
    after that."""

    def fire() -> None:
        time.sleep(seconds)
        log(f"geopak: training ran past its {seconds:g} s limit (timeout_s): interrupting it")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(grace_s)
        log(f"geopak: training did not stop within {grace_s:g} s of the interrupt: killing it (pid {os.getpid()})")
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Thread(target=fire, name="geopak-train-time-limit", daemon=True)
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m pipeline.train_entry [--timeout-s T] [--worker | torchrun options] "
                         "-- <geopak_model.train arguments>")
    cut = argv.index("--")
    own, trainer_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m pipeline.train_entry", add_help=False)
    ap.add_argument("--timeout-s", type=float, default=0.0)
    ap.add_argument("--worker", action="store_true", help="(torchrun starts each rank with it)")
    args, torchrun_args = ap.parse_known_args(own)
    from pipeline.core.processes import exit_with_parent_if_asked

    exit_with_parent_if_asked()  # launched by a pipeline step: never outlive it
    if args.timeout_s > 0:
        _interrupt_after(args.timeout_s, lambda m: print(m, file=sys.stderr, flush=True))
    if args.worker or not torchrun_args:
        return run_trainer(trainer_args)
    return run_torchrun(torchrun_args, trainer_args)


if __name__ == "__main__":
    sys.exit(main())
