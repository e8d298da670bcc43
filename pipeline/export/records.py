"""Each exported sample's JSON record: who made the image and under which licence, where and when it was taken, its
labels and split. The shards carry it beside every image, so the licence and attribution travel with the pixels
(TASL: title, author, source, licence), and a record never says more than the catalog knows: unknown values are
null, and a missing day of year says why.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core.provinces import PROVINCES
from pipeline.core.schema import col
from pipeline.core.shards import SPLITS
from pipeline.core.values import is_missing
from pipeline.filters.licenses import license_family, license_url
from pipeline.core.koppen_classes import COARSE_GROUPS

_STR, _INT, _F64, _BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
ATTRIBUTION_TYPE = pa.list_(pa.struct([(k, _STR) for k in ("displayName", "uri", "photoUri")]))
# Every field of a sample's JSON, typed and described: one declaration for the Parquet index beside each shard,
# the Hugging Face features in the dataset card, and the datasheet's field list. Null means unknown.
RECORD_SCHEMA = pa.schema([
    col("image_id", _STR, "sha256 of the original file (also the sample's key)"),
    col("split", _STR, "train | val | test (location- and owner-disjoint)"),
    col("source", _STR, "sample_world, local, flickr, google_places, yfcc100m, gldv2"),
    col("source_id", _STR, "the image's id at its source"),
    col("source_url", _STR, "the image's page at its source (Flickr: the photo page to link back to)"),
    col("owner", _STR, "photographer or uploader at the source (Flickr: the owner's NSID)"),
    col("license", _STR, "licence as the source names it"),
    col("license_url", _STR, "the licence deed's URL; null when the name does not say which deed"),
    col("license_family", _STR, "cc, cc0, public_domain, no_known_restrictions, us_government, all_rights_reserved"),
    col("redistributable", _BOOL, "false: keep out of any public release (Google Places terms, unknown licence)"),
    col("attribution", ATTRIBUTION_TYPE, "attribution the source requires shown with the image (Google Places "
        "authorAttributions: displayName, uri, photoUri)"),
    col("credit", _STR, "one line to show with the image: title, author, source, licence (TASL)"),
    col("title", _STR, "title at the source"),
    col("lat", _F64, "latitude in degrees (WGS84)"),
    col("lon", _F64, "longitude in degrees (WGS84)"),
    col("province", _STR, "province key: ajk, balochistan, gb, ict, kpk, punjab, sindh"),
    col("province_id", _INT, "province index 0-6 (GEOPAK's ids)"),
    col("province_name", _STR, "province name"),
    col("koppen", _STR, "Köppen-Geiger class code at the coordinate, e.g. BWh"),
    col("koppen_id", _INT, "Köppen-Geiger class id: 0 water, 1-30 Beck et al."),
    col("koppen_group", _STR, "coarse Köppen group: Water, A, B, C, D, E"),
    col("day_of_year", _INT, "1-based day of year taken (Pakistan time); null when unknown or implausible"),
    col("date_note", _STR, "why day_of_year is null"),
    col("taken_at", _STR, "capture time, ISO 8601 UTC; null when unknown"),
    col("taken_at_source", _STR, "where taken_at came from, e.g. exif:DateTimeOriginal+OffsetTimeOriginal"),
    col("original_width", _INT, "width of the original image in px (upright)"),
    col("original_height", _INT, "height of the original image in px (upright)"),
    col("width", _INT, "width of the stored copy in px"),
    col("height", _INT, "height of the stored copy in px"),
    col("resized", _BOOL, "false: the original JPEG stored byte for byte (its sha256 is image_id)"),
])
# the Parquet index beside each shard: the record (attribution as JSON text) and where the .jpg member is
INDEX_SCHEMA = pa.schema(
    [f.with_type(_STR) if f.name == "attribution" else f for f in RECORD_SCHEMA]
    + [col("key", _STR, "the sample's key in the tar (the image id)"), col("shard", _STR, "shard name, e.g. 00000"),
       col("offset", _INT, "byte offset of the .jpg member's data in the tar"),
       col("size", _INT, "bytes of the .jpg member"), col("sha256", _STR, "sha256 of the .jpg member")])

# the labelled catalog's columns a record is made from
LABELLED_COLUMNS = ["image_id", "path", "source", "source_id", "source_url", "owner", "license", "attribution",
                    "title", "lat", "lon", "province_id", "province_key", "koppen_id", "koppen_code", "koppen_group",
                    "day_of_year", "taken_at", "taken_at_source", "date_note", "width", "height"]
# licence families whose images may be passed on (under their licence's terms); others are for training only
REDISTRIBUTABLE = frozenset({"cc", "cc0", "public_domain", "no_known_restrictions", "us_government"})


def _text(v: Any) -> str | None:
    return None if is_missing(v, blank_text=True) else str(v)


ATTRIBUTION_KEYS = ("displayName", "uri", "photoUri")  # Places (New) authorAttributions' fields


def parse_attribution(value: Any) -> list[dict[str, str | None]] | None:
    """The catalog's ``attribution`` (JSON text: Places ``authorAttributions``) as a list of
    ``{displayName, uri, photoUri}``; None when there is none. Every record has this one shape (text that is not
    such a list becomes one entry's ``displayName``), so readers that infer a schema (Hugging Face ``datasets``)
    see one type."""
    text = _text(value)
    if text is None:
        return None
    try:
        items = json.loads(text)
    except ValueError:
        items = [{"displayName": text}]
    items = items if isinstance(items, list) else [items]
    out = [{k: (None if is_missing(a.get(k), blank_text=True) else str(a.get(k))) for k in ATTRIBUTION_KEYS}
           if isinstance(a, dict) else {"displayName": str(a), "uri": None, "photoUri": None} for a in items]
    return out or None


def _authors(attribution: list[dict] | None, owner: str | None) -> str | None:
    """Who to credit: the attribution's display names when the source gave them, else the owner."""
    names = [a["displayName"] for a in attribution or [] if a.get("displayName")]
    return ", ".join(names) if names else owner


def credit_line(title: str | None, author: str | None, source: str, url: str | None, lic: str | None,
                lic_url: str | None) -> str:
    """One human-readable credit in TASL order: '"Title" by Author (url), source, Licence (licence url)'."""
    parts = [f'"{title}"' if title else "Untitled", f"by {author}" if author else "by an unknown author"]
    where = f"{source}" + (f" ({url})" if url else "")
    licence = (lic or "no licence recorded") + (f" ({lic_url})" if lic_url else "")
    return f"{' '.join(parts)}, {where}, {licence}"


def _date_note(row: dict) -> str | None:
    """Why the day of year is null (the catalog's note, else what the labels stage did)."""
    if not is_missing(row["day_of_year"]):
        return _text(row["date_note"])
    note = _text(row["date_note"])
    if note:
        return note
    if is_missing(row["taken_at"]):
        return "no capture date at the source"
    return f"capture date {pd.Timestamp(row['taken_at']).isoformat()} judged implausible by the labels stage"


def sample_records(labelled: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """One row per train/val/test image: ``image_id``, ``path`` (to read it) and ``record`` (the JSON dict),
    sorted by image id. Buffer images (in no split) are left out; a labelled image without a split is an error."""
    missing = [c for c in LABELLED_COLUMNS if c not in labelled.columns and c not in ("attribution", "taken_at_source",
                                                                                       "date_note")]
    if missing:
        raise ValueError(f"the labelled catalog lacks columns {missing}")
    df = labelled.reindex(columns=LABELLED_COLUMNS).merge(splits[["image_id", "split"]], on="image_id", how="left")
    if df["split"].isna().any():
        raise ValueError(f"{int(df['split'].isna().sum())} labelled images have no split: materialize "
                         "dataset_splits first")
    df = df[df["split"].isin(SPLITS)].sort_values("image_id", kind="stable").reset_index(drop=True)
    names = {p.id: p.name for p in PROVINCES}
    records = [_record(r, names) for r in df.to_dict("records")]
    return pd.DataFrame({"image_id": df["image_id"].astype(str), "path": df["path"].astype(str),
                         "split": df["split"].astype(str), "width": df["width"].astype(np.int64),
                         "height": df["height"].astype(np.int64), "record": records})


def _record(r: dict, province_names: dict[int, str]) -> dict[str, Any]:
    lic, owner, url, title = _text(r["license"]), _text(r["owner"]), _text(r["source_url"]), _text(r["title"])
    attribution = parse_attribution(r["attribution"])
    lic_url = license_url(lic)
    family = license_family(lic)
    doy = None if is_missing(r["day_of_year"]) else int(r["day_of_year"])
    taken = None if is_missing(r["taken_at"]) else pd.Timestamp(r["taken_at"]).isoformat()
    return {
        "image_id": str(r["image_id"]), "split": str(r["split"]),
        "source": str(r["source"]), "source_id": str(r["source_id"]), "source_url": url,
        "owner": owner, "license": lic, "license_url": lic_url, "license_family": family,
        "redistributable": family in REDISTRIBUTABLE, "attribution": attribution,
        "credit": credit_line(title, _authors(attribution, owner), str(r["source"]), url, lic, lic_url),
        "title": title,
        "lat": float(r["lat"]), "lon": float(r["lon"]),
        "province": str(r["province_key"]), "province_id": int(r["province_id"]),
        "province_name": province_names.get(int(r["province_id"])),
        "koppen": str(r["koppen_code"]), "koppen_id": int(r["koppen_id"]),
        "koppen_group": COARSE_GROUPS[int(r["koppen_group"])],
        "day_of_year": doy, "date_note": _date_note(r), "taken_at": taken,
        "taken_at_source": _text(r["taken_at_source"]),
        "original_width": int(r["width"]), "original_height": int(r["height"]),
    }
