"""Issue 20 (items 3, 4, 7): the readers against real camera and phone photos that nobody on this project made.

``tests/data/real_photos/`` holds 17 photos copied byte for byte from registry packages' test data (README.md there
names each file's source and licence); ``expected.json`` is what ExifTool, an independent reader, says about them.
Every GPS position must be read exactly, no capture time may be the file's modify time, HEIC must open, decode and
pass through the local source and the catalog like a JPEG, and no file may crash any reader.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.catalog.build import build_catalog, fast_jpeg_facts, header_facts
from pipeline.core import reasons
from pipeline.core.exif import DEFAULT_UTC_OFFSET, DecompressionBomb, ImageHeader, read_header
from pipeline.core.image_formats import AVIF_READABLE, PHOTO_FORMATS
from pipeline.core.store import ImageStore, sniff_extension
from pipeline.core.decode import DEFAULT_MAX_PIXELS, DecodeError, decode, open_image
from pipeline.sources.local import LocalSource, LocalSourceConfig

PHOTOS = Path(__file__).parent / "data" / "real_photos"
EXPECTED: dict[str, dict] = {e["FileName"]: e for e in json.loads((PHOTOS / "expected.json").read_text())}
NAMES = sorted(EXPECTED)
HEIC = [n for n in NAMES if n.endswith(".heic")]
LAHORE = (31.5497, 74.3436)
EXIF_TIME = "%Y:%m:%d %H:%M:%S"
ASSUMED = "exif:DateTimeOriginal (assumed +05:00)"
# where each photo's capture time must come from, by the rule (tagged offset, else GPS clock, else +05:00)
CAPTURE_SOURCE = {
    "01.tif": ASSUMED,  # DateTimeOriginal stored in IFD0 by paint.net: still the capture time
    "02.jpg": ASSUMED,
    "arrow.heic": ASSUMED,
    "aux_YCbCr.heic": "exif:DateTimeOriginal+OffsetTimeOriginal",
    "empty_icc.heic": "exif:DateTimeOriginal+OffsetTimeOriginal",
    "evil1.jpg": ASSUMED,
    "exif_gps_typeerror.jpg": None,  # only IFD0 DateTime (the Photoshop save) is left in EXIF
    "frozenpond.mpo": ASSUMED,
    "ifd_tag_type.tiff": ASSUMED,
    "r_sigma.jpg": ASSUMED,
    "short-ascii-II.jpg": "exif:DateTimeOriginal+GPS",
    "starfish.jpg": ASSUMED,
    "test1.jpg": ASSUMED,  # GPSTimeStamp without GPSDateStamp: no GPS clock to trust
    "test2.jpg": ASSUMED,
    "test3.jpg": ASSUMED,
    "ultrahdr.jpg": "exif:DateTimeOriginal+OffsetTimeOriginal",
    "xiaomi.heic": "exif:DateTimeOriginal+GPS",
}
# cut after the header by the package that ships it (Pillow keeps its test file at 48 kB): metadata intact, pixels not
TRUNCATED = {"ultrahdr.jpg"}


def _data(name: str) -> bytes:
    return (PHOTOS / name).read_bytes()


def _exif_time(text: str | None) -> dt.datetime | None:
    return dt.datetime.strptime(text[:19], EXIF_TIME) if text else None


def _local(h: ImageHeader) -> dt.datetime:
    """The capture time as the camera's clock showed it."""
    return h.taken_at.astimezone(h.utc_offset or DEFAULT_UTC_OFFSET).replace(tzinfo=None)


def test_corpus_is_what_its_readme_lists():
    files = sorted(p.name for p in PHOTOS.iterdir() if p.name not in ("README.md", "expected.json"))
    assert files == NAMES == sorted(CAPTURE_SOURCE)
    readme = (PHOTOS / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in NAMES)
    assert sum((PHOTOS / n).stat().st_size for n in NAMES) < 6_000_000
    assert len(HEIC) == 4 and sum("GPSLatitude" in EXPECTED[n] for n in HEIC) == 3


