"""Predictor throughput on CPU: images per second for the cpu-small preset at batch 1 and batch 32.

Usage: python bench/bench_predict.py [--images 64] [--preset cpu-small]
Builds an untrained checkpoint over a stand-in cell table (throughput does not depend on the weights' values),
renders synthetic JPEGs, and times GeopakPredictor.predict end to end (decode, resize, encoders, mixture).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--cells-per-province", type=int, default=30)
    args = ap.parse_args()

    import torch

    from geopak_model.cells import CellTable
    from geopak_model.checkpoint import save_untrained
    from geopak_model.config import preset
    from geopak_model.predictor import GeopakPredictor
    from pipeline.core.provinces import PROVINCES

    rng = np.random.default_rng(0)
    rows = []
    for p in PROVINCES:
        for local in range(args.cells_per_province):
            rows.append({"cell_id": len(rows), "province_id": p.id, "local_id": local,
                         "center_lat": 24 + 12 * rng.random(), "center_lon": 62 + 14 * rng.random(), "radius_km": 20.0})
    cells = CellTable.from_frames(pd.DataFrame(rows))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_untrained(Path(tmp) / "model.pt", preset(args.preset), cells)
        predictor = GeopakPredictor.from_checkpoint(ckpt, device="cpu")
        images = []
        for i in range(args.images):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
        predictor.predict(images[:2])  # warm-up
        rates = {}
        for bs in (1, 32):
            t0 = time.perf_counter()
            for start in range(0, len(images), bs):
                predictor.predict(images[start : start + bs], batch_size=bs)
            rates[bs] = len(images) / (time.perf_counter() - t0)
        print(f"preset {args.preset} on CPU ({torch.get_num_threads()} threads), {args.images} JPEGs of 640x480, "
              f"{cells.n_cells} cells, top 2 provinces x top 5 cells")
        print(f"batch 1: {rates[1]:.1f} images/s")
        print(f"batch 32: {rates[32]:.1f} images/s")
        print(f"batch 32 / batch 1: {rates[32] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
