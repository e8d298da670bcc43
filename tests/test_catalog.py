"""EXIF reading and the catalog builder: every bad row leaves with a reason, the run goes on."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.catalog.build import build_catalog
from pipeline.core import reasons
from pipeline.core.exif import NotAnImage, read_header
from pipeline.core.schema import CATALOG_SCHEMA, REJECTIONS_SCHEMA, to_table
from pipeline.core.store import ImageStore
from pipeline.labels.label import label_catalog
from tests.conftest import gps_exif, jpeg_bytes


@pytest.mark.parametrize("lat, lon", [(24.8607, 67.0011), (-33.8688, 151.2093), (40.7128, -74.006), (-22.9, -43.2)])
def test_exif_gps_all_hemispheres(lat, lon):
    h = read_header(jpeg_bytes(exif=gps_exif(lat, lon)))
    assert h.lat == pytest.approx(lat, abs=1e-6) and h.lon == pytest.approx(lon, abs=1e-6)
    assert h.taken_at == dt.datetime(2021, 3, 14, 4, 26, 53, tzinfo=dt.timezone.utc)  # 09:26:53 at +05:00


def test_exif_orientation_and_defaults():
    h = read_header(jpeg_bytes(size=(96, 64), exif=gps_exif(30, 70, offset=None, orientation=6)))
    assert (h.width, h.height) == (64, 96)
    assert h.taken_at.hour == 4  # no offset tag: Pakistan time assumed
    h = read_header(jpeg_bytes())
    assert h.lat is None and h.taken_at is None and h.format == "JPEG"


def test_corrupt_exif_is_noted_not_fatal():
    data = bytearray(jpeg_bytes(exif=gps_exif(30, 70)))
    i = data.find(b"Exif\x00\x00")
    data[i + 10 : i + 40] = b"\xff" * 30  # smash the IFD offsets
    h = read_header(bytes(data))
    assert h.width == 96 and h.lat is None


def test_not_an_image():
    for junk in (b"", b"<!DOCTYPE html><html>429</html>", b"\x00" * 100):
        with pytest.raises(NotAnImage):
            read_header(junk)


def _manifest_row(store, data, sid, **kw):
    image_id, rel = store.put(data) if data is not None else ("f" * 64, "images/ff/ff/missing.jpg")
    row = dict(source="test", source_id=sid, source_url=None, image_id=image_id, path=rel, lat=None, lon=None,
               geo_accuracy=None, taken_at=None, owner="me", license="CC0-1.0", title=None, tags=None, place_id=None)
    row.update(kw)
    return row


def test_catalog_rejects_bad_rows_and_keeps_good(tmp_path):
    store = ImageStore(tmp_path)
    good = jpeg_bytes(exif=gps_exif(31.5, 74.3))
    rows = [
        _manifest_row(store, good, "good"),
        _manifest_row(store, good, "same-bytes-again"),
        _manifest_row(store, None, "missing"),
        _manifest_row(store, b"<!DOCTYPE html><html>error</html>", "html"),
        _manifest_row(store, jpeg_bytes(colour=(1, 2, 3)), "no-gps"),
        _manifest_row(store, jpeg_bytes(colour=(4, 5, 6)), "nan", lat=float("nan"), lon=70.0),
        _manifest_row(store, jpeg_bytes(colour=(7, 8, 9)), "range", lat=95.0, lon=70.0),
        _manifest_row(store, jpeg_bytes(colour=(9, 9, 9), exif=gps_exif(30, 70, when="2031:01:01 00:00:00")), "future"),
        _manifest_row(store, jpeg_bytes(colour=(3, 3, 3), exif=gps_exif(10, 10)), "source-wins", lat=33.7, lon=73.0,
                      taken_at=pd.Timestamp("2019-05-05T10:00:00Z"), geo_accuracy=16.0),
    ]
    catalog, rejections = build_catalog([pd.DataFrame(rows)], store, now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    to_table(catalog, CATALOG_SCHEMA)
    to_table(rejections, REJECTIONS_SCHEMA)
    assert sorted(catalog["source_id"]) == ["good", "source-wins"]
    got = dict(zip(rejections["source_id"], rejections["reason"]))
    assert got == {
        "same-bytes-again": reasons.DUPLICATE_BYTES,
        "missing": reasons.MISSING_FILE,
        "html": reasons.NOT_AN_IMAGE,
        "no-gps": reasons.NO_COORDINATES,
        "nan": reasons.NO_COORDINATES,  # a NaN from the source falls back to EXIF, which has none
        "range": reasons.INVALID_COORDINATES,
        "future": reasons.FUTURE_DATE,
    }
    won = catalog.set_index("source_id").loc["source-wins"]
    assert (won["lat"], won["lon"], won["geo_accuracy"]) == (33.7, 73.0, 16.0)
    assert won["taken_at"] == pd.Timestamp("2019-05-05T10:00:00Z")
    assert set(rejections["reason"]) <= set(reasons.DESCRIPTIONS)


def test_catalog_reads_manifests_without_optional_columns_and_carries_them(tmp_path):
    """A manifest written before the optional columns existed still builds; one that sets them keeps them."""
    store = ImageStore(tmp_path)
    old = pd.DataFrame([_manifest_row(store, jpeg_bytes(exif=gps_exif(31.5, 74.3)), "old")])
    new = pd.DataFrame([_manifest_row(store, jpeg_bytes(colour=(5, 6, 7), exif=gps_exif(31.5, 74.3)), "new")])
    new["date_note"] = ["flickr datetakenunknown=1"]
    new["attribution"] = ['[{"displayName": "A. Photographer"}]']
    catalog, _ = build_catalog([old, new], store, now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    by_id = catalog.set_index("source_id")
    assert pd.isna(by_id.loc["old", "date_note"]) and pd.isna(by_id.loc["old", "attribution"])
    assert by_id.loc["new", "date_note"] == "flickr datetakenunknown=1"
    assert by_id.loc["new", "attribution"] == '[{"displayName": "A. Photographer"}]'


def test_empty_inputs(tmp_path):
    catalog, rejections = build_catalog([], ImageStore(tmp_path))
    assert catalog.empty and rejections.empty
    assert list(catalog.columns) == CATALOG_SCHEMA.names


def test_labels_reject_outside_and_null_bad_dates(tmp_path, boundaries, koppen):
    store = ImageStore(tmp_path)
    rows = [
        _manifest_row(store, jpeg_bytes(colour=(10, 10, 10)), "karachi", lat=24.86, lon=67.01,
                      taken_at=pd.Timestamp("2024-12-31T12:00:00Z")),
        _manifest_row(store, jpeg_bytes(colour=(20, 20, 20)), "kabul", lat=34.53, lon=69.17),
        _manifest_row(store, jpeg_bytes(colour=(30, 30, 30)), "old", lat=35.92, lon=74.31,
                      taken_at=pd.Timestamp("1975-01-01T00:00:00Z")),
    ]
    catalog, _ = build_catalog([pd.DataFrame(rows)], store)
    labelled, rejections = label_catalog(catalog, boundaries, koppen)
    assert rejections[["source_id", "reason"]].values.tolist() == [["kabul", reasons.OUTSIDE_PAKISTAN]]
    lab = labelled.set_index("source_id")
    assert lab.loc["karachi", "province_key"] == "sindh" and lab.loc["old", "province_key"] == "gb"
    assert lab.loc["karachi", "day_of_year"] == 366  # 31 Dec of a leap year
    assert pd.isna(lab.loc["old", "day_of_year"]) and np.isnan(lab.loc["old", "doy_sin"])
    assert lab.loc["old", "date_note"].startswith("implausible capture date for a day-of-year label: 1975-01-01")
    assert pd.isna(lab.loc["karachi", "date_note"])
    assert lab.loc["karachi", "koppen_code"].startswith("BW")


def test_labelling_a_file_in_batches_equals_labelling_the_frame(tmp_path, boundaries, koppen):
    """label_catalog_file (batch by batch, memory O(batch)) writes what label_catalog gives on the whole frame,
    and its summary counts what counts_table counts."""
    from pipeline.core.report import counts_table
    from pipeline.core.schema import LABELLED_SCHEMA, read_table, write_table
    from pipeline.labels.label import label_catalog_file

    store = ImageStore(tmp_path)
    rng = np.random.default_rng(2)
    rows = [_manifest_row(store, jpeg_bytes(colour=(k % 250, k // 250, 7)), f"p{k}", lat=float(lat), lon=float(lon),
                          taken_at=pd.Timestamp("2021-06-01T08:00:00Z") if k % 3 else None)
            for k, (lat, lon) in enumerate(zip(rng.uniform(24, 37, 40), rng.uniform(61, 77, 40)))]
    catalog, _ = build_catalog([pd.DataFrame(rows)], store, now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    catalog["sharpness"] = rng.random(len(catalog))  # a filter column the labels carry on
    catalog.index = catalog.index + 1000  # a frame's index saved with it (pandas metadata) is no column
    catalog.to_parquet(tmp_path / "filtered.parquet")
    catalog = catalog.reset_index(drop=True)
    whole, whole_rej = label_catalog(catalog, boundaries, koppen)
    summary = label_catalog_file(tmp_path / "filtered.parquet", tmp_path / "labelled.parquet",
                                 tmp_path / "rejected.parquet", boundaries, koppen, batch_rows=7)
    got = read_table(tmp_path / "labelled.parquet", LABELLED_SCHEMA)
    assert got["image_id"].tolist() == whole["image_id"].tolist() and len(whole_rej) > 0
    for col in ("province_key", "koppen_code", "day_of_year", "sharpness", "date_note"):
        assert got[col].astype(object).where(got[col].notna(), None).tolist() == \
            whole[col].astype(object).where(whole[col].notna(), None).tolist(), col
    assert read_table(tmp_path / "rejected.parquet")["source_id"].tolist() == whole_rej["source_id"].tolist()
    assert (summary.rows, summary.rejected) == (len(whole), len(whole_rej))
    assert summary.day_of_year_known == int(whole["day_of_year"].notna().sum())
    expected = counts_table(whole, "province_key", "source")
    assert summary.table("province_source").set_index("province_key").loc[expected["province_key"]].values.tolist() \
        == expected.set_index("province_key").values.tolist()
