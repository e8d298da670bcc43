"""Every rejection reason code, in one place. A row that leaves the pipeline carries exactly one of these, written
by ``rejection`` (every stage's rejections share one row shape)."""

from __future__ import annotations

from pipeline.core.values import is_missing

# sources: rows a source cannot turn into an image with a coordinate
MALFORMED_DATE = "malformed_date"
DOWNLOAD_FAILED = "download_failed"
UNSUPPORTED_FORMAT = "unsupported_format"
DUPLICATE_ROW = "duplicate_row"
# catalog stage: reading files and their metadata
MISSING_FILE = "missing_file"
NOT_AN_IMAGE = "not_an_image"
NO_COORDINATES = "no_coordinates"
INVALID_COORDINATES = "invalid_coordinates"
FUTURE_DATE = "future_date"
DUPLICATE_BYTES = "duplicate_bytes"
# crawl stage: what a source found but did not keep (raw/<source>/<province>/rejections.parquet)
OTHER_PROVINCE = "other_province"
LICENSE_NOT_ALLOWED = "license_not_allowed"
LOW_GEO_ACCURACY = "low_geo_accuracy"
NOT_A_PHOTO = "not_a_photo"
NO_IMAGE_URL = "no_image_url"
IMAGE_TOO_LARGE = "image_too_large"
COORDINATES_EXPIRED = "coordinates_expired"  # Google Places: coordinates older than the terms allow
# (a crawl download that failed is DOWNLOAD_FAILED, defined with the sources' codes above)
# label stage
OUTSIDE_PAKISTAN = "outside_pakistan"
NO_CLIMATE_CLASS = "no_climate_class"
# filter stage (pipeline/filters): decoding, image quality, duplicates, geotag, licence, content
UNDECODABLE = "undecodable"
BYTES_CHANGED = "bytes_changed"  # the stored file's sha256 is no longer its image_id
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
NEAR_UNIFORM = "near_uniform"
BLURRED = "blurred"
NEAR_DUPLICATE = "near_duplicate"
NULL_ISLAND = "null_island"
INACCURATE_GEOTAG = "inaccurate_geotag"
# (a licence off the allowlist is LICENSE_NOT_ALLOWED, at the crawl and the filter alike)
INDOOR = "indoor"

DESCRIPTIONS: dict[str, str] = {
    MALFORMED_DATE: "the source gives a date that cannot be parsed",
    DUPLICATE_ROW: "the same file or manifest row is listed more than once",
    MISSING_FILE: "the manifest names a file that is not in the image store",
    NOT_AN_IMAGE: "the bytes are not an image any decoder recognises (HTML error page, empty file, unknown format)",
    NO_COORDINATES: "neither the source nor the EXIF GPS block gives a coordinate",
    INVALID_COORDINATES: "latitude/longitude NaN, infinite or out of range",
    FUTURE_DATE: "the date taken lies in the future: the camera clock or the metadata is broken",
    DUPLICATE_BYTES: "the same bytes (sha256) already entered the catalog from another row; the first row is kept",
    OTHER_PROVINCE: "the source's coordinate lies in another province: that province's crawl partition keeps it",
    LOW_GEO_ACCURACY: "the source's location accuracy is below the configured threshold",
    NOT_A_PHOTO: "the record is a video, not a photo",
    NO_IMAGE_URL: "the source gives no URL to download the image from",
    IMAGE_TOO_LARGE: "the download is over the configured byte or pixel limit",
    COORDINATES_EXPIRED: "Google Places coordinates older than the 30 days Google's terms allow caching them: "
    "deleted until Place Details is fetched again for the place_id (which the terms let us keep)",
    DOWNLOAD_FAILED: "the image could not be downloaded (HTTP error, timeout, connection error, or transient errors "
    "outlasted the retries): retried on the next run",
    OUTSIDE_PAKISTAN: "the coordinate lies in no province polygon of Pakistan",
    NO_CLIMATE_CLASS: "the Köppen-Geiger raster has no class at the coordinate",
    UNDECODABLE: "the header is readable but the pixel data is truncated or corrupt",
    BYTES_CHANGED: "the stored file's bytes no longer hash to its image_id (sha256): truncated or replaced after "
    "it was catalogued; the detail gives both id prefixes",
    DECOMPRESSION_BOMB: "the header claims more pixels than the pixel limit (the filter's configured one; PIL's "
    "at the source and the catalog); refused before decoding, with this one code at every stage",
    UNSUPPORTED_FORMAT: "an image format not accepted for photos: a container this installation cannot decode "
    "(AVIF where Pillow has no libavif; HEIC/HEIF is read through pillow-heif) or a format PIL reads but photos "
    "never use (GIF, ICO, PSD, ...)",
    TOO_SMALL: "the shorter side (after EXIF orientation) is below the configured minimum",
    BAD_ASPECT_RATIO: "long side / short side above the configured maximum (strips, extreme panoramas)",
    NEAR_UNIFORM: "almost no grey-level variation: blank, lens cap, over/under-exposed frame",
    BLURRED: "variance of the Laplacian of the downscaled grey image below the configured minimum",
    NEAR_DUPLICATE: "perceptual hash within the Hamming threshold of a better copy (larger, then sharper) that is kept",
    NULL_ISLAND: "the coordinate is (0, 0): a missing geotag written as zeros",
    INACCURATE_GEOTAG: "the source's reported location accuracy is worse than its configured threshold",
    LICENSE_NOT_ALLOWED: "the licence is not on the source's allowlist (or missing where the source must report one)",
    INDOOR: "zero-shot CLIP puts the indoor prompts above the configured probability (only when CLIP is evaluated)",
}


def rejection(stage: str, row, reason: str, detail: str = "") -> dict:
    """One rejections-table row (REJECTIONS_SCHEMA) for a manifest-like ``row`` that leaves ``stage``."""
    return {
        "stage": stage,
        "source": str(row["source"]),
        "source_id": str(row["source_id"]),
        "image_id": None if is_missing(row.get("image_id")) else row.get("image_id"),
        "path": None if is_missing(row.get("path")) else row.get("path"),
        "reason": reason,
        "detail": detail,
    }
