"""Read what a file says about itself: format, oriented size, EXIF GPS and date taken, without decoding pixels.

GPS and date are read independently: a broken date never costs the coordinates, and each problem is reported
in words (``gps_error``, ``date_error``) so a rejection or a count can say what was unreadable.

The capture time is DateTimeOriginal, else DateTimeDigitized, never IFD0 DateTime (the file's last save). Its offset
is the matching OffsetTime* tag, else the one the GPS clock (UTC) implies, else Pakistan time; ``taken_at_source``
says which, ``date_note`` why there is none. HEIC/HEIF is opened like JPEG (``pipeline.core.image_formats``).

Public API: ``read_header`` (through PIL, or with ``fast`` a well-formed JPEG's markers and IFDs read directly by
``fast_jpeg_header``, with the same meaning), ``ImageHeader``, ``NotAnImage`` / ``DecompressionBomb``,
``error_detail`` and ``DEFAULT_UTC_OFFSET``; everything else is this module's own.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.TiffImagePlugin import IFDRational, ImageFileDirectory_v2

from pipeline.core.provinces import PAKISTAN_UTC_OFFSET_HOURS

# Pakistan Standard Time; assumed when EXIF gives a local time without OffsetTimeOriginal (no DST since 2009).
DEFAULT_UTC_OFFSET = dt.timezone(dt.timedelta(hours=PAKISTAN_UTC_OFFSET_HOURS))
_ORIENTATION_SWAPS_AXES = {5, 6, 7, 8}
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_QUARTER_HOUR = dt.timedelta(minutes=15)
# how far the GPS clock may stand from the camera's once the offset is taken out (a fix is stamped near the shutter)
_GPS_CLOCK_TOLERANCE = dt.timedelta(minutes=2)
# (name, tag, offset name, offset tag) in the order a capture time is taken from
_CAPTURE_TAGS = (
    ("DateTimeOriginal", ExifTags.Base.DateTimeOriginal, "OffsetTimeOriginal", ExifTags.Base.OffsetTimeOriginal),
    ("DateTimeDigitized", ExifTags.Base.DateTimeDigitized, "OffsetTimeDigitized", ExifTags.Base.OffsetTimeDigitized),
)


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int  # after EXIF orientation, i.e. as displayed
    height: int
    lat: float | None
    lon: float | None
    accuracy_m: float | None
    taken_at: dt.datetime | None  # UTC
    exif_error: str | None  # every EXIF problem in one line (block, GPS, date); noted, never fatal
    gps_error: str | None = None  # GPS tags present but no usable coordinate: what was unreadable
    date_error: str | None = None  # a date tag present but not usable (zeroed, impossible, bad offset)
    utc_offset: dt.timezone | None = None  # the camera's offset (tagged, or from the GPS clock); None: +05:00 assumed
    taken_at_source: str | None = None  # which tags gave taken_at, e.g. "exif:DateTimeOriginal+OffsetTimeOriginal"
    date_note: str | None = None  # why there is no usable capture time ("<why>: <detail>"), for the catalog


class NotAnImage(ValueError):
    pass


class DecompressionBomb(NotAnImage):
    """The header claims so many pixels that PIL refuses to open it (its limit, twice ``Image.MAX_IMAGE_PIXELS``)."""


class _Unreadable(ValueError):
    """One EXIF value that cannot be used; the message says which and why."""


def error_detail(exc: BaseException, size: int | None = None) -> str:
    """A rejection detail that is identical on every run: no object reprs with memory addresses, no file names.

    PIL's "cannot identify image file <_io.BytesIO object at 0x7f…>" would make two identical runs write
    different rejection files.
    """
    if size == 0:
        return "empty file"
    if isinstance(exc, UnidentifiedImageError):
        return "unrecognised image format"
    text = _OBJECT_REPR.sub(r"<\1>", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rational(v: Any, what: str) -> float:
    if isinstance(v, IFDRational):
        if v.denominator == 0:
            raise _Unreadable(f"{what} unreadable: zero denominator")
        f = float(v.numerator) / float(v.denominator)
    elif isinstance(v, tuple) and len(v) == 2:
        if float(v[1]) == 0:
            raise _Unreadable(f"{what} unreadable: zero denominator")
        f = float(v[0]) / float(v[1])
    else:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise _Unreadable(f"{what} unreadable: {type(v).__name__} value") from None
    if not math.isfinite(f):
        raise _Unreadable(f"{what} unreadable: {f}")
    return f


def _coordinate(gps: Any, tag: int, ref_tag: int, negative_ref: str, what: str) -> float:
    values, ref = gps.get(tag), gps.get(ref_tag)
    if values is None:
        raise _Unreadable(f"GPS {what} missing")
    if not isinstance(values, tuple) or len(values) != 3:
        raise _Unreadable(f"GPS {what} unreadable: not (degrees, minutes, seconds)")
    deg, minutes, sec = (_rational(v, f"GPS {what}") for v in values)
    value = deg + minutes / 60.0 + sec / 3600.0
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = (ref or "").strip("\x00 ").upper()
    if ref not in ("N", "S", "E", "W"):
        raise _Unreadable(f"GPS {what} reference {ref!r} is not N/S/E/W")
    return -value if ref == negative_ref else value


def _read_gps(exif: Image.Exif) -> tuple[float | None, float | None, float | None, str | None, str | None]:
    """(lat, lon, accuracy, gps_error, accuracy_error); coordinates are both present or both None."""
    try:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except Exception as exc:  # corrupt GPS IFD
        return None, None, None, f"GPS block unreadable: {error_detail(exc)}", None
    if not gps or (ExifTags.GPS.GPSLatitude not in gps and ExifTags.GPS.GPSLongitude not in gps):
        return None, None, None, None, None  # no position written (an IFD with only altitude or time)
    try:
        lat = _coordinate(gps, ExifTags.GPS.GPSLatitude, ExifTags.GPS.GPSLatitudeRef, "S", "latitude")
        lon = _coordinate(gps, ExifTags.GPS.GPSLongitude, ExifTags.GPS.GPSLongitudeRef, "W", "longitude")
    except _Unreadable as exc:
        return None, None, None, str(exc), None
    acc, acc_error = None, None
    if ExifTags.GPS.GPSHPositioningError in gps:
        try:
            acc = _rational(gps[ExifTags.GPS.GPSHPositioningError], "GPS accuracy")
        except _Unreadable as exc:  # the coordinate is still good
            acc_error = str(exc)
    return lat, lon, acc, None, acc_error


def _text(raw: Any) -> str:
    """An EXIF ASCII value as text, NULs and padding stripped ('' when absent)."""
    if raw is None:
        return ""
    return (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip("\x00 ")


def _parse_offset(text: str) -> dt.timezone | None:
    """The offset an OffsetTime* tag gives ("+05:00"), or None when it is malformed."""
    m = _OFFSET.match(text)
    if m:
        delta = (-1 if m.group(1) == "-" else 1) * dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
        if abs(delta) < dt.timedelta(hours=24):
            return dt.timezone(delta)
    return None


def _gps_offset(gps: Any, local: dt.datetime) -> dt.timezone | None:
    """The offset that the GPS clock (GPSDateStamp + GPSTimeStamp, UTC) implies for the camera's local time.

    Only a plausible one: a whole number of quarter hours within ±14 h, to ``_GPS_CLOCK_TOLERANCE`` (a fix is
    stamped a little before or after the shutter). A missing, unreadable or inconsistent stamp gives None.
    """
    day, clock = _text(gps.get(ExifTags.GPS.GPSDateStamp)), gps.get(ExifTags.GPS.GPSTimeStamp)
    if not day or not isinstance(clock, tuple) or len(clock) != 3:
        return None
    try:
        h, m, sec = (_rational(v, "GPS time") for v in clock)
        if not (0 <= h < 24 and 0 <= m < 60 and 0 <= sec < 61):
            return None
        utc = dt.datetime.strptime(day[:10].replace("-", ":"), "%Y:%m:%d") + dt.timedelta(
            hours=h, minutes=m, seconds=sec)
    except (_Unreadable, ValueError, OverflowError):
        return None
    diff = local - utc
    quarters = round(diff / _QUARTER_HOUR)
    if abs(quarters) > 56 or abs(diff - quarters * _QUARTER_HOUR) > _GPS_CLOCK_TOLERANCE:
        return None
    return dt.timezone(quarters * _QUARTER_HOUR)


@dataclass(frozen=True)
class _CaptureTime:
    """When a photo was taken, as its EXIF says, and where that came from."""

    taken_at: dt.datetime | None = None  # UTC
    offset: dt.timezone | None = None  # the camera's offset (tagged, or implied by GPS); None: +05:00 assumed
    source: str | None = None  # e.g. "exif:DateTimeOriginal+OffsetTimeOriginal"; None when there is no date
    error: str | None = None  # a date or offset tag present but unusable (noted, never fatal)
    note: str | None = None  # why there is no usable capture time ("<why>: <detail>"); None when there is one


def _capture_time(name: str, text: str, offset_name: str, offset_raw: Any, gps: Any) -> _CaptureTime:
    """One date tag's capture time: its own offset tag, else the GPS clock's, else Pakistan time."""
    if not text.strip(":0 "):  # "0000:00:00 00:00:00" or "    :  :     :  :  ": the camera did not know
        return _CaptureTime(error=f"date taken unknown (zeroed: {text!r})", note=f"exif date unusable: {text}")
    try:
        local = dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return _CaptureTime(error=f"date taken malformed: {text!r}", note=f"exif date unusable: {text}")
    offset_text, error = _text(offset_raw), None
    tz = _parse_offset(offset_text) if offset_text else None
    source = f"exif:{name}+{offset_name}"
    if tz is None:
        tz, source = _gps_offset(gps, local), f"exif:{name}+GPS"
        if offset_text:
            used = "GPS clock used" if tz is not None else "Pakistan time (+05:00) assumed"
            error = f"date offset {offset_text!r} malformed: {used}"
    if tz is None:
        source = f"exif:{name} (assumed +05:00)"
    try:
        taken = local.replace(tzinfo=tz or DEFAULT_UTC_OFFSET).astimezone(dt.timezone.utc)
    except OverflowError:
        return _CaptureTime(error=f"date taken out of range: {text!r}", note=f"exif date unusable: {text}")
    return _CaptureTime(taken, tz, source, error)


def _read_date(exif: Image.Exif) -> _CaptureTime:
    """DateTimeOriginal, else DateTimeDigitized, each with its own offset tag. Never IFD0 DateTime: that is when
    the file was last written (GIMP, Photoshop, macOS Photos set it on every save), not when the photo was taken."""
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
    except Exception as exc:  # corrupt Exif IFD
        return _CaptureTime(error=f"date unreadable: {error_detail(exc)}",
                           note="exif date unusable: Exif IFD unreadable")
    try:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except Exception:  # corrupt GPS IFD: reported by _read_gps; no GPS clock
        gps = {}
    first: _CaptureTime | None = None
    for name, tag, offset_name, offset_tag in _CAPTURE_TAGS:
        # in the Exif IFD; some TIFF writers put these tags in IFD0 itself (still the capture time, tag 0x9003)
        ifd = next((d for d in (sub, exif) if _text(d.get(tag))), None)
        if ifd is None:
            continue
        when = _capture_time(name, _text(ifd.get(tag)), offset_name, ifd.get(offset_tag), gps)
        if when.taken_at is not None:  # an unusable DateTimeOriginal before it stays noted
            error = "; ".join(e for e in (first.error if first else None, when.error) if e) or None
            return _CaptureTime(when.taken_at, when.offset, when.source, error)
        first = first or when
    if first is not None:
        return first
    saved = _text(exif.get(ExifTags.Base.DateTime))
    if saved:
        return _CaptureTime(note=f"exif has no capture date: IFD0 DateTime {saved} is the last save, not used")
    return _CaptureTime()


def _header_from_exif(fmt: str, width: int, height: int, exif: Image.Exif) -> ImageHeader:
    """The header of an image whose stored size and EXIF are known: PIL's reading and the fast JPEG path
    both end here, so both give every value the same meaning."""
    if exif.get(ExifTags.Base.Orientation) in _ORIENTATION_SWAPS_AXES:
        width, height = height, width
    lat, lon, acc, gps_error, acc_error = _read_gps(exif)
    when = _read_date(exif)
    problems = [p for p in (gps_error, acc_error, when.error) if p]
    return ImageHeader(fmt, int(width), int(height), lat, lon, acc, when.taken_at, "; ".join(problems) or None,
                       gps_error, when.error, when.offset, when.source, when.note)


# ------------------------------------------------------------------------------------------------ fast JPEG path
# A JPEG header read through PIL (open, EXIF IFD0, the GPS and Exif IFDs) costs ~0.45 ms, which bounds a first
# catalog build. ``fast_jpeg_header`` walks the markers and the three IFDs with ``struct`` for the well-formed case
# only and hands the same values (str, int, IFDRational tuples) to ``_header_from_exif``, the function PIL's reading
# ends in too, so both give GPS, capture time and its origin the same meaning; anything it does not recognise exactly
# as PIL would (another marker, a second EXIF block, XMP, MPO, an odd tag type, a value outside the block, a
# duplicate tag, a huge image) returns None and PIL reads the file. tests/test_catalog_fast_header.py checks both
# paths agree on many variants.
_JPEG_SEGMENTS = {0xC4, 0xDB, 0xDD, 0xFE, 0xC0, 0xC1, 0xC2, *range(0xE0, 0xF0)}
_TIFF_SIZES = {t: size for t, (size, _) in ImageFileDirectory_v2._load_dispatch.items()}
_ASCII, _SHORT, _LONG, _RATIONAL, _IFD = 2, 3, 4, 5, 13
# tag -> the (type, count) accepted; None: any count (ASCII). Other forms of these tags go to PIL.
# (IFD0 DateTime is read only to say that a photo has no capture date but for it)
_EXIF_TAGS = {36867: (_ASCII, None), 36868: (_ASCII, None), 36881: (_ASCII, None), 36882: (_ASCII, None)}
_IFD0_TAGS = {274: (_SHORT, 1), 282: (_RATIONAL, 1), 296: (_SHORT, 1), 306: (_ASCII, None),
              0x8769: ((_LONG, _IFD), 1), 0x8825: ((_LONG, _IFD), 1), **_EXIF_TAGS}
_GPS_TAGS = {1: (_ASCII, None), 2: (_RATIONAL, 3), 3: (_ASCII, None), 4: (_RATIONAL, 3), 7: (_RATIONAL, 3),
             29: (_ASCII, None), 31: (_RATIONAL, 1)}


class _Unsure(Exception):
    """The fast path does not know what PIL would make of this: PIL reads the file."""


def _ifd(tiff: bytes, offset: int, endian: str, wanted: dict) -> dict:
    """The wanted tags of one IFD as PIL's Exif gives them (str, int, IFDRational, tuples of IFDRational)."""
    if offset < 0 or offset + 2 > len(tiff):
        raise _Unsure
    (n,) = struct.unpack_from(endian + "H", tiff, offset)
    if offset + 2 + 12 * n > len(tiff):
        raise _Unsure
    out, seen, total = {}, set(), 0
    for tag, typ, count, raw in struct.iter_unpack(endian + "HHL4s", tiff[offset + 2 : offset + 2 + 12 * n]):
        if tag in seen or typ not in _TIFF_SIZES or count == 0:
            raise _Unsure
        seen.add(tag)
        size = count * _TIFF_SIZES[typ]
        if size > 4:
            (at,) = struct.unpack(endian + "L", raw)
            total += size
            if at + size > len(tiff) or total > len(tiff):
                raise _Unsure
            data = tiff[at : at + size]
        else:
            data = raw[:size]
        if tag not in wanted:
            continue
        want_typ, want_count = wanted[tag]
        if typ not in (want_typ if isinstance(want_typ, tuple) else (want_typ,)) or (
                want_count is not None and count != want_count):
            raise _Unsure
        if typ == _ASCII:
            out[tag] = (data[:-1] if data.endswith(b"\0") else data).decode("latin-1", "replace")
        elif typ == _RATIONAL:
            vals = struct.unpack(endian + f"{2 * count}L", data)
            rationals = tuple(IFDRational(a, b) for a, b in zip(vals[::2], vals[1::2]))
            out[tag] = rationals[0] if count == 1 else rationals
        else:
            out[tag] = struct.unpack(endian + ("H" if typ == _SHORT else "L"), data)[0]
    return out