@pytest.mark.parametrize("name", NAMES)
def test_gps_is_read_exactly_as_exiftool_reads_it(name):
    """read_header and the catalog's header facts (fast JPEG path and PIL path) give ExifTool's signed degrees."""
    want = EXPECTED[name]
    data = _data(name)
    readings = {how: (h.lat, h.lon) for how, h in (("read_header", read_header(data)),
                                                      ("read_header(path)", read_header(PHOTOS / name)))}
    readings["catalog"] = header_facts(data, fast=False)[4:6]
    if fast_jpeg_facts(data) is not None:
        readings["catalog fast path"] = fast_jpeg_facts(data)[4:6]
    for how, (lat, lon) in readings.items():
        if "GPSLatitude" in want:
            assert lat == pytest.approx(want["GPSLatitude"], abs=1e-7), how
            assert lon == pytest.approx(want["GPSLongitude"], abs=1e-7), how
        else:
            assert (lat, lon) == (None, None), how


@pytest.mark.parametrize("name", NAMES)
def test_capture_time_comes_from_the_capture_tags_never_the_modify_date(name):
    want, h = EXPECTED[name], read_header(_data(name))
    original = _exif_time(want.get("DateTimeOriginal")) or _exif_time(want.get("CreateDate"))
    assert h.taken_at_source == CAPTURE_SOURCE[name]
    if original is None:  # only the modify time is left: no capture time, and the catalog says why
        assert h.taken_at is None and "IFD0 DateTime" in h.date_note and want["ModifyDate"] in h.date_note
        return
    assert _local(h) == original and h.date_note is None
    modified = _exif_time(want.get("ModifyDate"))
    if modified is not None and modified not in (original, _exif_time(want.get("CreateDate"))):
        assert _local(h) != modified
    if "OffsetTimeOriginal" in want:
        assert h.utc_offset is not None and h.taken_at.astimezone(h.utc_offset).isoformat().endswith(
            want["OffsetTimeOriginal"])
    elif h.taken_at_source.endswith("+GPS"):  # the offset the GPS clock implies puts taken_at on that clock
        stamp = _exif_time(f"{want['GPSDateStamp']} {want['GPSTimeStamp']}").replace(tzinfo=dt.timezone.utc)
        assert abs(h.taken_at - stamp) <= dt.timedelta(minutes=2)
    else:
        assert h.utc_offset is None


@pytest.mark.parametrize("name", NAMES)
def test_fast_header_path_agrees_with_pil_on_real_photos(name):
    data = _data(name)
    fast = fast_jpeg_facts(data)
    assert fast is None or fast == header_facts(data, fast=False)


@pytest.mark.parametrize("name", NAMES)
def test_every_photo_opens_and_decodes_with_its_displayed_size(name):
    want, h = EXPECTED[name], read_header(_data(name))
    assert sorted((h.width, h.height)) == sorted((want["ImageWidth"], want["ImageHeight"]))
    if want.get("Orientation") in (5, 6, 7, 8) or want.get("Rotation") in (90, 270):
        assert (h.width, h.height) == (want["ImageHeight"], want["ImageWidth"])
    opened = open_image(PHOTOS / name, DEFAULT_MAX_PIXELS, frozenset(PHOTO_FORMATS))
    assert (opened.width, opened.height) == (h.width, h.height)
    if name in TRUNCATED:  # refused with the filter's reason, never a crash or a grey image
        with pytest.raises(DecodeError) as err:
            decode(opened, "RGB", 256, DEFAULT_MAX_PIXELS)
        assert err.value.reason == reasons.UNDECODABLE
        return
    img, _ = decode(opened, "RGB", 256, DEFAULT_MAX_PIXELS)
    assert img.mode == "RGB" and max(img.size) <= 256
    assert (img.width >= img.height) == (h.width >= h.height)


@pytest.mark.parametrize("name", NAMES)
def test_store_names_each_file_by_its_content(name):
    ext = sniff_extension(_data(name))
    assert ext == {".tiff": ".tif", ".mpo": ".jpg"}.get(Path(name).suffix, Path(name).suffix)


def test_heic_is_what_the_model_loader_reads():
    from geopak_model.data import load_image

    img = load_image(PHOTOS / "arrow.heic")  # iPhone portrait photo: the stored 4032x3024 turned upright
    assert img.mode == "RGB" and img.size == (3024, 4032)
    assert load_image(io.BytesIO(_data("empty_icc.heic")), min_side=224).size == (1025, 900)


