"""Scale bench section (issue 13): the catalog, first build and incremental rebuild.

Makes real stored files (small JPEGs with EXIF GPS and dates, distinct bytes, content-addressed paths) and raw
manifests split over 28 files like 4 sources x 7 provinces (coordinates from the source for 70 % of rows, EXIF for
the rest; ~0.5 % missing files and ~0.5 % duplicate bytes) in a temp folder it deletes, then measures, each step in
a forked child (so each peak RSS is its own):

- ``baseline``: the catalog build before this change (copied below from git: it can no longer be imported) at
  ``--baseline-rows`` (100k), and the new engine on the same rows from scratch: rows/s ratio in the same process;
- ``first build``: the new engine from scratch on ``--files`` rows (200k by default), every header read;
- for sizes above ``--files``: a build of that many rows whose files' headers are all known (rows beyond
  ``--files`` reuse its files under new image ids, and the header cache is seeded with their facts), i.e. every
  manifest resolved again but no header read: it measures the memory at that size and the non-header time; the
  first build at that size is extrapolated from the measured first build's rows/s (header reads dominate);
- ``incremental``: one manifest rewritten with 10k more rows (10k new files), rebuilt from the state.

Prints one JSON object per line on stdout (the ``bench/bench_scale.py`` interface), everything else on stderr.

Usage: python bench/scale_catalog.py [--sizes 1000000,10000000] [--files 200000] [--baseline-rows 100000] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench_scale import in_child as _in_child  # forked, non-daemonic: a build may start worker processes
from pipeline.catalog.build import (
    HEADER_SCHEMA,
    build_catalog_files,
    future_date_detail,
    header_dir,
    header_facts,
)
from pipeline.core import reasons
from pipeline.core.reasons import rejection
from pipeline.core.exif import DecompressionBomb, NotAnImage, read_header
from pipeline.core.schema import (
    CATALOG_SCHEMA, RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, empty_frame, fill_optional, to_table,
)
from pipeline.core.store import ImageStore
from pipeline.core.values import is_missing

STAGE = "catalog"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
SOURCES = ("flickr", "yfcc100m", "gldv2", "local")
PROVINCES = ("sindh", "punjab", "kpk", "ict", "gb", "balochistan", "ajk")
Progress = Callable[[int, int], None]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- the old build
def _present(v) -> bool:
    return not is_missing(v)


STAGE_OLD = "catalog"
NEWER_COLUMNS = ("taken_at_source",)  # catalog columns added after the old build (issue 17: where the date came from)


def baseline_build_catalog(
    manifests: Iterable[pd.DataFrame],
    store: ImageStore,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (catalog, rejections). Sources are taken in the order given; the first row with given bytes wins."""
    frames = [m for m in manifests if len(m)]
    raw = pd.concat(frames, ignore_index=True) if frames else empty_frame(RAW_MANIFEST_SCHEMA)
    to_table(raw, RAW_MANIFEST_SCHEMA, check_values=False)  # a manifest with wrong columns/types fails loudly
    now = now or dt.datetime.now(dt.timezone.utc)
    kept: list[dict] = []
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    total = len(raw)
    for i, row in enumerate(raw.to_dict("records")):
        if progress and (i % 500 == 0 or i == total - 1):
            progress(i + 1, total)
        path = store.abspath(row["path"])
        if not Path(path).is_file():
            rejected.append(rejection(STAGE_OLD, row, reasons.MISSING_FILE, str(row["path"])))
            continue
        try:
            header = read_header(path.read_bytes())
        except NotAnImage as exc:
            code = reasons.DECOMPRESSION_BOMB if isinstance(exc, DecompressionBomb) else reasons.NOT_AN_IMAGE
            rejected.append(rejection(STAGE_OLD, row, code, str(exc)[:200]))
            continue
        lat, lon = row.get("lat"), row.get("lon")
        if not (_present(lat) and _present(lon)):
            lat, lon = header.lat, header.lon
        if lat is None or lon is None:
            detail = header.gps_error or "no GPS in source metadata or EXIF"
            rejected.append(rejection(STAGE_OLD, row, reasons.NO_COORDINATES, detail))
            continue
        lat, lon = float(lat), float(lon)
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
            rejected.append(rejection(STAGE_OLD, row, reasons.INVALID_COORDINATES, f"lat={lat} lon={lon}"))
            continue
        from_source = _present(row.get("taken_at"))
        taken = pd.Timestamp(row.get("taken_at")).tz_convert("UTC") if from_source else header.taken_at
        if taken is not None and pd.Timestamp(taken) > pd.Timestamp(now):
            # the camera's offset is known when the date is the EXIF one (a source may have copied it)
            same = header.taken_at is not None and pd.Timestamp(header.taken_at) == pd.Timestamp(taken)
            offset = header.utc_offset if same else None
            rejected.append(rejection(STAGE_OLD, row, reasons.FUTURE_DATE, future_date_detail(taken, offset)))
            continue
        image_id = str(row["image_id"])
        if image_id in seen:
            rejected.append(rejection(STAGE_OLD, row, reasons.DUPLICATE_BYTES, f"kept {seen[image_id]}"))
            continue
        seen[image_id] = f"{row['source']}:{row['source_id']}"
        acc = row.get("geo_accuracy")
        kept.append(
            {
                **{k: row.get(k) for k in CATALOG_SCHEMA.names if k in row},
                "lat": lat,
                "lon": lon,
                "geo_accuracy": float(acc) if _present(acc) else header.accuracy_m,
                "taken_at": taken,
                "width": header.width,
                "height": header.height,
            }
        )
    catalog = pd.DataFrame(kept, columns=CATALOG_SCHEMA.names) if kept else empty_frame(CATALOG_SCHEMA)
    catalog["taken_at"] = pd.to_datetime(catalog["taken_at"], utc=True)
    rejections = pd.DataFrame(rejected, columns=REJECTIONS_SCHEMA.names) if rejected else empty_frame(REJECTIONS_SCHEMA)
    return catalog, rejections


