"""Issue 20 item 3: the capture time comes from DateTimeOriginal, else DateTimeDigitized, never IFD0 DateTime; its
offset from the matching OffsetTime* tag, else the GPS clock (UTC), else Pakistan time; and the header says which."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from pipeline.catalog.build import build_catalog, fast_jpeg_facts, header_facts
from pipeline.core.exif import read_header
from pipeline.core.store import ImageStore
from tests.conftest import gps_exif, heic_bytes, jpeg_bytes

LAHORE = (31.5497, 74.3436)
UTC = dt.timezone.utc


def _exif(original: str | None = None, digitized: str | None = None, saved: str | None = None,
          offset: str | None = None, offset_digitized: str | None = None, gps_stamp: tuple | None = None,
          ifd0_original: str | None = None) -> Image.Exif:
    ex = gps_exif(*LAHORE, when=original, offset=offset)
    sub = ex.get_ifd(ExifTags.IFD.Exif)
    for ifd, tag, value in ((sub, ExifTags.Base.DateTimeDigitized, digitized),
                            (sub, ExifTags.Base.OffsetTimeDigitized, offset_digitized),
                            (ex, ExifTags.Base.DateTime, saved), (ex, ExifTags.Base.DateTimeOriginal, ifd0_original)):
        if value:
            ifd[tag] = value
    if gps_stamp:
        day, (h, m, s) = gps_stamp
        gps = ex.get_ifd(ExifTags.IFD.GPSInfo)
        gps[ExifTags.GPS.GPSDateStamp] = day
        gps[ExifTags.GPS.GPSTimeStamp] = (IFDRational(h, 1), IFDRational(m, 1), IFDRational(s, 1))
    return ex


CASES = {  # name: (exif, taken_at UTC or None, taken_at_source, utc offset hours or None)
    "original with its offset": (_exif("2021:03:14 09:26:53", offset="-03:30", saved="2024:01:01 00:00:00"),
                                 dt.datetime(2021, 3, 14, 12, 56, 53, tzinfo=UTC),
                                 "exif:DateTimeOriginal+OffsetTimeOriginal", -3.5),
    "original, no offset: Pakistan time": (_exif("2021:03:14 09:26:53"),
                                           dt.datetime(2021, 3, 14, 4, 26, 53, tzinfo=UTC),
                                           "exif:DateTimeOriginal (assumed +05:00)", None),
    "edited: only the save time": (_exif(saved="2024:01:01 10:00:00"), None, None, None),
    "digitized with its own offset": (_exif(digitized="2020:06:01 12:00:00", offset_digitized="+02:00",
                                            saved="2024:01:01 10:00:00"),
                                      dt.datetime(2020, 6, 1, 10, 0, tzinfo=UTC),
                                      "exif:DateTimeDigitized+OffsetTimeDigitized", 2.0),
    "zeroed original, digitized kept": (_exif("0000:00:00 00:00:00", digitized="2020:06:01 12:00:00"),
                                        dt.datetime(2020, 6, 1, 7, 0, tzinfo=UTC),
                                        "exif:DateTimeDigitized (assumed +05:00)", None),
    "GPS clock gives the offset": (_exif("2023:04:27 19:44:18", gps_stamp=("2023:04:27", (16, 43, 45))),
                                   dt.datetime(2023, 4, 27, 16, 44, 18, tzinfo=UTC),
                                   "exif:DateTimeOriginal+GPS", 3.0),
    "GPS clock across midnight, Nepal's +05:45": (_exif("2023:01:01 05:40:00", gps_stamp=("2022:12:31", (23, 55, 0))),
                                                 dt.datetime(2022, 12, 31, 23, 55, tzinfo=UTC),
                                                 "exif:DateTimeOriginal+GPS", 5.75),
    "GPS clock far off the quarter hours": (_exif("2023:04:27 19:44:18", gps_stamp=("2023:04:27", (16, 37, 0))),
                                            dt.datetime(2023, 4, 27, 14, 44, 18, tzinfo=UTC),
                                            "exif:DateTimeOriginal (assumed +05:00)", None),
    "GPS clock a day away": (_exif("2023:04:27 19:44:18", gps_stamp=("2023:04:26", (19, 44, 18))),
                             dt.datetime(2023, 4, 27, 14, 44, 18, tzinfo=UTC),
                             "exif:DateTimeOriginal (assumed +05:00)", None),
    "tagged offset beats the GPS clock": (_exif("2023:04:27 19:44:18", offset="+05:00",
                                                gps_stamp=("2023:04:27", (16, 44, 18))),
                                          dt.datetime(2023, 4, 27, 14, 44, 18, tzinfo=UTC),
                                          "exif:DateTimeOriginal+OffsetTimeOriginal", 5.0),
    "malformed offset, GPS clock used": (_exif("2023:04:27 19:44:18", offset="+3",
                                               gps_stamp=("2023:04:27", (16, 44, 0))),
                                         dt.datetime(2023, 4, 27, 16, 44, 18, tzinfo=UTC),
                                         "exif:DateTimeOriginal+GPS", 3.0),
    "original in IFD0 (TIFF writers)": (_exif(ifd0_original="2006:02:14 22:00:58", saved="2006:02:15 08:00:00"),
                                        dt.datetime(2006, 2, 14, 17, 0, 58, tzinfo=UTC),
                                        "exif:DateTimeOriginal (assumed +05:00)", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_capture_time_rules(name):
    exif, taken, source, offset_h = CASES[name]
    jpeg = jpeg_bytes(exif=exif)
    for data in (jpeg, heic_bytes(exif=exif)):  # one reader for both containers
        h = read_header(data)
        assert (h.taken_at, h.taken_at_source) == (taken, source), name
        got = None if h.utc_offset is None else h.utc_offset.utcoffset(None).total_seconds() / 3600
        assert got == offset_h, name
        assert (h.date_note is None) == (taken is not None), name
    assert fast_jpeg_facts(jpeg) == header_facts(jpeg, fast=False)  # the catalog's own JPEG reader agrees


def test_edited_photo_says_why_it_has_no_date():
    h = read_header(jpeg_bytes(exif=_exif(saved="2024:01:01 10:00:00")))
    assert h.date_note == "exif has no capture date: IFD0 DateTime 2024:01:01 10:00:00 is the last save, not used"
    assert h.date_error is None  # nothing is broken: the photo simply has no capture tag


def test_unusable_date_note_names_the_value():
    h = read_header(jpeg_bytes(exif=_exif("0000:00:00 00:00:00")))
    assert h.taken_at is None and h.date_note == "exif date unusable: 0000:00:00 00:00:00"


def test_catalog_carries_where_each_date_came_from(tmp_path):
    """EXIF's origin and note travel into the catalog; a source's own date, or its reason for none, comes first."""
    store = ImageStore(tmp_path)

    def row(sid: str, data: bytes, **kw) -> dict:
        image_id, rel = store.put(data)
        return dict(source="test", source_id=sid, source_url=None, image_id=image_id, path=rel, lat=None, lon=None,
                    geo_accuracy=None, taken_at=None, owner=None, license=None, title=None, tags=None,
                    place_id=None) | kw

    rows = [row("exif", jpeg_bytes(colour=(1, 2, 3), exif=_exif("2021:03:14 09:26:53", offset="+05:00"))),
            row("edited", jpeg_bytes(colour=(4, 5, 6), exif=_exif(saved="2024:01:01 10:00:00"))),
            row("source", jpeg_bytes(colour=(7, 8, 9), exif=_exif("2021:03:14 09:26:53")),
                taken_at=pd.Timestamp("2020-01-01T00:00:00Z"), taken_at_source="flickr:datetaken"),
            row("unnamed", jpeg_bytes(colour=(10, 11, 12), exif=_exif("2021:03:14 09:26:53")),
                taken_at=pd.Timestamp("2020-01-01T00:00:00Z")),
            row("coarse", jpeg_bytes(colour=(13, 14, 15), exif=_exif("2021:03:14 09:26:53")),
                date_note="flickr datetakengranularity=6 (year): 1990-01-01 00:00:00")]
    catalog, rej = build_catalog([pd.DataFrame(rows)], store, now=dt.datetime(2026, 1, 1, tzinfo=UTC))
    assert rej.empty
    got = catalog.set_index("source_id")[["taken_at_source", "date_note"]].astype(object)
    got = got.where(got.notna(), None).to_dict("index")
    assert got == {
        "exif": {"taken_at_source": "exif:DateTimeOriginal+OffsetTimeOriginal", "date_note": None},
        "edited": {"taken_at_source": None, "date_note":
                   "exif has no capture date: IFD0 DateTime 2024:01:01 10:00:00 is the last save, not used"},
        "source": {"taken_at_source": "flickr:datetaken", "date_note": None},
        "unnamed": {"taken_at_source": "test:taken_at", "date_note": None},
        "coarse": {"taken_at_source": None, "date_note": "flickr datetakengranularity=6 (year): 1990-01-01 00:00:00"},
    }
    assert catalog.set_index("source_id")["taken_at"].isna().to_dict() == {
        "exif": False, "edited": True, "source": False, "unnamed": False, "coarse": True}
