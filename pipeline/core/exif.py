"""Read what a file says about itself: format, oriented size, EXIF GPS and date taken, without decoding pixels."""

from __future__ import annotations

import datetime as dt
import io
import math
from dataclasses import dataclass

from PIL import ExifTags, Image, UnidentifiedImageError

# Pakistan Standard Time; assumed when EXIF gives a local time without OffsetTimeOriginal (no DST since 2009).
DEFAULT_UTC_OFFSET = dt.timezone(dt.timedelta(hours=5))
_ORIENTATION_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int  # after EXIF orientation, i.e. as displayed
    height: int
    lat: float | None
    lon: float | None
    accuracy_m: float | None
    taken_at: dt.datetime | None  # UTC
    exif_error: str | None  # a malformed EXIF block is noted, not fatal


class NotAnImage(ValueError):
    pass


class DecompressionBomb(NotAnImage):
    """The header claims so many pixels that PIL refuses to open it (its limit, twice ``Image.MAX_IMAGE_PIXELS``)."""


def _rational(v) -> float:
    return float(v[0]) / float(v[1]) if isinstance(v, tuple) and len(v) == 2 else float(v)


def _dms(values, ref: str | None, negative_ref: str) -> float | None:
    if values is None or ref is None:
        return None
    parts = [_rational(v) for v in values]
    if len(parts) != 3:
        raise ValueError(f"GPS value {values!r} is not (deg, min, sec)")
    deg = parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
    ref = ref.strip("\x00 ").upper()
    return -deg if ref == negative_ref else deg


def _parse_exif_datetime(value: str | None, offset: str | None) -> dt.datetime | None:
    if not value:
        return None
    value = value.strip("\x00 ")
    if value.startswith("0000") or not value:
        return None
    local = dt.datetime.strptime(value[:19], "%Y:%m:%d %H:%M:%S")
    tz = DEFAULT_UTC_OFFSET
    if offset:
        off = offset.strip("\x00 ")
        sign = -1 if off.startswith("-") else 1
        hh, mm = off.lstrip("+-").split(":")
        tz = dt.timezone(sign * dt.timedelta(hours=int(hh), minutes=int(mm)))
    return local.replace(tzinfo=tz).astimezone(dt.timezone.utc)


def read_header(data: bytes) -> ImageHeader:
    """Parse header and EXIF only. Raises ``NotAnImage`` for bytes no decoder recognises."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise NotAnImage(str(exc) or type(exc).__name__) from exc
    with img:
        width, height = img.size
        lat = lon = acc = None
        taken = None
        err = None
        try:
            exif = img.getexif()
            if exif.get(ExifTags.Base.Orientation) in _ORIENTATION_SWAPS_AXES:
                width, height = height, width
            gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
            if gps:
                lat = _dms(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "S")
                lon = _dms(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "W")
                if ExifTags.GPS.GPSHPositioningError in gps:
                    acc = _rational(gps[ExifTags.GPS.GPSHPositioningError])
            sub = exif.get_ifd(ExifTags.IFD.Exif)
            taken = _parse_exif_datetime(
                sub.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime),
                sub.get(ExifTags.Base.OffsetTimeOriginal),
            )
        except Exception as exc:  # corrupt EXIF: keep the image, record why metadata is missing
            err = f"{type(exc).__name__}: {exc}"
            lat = lon = acc = None if lat is None or lon is None else acc
        if lat is not None and (math.isnan(lat) or math.isnan(lon if lon is not None else math.nan)):
            lat = lon = None
        return ImageHeader(img.format or "unknown", int(width), int(height), lat, lon, acc, taken, err)
