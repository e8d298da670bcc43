"""Issue 12 items 7 and 9: rejection details are reproducible and say what a curator needs to look the photo up."""

from __future__ import annotations

import datetime as dt
import io
import re

import pandas as pd
import pytest
from PIL import Image, ImageDraw

from pipeline.catalog.build import build_catalog
from pipeline.core import reasons
from pipeline.core.store import ImageStore
from pipeline.core.decode import DecodeError, open_image
from pipeline.filters.examples import contact_sheet_png, wrap_caption
from pipeline.filters.indoor import ClipSpec
from pipeline.filters.stage import KEPT, FilterConfig, filter_catalog
from pipeline.sources.local import LocalSource, LocalSourceConfig
from tests.conftest import gps_exif, jpeg_bytes
from tests.filter_corpus import png_header_only, rotated_exif_pair

ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
LAHORE = (31.5497, 74.3436)
NOW = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def _row(store: ImageStore, data: bytes, sid: str, **kw) -> dict:
    image_id, rel = store.put(data)
    row = dict(source="test", source_id=sid, source_url=None, image_id=image_id, path=rel, lat=None, lon=None,
               geo_accuracy=None, taken_at=None, owner=None, license=None, title=None, tags=None, place_id=None)
    return {**row, **kw}


# ---------------------------------------------------------------------------------------------- item 7


def test_local_source_details_are_deterministic_and_bombs_have_one_code(tmp_path, boundaries):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "jpeg_magic_garbage.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # 10 gigapixels claimed
    store = ImageStore(tmp_path / "data")
    res = LocalSource(LocalSourceConfig(folder=str(folder)), store, lambda la, lo: boundaries.locate(la, lo) >= 0).run()
    rej = res.rejections.set_index("source_id")
    assert rej.loc["folder:empty.jpg", "reason"] == reasons.NOT_AN_IMAGE
    assert rej.loc["folder:empty.jpg", "detail"] == "empty file"
    assert rej.loc["folder:jpeg_magic_garbage.jpg", "detail"] == "unrecognised image format"
    assert rej.loc["folder:bomb.png", "reason"] == reasons.DECOMPRESSION_BOMB  # as the catalog and the filter say
    assert not rej["detail"].str.contains(ADDRESS).any()


def test_catalog_and_filter_say_empty_file(tmp_path):
    store = ImageStore(tmp_path)
    empty = tmp_path / "images" / "empty.jpg"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b"")
    row = _row(store, jpeg_bytes(), "e")
    row["path"] = "images/empty.jpg"
    _, rej = build_catalog([pd.DataFrame([row])], store, now=NOW)
    assert rej[["reason", "detail"]].values.tolist() == [[reasons.NOT_AN_IMAGE, "empty file"]]
    for source in (b"", empty):
        with pytest.raises(DecodeError) as err:
            open_image(source, 10**8)
        assert (err.value.reason, err.value.detail) == (reasons.NOT_AN_IMAGE, "empty file")
    with pytest.raises(DecodeError) as err:
        open_image(b"\xff\xd8\xff garbage", 10**8)
    assert not ADDRESS.search(err.value.detail)


# ---------------------------------------------------------------------------------------------- item 9


def test_near_duplicate_detail_names_the_kept_copy_by_source_id(tmp_path, boundaries):
    upright, rotated, shown = rotated_exif_pair()
    store = ImageStore(tmp_path)
    rows = [_row(store, data, sid, source="mycamera", lat=LAHORE[0], lon=LAHORE[1], geo_accuracy=10.0,
                 taken_at=pd.Timestamp("2021-03-14", tz="UTC"), license="CC-BY-4.0", tags="",
                 width=shown[0], height=shown[1])
            for sid, data in (("upright-1", upright), ("rotated-2", rotated))]
    empty_hf = tmp_path / "hf-empty"
    empty_hf.mkdir()
    cfg = FilterConfig(clip=ClipSpec(cache_dir=str(empty_hf)), workers=1)
    res = filter_catalog(pd.DataFrame(rows), store, boundaries, cfg, tmp_path / "f" / "m.parquet",
                         tmp_path / "f" / "i.parquet")
    out = res.outcomes.set_index("source_id")
    assert sorted(out["outcome"]) == [KEPT, reasons.NEAR_DUPLICATE]
    kept_sid = out.index[out["outcome"] == KEPT][0]
    detail = res.rejections["detail"].iloc[0]
    assert detail.startswith(f"near duplicate of mycamera:{kept_sid} ")
    assert str(out.loc[kept_sid, "image_id"])[:12] not in detail  # named by its id, not by a content hash


