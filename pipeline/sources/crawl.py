"""The shared crawl driver: discover (source-specific) → download (shared, parallel) → manifest and rejections.

Every source implements ``Source``; ``run_crawl`` owns the crawl state, the downloads, the outputs and the rule that
no secret leaves in an error message. Outputs per source × province under ``raw/<source>/<province>/``:
``manifest.parquet`` (RAW_MANIFEST_SCHEMA; the catalog unions every ``raw/**/manifest.parquet``) and
``rejections.parquet`` (REJECTIONS_SCHEMA, stage ``crawl``), both rebuilt from the state on every run.

One source × province is crawled by one process at a time (an OS lock, ``crawl.lock`` beside the state, which a
second crawler waits ``lock_wait_s`` for and then fails naming the holder's pid), and a crawl running in a spawned
worker (a Dagster step) stops when its launcher dies, so a killed run's orphan never races the rerun.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import ClassVar, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import shapely

from pipeline.core import reasons
from pipeline.core.exif import DEFAULT_UTC_OFFSET
from pipeline.core.paths import DataPaths
from pipeline.core.processes import exclusive_lock, exit_with_parent
from pipeline.core.provinces import BY_KEY, Province
from pipeline.core.reasons import rejection
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, write_table
from pipeline.core.store import ImageStore, sweep_orphan_temps
from pipeline.core.values import is_missing
from pipeline.labels.boundaries import ProvinceBoundaries
from pipeline.sources.crawl_state import DONE, FAILED, PENDING, REJECTED, CrawlState, Rejected
from pipeline.sources.downloads import Fetched, download_all
from pipeline.sources.http import (
    CrawlError,
    HttpSettings,
    HttpStats,
    QuotaExhausted,
    Redactor,
    call_with_retries,
    classify,
)

T = TypeVar("T")
STAGE = "crawl"
Log = Callable[[str], None]


MIN_PHOTO_YEAR = 1826  # the oldest surviving photograph: an earlier date taken is a placeholder


def parse_local_datetime(text: object) -> dt.datetime | None:
    """A source's naive 'date taken' ('2015-06-01 12:34:56[.0]' or '2015-06-01'); None when unreadable."""
    value = str(text).strip()
    for fmt, width in (("%Y-%m-%d %H:%M:%S", 19), ("%Y-%m-%d", 10)):
        try:
            return dt.datetime.strptime(value[:width], fmt)
        except ValueError:
            continue
    return None


def local_datetime_to_utc(local: dt.datetime) -> dt.datetime:
    """A naive local date taken as UTC, read as Pakistan time (UTC+05:00, no DST).

    Flickr's ``datetaken`` (and YFCC's, which is Flickr's) is the camera's local clock as the owner set it, with no
    zone: Flickr says to show it "in the timezone of the photo owner" without conversion
    (flickr.com/services/api/misc.dates.html). The photos we keep lie in Pakistan, so Pakistan time is assumed, as
    for EXIF without OffsetTimeOriginal; a visitor's camera left on home time is off by its offset, which moves the
    day of year by at most one day, and only for photos taken within that many hours of midnight.
    """
    return local.replace(tzinfo=DEFAULT_UTC_OFFSET).astimezone(dt.timezone.utc)


def capture_time(text: object, origin: str, note: str | None = None) -> dict[str, object]:
    """The manifest's ``taken_at``, ``taken_at_source`` and ``date_note`` for a source's naive local date taken.

    ``origin`` names the field (``flickr:datetaken``); a date the source marks as not day-exact is passed as
    ``note`` (why), which keeps it out of ``taken_at``. Missing, unreadable and pre-photography dates get a note of
    their own, "<what>: <value>", so the catalog can count rows per reason (text before the first ': ').
    """
    what = origin.replace(":", " ")
    if note is None:
        missing = is_missing(text, blank_text=True)
        local = None if missing else parse_local_datetime(text)
        if missing:
            note = f"{what} missing"
        elif local is None:
            note = f"{what} unreadable: {str(text)[:40]!r}"
        elif local.year < MIN_PHOTO_YEAR:
            note = f"{what} before {MIN_PHOTO_YEAR} (a placeholder): {str(text)[:19]}"
        else:
            return {"taken_at": local_datetime_to_utc(local), "taken_at_source": origin, "date_note": None}
    return {"taken_at": None, "taken_at_source": None, "date_note": note}


