"""Crawl assets: Flickr, Google Places, YFCC100M and GLDv2, each partitioned by province (``crawl_job``).

Thin wrappers over ``pipeline.sources``: each partition crawls one province to completion (resuming a killed run
from its crawl state), writes ``raw/<source>/<province>/manifest.parquet`` — which ``image_catalog`` unions with
every other manifest — and reports counts, retries and rejections. A source that is disabled or lacks credentials
or files is skipped with a warning and an observation saying why; it never fails the run. Secrets come only through
``EnvVar`` and never reach logs, metadata or files.
"""

from collections.abc import Iterator
from typing import Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from pipeline.core.paths import DataPaths
from pipeline.core.provinces import PROVINCE_KEYS
from pipeline.core.report import province_map_png
from pipeline.defs.metadata import md_table, plot
from pipeline.defs.resources import BoundariesResource, DataRootResource, LaunchEnvResource
from pipeline.labels.boundaries import ProvinceBoundaries
from pipeline.sources.crawl import CrawlResult, Source, run_crawl
from pipeline.sources.flickr import DEFAULT_REST_URL, OPEN_LICENSES, FlickrConfig, FlickrSource
from pipeline.sources.gldv2 import DEFAULT_WIKIDATA_API, Gldv2Config, Gldv2Source
from pipeline.sources.google_places import DEFAULT_BASE_URL, GooglePlacesSource, PlacesConfig
from pipeline.sources.http import DEFAULT_USER_AGENT, HttpSettings, HttpStats, RetryPolicy
from pipeline.sources.yfcc100m import Yfcc100mSource, YfccConfig

PROVINCE_PARTITIONS = dg.StaticPartitionsDefinition(list(PROVINCE_KEYS))
CRAWL_GROUP = "crawl"


