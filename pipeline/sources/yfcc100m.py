"""YFCC100M crawler: stream the ``yfcc100m_dataset`` metadata (TSV, optionally .bz2/.gz) and download the photos.

The file is read in blocks with pyarrow (never whole); each block is one unit of crawl state, so a killed run skips
the blocks it finished, and a fully read file is not read again. Rows are kept when their coordinate falls in the
province's bbox and then in its polygon; photo id, owner, date taken, accuracy, licence and URLs are stored. Images
come from a configured mirror (e.g. the multimedia-commons S3 copy, keyed by the photo hash) and, failing that, from
the original Flickr download URL — many of which are dead now (recorded as ``download_failed``).

Two layouts are recognised from the field count: the 25-column 2016 release (line number and photo hash first) and
the 23-column 2014 Webscope release / SQLite dump. The 2014 release comes as ten parts, ``yfcc100m_dataset-0`` …
``-9`` (each ``.bz2``): ``metadata_path`` may name one file, a folder holding the parts, or a glob; parts are read
in numeric order, and each is resumed on its own. Text fields are URL-encoded with ``+`` for spaces; user tags are
a comma-separated list of encoded tags, so they are split before decoding (an encoded comma stays in its tag).
Dates taken are Flickr's (no granularity column): a missing, unreadable or placeholder date, or the first of a month
at midnight (how Flickr stores a month- or year-only date), keeps its coordinates with ``taken_at`` null and a
``date_note``.

One pass serves every province (issue 13): ``discover_candidates`` streams the file once (``indexed_bzip2``'s
parallel bz2 decoder when installed), keeps the rows inside the union of the province bboxes (vectorised), locates
them (point in polygon, vectorised per block) and writes each province's bbox rows to its own Parquet file, with a
record of the file it read. A province crawl configured with ``discovery_path`` then reads only its candidates file
(the per-province logic is unchanged: bbox, polygon, licence, accuracy), instead of the whole 100 M-row file; the
discovery run's id is one of its parameters, so a new discovery restarts its discovery (downloads are kept).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.provinces import PROVINCES
from pipeline.core.store import atomic_path, atomic_write_bytes
from pipeline.filters.licenses import check_selector, license_selected
from pipeline.labels.boundaries import ProvinceBoundaries
from pipeline.sources.crawl import (
    MIN_PHOTO_YEAR,
    CrawlContext,
    Log,
    RowCounter,
    Source,
    capture_time,
    parse_local_datetime,
    read_delimited,
    scan_in_chunks,
    to_float,
)
from pipeline.sources.downloads import Fetched, fetch_first
from pipeline.sources.http import HttpSettings, HttpStats, download_session

COLUMNS_2016 = (
    "line", "photoid", "hash", "uid", "unickname", "datetaken", "dateuploaded", "capturedevice", "title",
    "description", "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl", "downloadurl",
    "licensename", "licenseurl", "serverid", "farmid", "secret", "secretoriginal", "ext", "marker",
)
COLUMNS_SQL = tuple(c for c in COLUMNS_2016 if c not in ("line", "hash"))
KEEP = ("photoid", "uid", "unickname", "datetaken", "title", "usertags", "longitude", "latitude", "accuracy",
        "pageurl", "downloadurl", "licensename", "ext", "marker")
MIRROR_FIELDS = ("photoid", "hash", "hash_a", "hash_b", "ext")
# a metadata file in a folder: the single file, or one of the 2014 release's ten parts (never the .sql database)
PART_NAME = re.compile(r"^yfcc100m_dataset(-\d+)?(\.bz2|\.gz)?$")
DATE_ORIGIN = "yfcc100m:datetaken"


def metadata_parts(path: str) -> list[str]:
    """The metadata files ``path`` names, in reading order: a file; a folder of ``yfcc100m_dataset[-N][.bz2|.gz]``
    files (the 2014 release's ten parts); or a glob. A part present twice (plain and compressed) is refused."""
    given = Path(path)
    if given.is_file():
        return [str(given)]
    if given.is_dir():
        found = [f for f in given.iterdir() if f.is_file() and PART_NAME.match(f.name)]
    elif glob.has_magic(path):
        found = [Path(f) for f in glob.glob(path) if Path(f).is_file()]
    else:
        raise FileNotFoundError(f"YFCC100M metadata not found: {path}")
    if not found:
        raise FileNotFoundError(f"no yfcc100m_dataset file in {path} (a file, a folder of parts, or a glob)")
    stems = [re.sub(r"\.(bz2|gz)$", "", f.name) for f in found]
    twice = sorted({x for x in stems if stems.count(x) > 1})
    if twice:
        raise ValueError(f"{path}: {twice} present more than once (plain and compressed?): keep one of each")
    return [str(f) for f in sorted(found, key=lambda f: _natural(f.name))]


def _natural(name: str) -> list:
    """'yfcc100m_dataset-10' after '-9': digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def metadata_layout(parts: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns, columns kept) shared by every part; parts of different layouts are refused."""
    layouts = {part: detect_columns(part) for part in parts}
    if len(set(layouts.values())) > 1:
        raise ValueError(f"YFCC100M parts differ in layout: "
                         f"{ {Path(k).name: len(v) for k, v in layouts.items()} } fields")
    columns = layouts[parts[0]]
    return columns, KEEP + (("hash",) if "hash" in columns else ())


def yfcc_tags(usertags: str | None) -> list[str]:
    """User tags: split on commas first, then decode each (``%2C`` is a comma inside a tag, ``+`` a space)."""
    return [tag for raw in str(usertags or "").split(",") if (tag := unquote_plus(raw).strip())]


def yfcc_capture_time(text: object) -> dict[str, object]:
    """``taken_at`` from ``datetaken``, except where it can only be a placeholder for a coarser date.

    YFCC has no granularity column, but Flickr stores a month- or year-only date as the first of the month at
    00:00:00 (misc.dates: June 1980 is "1980-06-01 00:00:00", granularity 4): such a date is not trusted to the
    day. A real photo taken exactly at midnight on the 1st is lost to the day-of-year label, not to the dataset."""
    local = parse_local_datetime(text) if isinstance(text, str) else None
    if local is not None and local.year >= MIN_PHOTO_YEAR and local.day == 1 and local.time() == dt.time(0, 0):
        return capture_time(text, DATE_ORIGIN, f"yfcc100m datetaken looks month- or year-only (1st at 00:00:00): "
                                               f"{str(text)[:19]}")
    return capture_time(text, DATE_ORIGIN)


@dataclass(frozen=True)
class YfccConfig:
    metadata_path: str
    # e.g. "https://multimedia-commons.s3-us-west-2.amazonaws.com/data/images/{hash_a}/{hash_b}/{hash}.jpg"
    # placeholders: {photoid} {hash} {hash_a} (= hash[:3]) {hash_b} (= hash[3:6]) {ext}
    mirror_url_template: str = ""
    min_accuracy: int = 11
    # licences kept, as names ("Attribution License"), families ("cc") or patterns ("Attribution*"), as the filter
    # stage takes them; empty keeps all (YFCC100M is all Creative Commons)
    licenses: tuple[str, ...] = ()
    block_mb: float = 16
    downloads_per_second: float = 20.0  # 0: unlimited
    # the discovery pass's record (DataPaths.yfcc_discovery): when set, the crawl reads its province's candidates
    # file instead of the whole metadata file
    discovery_path: str = ""


def detect_columns(path: str) -> tuple[str, ...]:
    """The layout from the first line's field count."""
    with pa.input_stream(path, compression="detect") as f:
        head = f.read(1 << 20)
    n = head.split(b"\n", 1)[0].rstrip(b"\r").count(b"\t") + 1
    layouts = {len(COLUMNS_2016): COLUMNS_2016, len(COLUMNS_SQL): COLUMNS_SQL}
    if n not in layouts:
        raise ValueError(f"{path}: {n} tab-separated fields; a yfcc100m_dataset line has 25 (2016) or 23 fields")
    return layouts[n]


def _mirror_fields(record: dict) -> dict:
    h = record.get("hash") or ""
    ext = record.get("ext") or "jpg"
    return {"photoid": record["photoid"], "hash": h, "hash_a": h[:3], "hash_b": h[3:6], "ext": ext}


class Yfcc100mSource(Source):
    name = "yfcc100m"
    filter_reasons = (reasons.LICENSE_NOT_ALLOWED, reasons.LOW_GEO_ACCURACY, reasons.NO_IMAGE_URL)

    def __init__(self, cfg: YfccConfig, http: HttpSettings, stats: HttpStats):
        if not cfg.metadata_path:
            raise ValueError("YFCC100M needs the path of the yfcc100m_dataset file")
        if cfg.mirror_url_template:
            try:
                cfg.mirror_url_template.format(**dict.fromkeys(MIRROR_FIELDS, "x"))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"mirror_url_template: unknown placeholder {exc}; use {MIRROR_FIELDS}") from exc
        for entry in cfg.licenses:
            check_selector(entry)
        self.cfg = cfg
        self.http = http
        self.downloads = download_session(http, stats, cfg.downloads_per_second)

    def params(self) -> dict:
        c = self.cfg
        params = {"metadata_path": c.metadata_path, "min_accuracy": c.min_accuracy, "licenses": sorted(c.licenses),
                  "block_mb": c.block_mb, "mirror": bool(c.mirror_url_template)}
        if c.discovery_path:  # candidates come from one discovery run: a new run restarts this crawl's discovery
            params["discovery_run"] = read_discovery(c.discovery_path, c.metadata_path)["run_id"]
        return params

    # ------------------------------------------------------------------------------------------------ discovery
    def _handler(self, ctx: CrawlContext) -> Callable[[pa.RecordBatch], tuple]:
        x0, y0, x1, y1 = ctx.bbox

        def handle(batch: pa.RecordBatch):
            df = batch.to_pandas()
            lat = pd.to_numeric(df["latitude"], errors="coerce")
            lon = pd.to_numeric(df["longitude"], errors="coerce")
            records = df[(lat >= y0) & (lat <= y1) & (lon >= x0) & (lon <= x1)].to_dict("records")
            keep, rejected = self.sort_items([str(r["photoid"]) for r in records], records, ctx)
            return keep, rejected, {"in_bbox": len(records)}

        return handle

    def discover(self, ctx: CrawlContext) -> None:
        """Scan the metadata part by part (one file: units ``chunk:<i>``; parts: ``part<k>@<name>:<i>``)."""
        if self.cfg.discovery_path:
            return self._discover_candidates(ctx)
        parts = metadata_parts(self.cfg.metadata_path)
        columns, keep_cols = metadata_layout(parts)
        handle = self._handler(ctx)
        malformed = ctx.state.meta_get("malformed_lines") or {"count": 0, "examples": [], "parts": {}}
        for k, part in enumerate(parts):
            name = "chunk" if len(parts) == 1 else f"part{k}@{Path(part).name}"
            if ctx.state.meta_get(f"{name}_complete"):
                continue
            bad = RowCounter()
            batches = read_delimited(part, columns, keep_cols, delimiter="\t", header=False,
                                     block_mb=self.cfg.block_mb, bad_rows=bad)
            scan_in_chunks(ctx, name, batches, handle)
            # every scan reads its part from the start, so the count covers the whole part
            malformed.setdefault("parts", {})[name] = bad.count
            malformed["count"] = sum(malformed["parts"].values())
            malformed["examples"] = (malformed.get("examples", []) + bad.examples)[:3]
            ctx.state.meta_set("malformed_lines", malformed)
            if bad.count:
                ctx.info(f"yfcc100m: {bad.count} malformed lines skipped in {Path(part).name}, e.g. {bad.examples}")

    def _discover_candidates(self, ctx: CrawlContext) -> None:
        """Read this province's rows from the discovery pass's file, in chunks of ``CANDIDATE_ROWS`` (each a unit)."""
        record = read_discovery(self.cfg.discovery_path, self.cfg.metadata_path)
        path = ctx.paths.yfcc_candidates(ctx.province.key)
        if not path.exists():
            raise DiscoveryMissing(f"YFCC100M candidates for {ctx.province.key} not found at {path}: materialize "
                                   f"yfcc100m_candidates again (its record exists, the file does not)")
        batches = pq.ParquetFile(path).iter_batches(batch_size=CANDIDATE_ROWS, columns=list(record["columns"]))
        scan_in_chunks(ctx, "candidates", batches, self._handler(ctx))
        ctx.state.meta_set("malformed_lines", record["malformed_lines"])
        ctx.state.meta_set("discovery_rows", record["rows"])

    def summary(self, state) -> dict[str, float]:
        out = {"malformed lines skipped": float((state.meta_get("malformed_lines") or {}).get("count", 0))}
        if state.meta_get("discovery_rows") is not None:  # read once by yfcc100m_candidates for every province
            out["metadata rows (one discovery pass)"] = float(state.meta_get("discovery_rows"))
        return out

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return ctx.judge_located(records, "latitude", "longitude", self._check)

    def _check(self, r: dict) -> str | None:
        if str(r.get("marker", "0")).strip() not in ("0", ""):
            return reasons.NOT_A_PHOTO
        name = unquote_plus(r.get("licensename") or "")
        if self.cfg.licenses and not any(license_selected(entry, name) for entry in self.cfg.licenses):
            return reasons.LICENSE_NOT_ALLOWED
        if not to_float(r.get("accuracy")) >= self.cfg.min_accuracy:
            return reasons.LOW_GEO_ACCURACY
        return None if self._urls(r) else reasons.NO_IMAGE_URL

    # ------------------------------------------------------------------------------------------------ download
    def _urls(self, record: dict) -> list[str]:
        urls = []
        if self.cfg.mirror_url_template and (record.get("hash") or "{hash" not in self.cfg.mirror_url_template):
            urls.append(self.cfg.mirror_url_template.format(**_mirror_fields(record)))
        if record.get("downloadurl"):
            urls.append(record["downloadurl"])
        return urls

    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        urls = self._urls(record)
        return lambda: fetch_first(self.downloads, urls, self.http.max_image_bytes)

    def manifest_row(self, record: dict) -> dict:
        def text(key: str) -> str | None:
            return unquote_plus(record[key]) if record.get(key) else None

        # the catalog's tags are space separated (as Flickr's own): a tag's inner spaces are dropped, as Flickr does
        tags = " ".join("".join(tag.split()) for tag in yfcc_tags(record.get("usertags")))
        return {
            "source_url": record.get("pageurl") or None,
            "lat": to_float(record["latitude"]),
            "lon": to_float(record["longitude"]),
            "geo_accuracy": to_float(record.get("accuracy")),  # Flickr level 1-16
            **yfcc_capture_time(record.get("datetaken")),
            "owner": text("unickname") or record.get("uid"),
            "license": text("licensename"),
            "title": text("title"),
            "tags": tags or None,
            "place_id": None,
        }


