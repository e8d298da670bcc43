"""Bring your own images: a local folder (coordinates from EXIF) and/or a manifest file (CSV or Parquet).

Folder mode walks a directory tree and reads GPS and the capture time from each image's EXIF (JPEG, HEIC/HEIF, TIFF,
...; ``pipeline.core.exif`` says which tags, and each row's ``taken_at_source`` which it used). Manifest mode reads
GEOPAK / OSV-5M style tables whose columns may be spelled ``lat``/``latitude``, ``lon``/``lng``/``long``/
``longitude``, ``path``/``file``/``image_path``/``filepath`` or ``url``; when a manifest gives coordinates and
the file's EXIF has others, the manifest wins and the disagreement is counted. Files are copied into the
content-addressed store (or referenced in place) so later stages never depend on the original folder; a re-run,
in either mode, hashes and copies only files whose path, size or modification time changed (the others' headers are
read again, so changed manifest metadata still applies). Every bad row or file gets one reason code. A photo whose
EXIF date is zeroed or impossible keeps its coordinates with no date; ``exif_date_unusable`` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import reasons
from pipeline.core.exif import DecompressionBomb, ImageHeader, NotAnImage, error_detail, read_header
from pipeline.core.gazetteer import haversine_km
from pipeline.core.image_formats import PHOTO_SUFFIXES, UNREADABLE_EXTENSIONS
from pipeline.core.parallel import chunked, map_chunks
from pipeline.core.provinces import lookup
from pipeline.core.reasons import rejection
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, empty_frame
from pipeline.core.store import ImageStore, sha256_hex, sniff_extension
from pipeline.core.values import is_missing

SOURCE = "local"
STAGE = "source"
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "lat": ("lat", "latitude", "gps_lat", "y"),
    "lon": ("lon", "lng", "long", "longitude", "gps_lon", "x"),
    "path": ("path", "file", "filename", "image_path", "filepath", "image", "img_path"),
    "url": ("url", "image_url", "download_url", "downloadurl"),
    "taken_at": ("taken_at", "date", "datetaken", "date_taken", "datetime", "timestamp", "captured_at"),
    "owner": ("owner", "author", "user", "owner_name", "uid"),
    "license": ("license", "licence", "licensename"),
    "province": ("province", "state", "region", "admin1"),
    "id": ("id", "image_id", "photo_id", "source_id"),
    "title": ("title", "caption"),
}
DISAGREEMENT_KM = 1.0  # manifest vs EXIF coordinates further apart than this are counted as disagreeing
FAN_OUT_CHUNK = 32  # files per task: amortises a Dask round trip, still balances a few hundred files over workers


@dataclass(frozen=True)
class LocalSourceConfig:
    folder: str | None = None
    manifest: str | None = None
    copy_into_store: bool = True  # False: reference files where they are (path is absolute)
    default_license: str | None = None  # e.g. "CC-BY-4.0" when the whole folder shares one licence
    owner: str | None = None
    download_timeout_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.folder or self.manifest)


@dataclass
class LocalIngestResult:
    manifest: pd.DataFrame
    rejections: pd.DataFrame
    stats: dict[str, int] = field(default_factory=dict)


def normalise_columns(df: pd.DataFrame) -> dict[str, str]:
    """Map canonical names (lat, lon, path, url, ...) to the manifest's own column names."""
    lower = {c.strip().lower(): c for c in df.columns}
    found = {}
    for canon, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in lower:
                found[canon] = lower[alias]
                break
    return found


