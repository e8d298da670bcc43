"""Filter-like per-image work (pipeline.filters.metrics.measure: read, decode, grey stats, pHash, sharpness) on
sample-world images through pipeline.core.parallel.map_chunks: in this process (the baseline), on a real
dask.distributed cluster with ONE worker, and with TWO workers (separate processes on 127.0.0.1, one thread each).
Prints images/s and the ratios, and how much of the data root's bandwidth each worker needs, i.e. how many workers
a shared data root (NFS over 1 or 10 GbE) can feed before it, not the CPUs, sets the pace.

    .venv/bin/python bench/bench_dask_scaling.py [--images 480] [--size 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.parallel import chunked, map_chunks  # noqa: E402
from pipeline.filters.metrics import MetricsParams, measure  # noqa: E402

PARAMS = MetricsParams()
LINKS_MB_S = {"1 GbE NFS": 110.0, "10 GbE NFS": 1100.0}


def measure_chunk(items: list[tuple[str, str]]) -> list[dict]:
    return [measure(path, image_id, PARAMS) for image_id, path in items]


def timed(fn, rounds: int) -> float:
    """Best-of-``rounds`` wall seconds (the machine is shared: the best round is the least disturbed)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--size", type=int, default=1024, help="sample-world image size (px, at most 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()

    from pipeline.core.store import ImageStore
    from pipeline.sources.sample_world import SampleWorldConfig, generate_sample_world
    from tests.cluster_support import dask_cluster

    with tempfile.TemporaryDirectory(prefix="geopak-bench-dask-") as tmp:
        store = ImageStore(tmp)
        manifest, _ = generate_sample_world(SampleWorldConfig(n_images=args.images, image_size=args.size), store,
                                            workers=2)
        items = [(str(i), str(store.abspath(p))) for i, p in zip(manifest["image_id"], manifest["path"])]
        mean_bytes = statistics.fmean(Path(p).stat().st_size for _, p in items)
        chunks = chunked(items, args.chunk)
        n = len(items)
        print(f"{n} sample-world images of {args.size} px, mean file {mean_bytes / 1024:.0f} KiB, "
              f"chunks of {args.chunk}, best of {args.rounds} rounds", file=sys.stderr)

        base = timed(lambda: map_chunks(measure_chunk, chunks, workers=1), args.rounds)
        rows = [("this process (baseline)", base)]
        for workers in (1, 2):
            with dask_cluster(workers=workers, log_dir=Path(tmp) / f"dask{workers}") as cluster:
                map_chunks(measure_chunk, chunks[:workers], workers=1, scheduler_address=cluster.address)  # warm
                rows.append((f"Dask, {workers} worker{'s' * (workers > 1)}",
                             timed(lambda: map_chunks(measure_chunk, chunks, workers=1,
                                                      scheduler_address=cluster.address), args.rounds)))

    print("| where | seconds | images/s | vs this process | vs 1 Dask worker |")
    print("|---|---:|---:|---:|---:|")
    one = rows[1][1]
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} | {n / sec:.1f} | {base / sec:.2f}x | {one / sec:.2f}x |")
    per_worker = n / one  # images/s one worker sustains
    need = per_worker * mean_bytes / 1e6
    print(f"\nOne worker reads {need:.1f} MB/s from the data root ({per_worker:.1f} images/s x "
          f"{mean_bytes / 1e6:.2f} MB).")
    for link, mb_s in LINKS_MB_S.items():
        print(f"- {link} (~{mb_s:.0f} MB/s) feeds about {mb_s / need:.0f} such workers before the data root, "
              f"not their CPUs, sets the pace (other image sizes: link MB/s / (images/s per worker x MB per image))")


if __name__ == "__main__":
    main()
