"""Crawl assets: Flickr, Google Places, YFCC100M and GLDv2, each partitioned by province (``crawl_job``).

Thin wrappers over ``pipeline.sources``: each partition crawls one province to completion (resuming a killed run
from its crawl state), writes ``raw/<source>/<province>/manifest.parquet`` — which ``image_catalog`` unions with
every other manifest — and reports counts, retries and rejections. A source that is disabled or lacks credentials
or files is skipped with a warning and materialized as skipped, saying why (``pipeline.defs.source_status``); it
never fails the run. Secrets come only through
``EnvVar`` and never reach logs, metadata or files.
"""

from collections.abc import Iterator
from typing import ClassVar, Literal, Optional

import dagster as dg
import pandas as pd
from pydantic import Field, PrivateAttr

from pipeline.core.paths import DataPaths
from pipeline.core.processes import exclusive_lock
from pipeline.core.provinces import PROVINCE_KEYS
from pipeline.core.report import province_map_png
from pipeline.defs.config import bounded_field, dataclass_kwargs
from pipeline.core.schema import RAW_MANIFEST_SCHEMA
from pipeline.defs.metadata import data_file, md_table, plot, schema_metadata, table_metadata
from pipeline.defs.resources import BoundariesResource, DataRootResource, LaunchEnvResource
from pipeline.defs.source_status import skipped_result
from pipeline.labels.boundaries import ProvinceBoundaries
from pipeline.sources import google_places, places_v1
from pipeline.sources.crawl import STOPPED_KEY, CrawlResult, Source, remaining_work, run_crawl
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.flickr import DEFAULT_REST_URL, OPEN_LICENSES, FlickrConfig, FlickrSource
from pipeline.sources.gldv2 import DEFAULT_WIKIDATA_API, Gldv2Config, Gldv2Source
from pipeline.sources.google_places import GooglePlacesSource, PlacesConfig
from pipeline.sources.http import CONTACT_ENV, HttpSettings, HttpStats, RetryPolicy, user_agent
from pipeline.sources.places_terms import expire_stored_places, terms_report
from pipeline.sources.places_v1 import PlacesV1Config, PlacesV1Source, billing_table
from pipeline.sources.yfcc100m import DiscoveryMissing, Yfcc100mSource, YfccConfig, discover_candidates, read_discovery

PROVINCE_PARTITIONS = dg.StaticPartitionsDefinition(list(PROVINCE_KEYS))
# run tag of an incremental Flickr crawl: only photos uploaded since (pipeline.defs.automation sets it)
MIN_UPLOAD_TAG = "geopak/min_upload_date"
CRAWL_GROUP = "crawl"


class CrawlResource(LaunchEnvResource):
    """Settings every crawler shares: HTTP timeouts, retries and parallel downloads. Secrets and paths left empty
    are read from the environment at run start, so they never enter the run config. `contact` (empty:
    GEOPAK_CONTACT) goes into the User-Agent, which Wikimedia requires (GLDv2 refuses to start without one)."""

    enabled: bool = Field(default=True, description="false: the source is skipped (its partitions record why)")
    timeout_s: float = bounded_field(30.0, "seconds per HTTP request before it counts as failed", gt=0)
    download_deadline_s: float = bounded_field(300.0, "seconds a whole image download may take; a host that "
                                               "trickles bytes is cut off there and retried", gt=0)
    max_attempts: int = bounded_field(6, "tries per request before a unit or download gives up", ge=1)
    backoff_base_s: float = bounded_field(1.0, "first retry delay; doubles per attempt, with jitter", ge=0)
    backoff_max_s: float = bounded_field(60.0, "longest retry delay", ge=0)
    download_workers: int = bounded_field(8, "parallel image downloads", ge=1)
    max_image_mb: float = bounded_field(25.0, "larger images are rejected without being stored", gt=0)
    contact: str = Field(default="", description="an e-mail or URL where you can be reached, sent in the "
                         f"User-Agent (Wikimedia refuses requests without one); empty: {CONTACT_ENV} at run start")
    user_agent: str = Field(default="", description="User-Agent header of every request; empty: GeoPak/<version> "
                            "(<contact>) python-requests/<version>")

    def _read_env(self) -> dict[str, str]:
        """The resource's own variables plus the contact every crawler shares."""
        return {"contact": (dg.EnvVar(CONTACT_ENV).get_value("") or "").strip(), **super()._read_env()}

    def http_settings(self, paths: DataPaths) -> HttpSettings:
        return HttpSettings(
            timeout_s=self.timeout_s,
            body_deadline_s=self.download_deadline_s,
            retry=RetryPolicy(max_attempts=self.max_attempts, base_delay_s=self.backoff_base_s,
                              max_delay_s=self.backoff_max_s),
            download_workers=self.download_workers,
            max_image_bytes=int(self.max_image_mb * 2**20),
            user_agent=self.user_agent or user_agent(self.text("contact")),
            rate_limit_db=str(paths.rate_limits),
        )

    def skip_reason(self) -> str | None:
        """Why this source does not run (disabled, or not configured); None when it runs."""
        if not self.enabled:
            return "disabled in its resource config (enabled: false)"
        return self.missing()

    def missing(self) -> str | None:
        raise NotImplementedError

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        raise NotImplementedError


