"""Where each stage keeps its files under the data root: one place, so assets and tests agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class DataPaths:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "DataPaths":
        return cls(Path(root).expanduser().resolve())

    def raw_dir(self, source: str, partition: str | None = None) -> Path:
        return self.root / "raw" / source / (partition or "")

    def raw_manifest(self, source: str, partition: str | None = None) -> Path:
        return self.raw_dir(source, partition) / "manifest.parquet"

    def raw_manifests(self) -> list[Path]:
        """Every source's manifest (sample world, and per-province crawl partitions), in a stable order."""
        return sorted((self.root / "raw").glob("**/manifest.parquet"))

    # crawlers (issue 7): per source × province, beside the manifest
    def crawl_state(self, source: str, partition: str) -> Path:
        return self.raw_dir(source, partition) / "state.sqlite"

    def source_rejections(self, source: str, partition: str | None = None) -> Path:
        """Rows a source could not turn into images (beside its manifest)."""
        return self.raw_dir(source, partition) / "rejections.parquet"

    @property
    def rate_limits(self) -> Path:
        """Token buckets shared by every crawl process (one row per API key, named by the key's hash)."""
        return self.root / "raw" / "rate_limits.sqlite"

    def crawl_cache(self, source: str) -> Path:
        """Answers shared by every partition of a source (e.g. Wikidata coordinates for GLDv2)."""
        return self.raw_dir(source) / "cache.sqlite"

    @property
    def sample_world_truth(self) -> Path:
        return self.raw_dir("sample_world") / "ground_truth.parquet"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog" / "image_catalog.parquet"

    @property
    def catalog_rejections(self) -> Path:
        return self.root / "catalog" / "rejections.parquet"

    @property
    def catalog_state(self) -> Path:
        """What the last catalog build resolved (per-manifest shards, header cache): rebuilds read only changes."""
        return self.root / "catalog" / "state"

    # YFCC100M discovery (issue 13): one pass over the metadata file, one candidates file per province
    def yfcc_candidates(self, province: str) -> Path:
        return self.raw_dir("yfcc100m") / "candidates" / f"{province}.parquet"

    @property
    def yfcc_discovery(self) -> Path:
        """The discovery pass's own record: the metadata file it read (path, size, mtime) and its counts."""
        return self.raw_dir("yfcc100m") / "candidates" / "discovery.json"

    @property
    def labelled(self) -> Path:
        return self.root / "labels" / "labelled_catalog.parquet"

    @property
    def label_rejections(self) -> Path:
        return self.root / "labels" / "rejections.parquet"

    @property
    def koppen_geotiff(self) -> Path:
        return self.root / "labels" / "koppen_pakistan.tif"

    # filter stage (issue 3)
    @property
    def filtered(self) -> Path:
        return self.root / "filter" / "filtered_catalog.parquet"

    @property
    def filter_rejections(self) -> Path:
        return self.root / "filter" / "rejections.parquet"

    @property
    def filter_cache(self) -> Path:
        """Image metrics by image_id: a folder of Parquet shards, one per committed chunk (pd.read_parquet reads it)."""
        return self.root / "filter" / "metrics_cache.parquet"

    @property
    def filter_indoor_cache(self) -> Path:
        """CLIP indoor scores by image_id and weights (only written when real weights were available); a folder of
        Parquet shards like ``filter_cache``."""
        return self.root / "filter" / "indoor_cache.parquet"

    # geocells and splits (issue 4)
    @property
    def geocells(self) -> Path:
        """One row per cell: cell_id, province_id, local_id, center_lat/lon, radius_km, count, cap_km, urban."""
        return self.root / "geocells" / "cells.parquet"

    @property
    def geocell_polygons(self) -> Path:
        return self.root / "geocells" / "cell_polygons.parquet"  # GeoParquet, EPSG:4326

    @property
    def geocell_neighbours(self) -> Path:
        """cell_id, neighbour_id, distance_km (same province, sorted by distance)."""
        return self.root / "geocells" / "neighbours.parquet"

    @property
    def cell_assignments(self) -> Path:
        """image_id, cell_id, province_id, distance_km (to the cell centre)."""
        return self.root / "geocells" / "assignments.parquet"

    @property
    def splits(self) -> Path:
        """image_id, split (train/val/test), group_id."""
        return self.root / "splits" / "splits.parquet"

    # model and evaluation (issues 5-6)
    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def run_dir(self, run_name: str, configured: str | Path = "") -> Path:
        """A training run's folder: the configured one, else ``<model_dir>/<run_name>`` (the one rule the trainer
        and the Dagster step share, so both find the same checkpoints)."""
        return Path(configured) if configured else self.model_dir / run_name

    @property
    def weights_dir(self) -> Path:
        """Encoder weights files (``resnet50_places365.pth.tar``, CLIP files) that configs name by relative path:
        training, evaluation and ``geopak predict`` all resolve them here."""
        return self.root / "weights"

    @property
    def evaluation_dir(self) -> Path:
        return self.root / "evaluation"

    def report(self, name: str) -> Path:
        return self.root / "reports" / name