# ---------------------------------------------------------------------------------------------- synthetic data
def _jpegs() -> list[bytes]:
    """Eight small JPEGs with EXIF GPS (and a date for half of them): the variety a header read meets."""
    from PIL import ExifTags, Image

    out = []
    rng = np.random.default_rng(0)
    for k in range(8):
        ex = Image.Exif()
        gps = ex.get_ifd(ExifTags.IFD.GPSInfo)
        lat, lon = 24.0 + k * 1.3, 67.0 + k * 0.9
        gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLongitudeRef] = "N", "E"
        gps[ExifTags.GPS.GPSLatitude] = (float(int(lat)), 30.0, 12.5)
        gps[ExifTags.GPS.GPSLongitude] = (float(int(lon)), 15.0, 40.25)
        if k % 2 == 0:
            sub = ex.get_ifd(ExifTags.IFD.Exif)
            sub[ExifTags.Base.DateTimeOriginal] = f"2019:0{1 + k}:14 09:26:53"
            sub[ExifTags.Base.OffsetTimeOriginal] = "+05:00"
        if k == 3:
            ex[ExifTags.Base.Orientation] = 6
        buf = io.BytesIO()
        img = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        img.save(buf, "JPEG", quality=80, exif=ex)
        out.append(buf.getvalue())
    return out