@pytest.mark.parametrize(
    "offset, shown",
    [("+05:00", "2031-03-14 09:26:53+05:00 (camera local time)"),
     ("-03:30", "2031-03-14 09:26:53-03:30 (camera local time)"),
     (None, "2031-03-14 09:26:53+05:00 (Pakistan time, no offset recorded)")],
)
def test_future_date_detail_is_the_cameras_local_time(tmp_path, offset, shown):
    store = ImageStore(tmp_path)
    row = _row(store, jpeg_bytes(exif=gps_exif(*LAHORE, when="2031:03:14 09:26:53", offset=offset)), "f")
    _, rej = build_catalog([pd.DataFrame([row])], store, now=NOW)
    assert rej[["reason", "detail"]].values.tolist() == [[reasons.FUTURE_DATE, f"taken {shown} lies in the future"]]


def test_future_date_from_the_source_is_shown_in_pakistan_time(tmp_path):
    store = ImageStore(tmp_path)
    row = _row(store, jpeg_bytes(), "s", lat=LAHORE[0], lon=LAHORE[1],
               taken_at=pd.Timestamp("2031-03-14T04:26:53Z"))
    _, rej = build_catalog([pd.DataFrame([row])], store, now=NOW)
    assert rej["detail"].tolist() == ["taken 2031-03-14 09:26:53+05:00 (Pakistan time, no offset recorded) lies in "
                                      "the future"]


def test_contact_sheet_captions_are_not_cut(tmp_path):
    """Two ids that share their first 16 characters must look different on the sheet."""
    head = "manifest:geopak.csv:"  # 20 characters already
    a = contact_sheet_png({reasons.MISSING_FILE: [(None, head + "lahore/0001.jpg")]})
    b = contact_sheet_png({reasons.MISSING_FILE: [(None, head + "karachi/0002.jpg")]})
    assert a != b
    assert Image.open(io.BytesIO(a)).format == "PNG"


@pytest.mark.parametrize("caption", ["flickr:53012345678901", "manifest:geopak.csv:manifest_images/c.jpg", "x" * 70,
                                     "short", ""])
def test_wrapped_caption_keeps_every_character_and_fits(caption):
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines = wrap_caption(caption, 100, measure)
    assert "".join(lines) == caption
    assert all(measure(line) <= 100 or len(line) == 1 for line in lines)


def test_download_failure_detail_has_no_object_address(tmp_path, boundaries):
    """requests puts connection-object reprs in its messages; the rejection must read the same on every run."""
    csv = tmp_path / "urls.csv"
    pd.DataFrame({"id": ["u"], "lat": ["31.5"], "lon": ["74.3"], "url": ["http://example.invalid/a.jpg"]}).to_csv(
        csv, index=False)

    def fetch(url: str, timeout: float) -> bytes:
        raise ConnectionError("Max retries exceeded (Caused by NewConnectionError('<urllib3.connection."
                              "HTTPConnection object at 0x7f3a5c2e1d90>: Failed to establish a new connection'))")

    src = LocalSource(LocalSourceConfig(manifest=str(csv)), ImageStore(tmp_path / "data"),
                      lambda la, lo: boundaries.locate(la, lo) >= 0, fetch=fetch)
    rej = src.run().rejections
    assert rej["reason"].tolist() == [reasons.DOWNLOAD_FAILED]
    detail = rej["detail"].iloc[0]
    assert not ADDRESS.search(detail)
    assert "<urllib3.connection.HTTPConnection>" in detail and detail.startswith("ConnectionError: ")
