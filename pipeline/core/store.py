"""Content-addressed image store and atomic file writes.

Images live at ``<root>/images/ab/cd/<sha256><ext>``: the same bytes are stored once whatever the source, and a
crashed write never leaves a half-written file under its final name (temp file in the same folder, fsync, rename).
Catalog rows hold paths relative to the data root so a data root can be moved or mounted elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid is in the name, so a later run can tell a killed writer's leftover from a live one's
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphan_temps(folder: str | Path) -> int:
    """Remove temp files left by writers that were killed (SIGKILL, power loss) under ``folder``; keep live ones."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # ".<name>.<pid>.<random>.tmp" -> [..., pid, random, "tmp"]
        pid = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
        if pid is None or not _pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_EXT_BY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF8", ".gif"),
    (b"RIFF", ".webp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"BM", ".bmp"),
)


def sniff_extension(data: bytes) -> str:
    """File extension from the leading bytes (what the file is, not what its name claims); ``.bin`` if unknown."""
    for magic, ext in _EXT_BY_MAGIC:
        if data.startswith(magic):
            return ext
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return ".heic" if b"hei" in data[8:12] or b"mif1" in data[8:12] else ".avif"
    return ".bin"


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