def test_heic_keeps_the_decompression_bomb_guard(monkeypatch):
    """HEIF goes through Pillow's own pixel check: a lower limit refuses it from its header, as it does a JPEG."""
    with pytest.raises(DecodeError) as err:
        open_image(PHOTOS / "xiaomi.heic", max_pixels=1_000_000)
    assert err.value.reason == reasons.DECOMPRESSION_BOMB
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 2592x1944 is over twice this: PIL refuses
    with pytest.raises(DecompressionBomb):
        read_header(_data("xiaomi.heic"))
    assert header_facts(_data("xiaomi.heic"))[0] == reasons.DECOMPRESSION_BOMB


def _local_source(tmp_path, boundaries, **cfg) -> tuple:
    store = ImageStore(tmp_path / "data")
    src = LocalSource(LocalSourceConfig(**cfg), store, lambda la, lo: boundaries.locate(la, lo) >= 0)
    return src.run(), store


def test_folder_of_real_photos_reads_every_file(tmp_path, boundaries):
    """None lies in Pakistan: each is rejected for where its GPS puts it, or for having none, never as unreadable."""
    res, _ = _local_source(tmp_path, boundaries, folder=str(PHOTOS))
    assert res.manifest.empty
    rej = res.rejections.set_index(res.rejections["source_id"].str.removeprefix("folder:"))
    assert sorted(rej.index) == sorted(NAMES + ["README.md", "expected.json"])
    for name in NAMES:
        want = EXPECTED[name]
        if "GPSLatitude" in want:
            assert rej.loc[name, "reason"] == reasons.OUTSIDE_PAKISTAN
            assert f"lat={want['GPSLatitude']:.5f} lon={want['GPSLongitude']:.5f}" in rej.loc[name, "detail"]
        else:
            assert rej.loc[name, "reason"] == reasons.NO_COORDINATES


def test_real_photos_pass_the_local_source_and_the_catalog(tmp_path, boundaries):
    """Placed in Lahore by a manifest, every photo (HEIC included) is stored, catalogued and keeps its EXIF
    capture time and where it came from; the edited photo with no capture tag says why it has no date."""
    manifest = tmp_path / "photos.csv"
    pd.DataFrame({"path": [str(PHOTOS / n) for n in NAMES], "lat": LAHORE[0], "lon": LAHORE[1]}).to_csv(
        manifest, index=False)
    res, store = _local_source(tmp_path, boundaries, manifest=str(manifest))
    assert res.rejections.empty and len(res.manifest) == len(NAMES)
    catalog, rejections = build_catalog([res.manifest], store)
    assert rejections.empty and len(catalog) == len(NAMES)
    rows = catalog.set_index(catalog["source_id"].str.rsplit("/", n=1).str[-1])
    for name in NAMES:
        h, row = read_header(_data(name)), rows.loc[name]
        assert (None if pd.isna(row["taken_at_source"]) else row["taken_at_source"]) == CAPTURE_SOURCE[name]
        assert (pd.isna(row["taken_at"]) and h.taken_at is None) or row["taken_at"] == pd.Timestamp(h.taken_at)
        assert (row["width"], row["height"]) == (h.width, h.height)
    assert rows.loc["exif_gps_typeerror.jpg", "date_note"].startswith("exif has no capture date: IFD0 DateTime")
    assert all(rows.loc[n, "path"].endswith(".heic") for n in HEIC)


@pytest.mark.skipif(not AVIF_READABLE, reason="this Pillow build has no AVIF codec")
def test_avif_with_a_real_exif_block_reads_like_jpeg():
    """CONSTRUCTED, not a camera file: no registry package we found ships a real AVIF photo with GPS under a
    permissive licence, so Pillow encodes an AVIF carrying the EXIF block of the real Nokia photo (starfish.jpg)."""
    with Image.open(PHOTOS / "starfish.jpg") as src:
        exif, buf = src.info["exif"], io.BytesIO()
        src.convert("RGB").resize((160, 90)).save(buf, "AVIF", exif=exif)
    data, want = buf.getvalue(), EXPECTED["starfish.jpg"]
    h = read_header(data)
    assert sniff_extension(data) == ".avif" and h.format == "AVIF"
    assert h.lat == pytest.approx(want["GPSLatitude"], abs=1e-7)
    assert h.lon == pytest.approx(want["GPSLongitude"], abs=1e-7)
    assert _local(h) == _exif_time(want["DateTimeOriginal"]) and h.taken_at_source == ASSUMED
    img, _ = decode(open_image(data, DEFAULT_MAX_PIXELS, frozenset(PHOTO_FORMATS)), "RGB", 64, DEFAULT_MAX_PIXELS)
    assert img.size == (64, 36)