def make_files(root: Path, start: int, n: int, out: Path) -> None:
    """``n`` stored files with distinct bytes (a counter after the JPEG's end), at their content address."""
    bases = _jpegs()
    ids, paths, made = [], [], set()
    for j in range(start, start + n):
        data = bases[j % len(bases)] + j.to_bytes(8, "little")
        image_id = hashlib.sha256(data).hexdigest()
        rel = f"images/{image_id[:2]}/{image_id[2:4]}/{image_id}.jpg"
        folder = rel.rsplit("/", 1)[0]
        if folder not in made:
            (root / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        with open(root / rel, "wb") as f:
            f.write(data)
        ids.append(image_id)
        paths.append(rel)
    pq.write_table(pa.table({"image_id": ids, "path": paths}), out)


def make_files_parallel(root: Path, n: int, out: Path, makers: int) -> None:
    """``make_files`` over ``makers`` forked processes (file creation is bound by the file system's per-file
    work, which runs on all cores): each makes a contiguous range, then their lists are joined in order."""
    import multiprocessing as mp

    makers = max(1, min(makers, n))
    bounds = [n * k // makers for k in range(makers + 1)]
    parts = [out.with_name(f"{out.stem}.part{k}.parquet") for k in range(makers)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=make_files, args=(root, bounds[k], bounds[k + 1] - bounds[k], parts[k]))
             for k in range(makers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"making files failed: exit codes {[p.exitcode for p in procs]}")
    pq.write_table(pa.concat_tables(pq.read_table(p) for p in parts), out)
    for p in parts:
        p.unlink()


def _synthetic_ids(j: np.ndarray) -> list[str]:
    h = (j.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xD1B54A32D192ED03)
    return [f"{v:016x}{w:016x}" * 2 for v, w in zip(h.tolist(), (h * np.uint64(31)).tolist())]


def manifest_tables(files: pa.Table, rows: int, start: int = 0) -> pa.Table:
    """Rows ``start``..``start+rows``: row j uses file j (its real id) while there are files, then file j mod F
    under a synthetic id; every 200th row names a missing file, every 199th repeats an earlier row's bytes."""
    j = np.arange(start, start + rows)
    nfiles = len(files)
    fidx = j % nfiles
    ids = np.asarray(files["image_id"].take(pa.array(fidx)).to_pylist(), dtype=object)
    beyond = j >= nfiles
    if beyond.any():
        ids[beyond] = _synthetic_ids(j[beyond])
    paths = np.asarray(files["path"].take(pa.array(fidx)).to_pylist(), dtype=object)
    missing = j % 200 == 7
    paths[missing] = [f"images/00/00/missing-{k}.jpg" for k in j[missing]]
    dup = (j % 199 == 11) & (j > 11)
    ids[dup], paths[dup] = ids[np.flatnonzero(dup) - 11], paths[np.flatnonzero(dup) - 11]
    rng = np.random.default_rng(start)
    from_source = rng.random(rows) < 0.7
    lat = np.where(from_source, rng.uniform(24, 36, rows), np.nan)
    lon = np.where(from_source, rng.uniform(61, 77, rows), np.nan)
    taken = pa.array(np.where(rng.random(rows) < 0.5, 1_500_000_000_000_000 + j * 1_000_000, 0), pa.int64())
    taken = pc.if_else(pc.equal(taken, 0), pa.scalar(None, pa.int64()), taken).cast(pa.timestamp("us", tz="UTC"))
    n = rows
    return fill_optional(pa.table({
        "image_id": pa.array(ids, pa.string()),
        "source": pa.array([SOURCES[k % 4] for k in j], pa.string()),
        "source_id": pa.array(j.astype(str), pa.string()),
        "source_url": pa.nulls(n, pa.string()),
        "path": pa.array(paths, pa.string()),
        "lat": pa.array(lat, pa.float64(), from_pandas=True),
        "lon": pa.array(lon, pa.float64(), from_pandas=True),
        "geo_accuracy": pa.array(np.where(from_source, 16.0, np.nan), pa.float64(), from_pandas=True),
        "taken_at": taken,
        "owner": pa.array(np.char.add("user", (j % 5000).astype(str)).astype(object), pa.string()),
        "license": pa.array(["CC-BY-2.0"] * n, pa.string()),
        "title": pa.nulls(n, pa.string()),
        "tags": pa.nulls(n, pa.string()),
        "place_id": pa.nulls(n, pa.string()),
    }), RAW_MANIFEST_SCHEMA).select(RAW_MANIFEST_SCHEMA.names).cast(RAW_MANIFEST_SCHEMA)


def write_manifests(folder: Path, files_path: Path, rows: int) -> list[Path]:
    """``rows`` rows over 28 manifests (source x province), written in blocks (run in a child: the list of files
    is read here, so that the builds, forked from the parent, do not carry it in their memory)."""
    files = pq.read_table(files_path)
    per = math.ceil(rows / 28)
    out = []
    for k in range(28):
        start, n = k * per, max(0, min(per, rows - k * per))
        path = folder / SOURCES[k // 7] / PROVINCES[k % 7] / "manifest.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(path, RAW_MANIFEST_SCHEMA, compression="zstd") as w:
            for s in range(start, start + n, 250_000):
                w.write_table(manifest_tables(files, min(250_000, start + n - s), s))
        out.append(path)
    return sorted(out)


def seed_headers(root: Path, state: Path, known_state: Path, files_path: Path, rows: int) -> None:
    """Header cache entries for rows beyond the real files: their synthetic ids, with the facts (and the file
    size/mtime) of the file they share, taken from a real build's cache."""
    files = pq.read_table(files_path)
    known = pa.concat_tables(pq.read_table(p) for p in sorted(header_dir(known_state).glob("*.parquet")))
    by_id = {i: k for k, i in enumerate(known["image_id"].to_pylist())}
    extra = []  # files no row of the real build read (their rows were missing-file or duplicate rows)
    for image_id, rel in zip(files["image_id"].to_pylist(), files["path"].to_pylist()):
        if image_id not in by_id:
            path = root / rel
            st = path.stat()
            by_id[image_id] = len(known) + len(extra)
            extra.append((image_id, st.st_size, st.st_mtime_ns) + header_facts(path.read_bytes()))
    if extra:
        cols = list(zip(*extra))
        known = pa.concat_tables([known.cast(HEADER_SCHEMA), pa.table(
            {f.name: pa.array(c, type=f.type) for f, c in zip(HEADER_SCHEMA, cols)}, schema=HEADER_SCHEMA)])
    pos = np.asarray([by_id[i] for i in files["image_id"].to_pylist()])
    header_dir(state).mkdir(parents=True, exist_ok=True)
    for p in header_dir(known_state).glob("*.parquet"):
        shutil.copy(p, header_dir(state) / p.name)
    nfiles = len(files)
    for s in range(nfiles, rows, 1_000_000):
        j = np.arange(s, min(rows, s + 1_000_000))
        part = known.take(pa.array(pos[j % nfiles]))
        part = part.set_column(0, "image_id", pa.array(_synthetic_ids(j), pa.string()))
        pq.write_table(part.cast(HEADER_SCHEMA), header_dir(state) / f"seed-{s:012d}.parquet")


# ---------------------------------------------------------------------------------------------- measuring
def _run_new(root: str, manifests: list[str], out: str, state: str, workers: int) -> dict:
    t = time.perf_counter()
    st = build_catalog_files([Path(m) for m in manifests], ImageStore(root), Path(out) / "catalog.parquet",
                             Path(out) / "rejections.parquet", Path(state), now=NOW, workers=workers)
    return {"seconds": time.perf_counter() - t, "rss": rss_mb(), "rows": st.rows, "rejected": st.rejected,
            "headers_read": st.headers_read, "resolved": st.manifests_resolved, "split": st.seconds}


def _run_old(root: str, manifests: list[str], out: str) -> dict:
    frames = [pq.read_table(m).to_pandas() for m in manifests]
    t = time.perf_counter()
    catalog, rejections = baseline_build_catalog(frames, ImageStore(root), now=NOW)
    seconds = time.perf_counter() - t
    pq.write_table(to_table(catalog, CATALOG_SCHEMA), Path(out) / "catalog_old.parquet")
    pq.write_table(to_table(rejections, REJECTIONS_SCHEMA), Path(out) / "rejections_old.parquet")
    return {"seconds": seconds, "rss": rss_mb(), "rows": len(catalog), "rejected": len(rejections)}


def _grow(root: str, manifest: str, files_out: str, start: int, n: int) -> None:
    """Rewrite one manifest with ``n`` more rows on ``n`` new files (what a crawl that found more photos does)."""
    make_files(Path(root), start, n, Path(files_out))
    new = manifest_tables(pq.read_table(files_out), n, 0)
    grown = pa.concat_tables([pq.read_table(manifest), new.set_column(
        2, "source_id", pc.binary_join_element_wise("new-", new["source_id"], "")).cast(RAW_MANIFEST_SCHEMA)])
    pq.write_table(grown, manifest, compression="zstd")


def emit(**row) -> None:
    print(json.dumps({"stage": STAGE, "baseline_seconds": None, **row}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--files", type=int, default=200_000, help="distinct stored files (first build size); 200k: "
                    "about 1.5 min to make on the 2-core dev machine; 10 M need ~41 GB of disk (4 KiB a file)")
    ap.add_argument("--baseline-rows", type=int, default=100_000)
    ap.add_argument("--grow", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--makers", type=int, default=os.cpu_count() or 1,
                    help="processes making the stored files (default: one per core)")
    ap.add_argument("--folder", default=None, help="work here and keep it: stored files already made there "
                    "(files.parquet, root/) are reused, so a 10 M run need not make them again")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sizes = sorted(int(s) for s in a.sizes.split(",") if s)
    if a.quick:
        sizes, a.files, a.baseline_rows, a.grow = [4000, 12000], 4000, 2000, 500
    tmp = Path(a.folder) if a.folder else Path(tempfile.mkdtemp(prefix="geopak-scale-catalog-"))
    root = tmp / "root"
    try:
        t = time.perf_counter()
        nfiles = min(a.files, max(sizes))
        files = tmp / "files.parquet"
        if files.exists() and pq.ParquetFile(files).metadata.num_rows == nfiles:
            log(f"reusing the {nfiles:,} stored files in {tmp}")
            for old in (p for p in tmp.iterdir() if p.is_dir() and p.name != "root"):
                shutil.rmtree(old)  # the outputs of an earlier run there
        else:
            make_files_parallel(root, nfiles, files, a.makers)
            log(f"made {nfiles:,} stored files in {time.perf_counter() - t:.0f} s ({a.makers} processes), "
                f"{shutil.disk_usage(tmp).free / 1e9:.0f} GB left on the disk")

        # baseline: the old build and the new one, same rows, same process tree
        base_m = _in_child(write_manifests, tmp / "m_base", files, a.baseline_rows)
        (tmp / "o_base").mkdir()
        old = _in_child(_run_old, str(root), [str(m) for m in base_m], str(tmp / "o_base"))
        new = _in_child(_run_new, str(root), [str(m) for m in base_m], str(tmp / "o_base"), str(tmp / "s_base"),
                        a.workers)
        same = pq.read_table(tmp / "o_base" / "catalog.parquet").drop_columns(list(NEWER_COLUMNS)).equals(
            pq.read_table(tmp / "o_base" / "catalog_old.parquet").cast(CATALOG_SCHEMA).drop_columns(
                list(NEWER_COLUMNS)))
        same_rej = pq.read_table(tmp / "o_base" / "rejections.parquet").equals(
            pq.read_table(tmp / "o_base" / "rejections_old.parquet").cast(REJECTIONS_SCHEMA))
        log(f"baseline {a.baseline_rows:,} rows: old {old['seconds']:.1f} s ({old['rss']:.0f} MB), new "
            f"{new['seconds']:.1f} s ({new['rss']:.0f} MB); identical catalog {same}, rejections {same_rej}")
        emit(stage=f"{STAGE} first build", size=a.baseline_rows, seconds=round(new["seconds"], 2),
             peak_rss_mb=round(new["rss"], 1), measured=True, baseline_seconds=round(old["seconds"], 2),
             note=f"vs the old build in the same run: {old['seconds'] / new['seconds']:.1f}x rows/s "
                  f"({a.baseline_rows / old['seconds']:,.0f} -> {a.baseline_rows / new['seconds']:,.0f} rows/s), "
                  f"old peak {old['rss']:.0f} MB; output identical: catalog {same} (but for "
                  f"{', '.join(NEWER_COLUMNS)}, which it did not have), rejections {same_rej}; "
                  f"{a.workers} header-read processes")

        # first build with every header read, at the number of files made
        first_m = _in_child(write_manifests, tmp / "m_first", files, nfiles)
        (tmp / "o_first").mkdir()
        first = _in_child(_run_new, str(root), [str(m) for m in first_m], str(tmp / "o_first"),
                          str(tmp / "s_first"), a.workers)
        rate = nfiles / first["seconds"]
        log(f"first build {nfiles:,} rows: {first['seconds']:.1f} s, {first['rss']:.0f} MB, {first['split']}")
        emit(stage=f"{STAGE} first build", size=nfiles, seconds=round(first["seconds"], 2),
             peak_rss_mb=round(first["rss"], 1), measured=True,
             note=f"{rate:,.0f} rows/s, {first['headers_read']:,} headers read; old build at this size "
                  f"~{nfiles / (a.baseline_rows / old['seconds']):,.0f} s (linear from its rows/s)")
        inc = _grow_and_build(a, root, tmp, first_m[0], str(tmp / "o_first"), str(tmp / "s_first"), nfiles)
        emit(stage=f"{STAGE} incremental +{a.grow:,}", size=nfiles, seconds=round(inc["seconds"], 2),
             peak_rss_mb=round(inc["rss"], 1), measured=True,
             note=f"one manifest rewritten with {a.grow:,} more rows: {inc['resolved']} of 28 manifests resolved, "
                  f"{inc['headers_read']:,} headers read")

        for size in (s for s in sizes if s > nfiles):
            big_m = _in_child(write_manifests, tmp / f"m_{size}", files, size)
            state = tmp / f"s_{size}"
            _in_child(seed_headers, root, state, tmp / "s_first", files, size)
            (tmp / f"o_{size}").mkdir()
            known = _in_child(_run_new, str(root), [str(m) for m in big_m], str(tmp / f"o_{size}"), str(state),
                              a.workers)
            log(f"{size:,} rows, headers known: {known['seconds']:.1f} s, {known['rss']:.0f} MB, {known['split']}")
            emit(stage=f"{STAGE} build, every header known", size=size, seconds=round(known["seconds"], 2),
                 peak_rss_mb=round(known["rss"], 1), measured=True,
                 note=f"all 28 manifests resolved ({known['rows']:,} rows kept), {known['headers_read']} headers "
                      f"read: the first build's non-header work and its memory at this size")
            emit(stage=f"{STAGE} first build", size=size, seconds=round(size / rate, 1), peak_rss_mb=None,
                 measured=False, note=f"extrapolated: {size:,} rows at the measured first build's {rate:,.0f} "
                                      f"rows/s ({nfiles:,} rows); memory as the measured build at this size")
            inc = _grow_and_build(a, root, tmp, big_m[0], str(tmp / f"o_{size}"), str(state), size + 10**9)
            emit(stage=f"{STAGE} incremental +{a.grow:,}", size=size, seconds=round(inc["seconds"], 2),
                 peak_rss_mb=round(inc["rss"], 1), measured=True,
                 note=f"one manifest rewritten with {a.grow:,} more rows: {inc['resolved']} of 28 manifests "
                      f"resolved, {inc['headers_read']:,} headers read, every other row's file re-stat'ed")
    finally:
        if not a.folder:
            shutil.rmtree(tmp, ignore_errors=True)


def _grow_and_build(a, root: Path, tmp: Path, manifest: Path, out: str, state: str, start: int) -> dict:
    _in_child(_grow, str(root), str(manifest), str(tmp / f"grow-{start}.parquet"), start, a.grow)
    manifests = sorted(str(p) for p in Path(manifest).parents[2].glob("**/manifest.parquet"))
    inc = _in_child(_run_new, str(root), manifests, out, state, a.workers)
    log(f"incremental +{a.grow:,}: {inc['seconds']:.1f} s, {inc['rss']:.0f} MB, {inc['split']}")
    return inc


if __name__ == "__main__":
    main()