# ---------------------------------------------------------------------------------------- one-pass discovery
CANDIDATE_ROWS = 50_000  # rows per crawl unit when a province reads its candidates file
# fewer workers: pyarrow's single-threaded bz2. On this 2-core dev machine indexed_bzip2 x2 measured 1.7x pyarrow's
# rate with a core to spare and 0.4-0.6x when other work held both cores (bench/scale_yfcc.py)
PARALLEL_BZ2_MIN_WORKERS = 2
DISCOVERY_VERSION = 1  # bump when what a candidates file holds changes: every province's discovery restarts


class DiscoveryMissing(FileNotFoundError):
    """The one-pass discovery has not run (or ran on another file): the message says what to materialize."""


@dataclass
class DiscoveryResult:
    """What the one pass read and where its rows went (counts per province: in its bbox, in its polygon)."""

    run_id: str
    rows: int
    decompressor: str
    seconds: float
    reused: bool  # the record matched the file: nothing was read
    provinces: dict[str, dict[str, int]] = field(default_factory=dict)
    malformed_lines: dict = field(default_factory=dict)


def _file_fingerprint(path: str) -> dict:
    st = os.stat(path)
    return {"metadata_path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(metadata_path: str, parts: list[str]) -> dict:
    """What a discovery record is checked against: the one file's size and mtime (the record's form since before
    parts were read), or every part's."""
    if len(parts) == 1 and Path(metadata_path).is_file():
        return _file_fingerprint(parts[0])
    return {"metadata_path": os.path.abspath(metadata_path), "parts": [_file_fingerprint(p) for p in parts]}


def read_discovery(discovery_path: str | Path, metadata_path: str) -> dict:
    """The discovery record, checked against the configured metadata file; ``DiscoveryMissing`` says what to run."""
    path = Path(discovery_path)
    if not path.exists():
        raise DiscoveryMissing(f"YFCC100M discovery output not found ({path}): materialize the yfcc100m_candidates "
                               f"asset first (one pass over the metadata file writes every province's candidates)")
    record = json.loads(path.read_text())
    now = _fingerprint(metadata_path, metadata_parts(metadata_path))
    then = {k: record.get(k) for k in now}
    if then != now:
        raise DiscoveryMissing(f"YFCC100M candidates were discovered from {then} but the configured metadata file "
                               f"is {now}: materialize yfcc100m_candidates again")
    return record


def open_metadata(path: str, workers: int, log: Log) -> tuple[object, str]:
    """What ``read_delimited`` reads (a path, or a decompressed stream) and the decompressor's name.

    ``.bz2``: indexed_bzip2's parallel decoder from ``PARALLEL_BZ2_MIN_WORKERS`` workers up; with one worker, or
    when it is not installed, pyarrow's bz2 in one thread, said in the log."""
    if not path.endswith(".bz2"):
        return path, "gzip (pyarrow)" if path.endswith(".gz") else "none"
    if workers < PARALLEL_BZ2_MIN_WORKERS:
        log(f"yfcc100m: {workers} worker(s): decompressing .bz2 with pyarrow in one thread (the parallel decoder "
            f"is used from {PARALLEL_BZ2_MIN_WORKERS} workers)")
        return path, "bz2 (pyarrow, 1 thread)"
    try:
        import indexed_bzip2
    except ImportError:
        log("yfcc100m: indexed_bzip2 is not installed: decompressing .bz2 with pyarrow in one thread (pip install "
            "indexed-bzip2 for a parallel decoder)")
        return path, "bz2 (pyarrow, 1 thread)"
    return pa.PythonFile(indexed_bzip2.open(path, parallelization=workers), mode="r"), \
        f"indexed_bzip2 ({workers} threads)"


def _coordinate(col: pa.Array) -> np.ndarray:
    """Float degrees, NaN where empty or unparsable: Arrow's exact parser, pandas' when Arrow refuses a value."""
    try:
        nulled = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        return pc.cast(nulled, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pd.to_numeric(col.to_pandas(), errors="coerce").to_numpy(dtype=float)


def discover_candidates(
    metadata_path: str,
    boundaries: ProvinceBoundaries,
    paths: DataPaths,
    block_mb: float = 16,
    workers: int | None = None,
    log: Log = print,
    force: bool = False,
) -> DiscoveryResult:
    """Read the metadata once and write every province's bbox rows (with their located ``province_id``).

    Each part (the one file, or each of the 2014 release's ten) leaves its own per-province shards and a record
    under ``candidates/parts/``, so a killed pass resumes at the first unfinished part; the shards are then joined
    into each province's file in part order. Files are written atomically (temp + rename), the record last; a
    record that matches the files and the boundaries means nothing is read again (unless ``force``)."""
    start = time.monotonic()
    workers = workers or os.cpu_count() or 1
    parts = metadata_parts(metadata_path)
    columns, keep_cols = metadata_layout(parts)
    provinces = [(p.key, boundaries.polygons[p.id].bounds) for p in PROVINCES if p.id in boundaries.polygons]
    settings = [boundaries.source, [k for k, _ in provinces], len(columns), DISCOVERY_VERSION, CANDIDATE_ROWS]
    fingerprint = _fingerprint(metadata_path, parts)
    run_id = hashlib.sha256(json.dumps([fingerprint, *settings]).encode()).hexdigest()[:16]
    record_path = paths.yfcc_discovery
    if not force and record_path.exists():
        old = json.loads(record_path.read_text())
        if old.get("run_id") == run_id and all(paths.yfcc_candidates(k).exists() for k, _ in provinces):
            log(f"yfcc100m: {metadata_path} was already discovered (run {run_id}): nothing to read")
            return DiscoveryResult(run_id, old["rows"], old["decompressor"], time.monotonic() - start, True,
                                   old["provinces"], old["malformed_lines"])
    shards = record_path.parent / "parts"
    done = []
    for k, part in enumerate(parts):
        folder = shards / f"{k:02d}-{Path(part).name}"
        part_id = hashlib.sha256(json.dumps([_file_fingerprint(part), *settings]).encode()).hexdigest()[:16]
        kept = folder / "part.json"
        old = json.loads(kept.read_text()) if kept.exists() and not force else {}
        if old.get("part_id") == part_id and all((folder / f"{key}.parquet").exists() for key, _ in provinces):
            log(f"yfcc100m: {Path(part).name} was read by an earlier, interrupted pass: not read again")
        else:
            old = {"part_id": part_id, **_discover_part(part, columns, keep_cols, boundaries, provinces, folder,
                                                        block_mb, workers, log)}
            atomic_write_bytes(kept, json.dumps(old, indent=1).encode())
        done.append((folder, old))
    schema = _candidate_schema(keep_cols)
    for key, _ in provinces:
        with atomic_path(paths.yfcc_candidates(key)) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for folder, _ in done:
                w.write_table(pq.read_table(folder / f"{key}.parquet"))
    counts = {key: {n: sum(r["provinces"][key][n] for _, r in done) for n in ("in_bbox", "in_province")}
              for key, _ in provinces}
    rows = sum(r["rows"] for _, r in done)
    malformed = {"count": sum(r["malformed_lines"]["count"] for _, r in done),
                 "examples": [e for _, r in done for e in r["malformed_lines"]["examples"]][:3]}
    how = ", ".join(dict.fromkeys(r["decompressor"] for _, r in done))
    seconds = time.monotonic() - start
    record = {**fingerprint, "run_id": run_id, "rows": rows, "decompressor": how, "seconds": round(seconds, 2),
              "columns": list(keep_cols), "provinces": counts, "malformed_lines": malformed,
              "boundaries": boundaries.source}
    atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())
    shutil.rmtree(shards, ignore_errors=True)  # joined into the province files, which the record now vouches for
    return DiscoveryResult(run_id, rows, how, seconds, False, counts, malformed)


def _candidate_schema(keep_cols: tuple[str, ...]) -> pa.Schema:
    return pa.schema([pa.field(c, pa.string()) for c in keep_cols] + [pa.field("province_id", pa.int16())])


def _discover_part(
    part: str,
    columns: tuple[str, ...],
    keep_cols: tuple[str, ...],
    boundaries: ProvinceBoundaries,
    provinces: list[tuple[str, tuple[float, float, float, float]]],
    folder: Path,
    block_mb: float,
    workers: int,
    log: Log,
) -> dict:
    """One part's pass: its rows in each province's bbox, written to ``folder/<province>.parquet``; its counts."""
    bad = RowCounter()
    source, how = open_metadata(part, workers, log)
    log(f"yfcc100m: one pass over {part} ({os.stat(part).st_size:,} bytes), decompressor: {how}")
    batches = read_delimited(source, columns, keep_cols, delimiter="\t", header=False, block_mb=block_mb,
                             bad_rows=bad)
    x0 = min(b[0] for _, b in provinces)
    y0 = min(b[1] for _, b in provinces)
    x1 = max(b[2] for _, b in provinces)
    y1 = max(b[3] for _, b in provinces)
    schema = _candidate_schema(keep_cols)
    counts = {k: {"in_bbox": 0, "in_province": 0} for k, _ in provinces}
    ids = {p.key: p.id for p in PROVINCES}
    rows = 0
    with contextlib.ExitStack() as stack:
        writers = {}
        for key, _ in provinces:
            tmp = stack.enter_context(atomic_path(folder / f"{key}.parquet"))
            writers[key] = stack.enter_context(pq.ParquetWriter(tmp, schema, compression="zstd"))
        for i, batch in enumerate(batches):
            rows += batch.num_rows
            lat, lon = _coordinate(batch.column("latitude")), _coordinate(batch.column("longitude"))
            near = (lat >= y0) & (lat <= y1) & (lon >= x0) & (lon <= x1)  # NaN compares False
            if near.any():
                sub = pa.Table.from_batches([batch]).filter(pa.array(near))
                la, lo = lat[near], lon[near]
                where = boundaries.locate(la, lo)
                sub = sub.append_column("province_id", pa.array(where, pa.int16()))
                for key, (bx0, by0, bx1, by1) in provinces:
                    mine = (la >= by0) & (la <= by1) & (lo >= bx0) & (lo <= bx1)
                    if mine.any():
                        writers[key].write_table(sub.filter(pa.array(mine)))
                        counts[key]["in_bbox"] += int(mine.sum())
                        counts[key]["in_province"] += int((where[mine] == ids[key]).sum())
            if i % 50 == 0:
                log(f"yfcc100m discovery: {rows:,} rows read from {Path(part).name}")
        for w in writers.values():
            w.close()
    if bad.count:
        log(f"yfcc100m: {bad.count} malformed lines skipped in {Path(part).name}, e.g. {bad.examples}")
    return {"rows": rows, "decompressor": how, "provinces": counts,
            "malformed_lines": {"count": bad.count, "examples": bad.examples}}