class FlickrResource(CrawlResource):
    """Flickr photos.search. Set FLICKR_API_KEY and FLICKR_API_SECRET to enable it."""

    ENV: ClassVar[dict[str, str]] = {"api_key": "FLICKR_API_KEY", "api_secret": "FLICKR_API_SECRET"}

    api_key: str = Field(default="", description="empty: FLICKR_API_KEY at run start (never shown or logged)")
    api_secret: str = Field(default="", description="empty: FLICKR_API_SECRET at run start (never shown or logged)")
    rest_url: str = Field(default=DEFAULT_REST_URL, description="Flickr REST endpoint")
    queries_per_hour: float = bounded_field(3600.0, "API budget per key (Flickr's limit: 3600)", gt=0)
    min_taken_date: str = Field(default="2000-01-01", description="earliest taken date searched (YYYY-MM-DD)")
    max_taken_date: str = Field(default="", description="empty: when the province's crawl first started; set a "
                                "later date to pick up newer photos")
    licenses: list[str] = Field(default=list(OPEN_LICENSES), description="licences kept, resolved against "
                                "flickr.photos.licenses.getInfo at each crawl: ids ('11'), names ('CC BY 4.0', "
                                "'Public Domain Mark', 'No known copyright restrictions'), families (cc, cc0, "
                                "public_domain, no_known_restrictions, us_government) or patterns ('CC BY*' = "
                                "'all CC BY'); default: all but All Rights Reserved")
    min_accuracy: int = bounded_field(11, "Flickr geo accuracy kept: 1 world … 11 city … 16 street", ge=1, le=16)
    sizes: list[str] = Field(default=["url_l", "url_c", "url_z", "url_m"], description="image sizes asked for; the "
                             "first one present is downloaded")
    min_tile_deg: float = bounded_field(0.01, "a search over 4,000 results is split by area down to tiles this small "
                                        "(degrees)", gt=0)
    min_window_hours: float = bounded_field(1.0, "… then by taken date down to windows this short (hours)", gt=0)
    min_upload_date: str = Field(default="", description="only photos uploaded at or after this UTC date/time (ISO); "
                                 f"the run tag {MIN_UPLOAD_TAG} (set by the weekly schedule) wins; empty: all")
    _run_floor: str = PrivateAttr(default="")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        super().setup_for_execution(context)
        run = context.dagster_run
        self._run_floor = run.tags.get(MIN_UPLOAD_TAG, "") if run is not None else ""

    def upload_floor(self) -> str:
        """The incremental crawl's floor: the run's tag, else the field ('' = every photo)."""
        return self._run_floor or self.min_upload_date

    def missing(self) -> str | None:
        if not (self.text("api_key") and self.text("api_secret")):
            return "FLICKR_API_KEY and FLICKR_API_SECRET are not set"
        return None

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        cfg = FlickrConfig(**dataclass_kwargs(FlickrConfig, self, api_key=self.text("api_key"),
                                              api_secret=self.text("api_secret"),
                                              min_window_s=int(self.min_window_hours * 3600),
                                              min_upload_date=self.upload_floor()))
        return FlickrSource(cfg, http, stats)


PLACES_ENV = {"enabled": "GEOPAK_GOOGLE_PLACES_ENABLED", "api_key": "GOOGLE_MAPS_API_KEY"}