class CrawlResource(LaunchEnvResource):
    """Settings every crawler shares: HTTP timeouts, retries and parallel downloads. Secrets and paths left empty
    are read from the environment at run start (``env``), so they never enter the run config."""

    enabled: bool = True
    timeout_s: float = 30.0
    max_attempts: int = Field(default=6, description="tries per request before a unit or download gives up")
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    download_workers: int = 8
    max_image_mb: float = 25.0
    user_agent: str = DEFAULT_USER_AGENT

    def http_settings(self, paths: DataPaths) -> HttpSettings:
        return HttpSettings(
            timeout_s=self.timeout_s,
            retry=RetryPolicy(self.max_attempts, self.backoff_base_s, self.backoff_max_s),
            download_workers=self.download_workers,
            max_image_bytes=int(self.max_image_mb * 2**20),
            user_agent=self.user_agent,
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

    api_key: str = ""
    api_secret: str = ""
    rest_url: str = DEFAULT_REST_URL
    queries_per_hour: float = 3600.0
    min_taken_date: str = "2000-01-01"
    max_taken_date: str = Field(default="", description="empty: when the province's crawl first started; set a "
                                "later date to pick up newer photos")
    licenses: list[str] = Field(default=list(OPEN_LICENSES), description="Flickr licence ids to keep (0 = ARR)")
    min_accuracy: int = 11
    sizes: list[str] = ["url_l", "url_c", "url_z", "url_m"]
    min_tile_deg: float = 0.01
    min_window_hours: float = 1.0

    def missing(self) -> str | None:
        if not (self.text("api_key") and self.text("api_secret")):
            return "FLICKR_API_KEY and FLICKR_API_SECRET are not set"
        return None

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        cfg = FlickrConfig(self.text("api_key"), self.text("api_secret"), self.rest_url, self.queries_per_hour,
                           self.min_taken_date, self.max_taken_date, tuple(self.licenses), self.min_accuracy,
                           tuple(self.sizes),
                           min_tile_deg=self.min_tile_deg, min_window_s=int(self.min_window_hours * 3600))
        return FlickrSource(cfg, http, stats)


class GooglePlacesResource(CrawlResource):
    """Google Places (legacy) via googlemaps. OPT-IN: Google's terms restrict storing and redistributing Places
    content. Set GOOGLE_MAPS_API_KEY and GEOPAK_GOOGLE_PLACES_ENABLED=1 (or enabled: true) to run it."""

    enabled: Optional[bool] = None  # None: GEOPAK_GOOGLE_PLACES_ENABLED at run start, else off
    api_key: str = ""
    base_url: str = DEFAULT_BASE_URL
    queries_per_second: float = 10.0
    tile_deg: float = 0.25
    min_tile_deg: float = 0.01
    place_type: str = ""
    keyword: str = ""
    max_photos_per_place: int = 10
    max_width: int = 1600
    page_token_delay_s: float = 2.0

    def skip_reason(self) -> str | None:
        if not self.flag("enabled", default=False):
            return ("opt-in only (Google's terms restrict storing and redistributing Places content): set "
                    "GEOPAK_GOOGLE_PLACES_ENABLED=1 or google_places.enabled=true")
        return self.missing()

    def missing(self) -> str | None:
        return None if self.text("api_key") else "GOOGLE_MAPS_API_KEY is not set"

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        cfg = PlacesConfig(self.text("api_key"), self.base_url, self.queries_per_second, self.tile_deg,
                           self.min_tile_deg, self.place_type, self.keyword, self.max_photos_per_place, self.max_width,
                           self.page_token_delay_s)
        return GooglePlacesSource(cfg, http, stats)


class Yfcc100mResource(CrawlResource):
    """YFCC100M from a local ``yfcc100m_dataset`` file. Set GEOPAK_YFCC100M_METADATA to enable it."""

    metadata_path: str = ""
    mirror_url_template: str = Field(default="", description="{photoid} {hash} {hash_a} {hash_b} {ext}")
    min_accuracy: int = 11
    licenses: list[str] = []
    block_mb: float = 16.0
    downloads_per_second: float = 20.0

    def missing(self) -> str | None:
        if self.text("metadata_path"):
            return None
        return "GEOPAK_YFCC100M_METADATA (path of yfcc100m_dataset) is not set"

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        cfg = YfccConfig(self.text("metadata_path"), self.text("mirror_url_template"), self.min_accuracy,
                         tuple(self.licenses), self.block_mb, self.downloads_per_second)
        return Yfcc100mSource(cfg, http, stats)


class Gldv2Resource(CrawlResource):
    """Google Landmarks v2 CSVs located through Wikidata. Set GEOPAK_GLDV2_TRAIN_CSV and
    GEOPAK_GLDV2_CATEGORIES_CSV (and optionally GEOPAK_GLDV2_ATTRIBUTION_CSV) to enable it; set
    GEOPAK_GLDV2_COORDINATES to a landmark-coordinates file (CSV/Parquet) to locate landmarks without Wikidata."""

    train_csv: str = ""
    categories_csv: str = ""
    attribution_csv: str = ""
    wikidata_api_url: str = DEFAULT_WIKIDATA_API
    wikidata_requests_per_second: float = 5.0
    block_mb: float = 16.0
    downloads_per_second: float = 20.0
    coordinates_path: str = Field(default="", description="landmark_id or wikidata_id -> lat, lon (CSV/Parquet); "
                                  "when set, Wikidata is not asked")

    def missing(self) -> str | None:
        if not (self.text("train_csv") and self.text("categories_csv")):
            return "GEOPAK_GLDV2_TRAIN_CSV and GEOPAK_GLDV2_CATEGORIES_CSV are not set"
        return None

    def source(self, http: HttpSettings, stats: HttpStats) -> Source:
        cfg = Gldv2Config(self.text("train_csv"), self.text("categories_csv"), self.text("attribution_csv"),
                          self.wikidata_api_url,
                          self.wikidata_requests_per_second, block_mb=self.block_mb,
                          downloads_per_second=self.downloads_per_second,
                          coordinates_path=self.text("coordinates_path"))
        return Gldv2Source(cfg, http, stats)


def _crawl(
    context: dg.AssetExecutionContext, resource: CrawlResource, data_root: DataRootResource,
    boundaries: BoundariesResource,
) -> Iterator[dg.MaterializeResult]:
    province = context.partition_key
    name = context.asset_key.path[-1]
    reason = resource.skip_reason()
    if reason:
        context.log.warning(f"{name} skipped for {province}: {reason}")
        context.log_event(dg.AssetObservation(asset_key=context.asset_key, partition=province,
                                              metadata={"status": "skipped", "reason": reason}))
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
        "manifest": dg.MetadataValue.path(str(paths.raw_manifest(result.source, result.province))),
        "rejections": dg.MetadataValue.path(str(paths.source_rejections(result.source, result.province))),
        "crawl_state": dg.MetadataValue.path(str(paths.crawl_state(result.source, result.province))),
        "preview": md_table(m.drop(columns=["image_id"]).head(10)),
    }
    if len(m):
        ids = locator.locate(m["lat"].to_numpy(), m["lon"].to_numpy())
        meta["map"] = plot(paths, f"crawl_{result.source}_{result.province}.png",
                           province_map_png(m["lat"], m["lon"], ids, locator.polygons,
                                            f"{result.source} / {result.province}"),
                           f"{result.source} images in {result.province}")
    return meta


