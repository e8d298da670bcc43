"""The filtering stage as one function: every catalog row is kept or rejected with exactly one reason.

Checks run cheapest first and each row stops at its first failure, so no work is spent on rows already out:

1. identical ``image_id`` (defensive: the catalog already drops duplicate bytes) -> ``duplicate_bytes``;
2. geotag sanity on catalog columns: ``null_island``, ``outside_pakistan``, ``inaccurate_geotag``;
3. licence allowlist per source -> ``license_not_allowed``;
4. one read and decode per image (cached by ``image_id``, committed in chunks): ``missing_file``,
   ``bytes_changed`` (the bytes' sha256 is no longer their id), ``not_an_image``, ``decompression_bomb``,
   ``unsupported_format``, ``undecodable``, then thresholds on the metrics: ``too_small``, ``bad_aspect_ratio``,
   ``near_uniform``, ``blurred``;
5. near duplicates among the survivors (256-bit pHash, union-find, best copy kept) -> ``near_duplicate``;
6. indoor scenes by zero-shot CLIP, only with real pretrained weights -> ``indoor``.

Step 4 also writes the training copy of each image that needs one (``pipeline.core.copies``) from the same decode,
when given a copy cache; copies of images rejected at step 4 or later are dropped at the end, so only kept images
keep one and the shard writer need not decode them again.

Steps 4 and 6 are the long ones; both add their results to their caches chunk by chunk (``commit_rows`` images or
about ``commit_seconds`` of work each), so a killed run resumes where it stopped, losing at most one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core import reasons
from pipeline.core.provinces import BY_ID
from pipeline.core.reasons import rejection
from pipeline.core.schema import REJECTIONS_SCHEMA, empty_frame
from pipeline.core.store import ImageStore
from pipeline.filters.cache import ImageValueCache, commit_in_chunks
from pipeline.core.copies import CopyCache
from pipeline.core.decode import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS
from pipeline.filters.dedup import CopyFacts, group_near_duplicates, hash_words, near_duplicate_detail
from pipeline.filters.geotag import DEFAULT_ACCURACY_RULES, AccuracyRule, geotag_reasons
from pipeline.filters.indoor import ClipSpec, IndoorClassifier, check_weights, indoor_scores
from pipeline.filters.licenses import DEFAULT_ALLOWED, license_reasons
from pipeline.filters.metrics import MetricsParams, cached_metrics

STAGE = "filter"
KEPT = "kept"
OUTSIDE_KEY = "outside"
INDOOR_COLUMNS = {"image_id": "string", "key": "string", "p_indoor": "Float64"}
Log = Callable[[str], None]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FilterConfig:
    """Every threshold of the stage. Defaults suit real photos and keep the sample world's good images; the
    sample-world figures below were measured over five worlds (9,100 images of 160 and 256 px, seeds 0-2).

    - ``min_short_side`` 64 px: drops thumbnails and icons; the smallest good sample images (160 px long side,
      16:9) are 90 px, the planted "tiny" ones at most 56 px.
    - ``max_aspect_ratio`` 3: 2:1 panoramas pass, strips and banners do not.
    - ``min_grey_std`` 4 (0-255 grey levels at analysis size): blank frames measure at most 1.0, good images at
      least 6.4.
    - ``min_sharpness`` 3.4 (Laplacian variance at ``blur_size`` = 128 px): only heavy blur; the planted blurred
      images measure at most 3.1 and the smoothest good ones (featureless hazy desert) at least 3.7. Sharp real
      photos score in the hundreds at this size, so production crawls can raise it after looking at the examples.
    - ``phash_max_distance`` 24 of 256 bits: resized/re-compressed copies differ by at most 12 bits, different
      images by at least 36 (see ``pipeline.filters.dedup``).
    - ``indoor_threshold`` 0.8: reject only when CLIP is fairly sure (a wrongly dropped outdoor photo costs more
      than a kept indoor one).
    """

    # Each field's "doc" and bounds are what the Launchpad shows (pipeline.defs.config); the reasons are above.
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "doc": "images with more pixels are rejected as decompression bombs before decoding", "ge": 1})
    allowed_formats: tuple[str, ...] = field(default=DEFAULT_FORMATS, metadata={
        "doc": "Pillow format names kept (upper case); other formats are rejected as unsupported_format"})
    analysis_size: int = field(default=256, metadata={
        "doc": "long side in px at which images are decoded for the quality metrics and pHash", "ge": 32})
    blur_size: int = field(default=128, metadata={
        "doc": "long side in px at which sharpness (Laplacian variance) is measured", "ge": 16})
    min_short_side: int = field(default=64, metadata={
        "doc": "images whose short side is smaller (px) are rejected as too_small (thumbnails, icons)", "ge": 0})
    max_aspect_ratio: float = field(default=3.0, metadata={
        "doc": "long/short side above this is rejected as bad_aspect_ratio (2:1 panoramas pass)", "ge": 1.0})
    min_grey_std: float = field(default=4.0, metadata={
        "doc": "grey-level standard deviation (0-255) below this is rejected as near_uniform", "ge": 0.0})
    min_sharpness: float = field(default=3.4, metadata={
        "doc": "Laplacian variance at blur_size below this is rejected as blurred (raise for real photos)",
        "ge": 0.0})
    phash_max_distance: int = field(default=24, metadata={
        "doc": "256-bit pHashes this close (bits) are near duplicates; the best copy is kept", "ge": 0, "le": 256})
    accuracy_rules: Mapping[str, AccuracyRule] = field(default_factory=lambda: dict(DEFAULT_ACCURACY_RULES),
                                                       metadata={"doc": "source ('*' = any other) -> geotag "
                                                                 "accuracy rule; rows failing it are "
                                                                 "inaccurate_geotag"})
    allowed_licenses: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ALLOWED), metadata={
        "doc": "source ('*' = any other) -> licences kept: families (cc, cc0, public_domain, "
               "no_known_restrictions, us_government, all_rights_reserved), names ('CC BY 4.0') or patterns "
               "('CC BY*' = 'all CC BY')"})
    license_free_sources: tuple[str, ...] = field(default=("local",), metadata={
        "doc": "sources whose licences are not checked (your own images: you hold the rights)"})
    clip: ClipSpec = field(default=ClipSpec(), metadata={
        "doc": "the CLIP model that scores indoor scenes (only real pretrained weights are used)"})
    indoor_threshold: float = field(default=0.8, metadata={
        "doc": "CLIP P(indoor) at or above this is rejected as indoor", "ge": 0.0, "le": 1.0})
    clip_batch_size: int = field(default=32, metadata={"doc": "images per CLIP forward pass", "ge": 1})
    workers: int = field(default=2, metadata={"doc": "processes decoding images for the metrics", "ge": 1})
    chunk_size: int = field(default=16, metadata={"doc": "images per task sent to a worker process", "ge": 1})
    commit_rows: int = field(default=2000, metadata={
        "doc": "at most this many images are measured (or CLIP-scored) before they are committed to the cache; "
               "a killed run loses at most one such chunk", "ge": 1})
    commit_seconds: float = field(default=60.0, metadata={
        "doc": "and at most about this much work (seconds) per committed chunk", "gt": 0.0})
    copy_short_side: int = field(default=320, metadata={
        "doc": "short side (px) of the training copy made from the filter's decode of each kept image; keep it "
               "equal to image_shards' short_side or the shard stage decodes every image again (0 = no copies)",
        "ge": 0, "le": 4096})
    copy_quality: int = field(default=90, metadata={
        "doc": "JPEG quality of those copies (keep it equal to image_shards' quality)", "ge": 50, "le": 100})

    @property
    def metrics_params(self) -> MetricsParams:
        return MetricsParams(self.analysis_size, self.blur_size, self.max_pixels, tuple(self.allowed_formats),
                             copy_short_side=self.copy_short_side, copy_quality=self.copy_quality)


@dataclass(frozen=True)
class FilterResult:
    kept: pd.DataFrame  # catalog columns + sharpness, phash, indoor_score
    rejections: pd.DataFrame  # REJECTIONS_SCHEMA, stage "filter"
    outcomes: pd.DataFrame  # one row per input row: ids, source, province_key, outcome ('kept' or reason), detail
    indoor_evaluated: bool
    indoor_note: str
    metrics_computed: int
    metrics_reused: int
    duplicate_groups: int
    metrics_rechecked: int = 0  # cached images re-read because their file's size or mtime changed
    copies_kept: int = 0  # kept images with a training copy in the copy cache
    copies_dropped: int = 0  # copies made for images the filter then rejected, removed


class _Verdicts:
    """One (reason, detail) slot per row; a row keeps the first reason it gets."""

    def __init__(self, n: int):
        self.reason = np.full(n, "", dtype=object)
        self.detail = np.full(n, "", dtype=object)

    def open(self) -> np.ndarray:
        return self.reason == ""

    def set(self, rows: np.ndarray, code: str | np.ndarray, detail) -> None:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        codes = np.broadcast_to(np.asarray(code, dtype=object), rows.shape)
        details = np.broadcast_to(np.asarray(detail, dtype=object), rows.shape)
        free = self.reason[rows] == ""
        self.reason[rows[free]] = codes[free]
        self.detail[rows[free]] = details[free]


def filter_catalog(
    catalog: pd.DataFrame,
    store: ImageStore,
    locator,
    cfg: FilterConfig,
    metrics_cache: str | Path,
    indoor_cache: str | Path,
    progress: Progress | None = None,
    log: Log | None = None,
    scheduler_address: str | None = None,
    copy_dir: str | Path | None = None,
) -> FilterResult:
    """Keep or reject every row of ``catalog`` (CATALOG_SCHEMA). ``locator`` maps (lat, lon) to province ids.
    ``scheduler_address``: decode on that Dask cluster's workers instead of local processes (same result).
    ``copy_dir``: the training-copy cache (``<data root>/copies``) the decode writes into; None makes no copies."""
    log = log or (lambda _msg: None)
    df = catalog.reset_index(drop=True)
    n = len(df)
    v = _Verdicts(n)

    # 1. the same image twice (the catalog should have caught it; never keep both)
    dup = df["image_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        first = df.drop_duplicates("image_id").set_index("image_id")
        v.set(dup, reasons.DUPLICATE_BYTES, [f"same image_id as {first.at[i, 'source']}:{first.at[i, 'source_id']}"
                                             for i in df.loc[dup, "image_id"]])
    # 2-3. geotag and licence: catalog columns only
    province_ids = np.asarray(locator.locate(df["lat"].to_numpy(float), df["lon"].to_numpy(float)))
    code, detail = geotag_reasons(df, province_ids, cfg.accuracy_rules)
    v.set(code != "", code[code != ""], detail[code != ""])
    code, detail = license_reasons(df, cfg.allowed_licenses, cfg.license_free_sources)
    v.set(code != "", code[code != ""], detail[code != ""])

    # 4. one decode per image, cached
    rows = np.flatnonzero(v.open())
    items = [(str(df.at[k, "image_id"]), str(store.abspath(df.at[k, "path"]))) for k in rows]
    params = cfg.metrics_params if copy_dir is None else replace(cfg.metrics_params, copy_dir=str(copy_dir))
    cm = cached_metrics(items, params, metrics_cache, cfg.workers, cfg.chunk_size, progress,
                        commit_rows=cfg.commit_rows, commit_seconds=cfg.commit_seconds,
                        scheduler_address=scheduler_address)
    log(f"image metrics: {cm.computed} decoded ({cm.rechecked} of them because their file changed), "
        f"{cm.reused} from the cache, {cm.shards_written} chunks committed")
    m = cm.metrics
    metric_cols = pd.DataFrame(index=range(n), columns=["sharpness", "phash"]).astype({"sharpness": "Float64",
                                                                                       "phash": "string"})
    if len(rows):
        metric_cols.loc[rows, "sharpness"] = m["sharpness"].to_numpy()
        metric_cols.loc[rows, "phash"] = m["phash"].to_numpy()
        _quality_verdicts(v, rows, m, cfg)

    measured = rows
    # 5. near duplicates among the survivors
    rows = np.flatnonzero(v.open())
    groups = 0
    if len(rows) > 1:
        w, h = df.loc[rows, "width"].to_numpy(np.int64), df.loc[rows, "height"].to_numpy(np.int64)
        sharp = metric_cols.loc[rows, "sharpness"].to_numpy(dtype=float, na_value=np.nan)
        ids = df.loc[rows, "image_id"].astype(str).tolist()
        # words decoded from an Arrow column (no Python str per row), the column dropped at once (640 MB of text
        # at 10 M rows) and the words handed over: the call compacts and reorders them in place, no copy
        words = hash_words(pa.array(metric_cols.loc[rows, "phash"], type=pa.string()))
        g = group_near_duplicates(ids, words, w * h, sharp, cfg.phash_max_distance, words_owned=True)
        groups = int(len(np.unique(g.kept_index[g.group_size > 1])))
        out = np.flatnonzero(g.rejected)
        if len(out):
            kk = g.kept_index[out]
            srcs = df.loc[rows, "source"].astype(str).tolist()
            sids = df.loc[rows, "source_id"].astype(str).tolist()

            def facts(k: int) -> CopyFacts:
                return CopyFacts(srcs[k], sids[k], int(w[k]), int(h[k]), float(sharp[k]))

            v.set(rows[out], reasons.NEAR_DUPLICATE, [
                near_duplicate_detail(facts(k), facts(o), int(g.group_size[o]), int(g.distance[o]))
                for o, k in zip(out, kk)
            ])

    # 6. indoor scenes
    indoor = np.full(n, np.nan)
    rows = np.flatnonzero(v.open())
    evaluated, note = _indoor(df, rows, store, cfg, indoor_cache, indoor, log)
    if evaluated:
        hit = rows[np.nan_to_num(indoor[rows], nan=0.0) >= cfg.indoor_threshold]
        v.set(hit, reasons.INDOOR, [f"p_indoor={indoor[k]:.3f} >= {cfg.indoor_threshold}" for k in hit])

    keep = v.open()
    copies_kept, copies_dropped = _settle_copies(df, measured, keep, params)
    kept = df[keep].copy()
    kept["sharpness"] = metric_cols.loc[keep, "sharpness"].astype("float64").to_numpy()
    kept["phash"] = metric_cols.loc[keep, "phash"].astype(object).to_numpy()
    kept["indoor_score"] = indoor[keep]
    kept = kept.reset_index(drop=True)
    records = df[~keep].to_dict("records")
    rej = [rejection(STAGE, r, v.reason[k], str(v.detail[k])) for r, k in zip(records, np.flatnonzero(~keep))]
    rejections = pd.DataFrame(rej, columns=REJECTIONS_SCHEMA.names) if rej else empty_frame(REJECTIONS_SCHEMA)
    outcomes = pd.DataFrame({
        "image_id": df["image_id"], "source": df["source"], "source_id": df["source_id"], "path": df["path"],
        "province_key": [BY_ID[int(p)].key if p in BY_ID else OUTSIDE_KEY for p in province_ids],
        "outcome": np.where(keep, KEPT, v.reason), "detail": v.detail,
    })
    return FilterResult(kept, rejections, outcomes, evaluated, note, cm.computed, cm.reused, groups, cm.rechecked,
                        copies_kept, copies_dropped)


def _settle_copies(df: pd.DataFrame, measured: np.ndarray, keep: np.ndarray,
                   params: MetricsParams) -> tuple[int, int]:
    """Drop the training copies of measured images the filter rejected (their copy would only take space); returns
    (kept images that have a copy, copies dropped)."""
    spec = params.copy_spec
    if spec is None or params.copy_dir is None:
        return 0, 0
    cache = CopyCache(params.copy_dir, spec)
    kept_ids = set(df.loc[keep, "image_id"].astype(str))
    rejected = {str(i) for i in df.loc[measured[~keep[measured]], "image_id"]} - kept_ids
    return sum(cache.has(i) for i in kept_ids), cache.drop(rejected)


def _quality_verdicts(v: _Verdicts, rows: np.ndarray, m: pd.DataFrame, cfg: FilterConfig) -> None:
    """Decode failures, then size, aspect, uniformity and blur thresholds, in that order."""
    err = m["error"].notna().to_numpy()
    v.set(rows[err], m.loc[err, "error"].to_numpy(dtype=object), m.loc[err, "error_detail"].fillna("").to_numpy())
    ok = ~err
    w = m["width"].to_numpy(dtype=float, na_value=np.nan)
    h = m["height"].to_numpy(dtype=float, na_value=np.nan)
    short, long_ = np.fmin(w, h), np.fmax(w, h)
    sharp = m["sharpness"].to_numpy(dtype=float, na_value=np.nan)
    std = m["grey_std"].to_numpy(dtype=float, na_value=np.nan)
    grange = m["grey_range"].to_numpy(dtype=float, na_value=np.nan)
    size = cfg.blur_size
    checks = (
        (short < cfg.min_short_side, reasons.TOO_SMALL,
         lambda k: f"{w[k]:.0f}x{h[k]:.0f}: short side {short[k]:.0f} px < {cfg.min_short_side}"),
        (long_ / np.fmax(short, 1) > cfg.max_aspect_ratio, reasons.BAD_ASPECT_RATIO,
         lambda k: f"{w[k]:.0f}x{h[k]:.0f}: aspect {long_[k] / max(short[k], 1):.2f} > {cfg.max_aspect_ratio}"),
        (std < cfg.min_grey_std, reasons.NEAR_UNIFORM,
         lambda k: f"grey std {std[k]:.2f} < {cfg.min_grey_std} (1-99% range {grange[k]:.0f})"),
        (sharp < cfg.min_sharpness, reasons.BLURRED,
         lambda k: f"sharpness {sharp[k]:.2f} < {cfg.min_sharpness} (Laplacian variance at <= {size} px)"),
    )
    for mask, code, text in checks:
        hit = np.flatnonzero(ok & mask)  # NaN metrics compare False
        v.set(rows[hit], code, [text(k) for k in hit])


def _indoor(df: pd.DataFrame, rows: np.ndarray, store: ImageStore, cfg: FilterConfig, cache_path: str | Path,
            out: np.ndarray, log: Log) -> tuple[bool, str]:
    """Fill ``out[rows]`` with p_indoor when real weights are available; (evaluated, note for metadata)."""
    avail = check_weights(cfg.clip)
    if not avail.ok:
        return False, f"not evaluated (no pretrained CLIP weights: {avail.why}); all images passed through"
    cache = ImageValueCache(cache_path, INDOOR_COLUMNS)
    key = cfg.clip.key
    ids = df.loc[rows, "image_id"].astype(str).tolist()
    cached, missing = cache.lookup(ids, key)
    new: list[pd.DataFrame] = []
    if missing:
        try:
            classifier = IndoorClassifier(cfg.clip)
        except Exception as exc:  # noqa: BLE001 - a broken or mismatched checkpoint: say so, filter nothing
            reason = f"{type(exc).__name__}: {exc}"[:300]
            return False, f"not evaluated (no pretrained CLIP weights: loading {avail.why} failed: {reason}); " \
                          "all images passed through"
        path_of = dict(zip(ids, df.loc[rows, "path"]))

        def score(chunk, _offset: int) -> pd.DataFrame:
            scores = indoor_scores(classifier, [store.abspath(path_of[i]) for i in chunk], cfg.clip_batch_size,
                                   cfg.max_pixels)
            return cache.frame([{"image_id": i, "key": key, "p_indoor": float(s)} for i, s in zip(chunk, scores)])

        new = commit_in_chunks(cache, missing, score, cfg.commit_rows, cfg.commit_seconds)
    log(f"indoor CLIP scores: {len(missing)} computed ({len(new)} chunks committed), "
        f"{len(ids) - len(missing)} from the cache")
    if ids:
        out[rows] = cache.in_order([cached, *new], ids)["p_indoor"].to_numpy(dtype=float, na_value=np.nan)
    unscored = int(np.isnan(out[rows]).sum())
    return True, (f"evaluated with {avail.why}: reject when p_indoor >= {cfg.indoor_threshold}"
                  + (f"; {unscored} images could not be scored and were kept" if unscored else ""))