def to_float(value: object) -> float:
    """A number from a source's string or number field; NaN when missing or unreadable."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


@dataclass
class CrawlContext:
    """What a source needs while it discovers: its province, the state, retries and a scrubbed logger."""

    province: Province
    boundaries: ProvinceBoundaries
    state: CrawlState
    store: ImageStore
    paths: DataPaths
    http: HttpSettings
    stats: HttpStats
    redact: Redactor
    log: Log

    @cached_property
    def region(self) -> shapely.Geometry:
        geom = self.boundaries.polygons[self.province.id]
        shapely.prepare(geom)
        return geom

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(min_lon, min_lat, max_lon, max_lat) of the province polygon."""
        return tuple(float(v) for v in self.region.bounds)  # type: ignore[return-value]

    def intersects(self, bbox: Sequence[float]) -> bool:
        return bool(self.region.intersects(shapely.box(*bbox)))

    def location_reasons(self, lat: Sequence[float], lon: Sequence[float]) -> list[str | None]:
        """None for points in this province, else ``other_province`` / ``outside_pakistan``."""
        ids = self.boundaries.locate(np.asarray(lat, dtype=float), np.asarray(lon, dtype=float))
        return [None if i == self.province.id else reasons.OTHER_PROVINCE if i >= 0 else reasons.OUTSIDE_PAKISTAN
                for i in ids]

    def judge_located(
        self, records: list[dict], lat_key: str, lon_key: str, check: Callable[[dict], str | None]
    ) -> list[str | None]:
        """Location first (missing, another province's, outside Pakistan), then the source's own ``check``."""
        lat = [to_float(r.get(lat_key)) for r in records]
        lon = [to_float(r.get(lon_key)) for r in records]
        where = self.location_reasons(lat, lon) if records else []
        return [reasons.NO_COORDINATES if math.isnan(la) or math.isnan(lo) else w if w is not None else check(r)
                for r, la, lo, w in zip(records, lat, lon, where)]

    def retry(self, fn: Callable[[], T], classify_fn: Callable[[BaseException], tuple[str, float | None] | None]) -> T:
        return call_with_retries(fn, self.http.retry, classify_fn, self.stats)

    def info(self, message: str) -> None:
        self.log(self.redact(message))


class RowCounter:
    """Counts malformed rows pyarrow skips (wrong field count), so none disappears unrecorded."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, row) -> str:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"line {row.number}: {str(row.text)[:120]!r}")
        return "skip"


def read_delimited(
    path: str,
    columns: Sequence[str],
    keep: Sequence[str],
    delimiter: str = ",",
    header: bool = True,
    block_mb: float = 16,
    bad_rows: RowCounter | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream a (possibly .bz2/.gz) CSV/TSV as string record batches of about ``block_mb``, in file order."""
    stream = pa.input_stream(path, compression="detect")
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(
            column_names=None if header else list(columns), block_size=max(4096, int(block_mb * 2**20)),
            use_threads=False,
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char='"' if delimiter == "," else False,
            newlines_in_values=False,
            invalid_row_handler=bad_rows,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in columns}, include_columns=list(keep), strings_can_be_null=False
        ),
    )
    yield from reader


def scan_in_chunks(
    ctx: "CrawlContext",
    name: str,
    batches: Iterable[pa.RecordBatch],
    handle: Callable[[pa.RecordBatch], tuple[list, list[Rejected], dict]],
) -> None:
    """Process a file's batches as units ``<name>:<i>`` (resumable by chunk index); a finished file is not re-read."""
    flag = f"{name}_complete"
    if ctx.state.meta_get(flag):
        return
    rows = 0
    for i, batch in enumerate(batches):
        rows += batch.num_rows
        unit_id = f"{name}:{i:07d}"
        if ctx.state.unit_done(unit_id):
            continue
        keep, rejected, result = handle(batch)
        ctx.state.complete_unit(unit_id, keep, rejected, result={"rows": batch.num_rows, **result})
        if i % 50 == 0:
            ctx.info(f"{name}: {rows} rows read")
    ctx.state.meta_set(flag, True)


