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
    def labelled(self) -> Path:
        return self.root / "labels" / "labelled_catalog.parquet"

    @property
    def label_rejections(self) -> Path:
        return self.root / "labels" / "rejections.parquet"

    @property
    def koppen_geotiff(self) -> Path:
        return self.root / "labels" / "koppen_pakistan.tif"

    def report(self, name: str) -> Path:
        return self.root / "reports" / name
