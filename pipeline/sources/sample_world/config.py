"""Sample world constants and its config: everything that determines the output."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.fields import check_fields, doc_field
from pipeline.core.provinces import PAKISTAN_UTC_OFFSET_HOURS

SOURCE = "sample_world"
LICENSE = "CC0-1.0"
CAMERA_MAKE = "GeoPak"
CAMERA_MODEL = "GeoPak SampleWorld"
UTC_OFFSET_HOURS = PAKISTAN_UTC_OFFSET_HOURS  # the one definition (pipeline.core.provinces)
RENDER_VERSION = 1  # bump when the appearance changes, so caches keyed on it can be invalidated
PLAN_VERSION = 2  # bump when placement changes (2: province mix from the census population, not GEOPAK's crawl)

# Catalog-level defects (the catalog must notice them) then filter-level ones (valid geotagged JPEGs in Pakistan).
CATALOG_DEFECTS: tuple[str, ...] = ("no_gps", "outside_pakistan", "future_date", "truncated", "not_an_image")
FILTER_DEFECTS: tuple[str, ...] = ("blurred", "tiny", "blank", "near_duplicate", "exact_duplicate")
DEFECT_CODES: tuple[str, ...] = CATALOG_DEFECTS + FILTER_DEFECTS
SEASONS: tuple[str, ...] = ("winter", "spring", "summer", "autumn")
_SEASON_OF_MONTH = (0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0)  # Jan..Dec -> index into SEASONS (meteorological)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "source", "source_id", "source_url", "image_id", "path", "lat", "lon", "geo_accuracy", "taken_at",
    "owner", "license", "title", "tags", "place_id",
)


@dataclass(frozen=True)
class SampleWorldConfig:
    """Everything that determines the sample world; two equal configs give byte-identical outputs."""

    # Each field's doc and bounds are what the Launchpad shows and what __post_init__ checks (pipeline.core.fields).
    n_images: int = doc_field(3000, "images rendered", ge=1)
    seed: int = doc_field(0, "seed of places, dates, scenes and defects (same config: byte-identical world)", ge=0)
    image_size: int = doc_field(256, "long side in px; the aspect ratio varies per image (at most the sensor-noise "
                                "bank's size)", ge=64, le=1024)
    rural_fraction: float = doc_field(0.15, "share of points not tied to a populated place", ge=0.0, le=1.0)
    defect_fraction: float = doc_field(0.05, "share of deliberately bad rows, spread evenly over the defect kinds "
                                       "(duplicates need clean rows to copy)", ge=0.0, le=0.5)
    start_date: str = doc_field("2012-01-01", "earliest taken_at (YYYY-MM-DD)")
    end_date: str = doc_field("2024-12-31", "latest taken_at (YYYY-MM-DD)")

    def __post_init__(self) -> None:
        check_fields(self)