class Source(ABC):
    """One crawlable source. Subclasses say how to find items, judge them, fetch their bytes and describe them."""

    name: ClassVar[str]
    # reasons decided by parameters (licence, accuracy, ...): revisited when the parameters change
    filter_reasons: ClassVar[tuple[str, ...]] = ()
    # manifest columns beyond RAW_MANIFEST_SCHEMA that manifest_row fills (e.g. when a row was fetched)
    extra_manifest_columns: ClassVar[tuple[str, ...]] = ()
    # record fields the state drops once an item is final (stored or rejected): what the terms do not let us keep
    forget_when_final: ClassVar[tuple[str, ...]] = ()
    # parallel downloads the image host allows (Wikimedia: 2); None: HttpSettings.download_workers
    max_download_workers: ClassVar[int | None] = None

    @abstractmethod
    def params(self) -> dict:
        """What defines the crawl's result; a change restarts discovery (downloads are kept)."""

    def secrets(self) -> list[str]:
        return []

    def classify(self, exc: BaseException) -> tuple[str, float | None] | None:
        """(cause, retry_after) for errors worth retrying; sources add their client library's exceptions."""
        return classify(exc)

    def summary(self, state: CrawlState) -> dict[str, float]:
        """Source-specific facts for the asset metadata (besides the sums of unit results)."""
        return {}

    @abstractmethod
    def discover(self, ctx: CrawlContext) -> None:
        """Fill the state with items (pending or rejected), unit by unit, resumably."""

    @abstractmethod
    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        """A rejection reason per record, or None to keep it."""

    @abstractmethod
    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        """A callable that fetches the item's bytes once (retries are applied around it)."""

    @abstractmethod
    def manifest_row(self, record: dict) -> dict:
        """Catalog fields for one downloaded item (everything but source, source_id, image_id and path)."""

    def sort_items(self, ids: list[str], records: list[dict], ctx: CrawlContext) -> tuple[list, list[Rejected]]:
        """Split found records into (items to download, rejections) with ``judge``; a rejection is final, so its
        record drops the ``forget_when_final`` fields at once (as a finished download's does)."""
        verdicts = self.judge(records, ctx) if records else []
        keep = [(i, r) for i, r, v in zip(ids, records, verdicts) if v is None]
        rejected = [Rejected(i, {k: x for k, x in r.items() if k not in self.forget_when_final}, v)
                    for i, r, v in zip(ids, records, verdicts) if v is not None]
        return keep, rejected


@dataclass
class CrawlResult:
    source: str
    province: str
    manifest: pd.DataFrame
    rejections: pd.DataFrame
    counts: dict
    stats: dict[str, int]
    elapsed_s: float
    downloaded_this_run: int
    reset: bool = False
    summary: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # why the crawl stopped early (quota), its remaining work kept for the next run
    remaining: dict[str, int] = field(default_factory=dict)  # pending units by kind, and items still to download


def run_crawl(
    source: Source,
    province_key: str,
    paths: DataPaths,
    store: ImageStore,
    boundaries: ProvinceBoundaries,
    http: HttpSettings,
    stats: HttpStats,
    log: Log = print,
    discover_only: bool = False,
    lock_wait_s: float = 30.0,
) -> CrawlResult:
    """Crawl one province to completion (or resume one); write its manifest and rejections.

    Raises ``LockHeldError`` when another process still crawls the same source and province after ``lock_wait_s``.
    """
    start = time.monotonic()
    exit_with_parent()  # in a step worker: stop crawling when the launcher is killed
    province = BY_KEY[province_key]
    state_path = paths.crawl_state(source.name, province_key)
    with exclusive_lock(state_path.with_name("crawl.lock"), f"the {source.name}/{province_key} crawl", lock_wait_s):
        return _run_locked(source, province, paths, store, boundaries, http, stats, log, discover_only, start)


def _run_locked(
    source: Source,
    province: Province,
    paths: DataPaths,
    store: ImageStore,
    boundaries: ProvinceBoundaries,
    http: HttpSettings,
    stats: HttpStats,
    log: Log,
    discover_only: bool,
    start: float,
) -> CrawlResult:
    province_key = province.key
    swept = sweep_orphan_temps(store.root / "images")  # half-written downloads of a killed earlier run
    redact = Redactor(source.secrets())
    with CrawlState(paths.crawl_state(source.name, province_key)) as state:
        ctx = CrawlContext(province, boundaries, state, store, paths, http, stats, redact, log)
        reset = state.sync_params(source.params(), source.filter_reasons)
        if reset:
            ctx.info(f"{source.name}/{province_key}: parameters changed, discovery restarts (downloads are kept)")
        if swept:
            ctx.info(f"removed {swept} temp files left by a killed earlier run")
        before = state.counts()["items"].get(DONE, 0)
        stopped = None
        try:
            source.discover(ctx)
            if not discover_only:
                _download_pending(source, ctx)
        except QuotaExhausted as exc:  # not an error of the crawl: stop, keep the rest for the next run
            stopped = redact(str(exc))
            ctx.info(f"{source.name}/{province_key} stopped early, remaining work kept for the next run: {stopped}")
        except CrawlError:
            raise
        except Exception as exc:
            # ``from None``: the original exception (whose text may hold a URL with a key) is not chained
            raise CrawlError(redact(f"{source.name}/{province_key}: {type(exc).__name__}: {exc}")) from None
        state.meta_set(STOPPED_KEY, stopped)
        manifest, rejections = _write_outputs(source, ctx)
        counts = state.counts()
        summary = {**_sum_results(state.unit_results()), **source.summary(state)}
        remaining = remaining_work(state)
    return CrawlResult(
        source=source.name,
        province=province_key,
        manifest=manifest,
        rejections=rejections,
        counts=counts,
        stats=stats.snapshot(),
        elapsed_s=time.monotonic() - start,
        downloaded_this_run=counts["items"].get(DONE, 0) - before,
        reset=reset,
        summary=summary,
        stopped=stopped,
        remaining=remaining,
    )