class GooglePlacesResource(CrawlResource):
    """Google Places: Places API (New) by default (the only one a new Google Cloud project can enable since
    1 March 2025), the legacy Places API with `api: legacy`. OPT-IN: Google's terms restrict storing and
    redistributing Places content. Set GOOGLE_MAPS_API_KEY and GEOPAK_GOOGLE_PLACES_ENABLED=1 (or enabled: true)."""

    ENV: ClassVar[dict[str, str]] = PLACES_ENV

    enabled: Optional[bool] = Field(default=None, description="opt-in; empty: GEOPAK_GOOGLE_PLACES_ENABLED at run "
                                    "start, else off")
    api_key: str = Field(default="", description="empty: GOOGLE_MAPS_API_KEY at run start (never shown or logged)")
    api: Literal["new", "legacy"] = Field(default="new", description='"new": Places API (New), places.googleapis.com '
                                          '(enable "Places API (New)" for the key); "legacy": the legacy Places API, '
                                          "only for projects that still have it enabled")
    base_url: str = Field(default="", description=f"API endpoint; empty: {places_v1.DEFAULT_BASE_URL} (new) or "
                          f"{google_places.DEFAULT_BASE_URL} (legacy)")
    search: Literal["nearby", "text"] = Field(default="nearby", description="new API: nearby (searchNearby in each "
                                              "tile's circle, ≤ 20 places a search) or text (searchText for "
                                              "text_query in each tile's rectangle, ≤ 60 places through pages)")
    text_query: str = Field(default="", description='new API, search: text: the query, e.g. "tourist attraction"')
    queries_per_second: float = bounded_field(10.0, "API budget per key", gt=0)
    tile_deg: float = bounded_field(0.25, "side of the search tiles (degrees)", gt=0)
    min_tile_deg: Optional[float] = bounded_field(
        None, "a tile whose search returns its cap is split down to this side (degrees); empty: "
        f"{places_v1.PlacesV1Config.min_tile_deg} (new: 20 places a nearby search) or "
        f"{google_places.PlacesConfig.min_tile_deg} (legacy: 60)", gt=0)
    place_type: str = Field(default="", description='place type searched, e.g. "tourist_attraction"; empty: any')
    keyword: str = Field(default="", description="legacy API: keyword searched; empty: none")
    max_photos_per_place: int = bounded_field(10, "photos kept per place (Google returns at most 10)", ge=0, le=10)
    max_width: int = bounded_field(1600, "photo width asked for (legacy maximum 1600, new 4800)", ge=1, le=4800)
    page_token_delay_s: float = bounded_field(2.0, "legacy API: wait before asking for the next result page (its "
                                              "token needs time to become valid)", ge=0)
    page_token_tries: int = bounded_field(3, "legacy API: tries of a page token answered INVALID_REQUEST (not ready "
                                          "or expired) before the tile is searched again", ge=1)
    search_restarts: int = bounded_field(1, "legacy API: new searches of a tile whose page token stays invalid; "
                                         "then the tile is left for the next run", ge=0)
    refresh_after_days: float = bounded_field(27.0, "coordinates this old are fetched again from Place Details "
                                              "(Google's terms allow caching them 30 days)", gt=0, lt=30)

    def skip_reason(self) -> str | None:
        if not self.flag("enabled", default=False):
            return ("opt-in only (Google's terms restrict storing and redistributing Places content): set "
                    "GEOPAK_GOOGLE_PLACES_ENABLED=1 or google_places.enabled=true")
        return self.missing()

    def missing(self) -> str | None:
        return None if self.text("api_key") else "GOOGLE_MAPS_API_KEY is not set"

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        config, source, module = ((PlacesConfig, GooglePlacesSource, google_places) if self.api == "legacy"
                                  else (PlacesV1Config, PlacesV1Source, places_v1))
        cfg = config(**dataclass_kwargs(
            config, self, api_key=self.text("api_key"), base_url=self.base_url or module.DEFAULT_BASE_URL,
            min_tile_deg=self.min_tile_deg or config.min_tile_deg))
        return source(cfg, http, stats)


