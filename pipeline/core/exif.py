"""Read what a file says about itself: format, oriented size, EXIF GPS and date taken, without decoding pixels.

GPS and date are read independently: a broken date never costs the coordinates, and each problem is reported
in words (``gps_error``, ``date_error``) so a rejection or a count can say what was unreadable.

The capture time is DateTimeOriginal, else DateTimeDigitized, never IFD0 DateTime (the file's last save). Its offset
is the matching OffsetTime* tag, else the one the GPS clock (UTC) implies, else Pakistan time; ``taken_at_source``
says which, ``date_note`` why there is none. HEIC/HEIF is opened like JPEG (``pipeline.core.image_formats``).
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.TiffImagePlugin import IFDRational

from pipeline.core.provinces import PAKISTAN_UTC_OFFSET_HOURS

# Pakistan Standard Time; assumed when EXIF gives a local time without OffsetTimeOriginal (no DST since 2009).
DEFAULT_UTC_OFFSET = dt.timezone(dt.timedelta(hours=PAKISTAN_UTC_OFFSET_HOURS))
_ORIENTATION_SWAPS_AXES = {5, 6, 7, 8}
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_QUARTER_HOUR = dt.timedelta(minutes=15)
# how far the GPS clock may stand from the camera's once the offset is taken out (a fix is stamped near the shutter)
GPS_CLOCK_TOLERANCE = dt.timedelta(minutes=2)
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

    Only a plausible one: a whole number of quarter hours within ±14 h, to ``GPS_CLOCK_TOLERANCE`` (a fix is
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
    if abs(quarters) > 56 or abs(diff - quarters * _QUARTER_HOUR) > GPS_CLOCK_TOLERANCE:
        return None
    return dt.timezone(quarters * _QUARTER_HOUR)


@dataclass(frozen=True)
class CaptureTime:
    """When a photo was taken, as its EXIF says, and where that came from."""

    taken_at: dt.datetime | None = None  # UTC
    offset: dt.timezone | None = None  # the camera's offset (tagged, or implied by GPS); None: +05:00 assumed
    source: str | None = None  # e.g. "exif:DateTimeOriginal+OffsetTimeOriginal"; None when there is no date
    error: str | None = None  # a date or offset tag present but unusable (noted, never fatal)
    note: str | None = None  # why there is no usable capture time ("<why>: <detail>"); None when there is one


def _capture_time(name: str, text: str, offset_name: str, offset_raw: Any, gps: Any) -> CaptureTime:
    """One date tag's capture time: its own offset tag, else the GPS clock's, else Pakistan time."""
    if not text.strip(":0 "):  # "0000:00:00 00:00:00" or "    :  :     :  :  ": the camera did not know
        return CaptureTime(error=f"date taken unknown (zeroed: {text!r})", note=f"exif date unusable: {text}")
    try:
        local = dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return CaptureTime(error=f"date taken malformed: {text!r}", note=f"exif date unusable: {text}")
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
        return CaptureTime(error=f"date taken out of range: {text!r}", note=f"exif date unusable: {text}")
    return CaptureTime(taken, tz, source, error)


def _read_date(exif: Image.Exif) -> CaptureTime:
    """DateTimeOriginal, else DateTimeDigitized, each with its own offset tag. Never IFD0 DateTime: that is when
    the file was last written (GIMP, Photoshop, macOS Photos set it on every save), not when the photo was taken."""
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
    except Exception as exc:  # corrupt Exif IFD
        return CaptureTime(error=f"date unreadable: {error_detail(exc)}",
                           note="exif date unusable: Exif IFD unreadable")
    try:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except Exception:  # corrupt GPS IFD: reported by _read_gps; no GPS clock
        gps = {}
    first: CaptureTime | None = None
    for name, tag, offset_name, offset_tag in _CAPTURE_TAGS:
        # in the Exif IFD; some TIFF writers put these tags in IFD0 itself (still the capture time, tag 0x9003)
        ifd = next((d for d in (sub, exif) if _text(d.get(tag))), None)
        if ifd is None:
            continue
        when = _capture_time(name, _text(ifd.get(tag)), offset_name, ifd.get(offset_tag), gps)
        if when.taken_at is not None:  # an unusable DateTimeOriginal before it stays noted
            error = "; ".join(e for e in (first.error if first else None, when.error) if e) or None
            return CaptureTime(when.taken_at, when.offset, when.source, error)
        first = first or when
    if first is not None:
        return first
    saved = _text(exif.get(ExifTags.Base.DateTime))
    if saved:
        return CaptureTime(note=f"exif has no capture date: IFD0 DateTime {saved} is the last save, not used")
    return CaptureTime()


def header_from_exif(fmt: str, width: int, height: int, exif: Image.Exif) -> ImageHeader:
    """The header of an image whose stored size and EXIF are known: PIL's reading and the catalog's fast JPEG path
    both end here, so both give every value the same meaning."""
    if exif.get(ExifTags.Base.Orientation) in _ORIENTATION_SWAPS_AXES:
        width, height = height, width
    lat, lon, acc, gps_error, acc_error = _read_gps(exif)
    when = _read_date(exif)
    problems = [p for p in (gps_error, acc_error, when.error) if p]
    return ImageHeader(fmt, int(width), int(height), lat, lon, acc, when.taken_at, "; ".join(problems) or None,
                       gps_error, when.error, when.offset, when.source, when.note)


def read_header(source: bytes | Path) -> ImageHeader:
    """Parse header and EXIF only (a path is read no further than that). Raises ``NotAnImage`` for bytes no decoder
    recognises, ``DecompressionBomb`` for a header PIL refuses as one."""
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
        return header_from_exif(fmt, width, height, exif)