class _FastExif:
    """What this module's readers ask of PIL's Exif: ``get`` (IFD0) and ``get_ifd``."""

    def __init__(self, ifd0: dict, sub: dict[int, dict]):
        self.ifd0, self.sub = ifd0, sub

    def get(self, tag: int, default=None):
        return self.ifd0.get(tag, default)

    def get_ifd(self, tag: int) -> dict:
        return self.sub.get(tag, {})


def _exif_block(block: bytes) -> _FastExif:
    tiff = block[6:]
    if tiff.startswith(b"Exif\0\0") or len(tiff) < 8:
        raise _Unsure  # PIL strips a doubled prefix, or has no EXIF at all: leave those to it
    endian = {b"II*\0": "<", b"MM\0*": ">"}.get(tiff[:4])
    if endian is None:
        raise _Unsure
    (first,) = struct.unpack_from(endian + "L", tiff, 4)
    ifd0 = _ifd(tiff, first, endian, _IFD0_TAGS)
    sub = {}
    for pointer, wanted in ((0x8769, _EXIF_TAGS), (0x8825, _GPS_TAGS)):
        if pointer in ifd0:
            sub[pointer] = _ifd(tiff, ifd0[pointer], endian, wanted)
    return _FastExif(ifd0, sub)


def _jpeg_layout(data: bytes) -> tuple[int, int, bytes | None]:
    """(width, height, the EXIF APP1 block or None) from the markers before the first scan."""
    if data[:3] != b"\xff\xd8\xff":
        raise _Unsure
    pos, size, exif = 2, None, None
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise _Unsure
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise _Unsure
        if marker == 0xDA:  # start of scan: PIL stops here
            break
        if marker not in _JPEG_SEGMENTS:
            raise _Unsure
        seg = data[pos + 4 : end]
        if marker in (0xC0, 0xC1, 0xC2):
            if size is not None or len(seg) < 6 or seg[0] != 8 or seg[5] not in (1, 3, 4) or (len(seg) - 6) % 3:
                raise _Unsure
            size = struct.unpack_from(">H", seg, 3)[0], struct.unpack_from(">H", seg, 1)[0]
        elif marker == 0xDB:
            while seg:  # PIL's DQT check
                qt = 1 + (1 if seg[0] // 16 == 0 else 2) * 64
                if len(seg) < qt:
                    raise _Unsure
                seg = seg[qt:]
        elif marker == 0xE1 and seg.startswith(b"Exif\0\0"):
            if exif is not None:
                raise _Unsure  # PIL joins several blocks
            exif = seg
        elif marker == 0xE1 and seg.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
            raise _Unsure  # XMP may carry the orientation
        elif marker == 0xE2 and (seg.startswith(b"MPF\0") or (seg.startswith(b"ICC_PROFILE\0") and len(seg) < 15)):
            raise _Unsure
        elif (marker == 0xE0 and seg.startswith(b"JFIF") or marker == 0xEE and seg.startswith(b"Adobe")) \
                and len(seg) < 12:
            raise _Unsure
        pos = end
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise _Unsure
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise _Unsure  # PIL warns or refuses: let it
    return size[0], size[1], exif


def fast_jpeg_header(data: bytes) -> ImageHeader | None:
    """The header of a well-formed JPEG read without PIL (same values as ``read_header``), or None: PIL must read it."""
    try:
        width, height, block = _jpeg_layout(data)
        return _header_from_exif("JPEG", width, height, _FastExif({}, {}) if block is None else _exif_block(block))
    except (_Unsure, struct.error):
        return None


def read_header(source: bytes | Path, fast: bool = False) -> ImageHeader:
    """Parse header and EXIF only (a path is read no further than that). Raises ``NotAnImage`` for bytes no decoder
    recognises, ``DecompressionBomb`` for a header PIL refuses as one. ``fast``: bytes of a well-formed JPEG are
    read by ``fast_jpeg_header`` (~0.45 ms per file saved, which bounds a catalog's first build)."""
    if fast and isinstance(source, bytes):
        header = fast_jpeg_header(source)
        if header is not None:
            return header
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if size == 0:
        raise NotAnImage("empty file")
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(error_detail(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise NotAnImage(error_detail(exc, size)) from exc
    with img:
        width, height = img.size
        fmt = img.format or "unknown"
        try:
            exif = img.getexif()
            exif.get(ExifTags.Base.Orientation)  # IFD0 values are decoded when first asked for
        except Exception as exc:  # corrupt EXIF block: keep the image, record why metadata is missing
            err = f"EXIF unreadable: {error_detail(exc)}"
            return ImageHeader(fmt, int(width), int(height), None, None, None, None, err, gps_error=err,
                               date_note="exif date unusable: EXIF block unreadable")
        return _header_from_exif(fmt, width, height, exif)
