"""The sample world: a seeded generator of SYNTHETIC geotagged JPEGs placed on Pakistan's real geography.

These images are not photographs. They are cheap procedural renderings (sky, horizon, ground, mountains, a
place-specific "landmark" silhouette) whose appearance is driven by real data at the point where each one is
placed, so that the offline pipeline has something learnable to train and evaluate on without any network:

- placement: per-province counts follow the census population (``population_shares``); urban points jitter
  around real GeoNames places (chosen ∝ population^0.7), rural points are uniform inside the geoBoundaries ADM1
  polygon, and every non-defect point lies inside its intended province's polygon (checked with the same
  ``ProvinceBoundaries.locate`` the labeller uses, so nothing is rejected by accident);
- climate: the Köppen-Geiger class at the point picks the palette and texture (dunes, dry grass, fields,
  conifers, rock, snow, water) and whether mountains rise behind the horizon;
- place: the nearest/chosen GeoNames place contributes a landmark whose shape and colours are a deterministic
  function of its geonameid, so geocells (clusters around places) are learnable;
- season and hour: tint, vegetation greenness, winter snow on cold classes, summer haze, low-sun light;
- nuisance: random crop, aspect ratio, brightness/contrast, sensor noise and JPEG quality 80-95.

Coordinates and the date taken are written to EXIF only (the raw manifest leaves them empty) so the catalog's
EXIF path is exercised. A share of rows are deliberate defects (see ``DEFECT_CODES``) whose code is recorded in
the ground truth only. Everything is a pure function of ``(cfg, index)``: the same config gives byte-identical
images whatever the number of worker processes. This package must not import dagster.

Modules: ``config`` (constants, ``SampleWorldConfig``), ``plan`` (placement, dates, owners, defects; takes the
configured boundaries and Köppen raster), ``styles`` and ``landmarks`` (appearance), ``scene`` (the clean
picture), ``defects`` (EXIF, JPEG and the deliberate defects) and ``generate`` (the worker pool and the store).
"""

from __future__ import annotations

from pipeline.sources.sample_world.config import (
    CAMERA_MAKE,
    CAMERA_MODEL,
    CATALOG_DEFECTS,
    DEFECT_CODES,
    FILTER_DEFECTS,
    LICENSE,
    MANIFEST_COLUMNS,
    RENDER_VERSION,
    SEASONS,
    SOURCE,
    UTC_OFFSET_HOURS,
    SampleWorldConfig,
)
from pipeline.sources.sample_world.defects import render_image
from pipeline.sources.sample_world.generate import generate_sample_world
from pipeline.sources.sample_world.landmarks import LANDMARK_KINDS, landmark_shapes, place_palette
from pipeline.sources.sample_world.plan import plan_sample_world, province_counts
from pipeline.sources.sample_world.scene import render_scene

__all__ = [
    "CAMERA_MAKE", "CAMERA_MODEL", "CATALOG_DEFECTS", "DEFECT_CODES", "FILTER_DEFECTS", "LANDMARK_KINDS", "LICENSE",
    "MANIFEST_COLUMNS", "RENDER_VERSION", "SEASONS", "SOURCE", "UTC_OFFSET_HOURS", "SampleWorldConfig",
    "generate_sample_world", "landmark_shapes", "place_palette", "plan_sample_world", "province_counts",
    "render_image", "render_scene",
]
