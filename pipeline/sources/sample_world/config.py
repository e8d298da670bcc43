"""Sample world constants and its config: everything that determines the output."""

from __future__ import annotations

from dataclasses import dataclass

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

    n_images: int = 3000
    seed: int = 0
    image_size: int = 256  # long side in px; the aspect ratio varies per image
    rural_fraction: float = 0.15  # share of points not tied to a populated place
    defect_fraction: float = 0.05  # share of deliberately bad rows, spread evenly over DEFECT_CODES
    start_date: str = "2012-01-01"
    end_date: str = "2024-12-31"

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError("n_images must be ≥ 1")
        if self.image_size < 64:
            raise ValueError("image_size must be ≥ 64 px")
        if self.image_size > 1024:
            raise ValueError("image_size must be ≤ 1024 px (the sensor-noise bank's size)")
        if not 0.0 <= self.rural_fraction <= 1.0:
            raise ValueError("rural_fraction must lie in [0, 1]")
        if not 0.0 <= self.defect_fraction <= 0.5:
            raise ValueError("defect_fraction must lie in [0, 0.5] (duplicates need clean rows to copy)")
