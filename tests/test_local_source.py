"""Bring-your-own images: folder mode (EXIF) and manifest mode (CSV/Parquet), with every bad row explained."""

from __future__ import annotations

import io

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.store import ImageStore
from pipeline.defs import filtering, ingest, labels
from pipeline.defs.resources import LocalSourceResource
from pipeline.sources.local import LocalSource, LocalSourceConfig, normalise_columns
from tests.conftest import asset_resources, gps_exif, heic_bytes
from tests.conftest import jpeg_bytes as small_jpeg


def jpeg_bytes(**kw) -> bytes:
    """Photo-sized so the filter stage keeps them."""
    return small_jpeg(size=(320, 240), **kw)


def png_bytes(colour=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def corpus(tmp_path):
    """A folder and a manifest with every case the issue names."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "lahore.jpg").write_bytes(jpeg_bytes(colour=(1, 100, 1), exif=gps_exif(31.5497, 74.3436)))
    (folder / "sub" / "karachi.jpeg").write_bytes(jpeg_bytes(colour=(2, 100, 2), exif=gps_exif(24.8607, 67.0011)))
    (folder / "sydney.jpg").write_bytes(jpeg_bytes(colour=(3, 100, 3), exif=gps_exif(-33.8688, 151.2093)))  # S, E
    (folder / "new_york.jpg").write_bytes(jpeg_bytes(colour=(4, 100, 4), exif=gps_exif(40.7128, -74.0060)))  # N, W
    (folder / "rio.jpg").write_bytes(jpeg_bytes(colour=(5, 100, 5), exif=gps_exif(-22.9068, -43.1729)))  # S, W
    (folder / "no_gps.jpg").write_bytes(jpeg_bytes(colour=(6, 100, 6)))
    (folder / "phone.heic").write_bytes(heic_bytes(exif=gps_exif(33.6844, 73.0479)))  # read like a JPEG
    (folder / "cut.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (folder / "notes.txt").write_text("hello")
    imgs = tmp_path / "manifest_images"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(png_bytes())
    (imgs / "b.jpg").write_bytes(jpeg_bytes(colour=(7, 100, 7), exif=gps_exif(36.0, 75.0)))  # EXIF disagrees
    (imgs / "c.jpg").write_bytes(jpeg_bytes(colour=(8, 100, 8)))
    csv = tmp_path / "geopak.csv"
    pd.DataFrame(
        {
            "id": ["a", "b", "missing", "a", "far", "nan", "baddate", "c"],
            "Latitude": ["33.6844", "35.92", "30.0", "33.6844", "51.5", "", "30.2", "30.18"],
            "long": ["73.0479", "74.31", "70.0", "73.0479", "-0.12", "70", "71.5", "66.99"],
            "path": ["manifest_images/a.png", "manifest_images/b.jpg", "manifest_images/nope.jpg",
                     "manifest_images/a.png", "manifest_images/c.jpg", "manifest_images/c.jpg",
                     "manifest_images/c.jpg", str(imgs / "c.jpg")],
            "province": ["ICT", "GB", "Punjab", "ICT", "", "", "", "Balochistan"],
            "date": ["2021-05-01", "", "", "2021-05-01", "", "", "31/31/2020", "2019-07-01T10:00:00Z"],
        }
    ).to_csv(csv, index=False)
    return folder, csv


def run_source(cfg, tmp_path, boundaries, previous=None):
    store = ImageStore(tmp_path / "data")
    return LocalSource(cfg, store, lambda la, lo: boundaries.locate(la, lo) >= 0, previous=previous).run()


def test_column_spellings():
    df = pd.DataFrame(columns=["Latitude", "LNG", "image_path", "Date_Taken"])
    assert normalise_columns(df) == {"lat": "Latitude", "lon": "LNG", "path": "image_path", "taken_at": "Date_Taken"}


def test_folder_mode(corpus, tmp_path, boundaries):
    folder, _ = corpus
    res = run_source(LocalSourceConfig(folder=str(folder)), tmp_path, boundaries)
    got = dict(zip(res.rejections["source_id"], res.rejections["reason"]))
    assert sorted(res.manifest["source_id"]) == ["folder:lahore.jpg", "folder:phone.heic", "folder:sub/karachi.jpeg"]
    assert got == {
        "folder:sydney.jpg": reasons.OUTSIDE_PAKISTAN,
        "folder:new_york.jpg": reasons.OUTSIDE_PAKISTAN,
        "folder:rio.jpg": reasons.OUTSIDE_PAKISTAN,
        "folder:no_gps.jpg": reasons.NO_COORDINATES,
        "folder:cut.heic": reasons.NOT_AN_IMAGE,
        "folder:broken.jpg": reasons.NOT_AN_IMAGE,
        "folder:notes.txt": reasons.NOT_AN_IMAGE,
    }
    details = dict(zip(res.rejections["source_id"], res.rejections["detail"]))
    # all four hemisphere references are read with the right signs
    assert "lat=-33.86880 lon=151.20930" in details["folder:sydney.jpg"]
    assert "lat=40.71280 lon=-74.00600" in details["folder:new_york.jpg"]
    assert "lat=-22.90680 lon=-43.17290" in details["folder:rio.jpg"]
    lahore = res.manifest.set_index("source_id").loc["folder:lahore.jpg"]
    assert lahore["lat"] == pytest.approx(31.5497, abs=1e-6)
    assert lahore["taken_at"] == pd.Timestamp("2021-03-14T04:26:53Z")
    assert lahore["taken_at_source"] == "exif:DateTimeOriginal+OffsetTimeOriginal"
    phone = res.manifest.set_index("source_id").loc["folder:phone.heic"]
    assert (phone["lat"], phone["taken_at"]) == (pytest.approx(33.6844, abs=1e-6), lahore["taken_at"])
    assert phone["path"].endswith(".heic")
    assert (tmp_path / "data" / lahore["path"]).is_file()  # copied into the store


def test_manifest_mode(corpus, tmp_path, boundaries):
    _, csv = corpus
    res = run_source(LocalSourceConfig(manifest=str(csv)), tmp_path, boundaries)
    got = dict(zip(res.rejections["source_id"].str.split(":").str[-1], res.rejections["reason"]))
    assert got == {
        "missing": reasons.MISSING_FILE,
        "a": reasons.DUPLICATE_ROW,
        "far": reasons.OUTSIDE_PAKISTAN,
        "nan": reasons.NO_COORDINATES,
        "baddate": reasons.MALFORMED_DATE,
    }
    m = res.manifest.set_index(res.manifest["source_id"].str.split(":").str[-1])
    assert sorted(m.index) == ["a", "b", "c"]
    assert (m.loc["b", "lat"], m.loc["b", "lon"]) == (35.92, 74.31)  # the manifest wins over EXIF
    assert res.stats["manifest_exif_disagree"] == 1
    assert m.loc["a", "taken_at"] == pd.Timestamp("2021-05-01", tz="UTC")
    assert m.loc["c", "tags"] == "province:balochistan"


def test_rerun_adds_only_new_files(corpus, tmp_path, boundaries):
    folder, _ = corpus
    cfg = LocalSourceConfig(folder=str(folder))
    first = run_source(cfg, tmp_path, boundaries)
    (folder / "islamabad.jpg").write_bytes(jpeg_bytes(colour=(9, 100, 9), exif=gps_exif(33.6844, 73.0479)))
    second = run_source(cfg, tmp_path, boundaries, previous=first.manifest)
    assert second.stats["reused"] == 3 and second.stats["new"] == 1  # the HEIC photo is reused like the JPEGs
    assert len(second.manifest) == 4


def test_reference_mode_keeps_files_in_place(corpus, tmp_path, boundaries):
    folder, _ = corpus
    res = run_source(LocalSourceConfig(folder=str(folder), copy_into_store=False), tmp_path, boundaries)
    assert all(p.startswith(str(folder)) for p in res.manifest["path"])
    assert not (tmp_path / "data" / "images").exists()


def test_bad_configuration_is_a_clear_error(tmp_path, boundaries):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_source(LocalSourceConfig(folder=str(tmp_path / "nowhere")), tmp_path, boundaries)
    bad = tmp_path / "m.csv"
    pd.DataFrame({"path": ["x.jpg"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="latitude and longitude"):
        run_source(LocalSourceConfig(manifest=str(bad)), tmp_path, boundaries)


def test_main_assets_with_local_source_reach_labels(corpus, tmp_path, boundaries_path):
    folder, csv = corpus
    root = tmp_path / "data"
    result = dg.materialize(
        [*dg.load_assets_from_modules([ingest, filtering, labels]), *dg.load_asset_checks_from_modules([ingest, filtering, labels])],
        resources=asset_resources(
            root, boundaries_path, local_source=LocalSourceResource(folder=str(folder), manifest=str(csv))
        ),
        run_config={"ops": {"sample_world_images": {"config": {"enabled": False}}}},
    )
    assert result.success
    labelled = pd.read_parquet(DataPaths.at(root).labelled)
    assert set(labelled["source"]) == {"local"}
    assert sorted(labelled["province_key"]) == ["balochistan", "gb", "ict", "ict", "punjab", "sindh"]
    assert "folder:phone.heic" in set(labelled["source_id"])  # a HEIC photo is decoded and filtered like a JPEG
    md = result.asset_materializations_for_node("local_images")[0].metadata
    assert md["accepted"].value == 6 and md["rejected"].value == 12
    assert np.isfinite(labelled["lat"]).all()