class Yfcc100mResource(CrawlResource):
    """YFCC100M from a local `yfcc100m_dataset` file. Set GEOPAK_YFCC100M_METADATA to enable it."""

    ENV: ClassVar[dict[str, str]] = {"metadata_path": "GEOPAK_YFCC100M_METADATA",
                                     "mirror_url_template": "GEOPAK_YFCC100M_MIRROR"}

    metadata_path: str = Field(default="", description="the yfcc100m_dataset file, or the 2014 release's ten "
                               "parts (yfcc100m_dataset-0 … -9, .bz2 fine) as a folder or a glob; empty: "
                               "GEOPAK_YFCC100M_METADATA at run start")
    mirror_url_template: str = Field(default="", description="image URL with {photoid} {hash} {hash_a} (= hash[:3]) "
                                     "{hash_b} (= hash[3:6]) {ext}; empty: GEOPAK_YFCC100M_MIRROR, else the "
                                     "dataset's Flickr URLs")
    min_accuracy: int = bounded_field(11, "geo accuracy kept: 1 world … 11 city … 16 street", ge=1, le=16)
    licenses: list[str] = Field(default=[], description="licences kept: names ('Attribution License'), families "
                                "(cc, cc0, ...) or patterns ('Attribution-ShareAlike*'); empty keeps all (YFCC100M "
                                "is all Creative Commons)")
    block_mb: float = bounded_field(16.0, "metadata file read in blocks of this size", gt=0)
    downloads_per_second: float = bounded_field(20.0, "download rate limit; 0: unlimited", ge=0)

    discovery_workers: int = Field(default=0, ge=0, description="decompression threads of the one-pass discovery "
                                   "(yfcc100m_candidates); 0: one per core")
    discovery_lock_wait_s: float = Field(default=6 * 3600.0, gt=0, description="how long a run waits for another "
                                         "run's discovery pass to finish before failing")

    def missing(self) -> str | None:
        if self.text("metadata_path"):
            return None
        return "GEOPAK_YFCC100M_METADATA (path of yfcc100m_dataset) is not set"

    def source(self, http: HttpSettings, stats: HttpStats, discovery_path: str = "") -> Source:
        cfg = YfccConfig(**dataclass_kwargs(YfccConfig, self, metadata_path=self.text("metadata_path"),
                                            mirror_url_template=self.text("mirror_url_template"),
                                            discovery_path=discovery_path))
        return Yfcc100mSource(cfg, http, stats)


class _YfccFromCandidates:
    """What ``_crawl`` asks of a resource, with the source reading its province's file from ``yfcc100m_candidates``
    instead of the whole metadata file."""

    def __init__(self, resource: Yfcc100mResource, paths: DataPaths):
        self.resource, self.paths = resource, paths

    def skip_reason(self) -> str | None:
        return self.resource.skip_reason()

    def http_settings(self, paths: DataPaths) -> HttpSettings:
        return self.resource.http_settings(paths)

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        return self.resource.source(http, stats, discovery_path=str(self.paths.yfcc_discovery))


