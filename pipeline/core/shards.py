"""Training image shards: every train/val/test image written once, as a pre-resized JPEG copy, into WebDataset tar
shards in img2dataset's layout (issue 22). Decoding a 12 MP photo costs ~30 ms of CPU even in draft mode; its 320 px
copy decodes in ~0.7 ms (1.5 ms with the 224 px view), so every epoch reads copies, and the same files are the
dataset's export.

Layout under ``<data root>/shards/`` (``image_shards`` asset, ``pipeline.export.build``)::

    manifest.json               every committed shard per split: samples, bytes, sha256; the copy settings
    <split>/00000.tar           ``{key}.jpg`` + ``{key}.json`` per sample; key = the image_id (sha256 hex), so keys
                                stay the same across rebuilds (img2dataset numbers them instead)
    <split>/00000.parquet       the shard's index: one row per sample, the JSON's fields flattened (attribution as
                                JSON text) plus ``offset``/``size``/``sha256`` of the .jpg member inside the tar
    <split>/00000_stats.json    written last, the shard's commit marker: sha256, bytes, samples, plan fingerprint,
                                the images that could not be copied (and why)
    rejections.parquet          every image that could not be copied, with a reason code
    DATASHEET.md                "Datasheets for Datasets" answers with the real counts (``pipeline.export``)

Reading (the API ``geopak_model`` and the benches use; no torch, no decoding here)::

    shards = ShardSet.find(data_root)     # None: no shard folder (read the original files); ShardsIncomplete:
                                          # a build was started and not finished
    where = shards.locate(image_ids)      # rows -> (shard, offset, size); each shard holding one of them has its
                                          # sha256 checked once per process (ShardCorrupt names a bad one);
                                          # ShardsStale when an id is neither in the shards nor rejected by them
    data = where.read(i)                  # i-th id's JPEG bytes: one pread, no hashing (picklable for workers)
    where.reason(i)                       # None, or the reason code the i-th id has no copy
    shards.urls("train")                  # tar paths: webdataset.WebDataset(urls) or
                                          # datasets.load_dataset("webdataset", data_files={"train": urls})
    shards.index("train")                 # the index rows (pandas), with split and shard columns

Integrity: a shard's sha256 is checked when it is first located in a process, not per image per epoch; each
reader then only compares the file's size and mtime (one fstat when it opens the shard) with what was hashed, so a
shard replaced or edited later fails with ``ShardCorrupt`` naming it instead of feeding other pixels.
Writes are atomic (temp file + rename), the stats file last: a killed build leaves at most a shard without its
marker, which the next build writes again.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.store import atomic_path, atomic_write_bytes, file_sha256, sha256_hex

SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
REJECTIONS = "rejections.parquet"
DATASHEET = "DATASHEET.md"
FORMAT = "geopak-webdataset"
FORMAT_VERSION = 1  # bump when the tar/index/stats layout changes: every shard is written again
SPLITS = ("train", "val", "test")  # what is exported; "buffer" images are in no split
OPEN_FILES = 64  # shard files a reader keeps open at once (per process)


class ShardCorrupt(RuntimeError):
    """A shard's bytes are not the ones recorded when it was written (sha256 mismatch, or changed since it was
    checked). Not an OSError/ValueError on purpose: a loader must stop, not skip the image as unreadable."""


class ShardsIncomplete(RuntimeError):
    """The shard folder exists but no build finished (no manifest)."""


class ShardsStale(LookupError):
    """Images asked for are neither in the shards nor among the images they could not copy."""


class NotInShards(OSError):
    """This image has no copy in the shards: ``reason`` is the code recorded when the shard was written."""

    def __init__(self, image_id: str, reason: str):
        super().__init__(f"{image_id}: not in the shards ({reason})")
        self.reason = reason


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard, as ``manifest.json`` and its ``_stats.json`` record it."""

    split: str
    shard: str  # "00000"
    samples: int
    bytes: int
    sha256: str
    fingerprint: str  # the plan it was written for (ids, their records, the copy settings)
    preprocess: str = ""  # the copy settings (``short320-q90-v1``)
    rejected: list[dict] = field(default_factory=list)  # [{image_id, reason, detail}]

    def tar(self, root: Path) -> Path:
        return root / self.split / f"{self.shard}.tar"

    def index_path(self, root: Path) -> Path:
        return root / self.split / f"{self.shard}.parquet"


def shard_name(number: int) -> str:
    return f"{number:05d}"


def stats_path(folder: Path, name: str) -> Path:
    return folder / f"{name}_stats.json"


def read_stats(path: Path) -> ShardInfo | None:
    """A shard's commit marker, or None when it is missing, unreadable or of another format version."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if d.get("format_version") != FORMAT_VERSION:
        return None
    return ShardInfo(d["split"], d["shard"], int(d["samples"]), int(d["bytes"]), d["sha256"], d["fingerprint"],
                     str(d.get("preprocess", "")), list(d.get("rejected", [])))


# --- writing ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its key, the JPEG bytes and the JSON record (any JSON-able dict)."""

    key: str
    jpg: bytes
    record: dict[str, Any]


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends on nothing but the name and size: the same samples give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def _index_value(v: Any) -> Any:
    """Nested values (Places authorAttributions) go into the Parquet index as JSON text."""
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v