_COMMON = dict(partitions_def=PROVINCE_PARTITIONS, group_name=CRAWL_GROUP, kinds={"python", "parquet"},
               output_required=False)


@dg.asset(**_COMMON, description="Flickr photos.search by bbox and date (4,000-cap splitting), licence and accuracy "
                                 "filtered, downloaded into the image store.")
def flickr_photos(context: dg.AssetExecutionContext, flickr: FlickrResource, data_root: DataRootResource,
                  boundaries: BoundariesResource):
    yield from _crawl(context, flickr, data_root, boundaries)


@dg.asset(**_COMMON, description="OPT-IN Google Places photos (nearby search tiles, details, places_photo). "
                                 "Google's terms restrict storing and redistributing them.")
def google_places_photos(context: dg.AssetExecutionContext, google_places: GooglePlacesResource,
                         data_root: DataRootResource, boundaries: BoundariesResource):
    yield from _crawl(context, google_places, data_root, boundaries)


@dg.asset(**_COMMON, description="YFCC100M photos whose coordinates fall in the province (streamed metadata file).")
def yfcc100m_photos(context: dg.AssetExecutionContext, yfcc100m: Yfcc100mResource, data_root: DataRootResource,
                    boundaries: BoundariesResource):
    yield from _crawl(context, yfcc100m, data_root, boundaries)


@dg.asset(**_COMMON, description="Google Landmarks v2 images of landmarks located in the province via Wikidata.")
def gldv2_photos(context: dg.AssetExecutionContext, gldv2: Gldv2Resource, data_root: DataRootResource,
                 boundaries: BoundariesResource):
    yield from _crawl(context, gldv2, data_root, boundaries)


CRAWL_ASSETS = [flickr_photos, google_places_photos, yfcc100m_photos, gldv2_photos]


def crawl_resources() -> dict[str, CrawlResource]:
    """Secrets and paths from the environment at run start (never in run config or the UI); empty means 'skip'."""
    return {
        "flickr": FlickrResource(env={"api_key": "FLICKR_API_KEY", "api_secret": "FLICKR_API_SECRET"}),
        "google_places": GooglePlacesResource(env={"enabled": "GEOPAK_GOOGLE_PLACES_ENABLED",
                                                   "api_key": "GOOGLE_MAPS_API_KEY"}),
        "yfcc100m": Yfcc100mResource(env={"metadata_path": "GEOPAK_YFCC100M_METADATA",
                                          "mirror_url_template": "GEOPAK_YFCC100M_MIRROR"}),
        "gldv2": Gldv2Resource(env={"train_csv": "GEOPAK_GLDV2_TRAIN_CSV",
                                    "categories_csv": "GEOPAK_GLDV2_CATEGORIES_CSV",
                                    "attribution_csv": "GEOPAK_GLDV2_ATTRIBUTION_CSV",
                                    "coordinates_path": "GEOPAK_GLDV2_COORDINATES"}),
    }
