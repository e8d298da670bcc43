"""The catalog's fast JPEG header path gives exactly what PIL's reading gives, or steps aside (None)."""

from __future__ import annotations

import io
import random

import pytest
from PIL import ExifTags, Image

from pipeline.catalog.build import fast_jpeg_facts, header_facts
from tests.conftest import gps_exif, jpeg_bytes


def _variants() -> dict[str, bytes]:
    out = {"no exif": jpeg_bytes(), "grey": _save(Image.new("L", (40, 30), 90)),
           "progressive": _save(Image.new("RGB", (50, 20), (1, 2, 3)), progressive=True),
           "cmyk": _save(Image.new("CMYK", (16, 16), (1, 2, 3, 4)))}
    for lat, lon in ((24.86, 67.0), (-33.8, 151.2), (40.7, -74.0), (-22.9, -43.2), (0.0, 0.0)):
        out[f"gps {lat},{lon}"] = jpeg_bytes(exif=gps_exif(lat, lon))
    for o in range(1, 9):
        out[f"orientation {o}"] = jpeg_bytes(size=(48, 32), exif=gps_exif(30, 70, orientation=o))
    for when in (None, "0000:00:00 00:00:00", "2021:13:45 99:00:00", "2031:01:01 00:00:00", "", "2019:01:01"):
        out[f"when {when!r}"] = jpeg_bytes(exif=gps_exif(30, 70, when=when))
    for off in (None, "+05:00", "-03:30", "+99:00", "junk", "+00:00"):
        out[f"offset {off!r}"] = jpeg_bytes(exif=gps_exif(30, 70, offset=off))
    ex = gps_exif(30, 70)
    ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSHPositioningError] = 12.5
    out["accuracy"] = jpeg_bytes(exif=ex)
    ex = gps_exif(30, 70)
    ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "X"
    out["bad ref"] = jpeg_bytes(exif=ex)
    ex = gps_exif(30, 70)
    del ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLongitude]
    out["no longitude"] = jpeg_bytes(exif=ex)
    ex = Image.Exif()
    ex[ExifTags.Base.DateTime] = "2018:02:03 04:05:06"
    ex[ExifTags.Base.XResolution] = 300.0
    ex[ExifTags.Base.ResolutionUnit] = 2
    out["ifd0 date and dpi"] = jpeg_bytes(exif=ex)
    ex = Image.Exif()
    ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSAltitude] = 100.0
    out["gps altitude only"] = jpeg_bytes(exif=ex)
    for stamp in (("2021:03:14", (6.0, 26.0, 40.5)), ("2021:03:14", (1.0, 0.0, 0.0)), ("junk", (6.0, 26.0, 53.0))):
        ex = gps_exif(30, 70, offset=None)  # the GPS clock (UTC) gives the offset, when it agrees
        ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSDateStamp] = stamp[0]
        ex.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSTimeStamp] = stamp[1]
        out[f"gps clock {stamp}"] = jpeg_bytes(exif=ex)
    ex = gps_exif(30, 70, when=None, offset=None)
    ex.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeDigitized] = "2019:05:06 07:08:09"
    ex.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.OffsetTimeDigitized] = "+01:00"
    out["digitized"] = jpeg_bytes(exif=ex)
    data = bytearray(jpeg_bytes(exif=gps_exif(30, 70)))
    i = data.find(b"Exif\x00\x00")
    data[i + 10 : i + 40] = b"\xff" * 30
    out["smashed ifd"] = bytes(data)
    out["icc"] = _save(Image.new("RGB", (20, 20)), icc_profile=b"\0" * 300)
    out["xmp"] = _save(Image.new("RGB", (20, 20)), xmp=b"<x:xmpmeta tiff:Orientation=\"6\"/>")
    out["png"] = _save(Image.new("RGB", (20, 20)), fmt="PNG")
    out["html"] = b"<html>429</html>"
    out["empty"] = b""
    return out