def write_shard(folder: Path, name: str, split: str, samples: Sequence[Sample], fingerprint: str,
                rejected: Sequence[dict] = (), preprocess: str = "", index_schema: pa.Schema | None = None
                ) -> ShardInfo:
    """Write ``<name>.tar``, its ``.parquet`` index (typed by ``index_schema`` when given, so a column that is
    null throughout one shard has the same type as in the others) and last its ``_stats.json`` (each temp file +
    rename).

    The old marker is removed first, so a kill half way never leaves a marker vouching for other bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    stats = stats_path(folder, name)
    stats.unlink(missing_ok=True)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys) or any("." in k or "/" in k or not k for k in keys):
        raise ValueError(f"shard {split}/{name}: keys must be unique and hold no '.' or '/' (webdataset splits "
                         f"a member's name at its first dot)")
    rows = []
    need = sum(len(s.jpg) + 4096 for s in samples) + 1024 * len(samples) + 10240
    with atomic_path(folder / f"{name}.tar", need_bytes=need) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in samples:
                jpg = _member(f"{s.key}.jpg", len(s.jpg))
                data_at = tf.offset + len(jpg.tobuf(tarfile.USTAR_FORMAT, tf.encoding, tf.errors))  # after the header
                tf.addfile(jpg, io.BytesIO(s.jpg))
                text = json.dumps(s.record, ensure_ascii=False, sort_keys=True).encode()
                tf.addfile(_member(f"{s.key}.json", len(text)), io.BytesIO(text))
                rows.append({**{k: _index_value(v) for k, v in s.record.items()}, "key": s.key, "split": split,
                             "shard": name, "offset": data_at, "size": len(s.jpg),
                             "sha256": sha256_hex(s.jpg)})
        digest, size = file_sha256(tmp), tmp.stat().st_size
    if index_schema is not None:
        index = pa.Table.from_pylist(rows, schema=index_schema)
    else:
        index = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
    with atomic_path(folder / f"{name}.parquet") as tmp:
        pq.write_table(index, tmp, compression="zstd")
    info = ShardInfo(split, name, len(samples), size, digest, fingerprint, preprocess, list(rejected))
    atomic_write_bytes(stats, json.dumps({**asdict(info), "format_version": FORMAT_VERSION}, indent=1).encode())
    return info


def write_manifest(root: Path, shards: Sequence[ShardInfo], settings: dict[str, Any]) -> Path:
    """``manifest.json``: the copy settings and every shard per split (sha256 included), written atomically."""
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **settings,
           "splits": {s: [{k: v for k, v in asdict(i).items() if k != "rejected"} | {"rejected": len(i.rejected)}
                          for i in shards if i.split == s] for s in SPLITS}}
    return atomic_write_bytes(root / MANIFEST, json.dumps(doc, indent=1).encode())


# --- reading ----------------------------------------------------------------------------------------------------
# (path, size, mtime_ns) of every shard whose sha256 this process has checked
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_shard(path: Path, sha256: str, size: int) -> tuple[int, int]:
    """Check the shard's sha256 (once per process per file version); return its (size, mtime_ns)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ShardCorrupt(f"shard {path} is missing or unreadable ({exc}); materialize image_shards again") from exc
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if stamp not in _VERIFIED:
        got = file_sha256(path) if st.st_size == size else None
        if got != sha256:
            what = f"sha256 {got[:16]}…" if got else f"{st.st_size:,} bytes"
            raise ShardCorrupt(f"shard {path} is corrupt: {what}, but the manifest recorded sha256 {sha256[:16]}… "
                               f"({size:,} bytes); materialize image_shards again to rewrite it")
        _VERIFIED.add(stamp)
    return st.st_size, st.st_mtime_ns


