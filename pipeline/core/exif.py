"""Read what a file says about itself: format, oriented size, EXIF GPS and date taken, without decoding pixels.

GPS and date are read independently: a broken date never costs the coordinates, and each problem is reported
in words (``gps_error``, ``date_error``) so a rejection or a count can say what was unreadable.
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
    utc_offset: dt.timezone | None = None  # OffsetTimeOriginal of taken_at; None when untagged (Pakistan time used)


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


def _parse_offset(raw: Any) -> tuple[dt.timezone | None, str | None]:
    """The tagged offset (None when untagged or malformed) and the problem in words."""
    if raw is None:
        return None, None
    text = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip("\x00 ")
    if not text:
        return None, None
    m = _OFFSET.match(text)
    if m:
        delta = (-1 if m.group(1) == "-" else 1) * dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
        if abs(delta) < dt.timedelta(hours=24):
            return dt.timezone(delta), None
    return None, f"date offset {text!r} malformed: Pakistan time (+05:00) assumed"


def _parse_exif_datetime(value: Any, offset: Any) -> tuple[dt.datetime | None, dt.timezone | None, str | None]:
    """(taken_at in UTC, the tagged offset, the problem in words). A bad date is None, never an exception."""
    if value is None:
        return None, None, None
    text = (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)).strip("\x00 ")
    if not text:
        return None, None, None
    if not text.strip(":0 "):  # "0000:00:00 00:00:00" or "    :  :     :  :  ": the camera did not know
        return None, None, f"date taken unknown (zeroed: {text!r})"
    try:
        local = dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None, None, f"date taken malformed: {text!r}"
    tz, offset_error = _parse_offset(offset)
    try:
        return local.replace(tzinfo=tz or DEFAULT_UTC_OFFSET).astimezone(dt.timezone.utc), tz, offset_error
    except OverflowError:
        return None, None, f"date taken out of range: {text!r}"


def _read_date(exif: Image.Exif) -> tuple[dt.datetime | None, dt.timezone | None, str | None]:
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        value = sub.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
        offset = sub.get(ExifTags.Base.OffsetTimeOriginal)
    except Exception as exc:  # corrupt Exif IFD
        return None, None, f"date unreadable: {error_detail(exc)}"
    return _parse_exif_datetime(value, offset)


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
            if exif.get(ExifTags.Base.Orientation) in _ORIENTATION_SWAPS_AXES:
                width, height = height, width
        except Exception as exc:  # corrupt EXIF block: keep the image, record why metadata is missing
            err = f"EXIF unreadable: {error_detail(exc)}"
            return ImageHeader(fmt, int(width), int(height), None, None, None, None, err, err, None, None)
        lat, lon, acc, gps_error, acc_error = _read_gps(exif)
        taken, offset, date_error = _read_date(exif)
        problems = [p for p in (gps_error, acc_error, date_error) if p]
        return ImageHeader(
            fmt, int(width), int(height), lat, lon, acc, taken, "; ".join(problems) or None,
            gps_error, date_error, offset,
        )
