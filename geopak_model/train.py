"""Train GeoPak from the command line (open_clip's ``main`` entry): the phases, the export and the summary of
``trainer.Trainer``, or only the embedding cache.

    python -m geopak_model.train --config cfg.json
    python -m geopak_model.train --preset cpu-small --data-root data
    torchrun --nproc_per_node=2 -m geopak_model.train --config cfg.json     # DDP (gloo on CPU, NCCL on GPU)

The pipeline's model steps launch it as ``python -m pipeline.train_entry [torchrun options] -- <these arguments>``
through Dagster Pipes; ``run_cli``'s ``log`` / ``on_epoch`` callbacks are how that entry point reports (this
package never imports Dagster). ``--embed-chunk-images`` / ``--embed-chunk-seconds``: how often the embedding
build commits a shard (a killed build loses at most one chunk).

Modules, along open_clip's lines: ``distributed`` (runtime and collectives), ``schedule`` (learning rate, loss
ramps), ``epochs`` (state, train_one_epoch, validate, split encoding), ``trainer`` (the phase driver), ``export``
(model choice, calibration, galleries, summary) and this CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from geopak_model.cache import CHUNK_IMAGES, CHUNK_SECONDS
from geopak_model.config import TrainConfig, preset
from geopak_model.trainer import Trainer, embed_only
from pipeline.core.processes import exit_with_parent_if_asked
from pipeline.core.store import atomic_write_bytes


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m geopak_model.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="TrainConfig JSON (see geopak_model/config.py)")
    ap.add_argument("--preset", help="cpu-small | gpu-full | test-tiny (used when --config is not given)")
    ap.add_argument("--data-root", help="override data_root")
    ap.add_argument("--phases", help="comma-separated phases to run, e.g. 1,2")
    ap.add_argument("--embed-only", action="store_true", help="only build the embedding cache")
    ap.add_argument("--embed-chunk-images", type=int, default=CHUNK_IMAGES,
                    help="the embedding build commits a shard every this many images (a kill loses at most one)")
    ap.add_argument("--embed-chunk-seconds", type=float, default=CHUNK_SECONDS,
                    help="... or every this many seconds of work, whichever comes first")
    ap.add_argument("--result", help="write the run summary (or cache stats) JSON here")
    return ap


def run_cli(argv: list[str] | None = None, log: Callable[[str], None] | None = None,
            on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Parse ``argv``, train (or only embed), write ``--result`` on rank 0. Returns the result on rank 0, None on
    the other ranks. ``log`` / ``on_epoch`` as for ``Trainer`` (the Pipes entry point passes its own)."""
    args = parser().parse_args(argv)
    exit_with_parent_if_asked()  # launched by a pipeline step: never outlive it
    if args.config:
        cfg = TrainConfig.from_json_file(args.config)
    else:
        cfg = preset(args.preset or "cpu-small")
    if args.data_root:
        cfg.data_root = args.data_root
    if args.phases:
        cfg.run_phases = [int(p) for p in args.phases.split(",")]
    chunk = (args.embed_chunk_images, args.embed_chunk_seconds)
    result = embed_only(cfg, log, chunk) if args.embed_only else Trainer(cfg, log, on_epoch=on_epoch,
                                                                          embed_chunk=chunk).run()
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if args.result and main_rank:
        atomic_write_bytes(args.result, json.dumps(result, indent=2, default=float).encode())
    if dist.is_initialized():
        dist.destroy_process_group()
    return result if main_rank else None


def main(argv: list[str] | None = None) -> int:
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