@dataclass
class ShardLocations:
    """Where each asked-for image's copy is: picklable (file handles are opened lazily in each process)."""

    files: list[str]  # tar paths, by shard number
    stamps: list[tuple[int, int]]  # (size, mtime_ns) of each tar when its sha256 was checked
    image_ids: list[str]
    shard: np.ndarray  # int32 per row; -1: no copy
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    reasons: dict[int, str]  # row -> why it has no copy
    _fds: dict[int, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def reason(self, i: int) -> str | None:
        return self.reasons.get(int(i))

    def read(self, i: int) -> bytes:
        """The i-th image's JPEG bytes (``NotInShards`` when it has none)."""
        k = int(self.shard[i])
        if k < 0:
            raise NotInShards(self.image_ids[i], self.reasons.get(int(i), "unknown"))
        data = os.pread(self._fd(k), int(self.size[i]), int(self.offset[i]))
        if len(data) != int(self.size[i]):
            raise ShardCorrupt(f"shard {self.files[k]} is shorter than its index says (member of {self.image_ids[i]})")
        return data

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            if len(self._fds) >= OPEN_FILES:  # close the oldest: thousands of shards, a bounded number of files
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.files[k], os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != tuple(self.stamps[k]):
                os.close(fd)
                raise ShardCorrupt(f"shard {self.files[k]} changed since its sha256 was checked "
                                   f"(size/mtime differ); materialize image_shards again")
            self._fds[k] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardSet:
    """The committed shards under ``<data root>/shards`` (see the module docstring)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._shards = [ShardInfo(split, d["shard"], d["samples"], d["bytes"], d["sha256"], d["fingerprint"],
                                  d.get("preprocess", "")) for split in SPLITS for d in manifest["splits"].get(split, [])]

    @classmethod
    def find(cls, data_root: str | Path) -> ShardSet | None:
        """The data root's shards; None when it has no shard folder; ``ShardsIncomplete`` when a build started
        there never finished (reading the original files then would silently mix two preprocessings)."""
        root = Path(data_root) / SHARDS_DIR
        if not (root / MANIFEST).exists():
            if root.is_dir() and any(p.suffix == ".tar" for p in root.rglob("*.tar")):
                raise ShardsIncomplete(f"{root} holds shards but no {MANIFEST}: a build did not finish; "
                                       "materialize image_shards again (or delete the folder to read the originals)")
            return None
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ShardsIncomplete(f"{root / MANIFEST} is format {manifest.get('format')} "
                                   f"v{manifest.get('format_version')}, this code reads {FORMAT} v{FORMAT_VERSION}: "
                                   "materialize image_shards again")
        return cls(root, manifest)

    @property
    def preprocess(self) -> str:
        """What the copies are (``short320-q90-v1``): part of what the features computed from them depend on."""
        return str(self.manifest["preprocess"])

    def shards(self, split: str | None = None) -> list[ShardInfo]:
        return [s for s in self._shards if split is None or s.split == split]

    def urls(self, split: str) -> list[str]:
        """The split's tar files, in shard order (what ``webdataset`` and ``datasets`` take)."""
        return [str(s.tar(self.root)) for s in self.shards(split)]

    def index(self, split: str | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        """The index rows of the split's shards (all splits: None), in shard and member order."""
        files = [str(s.index_path(self.root)) for s in self.shards(split)]
        if not files:
            return pd.DataFrame(columns=columns or ["key", "split", "shard"])
        cols = None if columns is None else list(dict.fromkeys([*columns, "split", "shard"]))
        return pa.concat_tables([pq.read_table(f, columns=cols) for f in files], promote_options="permissive"
                                ).to_pandas()

    def rejections(self) -> pd.DataFrame:
        p = self.root / REJECTIONS
        return pd.read_parquet(p) if p.exists() else pd.DataFrame({"image_id": [], "reason": [], "detail": []})

    def locate(self, image_ids: Sequence[str] | pd.Series, verify: bool = True) -> ShardLocations:
        """Where each id's copy is. Every shard holding one of them has its sha256 checked (once per process,
        in parallel threads); ``ShardsStale`` when ids are neither in the shards nor rejected by them."""
        ids = pd.Index(pd.Series(list(image_ids), dtype=object))
        idx = self.index(columns=["key", "offset", "size"])
        names = pd.Index([f"{s.split}/{s.shard}" for s in self._shards])
        pos = pd.Index(idx["key"].astype(object)).get_indexer(ids)
        rejected = self.rejections().drop_duplicates("image_id").set_index("image_id")["reason"]
        missing = ids[(pos < 0) & ~ids.isin(rejected.index)]
        if len(missing):
            raise ShardsStale(f"{len(missing)} of {len(ids)} images are not in the shards under {self.root} "
                              f"(e.g. {', '.join(map(str, missing[:3]))}): the splits or labels changed since "
                              "they were written; materialize image_shards again")
        hit = pos >= 0
        shard = np.full(len(ids), -1, np.int32)
        shard[hit] = names.get_indexer((idx["split"] + "/" + idx["shard"]).to_numpy()[pos[hit]])
        offset = np.zeros(len(ids), np.int64)
        size = np.zeros(len(ids), np.int64)
        offset[hit], size[hit] = idx["offset"].to_numpy()[pos[hit]], idx["size"].to_numpy()[pos[hit]]
        reasons = {int(i): str(rejected[ids[i]]) for i in np.flatnonzero(~hit)}
        files = [str(s.tar(self.root)) for s in self._shards]
        stamps: list[tuple[int, int]] = [(-1, -1)] * len(files)
        used = sorted(set(shard[hit].tolist()))
        if verify and used:
            with ThreadPoolExecutor(max_workers=min(8, len(used), os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
                got = pool.map(lambda k: verify_shard(Path(files[k]), self._shards[k].sha256, self._shards[k].bytes),
                               used)
                for k, stamp in zip(used, got):
                    stamps[k] = stamp
        else:
            for k in used:
                st = os.stat(files[k])
                stamps[k] = (st.st_size, st.st_mtime_ns)
        return ShardLocations(files, stamps, [str(i) for i in ids], shard, offset, size, reasons)