STOPPED_KEY = "stopped_early"  # crawl-state meta: why the last run stopped early (None when it finished)


def remaining_work(state: CrawlState) -> dict[str, int]:
    """What a stopped or deferred crawl left for the next run: pending units per kind, items still to download."""
    out = {f"units {kind}": n for kind, n in state.unfinished_unit_kinds().items()}
    items = state.counts()["items"]
    out["items to download"] = items.get(PENDING, 0) + items.get(FAILED, 0)
    return out


def _sum_results(results: list[dict]) -> dict[str, float]:
    """Totals of the numeric facts finished units recorded (rows read, splits, capped queries, ...)."""
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, bool | int | float):
                out[f"units: {k}"] = out.get(f"units: {k}", 0) + float(v)
    return out


def _download_pending(source: Source, ctx: CrawlContext) -> None:
    pending = list(ctx.state.pending_items())
    if not pending:
        return
    where = f"{source.name}/{ctx.province.key}"
    http = ctx.http
    if source.max_download_workers is not None and http.download_workers > source.max_download_workers:
        http = replace(http, download_workers=source.max_download_workers)
    ctx.info(f"{where}: downloading {len(pending)} images with {http.download_workers} workers")
    jobs = ((item_id, source.fetcher(record)) for item_id, record in pending)
    outcomes = download_all(jobs, ctx.store, http, ctx.stats, ctx.redact, source.classify)
    for n, out in enumerate(outcomes, start=1):
        ctx.state.record_download(out.item_id, out.image_id, out.path, out.reason, out.detail, out.retry_later,
                                  forget=source.forget_when_final)
        if n % 500 == 0 or n == len(pending):
            ctx.info(f"{where}: {n}/{len(pending)} downloads finished")


def _write_outputs(source: Source, ctx: CrawlContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    items = ctx.state.items()
    done = items[items["status"] == DONE]
    verdicts = source.judge(list(done["record"]), ctx) if len(done) else []
    rows, rejected = [], []
    for row, verdict in zip(done.itertuples(index=False), verdicts):
        if verdict is None:
            rows.append({**source.manifest_row(row.record), "source": source.name, "source_id": row.item_id,
                         "image_id": row.image_id, "path": row.path})
        else:  # downloaded under earlier parameters that no longer admit it
            rejected.append(_rejection(source.name, row.item_id, verdict, "", row.image_id, row.path))
    for row in items[items["status"].isin([REJECTED, FAILED])].itertuples(index=False):
        detail = row.detail or ""
        if row.status == FAILED:
            detail = f"{detail} (retried on the next run)".strip()
        rejected.append(_rejection(source.name, row.item_id, row.reason or reasons.DOWNLOAD_FAILED, detail, None, None))
    manifest = pd.DataFrame(rows, columns=[*RAW_MANIFEST_SCHEMA.names, *source.extra_manifest_columns])
    rejections = pd.DataFrame(rejected, columns=REJECTIONS_SCHEMA.names)
    write_table(manifest, ctx.paths.raw_manifest(source.name, ctx.province.key), RAW_MANIFEST_SCHEMA)
    write_table(rejections, ctx.paths.source_rejections(source.name, ctx.province.key), REJECTIONS_SCHEMA)
    return manifest, rejections


def _rejection(source: str, item_id: str, reason: str, detail: str, image_id, path) -> dict:
    row = {"source": source, "source_id": item_id, "image_id": image_id, "path": path}
    return rejection(STAGE, row, reason, detail)
