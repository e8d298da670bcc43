"""Content-addressed image store and atomic file writes.

Images live at ``<root>/images/ab/cd/<sha256><ext>``: the same bytes are stored once whatever the source, and a
crashed write never leaves a half-written file under its final name (temp file in the same folder, fsync, rename).
Catalog rows hold paths relative to the data root so a data root can be moved or mounted elsewhere.

A write that does not fit raises ``DiskFullError`` (an ``OSError`` with errno ENOSPC) naming the path, the bytes
needed and the bytes left: checked before the write when the size is known, and converted from whatever the writer
raised when the disk fills during it (torch reports a full disk as ``RuntimeError: [enforce fail at
inline_container.cc:...] ... file write failed``, which does not say "No space left on device").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.processes import writer_gone, writer_tag


# below this many free bytes, a writer's unexplained "write failed" is taken as a full disk
LOW_SPACE_BYTES = 16 * 2**20


class DiskFullError(OSError):
    """Not enough free space for a write: the message says the path, the bytes needed and the bytes left."""

    def __init__(self, path: str | Path, needed: int | None, free: int, written: int | None = None):
        self.path, self.needed, self.free, self.written = str(path), needed, free, written
        if needed is not None:
            need = f"needs {needed:,} bytes"
        elif written is not None:
            need = f"needs more than the {written:,} bytes written before the disk filled"
        else:
            need = "needs more space"
        super().__init__(errno.ENOSPC, f"No space left on device: writing {path} {need}, {free:,} bytes left "
                                       f"on its file system; free some space or move the data root")
        self.filename = str(path)

    def __reduce__(self) -> tuple[type, tuple[str, int | None, int, int | None]]:
        return DiskFullError, (self.path, self.needed, self.free, self.written)

    def __str__(self) -> str:
        return f"[Errno {self.errno}] {self.strerror}"


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (or of its nearest existing
    ancestor, for a path not created yet)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def ensure_free_space(path: str | Path, needed: int) -> None:
    """Raise ``DiskFullError`` unless ``needed`` bytes fit on the file system where ``path`` will be written."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(path, needed, free)


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or EDQUOT) from the OS, also when a library wraps it in its own message (pyarrow)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and ("No space left on device" in text or "errno 28" in text.lower())


def _is_write_failure(exc: BaseException) -> bool:
    """A writer's failure that does not say why (torch's PytorchStreamWriter on a full disk)."""
    text = str(exc)
    return isinstance(exc, RuntimeError | OSError) and ("file write failed" in text or "enforce fail" in text)


@contextlib.contextmanager
def atomic_path(path: str | Path, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, else it is removed.

    ``need_bytes`` (when the size is known or can be bounded) is checked against the free space first; a full disk
    during the write is raised as ``DiskFullError`` whatever the writer raised."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if need_bytes is not None:
            ensure_free_space(path, need_bytes)
        # the writer's pid is in the name, so a later run can tell a killed writer's leftover from a live one's
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if isinstance(exc, DiskFullError) or not _is_disk_full(exc):
            raise
        raise DiskFullError(path, need_bytes, free_bytes(path)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = None
        if not isinstance(exc, DiskFullError) and (_is_disk_full(exc) or _is_write_failure(exc)):
            free = free_bytes(tmp_path)  # measured before the temp file is removed: what the writer ran into
            written = tmp_path.stat().st_size if tmp_path.exists() else None
            if _is_disk_full(exc) or free < LOW_SPACE_BYTES:
                full = DiskFullError(path, need_bytes, free, written)
        tmp_path.unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def sweep_orphan_temps(folder: str | Path) -> int:
    """Remove temp files left by writers that were killed (SIGKILL, power loss) under ``folder``; keep live ones,
    and another host's until they are stale (on a shared data root its writer may be mid-write)."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # ".<name>.<pid>_<host>.<random>.tmp" -> [..., writer, random, "tmp"]
        if len(parts) != 4 or writer_gone(parts[1], tmp):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path, need_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj: object) -> str:
    """A short, stable fingerprint of JSON-able settings (key order ignored): what a resume or a ledger compares."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (a shard or checkpoint is never held in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_EXT_BY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF8", ".gif"),
    (b"RIFF", ".webp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"BM", ".bmp"),
)


# ISO-BMFF ``ftyp`` brands of HEVC-coded HEIF stills and of AVIF; the generic image brands say HEIF unless an
# AVIF brand is listed too (AVIF files carry "mif1" as well)
_IMAGE_BRANDS = {b"heic": ".heic", b"heix": ".heic", b"heim": ".heic", b"heis": ".heic", b"hevc": ".heic",
                b"hevx": ".heic", b"avif": ".avif", b"avis": ".avif"}
_GENERIC_BRANDS = frozenset({b"mif1", b"msf1", b"miaf"})


def _ftyp_extension(data: bytes) -> str | None:
    """``.heic`` or ``.avif`` from an ISO-BMFF file's ``ftyp`` box (its major brand, else its compatible ones);
    None for any other file (MP4 video, ...)."""
    if data[4:8] != b"ftyp" or len(data) < 16:
        return None
    end = min(int.from_bytes(data[:4], "big"), len(data))
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, end - 3, 4)]
    named = [_IMAGE_BRANDS[b] for b in brands if b in _IMAGE_BRANDS]
    if named:
        return named[0] if brands[0] in _IMAGE_BRANDS or ".avif" not in named else ".avif"
    return ".heic" if brands[0] in _GENERIC_BRANDS else None


def sniff_extension(data: bytes) -> str:
    """File extension from the leading bytes (what the file is, not what its name claims); ``.bin`` if unknown."""
    for magic, ext in _EXT_BY_MAGIC:
        if data.startswith(magic):
            return ext
    return _ftyp_extension(data) or ".bin"


class ImageStore:
    """Bytes addressed by their sha256 under ``<root>/images``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def relpath(self, image_id: str, ext: str) -> str:
        return f"images/{image_id[:2]}/{image_id[2:4]}/{image_id}{ext}"

    def abspath(self, relpath: str) -> Path:
        return self.root / relpath

    def put(self, data: bytes) -> tuple[str, str]:
        """Store ``data`` once; return (image_id, path relative to the root). Idempotent and safe to re-run."""
        image_id = sha256_hex(data)
        rel = self.relpath(image_id, sniff_extension(data))
        target = self.abspath(rel)
        if not (target.exists() and target.stat().st_size == len(data)):
            atomic_write_bytes(target, data)
        return image_id, rel

    def read(self, relpath: str) -> bytes:
        return self.abspath(relpath).read_bytes()
