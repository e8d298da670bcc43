"""Scale bench section (issue 13): the YFCC100M one-pass discovery, rows/s, plain and .bz2.

Makes a synthetic ``yfcc100m_dataset`` (the 25-column 2016 layout, lines of ~470 bytes like the real file, about
half geotagged worldwide and ~1 % inside Pakistan's bbox) in a temp folder it deletes, then measures, each in a
forked child (so each peak RSS is its own):

- ``discovery``: ``discover_candidates`` — one pass, every province's candidates file written;
- ``baseline``: what each province's crawl did before (stream the whole file, parse, bbox filter: the scan of
  ``Yfcc100mSource.discover`` without its state writes), once; the old total is seven of them.

The plain file has ``--rows`` lines (default 2 M, ~1 GB); the .bz2 file ``--bz2-rows`` (default 400k; compressing
it takes most of the set-up time). Rows for 100 M (and for ``--sizes``) are extrapolated from the measured rates.
Prints one JSON object per line on stdout (the ``bench/bench_scale.py`` interface), everything else on stderr.

Usage: python bench/scale_yfcc.py [--rows 2000000] [--bz2-rows 400000] [--sizes 1000000,10000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import in_child as _in_child  # noqa: E402 - each measurement in its own forked child

STAGE = "YFCC100M discovery"
FULL = 100_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_file(path: Path, rows: int, seed: int = 0) -> None:
    """A YFCC-format TSV: 4,096 distinct line bodies (random text, coordinates) cycled with unique line/photo ids."""
    from pipeline.sources.yfcc100m import COLUMNS_2016

    rng = random.Random(seed)
    words = [f"{rng.getrandbits(36):x}" for _ in range(5000)]
    bodies = []
    for _ in range(4096):
        r = rng.random()
        if r < 0.5:
            lat, lon = "", ""  # not geotagged
        elif r < 0.51:
            lat, lon = f"{rng.uniform(23.5, 37.1):.6f}", f"{rng.uniform(60.9, 77.8):.6f}"  # Pakistan's bbox
        else:
            lat, lon = f"{rng.uniform(-60, 70):.6f}", f"{rng.uniform(-180, 180):.6f}"
        row = {"uid": f"{rng.randrange(10**8)}@N0{rng.randrange(9)}", "unickname": "+".join(rng.sample(words, 2)),
               "datetaken": "2012-05-06 10:20:30.0", "dateuploaded": "1336300000", "capturedevice": "Canon+EOS+7D",
               "title": "+".join(rng.sample(words, 4)), "description": "+".join(rng.sample(words, 12)),
               "usertags": ",".join(rng.sample(words, 6)), "machinetags": "", "longitude": lon, "latitude": lat,
               "accuracy": str(rng.choice([6, 11, 16])) if lat else "", "licensename": "Attribution+License",
               "licenseurl": "http://creativecommons.org/licenses/by/2.0/", "serverid": "1234", "farmid": "2",
               "secret": f"{rng.getrandbits(40):x}", "secretoriginal": f"{rng.getrandbits(40):x}", "ext": "jpg",
               "marker": "0"}
        bodies.append(row)
    with open(path, "w") as f:
        for start in range(0, rows, 100_000):
            out = []
            for i in range(start, min(rows, start + 100_000)):
                b = bodies[i % len(bodies)]
                pid = str(10_000_000 + i)
                fields = {**b, "line": str(i), "photoid": pid, "hash": f"{i:032x}",
                          "pageurl": f"http://www.flickr.com/photos/{b['uid']}/{pid}/",
                          "downloadurl": f"http://farm2.staticflickr.com/1234/{pid}_{b['secret']}.jpg"}
                out.append("\t".join(fields[c] for c in COLUMNS_2016))
            f.write("\n".join(out) + "\n")


def compress(src: Path, dst: Path) -> None:
    if shutil.which("bzip2"):
        with open(dst, "wb") as out:
            subprocess.run(["bzip2", "-c", "-9", str(src)], stdout=out, check=True)
    else:
        import bz2

        dst.write_bytes(bz2.compress(src.read_bytes()))


def _discovery(path: str, root: str, workers: int) -> dict:
    from pipeline.core.paths import DataPaths
    from pipeline.labels.boundaries import ProvinceBoundaries
    from pipeline.sources.yfcc100m import discover_candidates

    boundaries = ProvinceBoundaries.load()
    t = time.perf_counter()
    res = discover_candidates(path, boundaries, DataPaths.at(root), workers=workers, log=lambda m: None, force=True)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rows": res.rows, "decompressor": res.decompressor,
            "candidates": sum(v["in_bbox"] for v in res.provinces.values()),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _baseline(path: str, _root: str, _workers: int) -> dict:
    """One province's scan as ``Yfcc100mSource.discover`` did it for each of the seven provinces."""
    import pandas as pd

    from pipeline.sources.crawl import RowCounter, read_delimited
    from pipeline.sources.yfcc100m import KEEP, detect_columns

    columns = detect_columns(path)
    keep = KEEP + (("hash",) if "hash" in columns else ())
    x0, y0, x1, y1 = 69.3, 27.7, 75.4, 34.0  # Punjab's bbox (about)
    t = time.perf_counter()
    rows = found = 0
    for batch in read_delimited(path, columns, keep, delimiter="\t", header=False, block_mb=16,
                                bad_rows=RowCounter()):
        df = batch.to_pandas()
        lat = pd.to_numeric(df["latitude"], errors="coerce")
        lon = pd.to_numeric(df["longitude"], errors="coerce")
        found += len(df[(lat >= y0) & (lat <= y1) & (lon >= x0) & (lon <= x1)].to_dict("records"))
        rows += len(df)
    return {"seconds": time.perf_counter() - t, "rows": rows, "candidates": found,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _decompress(path: str, threads: int) -> dict:
    """Seconds to decompress the whole file: pyarrow's bz2 (threads 0) or indexed_bzip2 with ``threads``."""
    import pyarrow as pa

    t = time.perf_counter()
    if threads:
        import indexed_bzip2

        stream = indexed_bzip2.open(path, parallelization=threads)
    else:
        stream = pa.input_stream(path, compression="detect")
    n = 0
    while chunk := stream.read(16 << 20):
        n += len(chunk)
    return {"seconds": time.perf_counter() - t, "bytes": n}


def emit(**row) -> None:
    print(json.dumps({"stage": STAGE, "baseline_seconds": None, **row}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--bz2-rows", type=int, default=400_000)
    ap.add_argument("--sizes", default="")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rows, a.bz2_rows = 60_000, 20_000
    tmp = Path(tempfile.mkdtemp(prefix="geopak-scale-yfcc-"))
    try:
        plain, small, packed = tmp / "yfcc100m_dataset", tmp / "small", tmp / "yfcc100m_dataset.bz2"
        t = time.perf_counter()
        make_file(plain, a.rows)
        make_file(small, a.bz2_rows)
        compress(small, packed)
        log(f"made {a.rows:,} rows ({plain.stat().st_size / 1e6:.0f} MB) and {a.bz2_rows:,} rows .bz2 "
            f"({packed.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
        rates = {}
        for label, path, rows in (("plain", plain, a.rows), ("bz2", packed, a.bz2_rows)):
            base = _in_child(_baseline, str(path), str(tmp / "root"), a.workers)
            new = _in_child(_discovery, str(path), str(tmp / "root"), a.workers)
            assert new["rows"] == base["rows"] == rows, (new, base)
            old_total = 7 * base["seconds"]
            rates[label] = rows / new["seconds"]
            log(f"{label}: discovery {new['seconds']:.1f} s ({rates[label]:,.0f} rows/s, {new['decompressor']}), "
                f"one province's old scan {base['seconds']:.1f} s ({rows / base['seconds']:,.0f} rows/s)")
            emit(stage=f"{STAGE} ({label})", size=rows, seconds=round(new["seconds"], 2),
                 peak_rss_mb=round(new["rss"], 1), measured=True, baseline_seconds=round(old_total, 2),
                 note=f"{rates[label]:,.0f} rows/s, decompressor {new['decompressor']}; vs 7 per-province scans "
                      f"({rows / base['seconds']:,.0f} rows/s each): {old_total / new['seconds']:.1f}x; "
                      f"baseline peak {base['rss']:.0f} MB")
        arrow = _in_child(_decompress, str(packed), 0)
        parallel = _in_child(_decompress, str(packed), a.workers)
        mb = arrow["bytes"] / 1e6
        log(f"decompress {mb:.0f} MB: pyarrow bz2 {arrow['seconds']:.1f} s, indexed_bzip2 x{a.workers} "
            f"{parallel['seconds']:.1f} s")
        emit(stage=f"{STAGE}: .bz2 decompression only", size=a.bz2_rows, seconds=round(parallel["seconds"], 2),
             peak_rss_mb=None, measured=True, baseline_seconds=round(arrow["seconds"], 2),
             note=f"{mb / parallel['seconds']:.0f} MB/s with indexed_bzip2 ({a.workers} threads) vs "
                  f"{mb / arrow['seconds']:.0f} MB/s with pyarrow's bz2 (1 thread): "
                  f"{arrow['seconds'] / parallel['seconds']:.1f}x")
        sizes = sorted({FULL, *(int(s) for s in a.sizes.split(",") if s)})
        for label in ("plain", "bz2"):
            for n in sizes:
                emit(stage=f"{STAGE} ({label})", size=n, seconds=round(n / rates[label], 1), peak_rss_mb=None,
                     measured=False, note=f"extrapolated from the measured {rates[label]:,.0f} rows/s "
                                          f"({label}, {os.cpu_count()} cores); memory is flat (blocks of 16 MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