def read_manifest_file(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class FileFacts:
    """What one file's bytes say, computed where the file is read (this process, a pool worker or a Dask worker).

    Only facts travel back, never the bytes: the accept/reject decision needs the province polygons and the
    run's state, so it stays in the asset's process, which then copies (and the store hashes) accepted files only;
    a file referenced in place keeps the worker's hash as its id."""

    header: ImageHeader | None = None
    image_id: str | None = None  # sha256 of the bytes; None when only the header was read
    ext: str = ""
    reason: str | None = None  # a rejection code when the bytes are no usable image
    detail: str = ""


def inspect_bytes(data: bytes) -> FileFacts:
    """Sniff, parse the header of and hash one image's bytes; a rejection reason for anything else."""
    ext = sniff_extension(data)
    if ext in UNREADABLE_EXTENSIONS:  # a photo container this installation's Pillow cannot decode (AVIF)
        return FileFacts(reason=reasons.UNSUPPORTED_FORMAT, detail=f"{ext} content")
    if ext == ".bin" and data:
        return FileFacts(reason=reasons.NOT_AN_IMAGE, detail="unrecognised bytes")
    try:
        header = read_header(data)
    except DecompressionBomb as exc:  # the same code as the catalog and the filter stage
        return FileFacts(reason=reasons.DECOMPRESSION_BOMB, detail=str(exc)[:200])
    except NotAnImage as exc:
        return FileFacts(reason=reasons.NOT_AN_IMAGE, detail=str(exc)[:200])
    return FileFacts(header=header, image_id=sha256_hex(data), ext=ext)


def inspect_file(path: str, header_only: bool) -> FileFacts:
    """``inspect_bytes`` of a file; ``header_only`` (an unchanged file already stored) reads just its header, and
    falls back to the full read when that header is no longer readable (changed in place, same size and mtime)."""
    p = Path(path)
    if header_only:
        try:
            return FileFacts(header=read_header(p))
        except NotAnImage:
            pass
    try:
        data = p.read_bytes()
    except OSError as exc:  # removed or unreadable since it was listed: this file's rejection, not the run's end
        return FileFacts(reason=reasons.MISSING_FILE, detail=f"{path}: {error_detail(exc)}"[:200])
    return inspect_bytes(data)


def inspect_files(chunk: list[tuple[str, bool]]) -> list[FileFacts]:
    """``inspect_file`` over one chunk of (path, header_only): the unit of work ``map_chunks`` fans out."""
    return [inspect_file(path, header_only) for path, header_only in chunk]


@dataclass
class _FileJob:
    """One file to inspect, with everything its decision needs afterwards."""

    path: Path
    base: dict
    lat: float | None
    lon: float | None
    file_stat: tuple[int, int]
    stored: tuple[str, str] | None  # (image_id, path) of the unchanged file's previous, still stored, row


class LocalSource:
    """Turns a folder and/or a manifest into raw-manifest rows plus rejections.

    Reading, hashing and header parsing of files (the per-image work) fan out through
    ``pipeline.core.parallel.map_chunks``: ``workers`` local processes, or a Dask cluster when ``scheduler_address``
    is given. Decisions are then taken here in listing order, so the rows, the rejections and their order are the
    same whoever read the files."""

    def __init__(
        self,
        cfg: LocalSourceConfig,
        store: ImageStore,
        inside_pakistan: Callable[[np.ndarray, np.ndarray], np.ndarray],
        previous: pd.DataFrame | None = None,
        fetch: Callable[[str, float], bytes] | None = None,
        workers: int = 1,
        scheduler_address: str | None = None,
    ):
        self.cfg = cfg
        self.workers, self.scheduler_address = workers, scheduler_address  # where files are read and hashed
        self.store = store
        self.inside_pakistan = inside_pakistan
        self.fetch = fetch or _http_get
        # (file URI, size, mtime_ns) → previous row, so unchanged files are not hashed or copied again
        self._previous: dict[tuple[str, int, int], dict] = {}
        # URL → previous row: a manifest URL whose image is already stored is not downloaded again
        self._previous_urls: dict[str, dict] = {}
        if previous is not None and len(previous):
            for row in previous.to_dict("records"):
                size, mtime = row.get("file_size"), row.get("file_mtime_ns")
                if is_missing(row.get("source_url"), blank_text=True):
                    continue
                if is_missing(size) or is_missing(mtime):  # a downloaded row (no file stat)
                    self._previous_urls[str(row["source_url"])] = row
                    continue
                self._previous[(str(row["source_url"]), int(size), int(mtime))] = row
        self.rows: list[dict] = []
        self.rejected: list[dict] = []
        self.stats = {
            "files_seen": 0, "manifest_rows": 0, "reused": 0, "new": 0, "manifest_exif_disagree": 0,
            "exif_date_unusable": 0,
        }
        self._seen_source_ids: set[str] = set()

    # ---- public -------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, int], None] | None = None) -> LocalIngestResult:
        if self.cfg.folder:
            self._ingest_folder(Path(self.cfg.folder).expanduser(), progress)
        if self.cfg.manifest:
            self._ingest_manifest(Path(self.cfg.manifest).expanduser(), progress)
        manifest = pd.DataFrame(self.rows) if self.rows else empty_frame(RAW_MANIFEST_SCHEMA)
        for col in ("file_size", "file_mtime_ns"):
            if col not in manifest:
                manifest[col] = pd.Series(dtype="Int64")
        rej = pd.DataFrame(self.rejected, columns=REJECTIONS_SCHEMA.names) if self.rejected else empty_frame(
            REJECTIONS_SCHEMA
        )
        self.stats["accepted"] = len(manifest)
        self.stats["rejected"] = len(rej)
        return LocalIngestResult(manifest, rej, self.stats)

    # ---- folder mode --------------------------------------------------------------------------------------
    def _ingest_folder(self, root: Path, progress) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"local source folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        steps: list[Callable[[], None] | _FileJob] = []
        for path in files:
            self.stats["files_seen"] += 1
            sid = f"folder:{path.relative_to(root).as_posix()}"
            base = {"source_id": sid, "source_url": path.resolve().as_uri(), "title": path.stem, "taken_at": None}
            if path.suffix.lower() not in PHOTO_SUFFIXES:
                steps.append(partial(self._reject, base, reasons.NOT_AN_IMAGE, f"not an image file name: {path.name}"))
                continue
            steps.append(self._plan_file(path, base, lat=None, lon=None))
        self._run(steps, progress)

    # ---- manifest mode ------------------------------------------------------------------------------------
    def _ingest_manifest(self, mpath: Path, progress) -> None:
        if not mpath.is_file():
            raise FileNotFoundError(f"local source manifest {mpath} does not exist")
        df = read_manifest_file(mpath)
        cols = normalise_columns(df)
        if "path" not in cols and "url" not in cols:
            raise ValueError(f"{mpath}: needs a path column ({COLUMN_ALIASES['path']}) or a url column")
        if "lat" not in cols or "lon" not in cols:
            raise ValueError(f"{mpath}: needs latitude and longitude columns ({COLUMN_ALIASES['lat']}, ...)")
        steps: list[Callable[[], None] | _FileJob] = []  # run in row order once the files are inspected
        for i, rec in enumerate(df.to_dict("records")):
            self.stats["manifest_rows"] += 1
            get = lambda k: rec.get(cols[k]) if k in cols and not is_missing(rec.get(cols[k]), blank_text=True) else None  # noqa: E731
            key = get("id") or get("path") or get("url") or f"row{i}"
            sid = f"manifest:{mpath.name}:{key}"
            base = {"source_id": sid, "title": get("title"), "owner": get("owner"), "license": get("license")}
            lat, lon = get("lat"), get("lon")
            flat, flon = _float(lat), _float(lon)
            if lat is None or lon is None:
                steps.append(partial(self._reject, base, reasons.NO_COORDINATES,
                                     "empty latitude/longitude in the manifest"))
                continue
            if flat is None or flon is None or not (-90 <= flat <= 90 and -180 <= flon <= 180):
                steps.append(partial(self._reject, base, reasons.INVALID_COORDINATES, f"lat={lat!r} lon={lon!r}"))
                continue
            raw_date = get("taken_at")
            if raw_date is not None:
                ts = pd.to_datetime(raw_date, errors="coerce", utc=True)
                if pd.isna(ts):
                    steps.append(partial(self._reject, base, reasons.MALFORMED_DATE, f"date {raw_date!r}"))
                    continue
                base["taken_at"] = ts
            else:
                base["taken_at"] = None
            prov = get("province")
            if prov is not None:
                try:
                    base["tags"] = f"province:{lookup(str(prov)).key}"
                except KeyError:
                    base["tags"] = f"province:{prov}"
            if get("path") is not None:
                p = Path(str(get("path"))).expanduser()
                p = p if p.is_absolute() else (mpath.parent / p)
                base["source_url"] = p.resolve().as_uri()
                steps.append(self._plan_file(p, base, lat=flat, lon=flon))
            else:
                base["source_url"] = str(get("url"))
                steps.append(partial(self._add_url, str(get("url")), base, lat=flat, lon=flon))
        self._run(steps, progress)

    # ---- shared -------------------------------------------------------------------------------------------
    def _plan_file(self, path: Path, base: dict, lat: float | None, lon: float | None) -> Callable[[], None] | _FileJob:
        """A missing file's rejection, or the file to inspect (header only when unchanged and still stored)."""
        if not path.is_file():
            return partial(self._reject, base, reasons.MISSING_FILE, str(path))
        st = path.stat()
        prev = self._previous.get((path.resolve().as_uri(), st.st_size, st.st_mtime_ns))
        stored = (str(prev["image_id"]), str(prev["path"])) if prev is not None and self._still_stored(prev) else None
        return _FileJob(path, base, lat, lon, (st.st_size, st.st_mtime_ns), stored)

    def _run(self, steps: list[Callable[[], None] | _FileJob], progress) -> None:
        """Inspect every planned file (fanned out), then take each step's decision in listing order."""
        jobs = [s for s in steps if isinstance(s, _FileJob)]
        chunks = chunked([(str(j.path), j.stored is not None) for j in jobs], FAN_OUT_CHUNK)
        tick = None
        if progress is not None:
            def tick(done: int, total: int) -> None:
                progress(min(done * FAN_OUT_CHUNK, len(jobs)), len(jobs))
        parts = map_chunks(inspect_files, chunks, workers=self.workers, scheduler_address=self.scheduler_address,
                           progress=tick)
        facts = iter([f for part in parts for f in part])
        for step in steps:
            if isinstance(step, _FileJob):
                self._add_file(step, next(facts))
            else:
                step()

    def _add_file(self, job: _FileJob, facts: FileFacts) -> None:
        if job.stored is not None and facts.image_id is None and facts.header is not None:
            # unchanged and stored: only the header was read, the bytes are neither hashed nor copied again
            self._decide(job.base, job.lat, job.lon, facts.header, job.stored, job.file_stat, origin=job.path)
            return
        self._add_facts(facts, job.base, job.lat, job.lon, file_stat=job.file_stat, origin=job.path)

    def _still_stored(self, prev: dict) -> bool:
        """The previous row's image is where it says and was stored the way this run stores (copied or referenced)."""
        rel = prev.get("path")
        if is_missing(rel, blank_text=True) or is_missing(prev.get("image_id"), blank_text=True):
            return False
        referenced = Path(str(rel)).is_absolute()
        return referenced != self.cfg.copy_into_store and self.store.abspath(str(rel)).is_file()

    def _add_url(self, url: str, base: dict, lat: float, lon: float) -> None:
        prev = self._previous_urls.get(url)
        if prev is not None and self._still_stored(prev):  # downloaded before: the stored copy stands in
            try:
                header = read_header(self.store.abspath(str(prev["path"])))
            except NotAnImage:
                header = None  # the stored copy is damaged: download again
            if header is not None:
                stored = (str(prev["image_id"]), str(prev["path"]))
                self._decide(base, lat, lon, header, stored, (None, None), origin=None)
                return
        try:
            data = self.fetch(url, self.cfg.download_timeout_s)
        except Exception as exc:  # network errors are a per-row rejection, not a crash
            self._reject(base, reasons.DOWNLOAD_FAILED, error_detail(exc)[:200])  # no reprs with addresses
            return
        self._add_facts(inspect_bytes(data), base, lat, lon, file_stat=(None, None), origin=None, data=data)

    def _add_facts(
        self, facts: FileFacts, base: dict, lat: float | None, lon: float | None,
        file_stat: tuple[int | None, int | None], origin: Path | None, data: bytes | None = None,
    ) -> None:
        if facts.reason is not None or facts.header is None:
            self._reject(base, facts.reason or reasons.NOT_AN_IMAGE, facts.detail)
            return
        self._decide(base, lat, lon, facts.header, None, file_stat, origin=origin, facts=facts, data=data)

    def _decide(
        self, base: dict, lat: float | None, lon: float | None, header: ImageHeader,
        stored: tuple[str, str] | None, file_stat: tuple[int | None, int | None],
        origin: Path | None, facts: FileFacts | None = None, data: bytes | None = None,
    ) -> None:
        """Accept or reject one image from its header; ``stored`` is (image_id, path) of an unchanged file;
        ``data`` the bytes of a download (files are copied from ``origin``)."""
        if lat is None or lon is None:
            if header.lat is None or header.lon is None:
                self._reject(base, reasons.NO_COORDINATES, header.gps_error or "no GPS in EXIF")
                return
            lat, lon = header.lat, header.lon
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                self._reject(base, reasons.INVALID_COORDINATES, f"EXIF lat={lat} lon={lon}")
                return
        elif header.lat is not None and header.lon is not None:
            if haversine_km(lat, lon, header.lat, header.lon) > DISAGREEMENT_KM:
                self.stats["manifest_exif_disagree"] += 1
        if not bool(self.inside_pakistan(np.array([lat]), np.array([lon]))[0]):
            self._reject(base, reasons.OUTSIDE_PAKISTAN, f"lat={lat:.5f} lon={lon:.5f}")
            return
        taken, taken_from, date_note = base.get("taken_at"), "manifest", None
        date_unusable = False
        if taken is None:
            taken, taken_from, date_note = header.taken_at, header.taken_at_source, header.date_note
            date_unusable = taken is None and header.date_error is not None
        if stored is not None:
            image_id, rel = stored
        elif origin is None:
            assert data is not None
            image_id, rel = self.store.put(data)
        elif self.cfg.copy_into_store:
            # the store hashes what it copies (a file changed since it was inspected is stored as it is now)
            image_id, rel = self.store.put(origin.read_bytes())
        else:
            assert facts is not None and facts.image_id is not None
            image_id, rel = facts.image_id, str(origin.resolve())
        accepted = self._accept(
            {
                "source": SOURCE,
                "source_id": base["source_id"],
                "source_url": base.get("source_url"),
                "image_id": image_id,
                "path": rel,
                "lat": float(lat),
                "lon": float(lon),
                "geo_accuracy": header.accuracy_m,
                "taken_at": taken,
                "taken_at_source": taken_from,
                "date_note": date_note,
                "owner": base.get("owner") or self.cfg.owner,
                "license": base.get("license") or self.cfg.default_license,
                "title": base.get("title"),
                "tags": base.get("tags"),
                "place_id": None,
                "file_size": file_stat[0],
                "file_mtime_ns": file_stat[1],
            }
        )
        if accepted:
            self.stats["reused" if stored is not None else "new"] += 1
            self.stats["exif_date_unusable"] += int(date_unusable)

    def _accept(self, row: dict) -> bool:
        if row["source_id"] in self._seen_source_ids:
            self._reject(row, reasons.DUPLICATE_ROW, "the same file or row is listed twice")
            return False
        self._seen_source_ids.add(row["source_id"])
        self.rows.append(row)
        return True

    def _reject(self, base: dict, reason: str, detail: str) -> None:
        self.rejected.append(rejection(STAGE, {"source": SOURCE, **base}, reason, detail))


URL_MAX_BYTES = 256 * 2**20  # a manifest URL's image; a bigger body is refused instead of filling memory


def _http_get(url: str, timeout: float) -> bytes:
    """The body of ``url``: ``timeout`` per read, the whole body within the crawls' download deadline."""
    import requests

    from pipeline.sources.downloads import read_capped

    with requests.get(url, timeout=timeout, stream=True) as resp:
        resp.raise_for_status()
        return read_capped(resp, URL_MAX_BYTES)
