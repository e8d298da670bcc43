"""YFCC100M crawler: stream the ``yfcc100m_dataset`` metadata (TSV, optionally .bz2/.gz) and download the photos.

The file is read in blocks with pyarrow (never whole); each block is one unit of crawl state, so a killed run skips
the blocks it finished, and a fully read file is not read again. Rows are kept when their coordinate falls in the
province's bbox and then in its polygon; photo id, owner, date taken, accuracy, licence and URLs are stored. Images
come from a configured mirror (e.g. the multimedia-commons S3 copy, keyed by the photo hash) and, failing that, from
the original Flickr download URL — many of which are dead now (recorded as ``download_failed``).

Two layouts are recognised from the field count: the 25-column 2016 release (line number and photo hash first) and
the 23-column SQLite/older dump. Text fields are URL-encoded with ``+`` for spaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote_plus

import pandas as pd
import pyarrow as pa

from pipeline.core import reasons
from pipeline.sources.crawl import (
    CrawlContext,
    RowCounter,
    Source,
    local_datetime_to_utc,
    read_delimited,
    scan_in_chunks,
    to_float,
)
from pipeline.sources.http import Fetched, HttpSettings, HttpStats, download_session, fetch_first

COLUMNS_2016 = (
    "line", "photoid", "hash", "uid", "unickname", "datetaken", "dateuploaded", "capturedevice", "title",
    "description", "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl", "downloadurl",
    "licensename", "licenseurl", "serverid", "farmid", "secret", "secretoriginal", "ext", "marker",
)
COLUMNS_SQL = tuple(c for c in COLUMNS_2016 if c not in ("line", "hash"))
KEEP = ("photoid", "uid", "unickname", "datetaken", "title", "usertags", "longitude", "latitude", "accuracy",
        "pageurl", "downloadurl", "licensename", "ext", "marker")
MIRROR_FIELDS = ("photoid", "hash", "hash_a", "hash_b", "ext")


@dataclass(frozen=True)
class YfccConfig:
    metadata_path: str
    # e.g. "https://multimedia-commons.s3-us-west-2.amazonaws.com/data/images/{hash_a}/{hash_b}/{hash}.jpg"
    # placeholders: {photoid} {hash} {hash_a} (= hash[:3]) {hash_b} (= hash[3:6]) {ext}
    mirror_url_template: str = ""
    min_accuracy: int = 11
    licenses: tuple[str, ...] = ()  # licence names to keep; empty keeps all (YFCC100M is all Creative Commons)
    block_mb: float = 16
    downloads_per_second: float = 20.0  # 0: unlimited


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
        self.cfg = cfg
        self.http = http
        self.downloads = download_session(http, stats, cfg.downloads_per_second)

    def params(self) -> dict:
        c = self.cfg
        return {"metadata_path": c.metadata_path, "min_accuracy": c.min_accuracy, "licenses": sorted(c.licenses),
                "block_mb": c.block_mb, "mirror": bool(c.mirror_url_template)}

    # ------------------------------------------------------------------------------------------------ discovery
    def discover(self, ctx: CrawlContext) -> None:
        columns = detect_columns(self.cfg.metadata_path)
        keep_cols = KEEP + (("hash",) if "hash" in columns else ())
        bad = RowCounter()
        batches = read_delimited(self.cfg.metadata_path, columns, keep_cols, delimiter="\t", header=False,
                                 block_mb=self.cfg.block_mb, bad_rows=bad)
        x0, y0, x1, y1 = ctx.bbox

        def handle(batch: pa.RecordBatch):
            df = batch.to_pandas()
            lat = pd.to_numeric(df["latitude"], errors="coerce")
            lon = pd.to_numeric(df["longitude"], errors="coerce")
            records = df[(lat >= y0) & (lat <= y1) & (lon >= x0) & (lon <= x1)].to_dict("records")
            keep, rejected = self.sort_items([str(r["photoid"]) for r in records], records, ctx)
            return keep, rejected, {"in_bbox": len(records)}

        scanned_before = ctx.state.meta_get("chunk_complete")
        scan_in_chunks(ctx, "chunk", batches, handle)
        if not scanned_before:  # every scan reads from the start, so the count covers the whole file
            ctx.state.meta_set("malformed_lines", {"count": bad.count, "examples": bad.examples})
            if bad.count:
                ctx.info(f"yfcc100m: {bad.count} malformed lines skipped, e.g. {bad.examples}")

    def summary(self, state) -> dict[str, float]:
        return {"malformed lines skipped": float((state.meta_get("malformed_lines") or {}).get("count", 0))}

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return ctx.judge_located(records, "latitude", "longitude", self._check)

    def _check(self, r: dict) -> str | None:
        if str(r.get("marker", "0")).strip() not in ("0", ""):
            return reasons.NOT_A_PHOTO
        if self.cfg.licenses and unquote_plus(r.get("licensename") or "") not in self.cfg.licenses:
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

        return {
            "source_url": record.get("pageurl") or None,
            "lat": to_float(record["latitude"]),
            "lon": to_float(record["longitude"]),
            "geo_accuracy": to_float(record.get("accuracy")),  # Flickr level 1-16
            "taken_at": local_datetime_to_utc(record.get("datetaken")),
            "owner": text("unickname") or record.get("uid"),
            "license": text("licensename"),
            "title": text("title"),
            "tags": text("usertags"),
            "place_id": None,
        }
