"""Build the catalog: the union of every source's raw manifest, checked row by row against the image store.

Coordinates and dates come from the source when it reports them (the source is the authority for its own
metadata), otherwise from the image's EXIF. Every row either enters the catalog or leaves with one reason code.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from pipeline.core import reasons
from pipeline.core.exif import DEFAULT_UTC_OFFSET, DecompressionBomb, NotAnImage, read_header
from pipeline.core.schema import CATALOG_SCHEMA, RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, empty_frame, to_table
from pipeline.core.store import ImageStore
from pipeline.core.values import is_missing

Progress = Callable[[int, int], None]
STAGE = "catalog"


def _present(v) -> bool:
    return not is_missing(v)


def rejection(stage: str, row, reason: str, detail: str = "") -> dict:
    return {
        "stage": stage,
        "source": str(row["source"]),
        "source_id": str(row["source_id"]),
        "image_id": row.get("image_id") if _present(row.get("image_id")) else None,
        "path": row.get("path") if _present(row.get("path")) else None,
        "reason": reason,
        "detail": detail,
    }


def future_date_detail(taken_utc: dt.datetime | pd.Timestamp, offset: dt.timezone | None) -> str:
    """The date as the camera showed it: local time with its offset, Pakistan time when the photo has none.

    The run's own clock is left out so identical runs write identical rejection files.
    """
    local = pd.Timestamp(taken_utc).tz_convert(offset or DEFAULT_UTC_OFFSET)
    where = "camera local time" if offset is not None else "Pakistan time, no offset recorded"
    return f"taken {local.isoformat(sep=' ')} ({where}) lies in the future"


def build_catalog(
    manifests: Iterable[pd.DataFrame],
    store: ImageStore,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (catalog, rejections). Sources are taken in the order given; the first row with given bytes wins."""
    frames = [m for m in manifests if len(m)]
    raw = pd.concat(frames, ignore_index=True) if frames else empty_frame(RAW_MANIFEST_SCHEMA)
    to_table(raw, RAW_MANIFEST_SCHEMA, check_values=False)  # a manifest with wrong columns/types fails loudly
    now = now or dt.datetime.now(dt.timezone.utc)
    kept: list[dict] = []
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    total = len(raw)
    for i, row in enumerate(raw.to_dict("records")):
        if progress and (i % 500 == 0 or i == total - 1):
            progress(i + 1, total)
        path = store.abspath(row["path"])
        if not Path(path).is_file():
            rejected.append(rejection(STAGE, row, reasons.MISSING_FILE, str(row["path"])))
            continue
        try:
            header = read_header(path.read_bytes())
        except NotAnImage as exc:
            code = reasons.DECOMPRESSION_BOMB if isinstance(exc, DecompressionBomb) else reasons.NOT_AN_IMAGE
            rejected.append(rejection(STAGE, row, code, str(exc)[:200]))
            continue
        lat, lon = row.get("lat"), row.get("lon")
        if not (_present(lat) and _present(lon)):
            lat, lon = header.lat, header.lon
        if lat is None or lon is None:
            detail = header.gps_error or "no GPS in source metadata or EXIF"
            rejected.append(rejection(STAGE, row, reasons.NO_COORDINATES, detail))
            continue
        lat, lon = float(lat), float(lon)
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
            rejected.append(rejection(STAGE, row, reasons.INVALID_COORDINATES, f"lat={lat} lon={lon}"))
            continue
        from_source = _present(row.get("taken_at"))
        taken = pd.Timestamp(row.get("taken_at")).tz_convert("UTC") if from_source else header.taken_at
        if taken is not None and pd.Timestamp(taken) > pd.Timestamp(now):
            # the camera's offset is known when the date is the EXIF one (a source may have copied it)
            same = header.taken_at is not None and pd.Timestamp(header.taken_at) == pd.Timestamp(taken)
            offset = header.utc_offset if same else None
            rejected.append(rejection(STAGE, row, reasons.FUTURE_DATE, future_date_detail(taken, offset)))
            continue
        image_id = str(row["image_id"])
        if image_id in seen:
            rejected.append(rejection(STAGE, row, reasons.DUPLICATE_BYTES, f"kept {seen[image_id]}"))
            continue
        seen[image_id] = f"{row['source']}:{row['source_id']}"
        acc = row.get("geo_accuracy")
        kept.append(
            {
                **{k: row.get(k) for k in CATALOG_SCHEMA.names if k in row},
                "lat": lat,
                "lon": lon,
                "geo_accuracy": float(acc) if _present(acc) else header.accuracy_m,
                "taken_at": taken,
                "width": header.width,
                "height": header.height,
            }
        )
    catalog = pd.DataFrame(kept, columns=CATALOG_SCHEMA.names) if kept else empty_frame(CATALOG_SCHEMA)
    catalog["taken_at"] = pd.to_datetime(catalog["taken_at"], utc=True)
    rejections = pd.DataFrame(rejected, columns=REJECTIONS_SCHEMA.names) if rejected else empty_frame(REJECTIONS_SCHEMA)
    return catalog, rejections