class Gldv2Resource(CrawlResource):
    """Google Landmarks v2 CSVs located through Wikidata. Set GEOPAK_GLDV2_TRAIN_CSV and
    GEOPAK_GLDV2_CATEGORIES_CSV (and optionally GEOPAK_GLDV2_ATTRIBUTION_CSV) to enable it; set
    GEOPAK_GLDV2_COORDINATES to a landmark-coordinates file (CSV/Parquet) to locate landmarks without Wikidata."""

    ENV: ClassVar[dict[str, str]] = {"train_csv": "GEOPAK_GLDV2_TRAIN_CSV",
                                     "categories_csv": "GEOPAK_GLDV2_CATEGORIES_CSV",
                                     "attribution_csv": "GEOPAK_GLDV2_ATTRIBUTION_CSV",
                                     "coordinates_path": "GEOPAK_GLDV2_COORDINATES"}

    train_csv: str = Field(default="", description="GLDv2 train.csv; empty: GEOPAK_GLDV2_TRAIN_CSV at run start")
    categories_csv: str = Field(default="", description="train_label_to_category.csv; empty: "
                                "GEOPAK_GLDV2_CATEGORIES_CSV at run start")
    attribution_csv: str = Field(default="", description="train_attribution.csv (licences, authors); empty: "
                                 "GEOPAK_GLDV2_ATTRIBUTION_CSV at run start")
    wikidata_api_url: str = Field(default=DEFAULT_WIKIDATA_API, description="Wikidata API that locates landmarks")
    wikidata_requests_per_second: float = bounded_field(0.1, "Wikidata requests per second, one at a time "
                                                        "(Wikimedia's 2026 limit for clients without an account: "
                                                        "hundreds per hour; 429 Retry-After is honoured)", gt=0)
    block_mb: float = bounded_field(16.0, "CSV files read in blocks of this size", gt=0)
    downloads_per_second: float = bounded_field(20.0, "download rate limit; 0: unlimited", ge=0)
    download_mbps: float = bounded_field(20.0, "megabits per second read from upload.wikimedia.org by every "
                                         "process together (Wikimedia's robot policy: at most 25, and 2 "
                                         "connections, which the crawl never exceeds)", gt=0, le=25)
    coordinates_path: str = Field(default="", description="landmark_id or wikidata_id -> lat, lon (CSV/Parquet); "
                                  "when set, Wikidata is not asked")

    def missing(self) -> str | None:
        if not (self.text("train_csv") and self.text("categories_csv")):
            return "GEOPAK_GLDV2_TRAIN_CSV and GEOPAK_GLDV2_CATEGORIES_CSV are not set"
        return None

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        cfg = Gldv2Config(**dataclass_kwargs(Gldv2Config, self, train_csv=self.text("train_csv"),
                                             categories_csv=self.text("categories_csv"),
                                             attribution_csv=self.text("attribution_csv"),
                                             coordinates_path=self.text("coordinates_path")))
        return Gldv2Source(cfg, http, stats)


def _crawl(
    context: dg.AssetExecutionContext, resource: CrawlResource, data_root: DataRootResource,
    boundaries: BoundariesResource,
) -> Iterator[dg.MaterializeResult]:
    province = context.partition_key
    name = context.asset_key.path[-1]
    reason = resource.skip_reason()
    if reason:  # materialized as skipped, so the partitions view says why (pipeline.defs.source_status)
        context.log.warning(f"{name} skipped for {province}: {reason}")
        yield skipped_result(reason, data_root.paths.raw_manifest(SOURCE_OF_ASSET[name], province))
        return
    paths = data_root.paths
    http = resource.http_settings(paths)
    stats = HttpStats()
    locator = boundaries.polygons()  # crawling needs the polygons, not the fallback
    result = run_crawl(resource.source(http, stats), province, paths, data_root.store, locator, http, stats,
                       log=context.log.info)
    yield dg.MaterializeResult(metadata=_metadata(result, paths, locator))


def _counts(values: dict, key: str) -> pd.DataFrame:
    return pd.DataFrame(sorted(values.items()), columns=[key, "count"])


def _metadata(result: CrawlResult, paths: DataPaths, locator: ProvinceBoundaries) -> dict:
    m, rej, stats = result.manifest, result.rejections, result.stats
    retries = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("retry:")}
    statuses = {k: v for k, v in stats.items() if ":status:" in k}
    meta = {
        "status": "crawled",
        **table_metadata(paths.raw_manifest(result.source, result.province), RAW_MANIFEST_SCHEMA),
        "images": len(m),
        "new_images_this_run": result.downloaded_this_run,
        "rejected": len(rej),
        "rejections_per_reason": md_table(rej.groupby("reason").size().rename("rows").reset_index()),
        "api_requests_this_run": stats.get("api:requests", 0),
        "download_requests_this_run": stats.get("download:requests", 0),
        "retries_per_cause": md_table(_counts(retries, "cause")),
        "responses_per_status": md_table(_counts(statuses, "session:status")),
        "state": md_table(_counts({f"{k}:{s}": n for k, d in result.counts.items() for s, n in d.items()}, "what")),
        "summary": md_table(_counts(result.summary, "fact")),
        "elapsed_s": round(result.elapsed_s, 2),
        "parameters_changed": result.reset,
        "manifest": data_file(paths, paths.raw_manifest(result.source, result.province)),
        "rejections": data_file(paths, paths.source_rejections(result.source, result.province)),
        "crawl_state": data_file(paths, paths.crawl_state(result.source, result.province)),
        "preview": md_table(m.drop(columns=["image_id"]).head(10)),
        "quota_exhausted": result.stopped is not None,
        "remaining_work": md_table(_counts(result.remaining, "what")),
    }
    if result.stopped is not None:
        meta["stopped_because"] = result.stopped
    billing = billing_table(stats)
    if len(billing):  # Places API (New): requests per SKU and their list price
        meta["requests_per_sku"] = md_table(billing)
        meta["estimated_list_cost_usd"] = round(float(billing["list_cost_usd"].sum()), 2)
    if len(m):
        ids = locator.locate(m["lat"].to_numpy(), m["lon"].to_numpy())
        meta["map"] = plot(paths, f"crawl_{result.source}_{result.province}.png",
                           province_map_png(m["lat"], m["lon"], ids, locator.polygons,
                                            f"{result.source} / {result.province}"),
                           f"{result.source} images in {result.province}")
    return meta