def _save(img, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name", list(_variants()))
def test_fast_path_agrees_with_pil(name):
    data = _variants()[name]
    fast = fast_jpeg_facts(data)
    assert fast is None or fast == header_facts(data, fast=False), name


def test_fast_path_takes_the_ordinary_photos():
    v = _variants()
    ordinary = [k for k in v if k.startswith(("gps", "orientation", "when", "offset", "no exif", "grey", "accuracy",
                                                "digitized"))]
    assert all(fast_jpeg_facts(v[k]) is not None for k in ordinary)
    assert fast_jpeg_facts(v["xmp"]) is None and fast_jpeg_facts(v["png"]) is None


def test_fast_path_on_damaged_headers():
    """Bytes flipped and files cut in the header: whatever PIL makes of them, the fast path agrees or steps aside."""
    rng = random.Random(3)
    bases = [jpeg_bytes(exif=gps_exif(31.5, 74.3, orientation=6)), jpeg_bytes(exif=gps_exif(-10, -20, offset=None))]
    taken = 0
    for k in range(400):
        data = bytearray(bases[k % 2])
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(0, 400)] = rng.randrange(256)
        if k % 5 == 0:
            data = data[: rng.randrange(2, len(data))]
        data = bytes(data)
        fast = fast_jpeg_facts(data)
        if fast is not None:
            taken += 1
            assert fast == header_facts(data, fast=False), (k, data[:64])
    assert taken > 50  # most flips land in places neither reader looks at


def _noise_jpeg(exif=None, app_segments: int = 0, xmp: bool = False) -> bytes:
    """A JPEG well over ``HEADER_PREFIX_BYTES`` (noise compresses badly), with GPS; optionally APP15 segments of
    60 kB before the frame header (markers reaching past the prefix) or an XMP block (the fast reader steps aside)."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)
    data = _save(Image.fromarray(pixels), quality=95, exif=exif or gps_exif(33.7, 73.1, orientation=6))
    assert len(data) > 200_000
    extra = b""
    for _ in range(app_segments):
        extra += b"\xff\xef" + (2 + 60_000).to_bytes(2, "big") + bytes(60_000)
    if xmp:
        body = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
        extra += b"\xff\xe1" + (2 + len(body)).to_bytes(2, "big") + body
    return data[:2] + extra + data[2:]


@pytest.mark.parametrize("kind", ["camera jpeg", "markers past the prefix", "xmp", "png"])
def test_a_stored_files_header_is_read_from_its_first_bytes(tmp_path, monkeypatch, kind):
    """The catalog reads a stored file's header from its first ``HEADER_PREFIX_BYTES`` (photos are MBs); where
    that is not enough, PIL reads the path: the facts are those of the whole file's bytes either way."""
    import numpy as np

    from pipeline.catalog import build

    if kind == "png":
        pixels = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
        data = _save(Image.fromarray(pixels), "PNG", exif=gps_exif(30, 70))
    else:
        data = _noise_jpeg(app_segments=3 if kind == "markers past the prefix" else 0, xmp=kind == "xmp")
    path = tmp_path / "photo"
    path.write_bytes(data)
    read: list[int] = []
    real_open = open

    def counting_open(file, mode="r", *a, **kw):
        fh = real_open(file, mode, *a, **kw)
        real_read = fh.read
        fh.read = lambda n=-1: (lambda b: read.append(len(b)) or b)(real_read(n))
        return fh

    monkeypatch.setattr(build, "open", counting_open, raising=False)
    got = build._header_facts(str(path))
    assert got == header_facts(data) == header_facts(data, fast=False)
    assert got[2:6] != (None,) * 4  # size and place were read
    assert read == [build.HEADER_PREFIX_BYTES]  # the catalog's own read; PIL opens the path itself
    assert (fast_jpeg_facts(data[:build.HEADER_PREFIX_BYTES]) is not None) == (kind == "camera jpeg")


def test_a_file_gone_between_stat_and_read_is_not_an_image(tmp_path):
    from pipeline.catalog import build
    from pipeline.core import reasons

    got = build._header_facts(str(tmp_path / "gone.jpg"))
    assert got[0] == reasons.NOT_AN_IMAGE and "FileNotFoundError" in got[1]
