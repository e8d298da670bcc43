"""Geocell build speed: the full build (caps enforced) on 1M sample-world points, and projected-Euclidean vs
haversine HDBSCAN on 200k points, in one script.

Usage: python bench/bench_geocells.py [--points 1000000] [--compare-points 200000] [--cache /tmp/sw.parquet]
       [--splits]   (also time the split of the same points, owner-disjoint and owner×day)

Points are the sample world's own placement (``plan_sample_world``: the census province mix, photos jittered
around GeoNames places ∝ population^0.7, 15 % uniform rural points), without defects. Planning 1M points takes
about a minute; ``--cache`` keeps them between runs. Each measured step runs in a fresh subprocess so its peak RSS
(VmHWM of /proc/self/status, reset just before the step; it counts C allocations) is its own; imports, reading the
points and the gazetteer load happen before the clock starts and are resident in the figure. Goal: full build ≤ 60 s and ≤ 2 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["lat", "lon", "province_id", "owner", "taken_at"]


def _points(n: int, cache: str | None):
    import pandas as pd

    if cache and Path(cache).exists():
        df = pd.read_parquet(cache)
        if len(df) == n and {"owner", "taken_at"} <= set(df.columns):
            return df
    from pipeline.sources.sample_world import SampleWorldConfig, plan_sample_world

    t0 = time.perf_counter()
    df = plan_sample_world(SampleWorldConfig(n_images=n, defect_fraction=0.0))[COLUMNS]
    print(f"planned {n:,} sample-world points in {time.perf_counter() - t0:.1f} s", flush=True)
    if cache:
        df.to_parquet(cache)
    return df


def _status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2  # kB
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset VmHWM so the peak measured afterwards is the step's own (Linux ≥ 4.0); ru_maxrss cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _child(step: str, path: str, n: int) -> None:
    """Run one measured step on the first ``n`` points of the file; print one JSON line."""
    import hdbscan  # noqa: F401  (import cost is not the build's)
    import numpy as np
    import pandas as pd

    from pipeline.core.gazetteer import pakistan_places
    from pipeline.geocells.cells import GeocellConfig, build_geocells, province_areas_km2
    from pipeline.geocells.geometry import Projector
    from pipeline.labels.boundaries import ProvinceBoundaries

    df = pd.read_parquet(path, columns=COLUMNS).iloc[:n]
    lat, lon, prov = df["lat"].to_numpy(), df["lon"].to_numpy(), df["province_id"].to_numpy()
    pakistan_places()
    areas = province_areas_km2(ProvinceBoundaries.load().polygons)
    _reset_peak()
    out: dict = {"step": step, "points": int(len(df)), "rss_before_gb": round(_status_gb("VmRSS"), 3)}
    t0 = time.perf_counter()
    if step == "build":
        built = build_geocells(lat, lon, prov, GeocellConfig(), areas)
        c = built.cells
        out.update(
            cells=int(len(c)),
            over_cap=int((c["radius_km"] > c["cap_km"]).sum()),
            unassigned=int((built.members < 0).sum()),
            per_province=built.provinces.drop(columns=["notes"]).to_dict("records"),
            max_radius=c.groupby("province_id")["radius_km"].max().round(2).to_dict(),
        )
    elif step.startswith("splits"):  # the planned points carry owners and times, no place identities
        from pipeline.geocells.splits import SplitConfig, make_splits

        frame = df.assign(image_id=[f"{i:064x}" for i in range(len(df))], place_id=None)
        t0 = time.perf_counter()
        res = make_splits(frame, SplitConfig(owner_disjoint=step == "splits"))
        out.update({k: v for k, v in res.summary.items() if isinstance(v, (int, float))})
    else:  # one HDBSCAN fit on the projected plane vs on the sphere, same points and sizes
        import hdbscan

        kw = dict(min_cluster_size=50, min_samples=5, core_dist_n_jobs=2)
        if step == "euclidean":
            X = Projector.centred_on(lat, lon).xy(lat, lon)
            labels = hdbscan.HDBSCAN(algorithm="boruvka_kdtree", **kw).fit_predict(X)
        else:
            X = np.radians(np.column_stack([lat, lon]))
            labels = hdbscan.HDBSCAN(metric="haversine", algorithm="boruvka_balltree", **kw).fit_predict(X)
        out.update(clusters=int(labels.max() + 1), noise=float(np.mean(labels < 0)))
        np.save(Path(path).with_name(f"labels_{step}.npy"), labels)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_gb"] = round(_status_gb("VmHWM"), 3)
    print("RESULT " + json.dumps(out, default=str), flush=True)


def _run(step: str, path: str, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--child", step, "--data", path, "--points", str(n)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{step} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--compare-points", type=int, default=200_000)
    ap.add_argument("--cache", default=None, help="parquet file to keep the planned points in")
    ap.add_argument("--splits", action="store_true", help="also time make_splits on the same points")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.data, args.points)
        return

    import tempfile

    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO))
    df = _points(args.points, args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "points.parquet")
        df[COLUMNS].to_parquet(path)
        print(f"cores available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.1f} "
              "(other work on the machine slows every figure below)", flush=True)

        build = _run("build", path, args.points)
        pd.set_option("display.width", 250)
        pd.set_option("display.max_columns", 40)
        print(pd.DataFrame(build["per_province"]).to_string(index=False))
        print(f"max radius per province (km): {build['max_radius']}")
        print(f"full geocell build, {build['points']:,} points: {build['seconds']:.1f} s wall, peak RSS "
              f"{build['peak_rss_gb']:.2f} GB ({build['rss_before_gb']:.2f} GB resident before the build); "
              f"{build['cells']} cells, {build['over_cap']} over cap, {build['unassigned']} unassigned "
              f"-> goal ≤ 60 s: {'met' if build['seconds'] <= 60 else 'NOT met'}, ≤ 2 GB: "
              f"{'met' if build['peak_rss_gb'] <= 2 else 'NOT met'}", flush=True)

        if args.splits:
            for step, mode in (("splits", "owner-disjoint"), ("splits_owner_day", "owner×day")):
                sp = _run(step, path, args.points)
                print(f"make_splits ({mode}), {sp['points']:,} points: {sp['seconds']:.1f} s, peak RSS "
                      f"{sp['peak_rss_gb']:.2f} GB; train/val/test/buffer {sp['train_images']:,}/{sp['val_images']:,}/"
                      f"{sp['test_images']:,}/{sp['buffer_images']:,}, leaks {sp['leaks_within_km']} vs "
                      f"{sp['naive_random_split_leaks_within_km']:,} for a random split; owners in train and val/test "
                      f"{sp['owners_in_train_and_heldout']} ({sp['heldout_share_with_train_owner']:.1%} of val/test "
                      "images)", flush=True)
        eu = _run("euclidean", path, args.compare_points)
        hv = _run("haversine", path, args.compare_points)
        from sklearn.metrics import adjusted_rand_score

        agreement = adjusted_rand_score(*(np.load(Path(path).with_name(f"labels_{s}.npy")) for s in ("euclidean",
                                                                                                     "haversine")))
    for r in (eu, hv):
        print(f"HDBSCAN {r['step']:>9} on {r['points']:,} points: {r['seconds']:.1f} s, peak RSS "
              f"{r['peak_rss_gb']:.2f} GB ({r['rss_before_gb']:.2f} GB resident before the fit), {r['clusters']} clusters, "
              f"noise {r['noise']:.1%}")
    print(f"label agreement between the two (adjusted Rand index): {agreement:.3f}; "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"haversine / projected-Euclidean HDBSCAN: {hv['seconds'] / eu['seconds']:.1f}x time, "
          f"{hv['peak_rss_gb'] / eu['peak_rss_gb']:.1f}x peak RSS")
    print(f"full {build['points']:,}-point build vs one haversine HDBSCAN on {hv['points']:,} points: "
          f"{hv['seconds'] / build['seconds']:.2f}x (ratio of wall times)")


if __name__ == "__main__":
    main()