_COMMON = dict(partitions_def=PROVINCE_PARTITIONS, group_name=CRAWL_GROUP, kinds={"python", "parquet"},
               output_required=False, metadata=schema_metadata(RAW_MANIFEST_SCHEMA))


@dg.asset(**_COMMON, pool="flickr_api",  # one pool per API key: dagster_home/dagster.yaml
          description="Flickr photos.search by bbox and date (4,000-cap splitting), licence and accuracy "
                      "filtered, downloaded into the image store.")
def flickr_photos(context: dg.AssetExecutionContext, flickr: FlickrResource, data_root: DataRootResource,
                  boundaries: BoundariesResource):
    yield from _crawl(context, flickr, data_root, boundaries)


PLACES_TERMS_CHECK = "coordinates_within_terms"
PLACES_COMPLETE_CHECK = "crawl_complete"


@dg.asset(**_COMMON, pool="google_places_api",
          description="OPT-IN Google Places photos: Places API (New) by default (searchNearby/searchText tiles, "
                      "photo media), the legacy API as a setting. Google's terms restrict storing and redistributing "
                      "them.",
          check_specs=[
              dg.AssetCheckSpec(PLACES_TERMS_CHECK, asset="google_places_photos",
                                description="No manifest row keeps coordinates fetched more than 30 days ago "
                                            "(Google Maps Platform terms); evaluated after the run expired them."),
              dg.AssetCheckSpec(PLACES_COMPLETE_CHECK, asset="google_places_photos",
                                description="WARN when the crawl stopped early (quota) or left work for the next "
                                            "run (searches, places, photos)."),
          ])
def google_places_photos(context: dg.AssetExecutionContext, google_places: GooglePlacesResource,
                         data_root: DataRootResource, boundaries: BoundariesResource):
    paths, province = data_root.paths, context.partition_key
    expired = expire_stored_places(paths, province)  # no request: holds even when the crawl is skipped
    if expired:
        context.log.warning(f"google_places/{province}: {expired} rows lost coordinates older than 30 days")
    yield from _crawl(context, google_places, data_root, boundaries)
    yield places_terms_check(paths, province)
    yield places_complete_check(paths, province)


def places_terms_check(paths: DataPaths, province: str) -> dg.AssetCheckResult:
    """FAILS (ERROR) when the province's manifest holds a row whose coordinates are older than the terms allow."""
    report = terms_report(paths.raw_manifest("google_places", province))
    return dg.AssetCheckResult(
        check_name=PLACES_TERMS_CHECK, asset_key="google_places_photos", passed=report["expired_rows"] == 0,
        severity=dg.AssetCheckSeverity.ERROR, metadata={**report, "max_age_days": 30})


def places_complete_check(paths: DataPaths, province: str) -> dg.AssetCheckResult:
    """WARN when the last crawl stopped early (quota) or left searches, places or photos for the next run."""
    state_path = paths.crawl_state("google_places", province)
    if not state_path.exists():
        return dg.AssetCheckResult(check_name=PLACES_COMPLETE_CHECK, asset_key="google_places_photos", passed=True,
                                   metadata={"crawl_state": "none yet"})
    with CrawlState(state_path) as state:
        stopped, remaining = state.meta_get(STOPPED_KEY), remaining_work(state)
    left = sum(remaining.values())
    meta: dict = {"quota_exhausted": stopped is not None, "remaining": md_table(_counts(remaining, "what")),
                  "remaining_total": left}
    if stopped is not None:
        meta["stopped_because"] = stopped
    return dg.AssetCheckResult(check_name=PLACES_COMPLETE_CHECK, asset_key="google_places_photos",
                               passed=stopped is None and left == 0, severity=dg.AssetCheckSeverity.WARN,
                               metadata=meta)


