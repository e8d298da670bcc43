"""Every rejection reason code, in one place. A row that leaves the pipeline carries exactly one of these."""

from __future__ import annotations

# catalog stage: reading files and their metadata
MISSING_FILE = "missing_file"
NOT_AN_IMAGE = "not_an_image"
NO_COORDINATES = "no_coordinates"
INVALID_COORDINATES = "invalid_coordinates"
FUTURE_DATE = "future_date"
DUPLICATE_BYTES = "duplicate_bytes"
# label stage
OUTSIDE_PAKISTAN = "outside_pakistan"
NO_CLIMATE_CLASS = "no_climate_class"
# filter stage (pipeline/filters): decoding, image quality, duplicates, geotag, licence, content
UNDECODABLE = "undecodable"
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
NEAR_UNIFORM = "near_uniform"
BLURRED = "blurred"
NEAR_DUPLICATE = "near_duplicate"
NULL_ISLAND = "null_island"
INACCURATE_GEOTAG = "inaccurate_geotag"
LICENSE_NOT_ALLOWED = "license_not_allowed"
INDOOR = "indoor"

DESCRIPTIONS: dict[str, str] = {
    MISSING_FILE: "the manifest names a file that is not in the image store",
    NOT_AN_IMAGE: "the bytes are not an image any decoder recognises (HTML error page, empty file, unknown format)",
    NO_COORDINATES: "neither the source nor the EXIF GPS block gives a coordinate",
    INVALID_COORDINATES: "latitude/longitude NaN, infinite or out of range",
    FUTURE_DATE: "the date taken lies in the future: the camera clock or the metadata is broken",
    DUPLICATE_BYTES: "the same bytes (sha256) already entered the catalog from another row; the first row is kept",
    OUTSIDE_PAKISTAN: "the coordinate lies in no province polygon of Pakistan",
    NO_CLIMATE_CLASS: "the Köppen-Geiger raster has no class at the coordinate",
    UNDECODABLE: "the header is readable but the pixel data is truncated or corrupt",
    DECOMPRESSION_BOMB: "the header claims more pixels than the configured limit; refused before decoding",
    UNSUPPORTED_FORMAT: "a format PIL reads but the pipeline does not accept for photos (GIF, ICO, PSD, ...)",
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
