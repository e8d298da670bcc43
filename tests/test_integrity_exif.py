"""Issue 12 item 1: a bad EXIF date never costs a photo its coordinates, and unreadable GPS says what was wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from pipeline.catalog.build import build_catalog
from pipeline.core import reasons
from pipeline.core.exif import read_header
from pipeline.core.store import ImageStore
from pipeline.labels.label import label_catalog
from pipeline.sources.local import LocalSource, LocalSourceConfig
from tests.conftest import gps_exif, jpeg_bytes

LAHORE = (31.5497, 74.3436)
BAD_DATES = ["0000:00:00 00:00:00", "2021:13:01 10:00:00", "2021:02:30 25:61:00", "garbage", "    :  :     :  :  "]


def _zero_denominator_gps() -> Image.Exif:
    """Latitude degrees written as 31/0: a camera bug that PIL reads as NaN."""
    ex = Image.Exif()
    gps = ex.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (IFDRational(31, 0), IFDRational(0, 1), IFDRational(0, 1))
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (IFDRational(74, 1), IFDRational(0, 1), IFDRational(0, 1))
    return ex


@pytest.mark.parametrize("when", BAD_DATES)
def test_bad_date_keeps_coordinates_and_records_the_date_problem(when):
    h = read_header(jpeg_bytes(exif=gps_exif(*LAHORE, when=when)))  # no accuracy tag, as most cameras
    assert h.lat == pytest.approx(LAHORE[0], abs=1e-6) and h.lon == pytest.approx(LAHORE[1], abs=1e-6)
    assert h.taken_at is None
    assert h.date_error and "date taken" in h.date_error
    assert h.gps_error is None


def test_bad_date_keeps_accuracy_too():
    ex = gps_exif(*LAHORE, when="2021:13:01 10:00:00")
    ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSHPositioningError] = IFDRational(25, 1)
    h = read_header(jpeg_bytes(exif=ex))
    assert (h.lat, h.accuracy_m) == (pytest.approx(LAHORE[0], abs=1e-6), 25.0)


def test_malformed_offset_keeps_the_date_in_pakistan_time():
    h = read_header(jpeg_bytes(exif=gps_exif(*LAHORE, offset="+5")))
    assert h.taken_at is not None and h.taken_at.hour == 4  # 09:26:53 at the assumed +05:00
    assert h.utc_offset is None and "offset" in (h.date_error or "")


def test_zero_denominator_gps_says_what_was_unreadable():
    h = read_header(jpeg_bytes(exif=_zero_denominator_gps()))
    assert h.lat is None and h.lon is None
    assert h.gps_error == "GPS latitude unreadable: zero denominator"


def _source(tmp_path, boundaries, folder):
    store = ImageStore(tmp_path / "data")
    src = LocalSource(LocalSourceConfig(folder=str(folder)), store, lambda la, lo: boundaries.locate(la, lo) >= 0)
    return src.run(), store


def test_local_source_keeps_photos_with_bad_dates_and_counts_them(tmp_path, boundaries, koppen):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, when in enumerate(BAD_DATES):
        (folder / f"bad{i}.jpg").write_bytes(jpeg_bytes(colour=(i, 90, 9), exif=gps_exif(*LAHORE, when=when)))
    (folder / "good.jpg").write_bytes(jpeg_bytes(colour=(50, 90, 9), exif=gps_exif(*LAHORE)))
    (folder / "zero_denominator.jpg").write_bytes(jpeg_bytes(colour=(60, 90, 9), exif=_zero_denominator_gps()))
    res, store = _source(tmp_path, boundaries, folder)
    assert sorted(res.manifest["source_id"]) == [f"folder:bad{i}.jpg" for i in range(len(BAD_DATES))] + [
        "folder:good.jpg"
    ]
    assert res.stats["exif_date_unusable"] == len(BAD_DATES)
    rej = res.rejections.set_index("source_id")
    assert rej.loc["folder:zero_denominator.jpg", "reason"] == reasons.NO_COORDINATES
    assert rej.loc["folder:zero_denominator.jpg", "detail"] == "GPS latitude unreadable: zero denominator"
    # downstream: the coordinates survive the catalog and labels, the day of year is null
    catalog, cat_rej = build_catalog([res.manifest], store)
    assert cat_rej.empty and len(catalog) == len(BAD_DATES) + 1
    labelled, _ = label_catalog(catalog, boundaries, koppen)
    lab = labelled.set_index("source_id")
    assert (lab["province_key"] == "punjab").all()
    assert lab.drop(index="folder:good.jpg")["day_of_year"].isna().all()
    assert lab.loc["folder:good.jpg", "day_of_year"] == 73  # 14 March 2021


def test_catalog_names_the_unreadable_gps_value(tmp_path):
    store = ImageStore(tmp_path)
    image_id, rel = store.put(jpeg_bytes(exif=_zero_denominator_gps()))
    row = dict(source="test", source_id="z", source_url=None, image_id=image_id, path=rel, lat=None, lon=None,
               geo_accuracy=None, taken_at=None, owner=None, license=None, title=None, tags=None, place_id=None)
    _, rej = build_catalog([pd.DataFrame([row])], store)
    assert rej[["reason", "detail"]].values.tolist() == [
        [reasons.NO_COORDINATES, "GPS latitude unreadable: zero denominator"]
    ]
    assert np.all(rej["detail"].str.len() > 0)