@dg.asset(group_name=CRAWL_GROUP, kinds={"python", "parquet"}, output_required=False, pool="yfcc100m_source",
          description="One streaming pass over the YFCC100M metadata file: each province's candidate rows (its bbox) "
                      "in its own Parquet file, for the yfcc100m_photos partitions. An unchanged file is not re-read.")
def yfcc100m_candidates(context: dg.AssetExecutionContext, yfcc100m: Yfcc100mResource, data_root: DataRootResource,
                        boundaries: BoundariesResource):
    reason = yfcc100m.skip_reason()
    if reason:
        context.log.warning(f"yfcc100m_candidates skipped: {reason}")
        yield skipped_result(reason)  # materialized as skipped, saying why (pipeline.defs.source_status)
        return
    paths = data_root.paths
    # it runs in its own job (pipeline.defs.jobs), once; the lock only orders two runs started by hand at once:
    # the second waits, then finds the record fresh
    with exclusive_lock(paths.yfcc_discovery.with_name("discovery.lock"), "the YFCC100M discovery pass",
                        wait_s=yfcc100m.discovery_lock_wait_s):
        result = discover_candidates(yfcc100m.text("metadata_path"), boundaries.polygons(), paths,
                                     block_mb=yfcc100m.block_mb, workers=yfcc100m.discovery_workers or None,
                                     log=context.log.info)
    per_province = pd.DataFrame([{"province": k, **v} for k, v in result.provinces.items()])
    yield dg.MaterializeResult(metadata={
        "status": "unchanged: not re-read" if result.reused else "discovered",
        "run_id": result.run_id,
        "rows_read": result.rows,
        "rows_per_second": 0 if result.reused or not result.seconds else round(result.rows / result.seconds),
        "seconds": round(result.seconds, 2),
        "decompressor": result.decompressor,
        "malformed_lines": int(result.malformed_lines.get("count", 0)),
        "candidates_per_province": md_table(per_province),
        **{f"candidates_{k}": v["in_bbox"] for k, v in result.provinces.items()},
        "record": data_file(paths, paths.yfcc_discovery),
    })


@dg.asset(**_COMMON, deps=[yfcc100m_candidates], pool="yfcc100m_source",
          description="YFCC100M photos whose coordinates fall in the province (its file from yfcc100m_candidates).")
def yfcc100m_photos(context: dg.AssetExecutionContext, yfcc100m: Yfcc100mResource, data_root: DataRootResource,
                    boundaries: BoundariesResource):
    if yfcc100m.skip_reason() is None:
        try:
            read_discovery(data_root.paths.yfcc_discovery, yfcc100m.text("metadata_path"))
        except DiscoveryMissing as exc:
            raise dg.Failure(description=str(exc)) from None
    yield from _crawl(context, _YfccFromCandidates(yfcc100m, data_root.paths), data_root, boundaries)


@dg.asset(**_COMMON, pool="gldv2_source",
          description="Google Landmarks v2 images of landmarks located in the province via Wikidata.")
def gldv2_photos(context: dg.AssetExecutionContext, gldv2: Gldv2Resource, data_root: DataRootResource,
                 boundaries: BoundariesResource):
    yield from _crawl(context, gldv2, data_root, boundaries)


CRAWL_ASSETS = [flickr_photos, google_places_photos, yfcc100m_photos, gldv2_photos]
# asset name -> source name (its raw/<source>/<province>/ folder, its tag in the UI)
SOURCE_OF_ASSET = {"flickr_photos": FlickrSource.name, "google_places_photos": GooglePlacesSource.name,
                   "yfcc100m_photos": Yfcc100mSource.name, "gldv2_photos": Gldv2Source.name}


def crawl_resources() -> dict[str, CrawlResource]:
    """Secrets and paths from the environment at run start (never in run config or the UI); empty means 'skip'."""
    return {
        "flickr": FlickrResource(),
        "google_places": GooglePlacesResource(),
        "yfcc100m": Yfcc100mResource(),
        "gldv2": Gldv2Resource(),
    }
