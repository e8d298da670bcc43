"""A full disk must say so: "No space left on device", the path, the bytes needed and the bytes left (issue 12.6).

The free space is faked through ``shutil.disk_usage``; the writers' own failures are faked by raising what they raise
on a full disk (ENOSPC from the OS, torch's ``RuntimeError: [enforce fail at inline_container.cc:672]``)."""

from __future__ import annotations

import errno
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from geopak_model import checkpoint
from pipeline.core.store import DiskFullError, ImageStore, atomic_path, atomic_write_bytes

Usage = namedtuple("Usage", "total used free")
TORCH_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
              "file write failed")


def _free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - free, free))


def _no_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _assert_says_full(err: DiskFullError, path: Path, free: int) -> None:
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    text = str(err)
    assert "No space left on device" in text and str(path) in text and f"{free:,} bytes left" in text


def test_write_that_does_not_fit_fails_before_writing(tmp_path, monkeypatch):
    _free(monkeypatch, 1000)
    target = tmp_path / "sub" / "blob.bin"
    with pytest.raises(DiskFullError) as info:
        atomic_write_bytes(target, b"x" * 5000)
    _assert_says_full(info.value, target, 1000)
    assert "needs 5,000 bytes" in str(info.value)
    assert _no_leftovers(tmp_path) == []


def test_image_store_put_checks_space(tmp_path, monkeypatch):
    _free(monkeypatch, 10)
    with pytest.raises(DiskFullError, match="No space left on device"):
        ImageStore(tmp_path).put(b"\xff\xd8\xff" + b"0" * 100)
    assert _no_leftovers(tmp_path) == []


def test_enospc_from_the_writer_becomes_disk_full(tmp_path, monkeypatch):
    """A writer that hits the full disk midway (size not known up front) gets the same clear error."""
    _free(monkeypatch, 0)
    target = tmp_path / "table.parquet"
    with pytest.raises(DiskFullError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    _assert_says_full(info.value, target, 0)
    assert isinstance(info.value.__cause__, OSError)
    assert _no_leftovers(tmp_path) == [], "the temp file is removed"


def test_pyarrow_style_message_becomes_disk_full(tmp_path, monkeypatch):
    _free(monkeypatch, 0)
    with pytest.raises(DiskFullError):
        with atomic_path(tmp_path / "t.parquet"):
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    with pytest.raises(DiskFullError):  # what pyarrow raises writing to a full device (errno set)
        with atomic_path(tmp_path / "u.parquet"):
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


def test_other_errors_pass_through(tmp_path, monkeypatch):
    """An unrelated failure is not relabelled, nor is a torch write failure while space remains."""
    _free(monkeypatch, 10**9)
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "a"):
            raise ValueError("bad data")
    with pytest.raises(RuntimeError, match="enforce fail"):
        with atomic_path(tmp_path / "b"):
            raise RuntimeError(TORCH_FULL)


def test_checkpoint_needs_its_size(tmp_path, monkeypatch):
    payload = {"heads": {"w": torch.zeros(1000, 100)}}  # 400 kB of storage
    _free(monkeypatch, 100_000)
    target = tmp_path / "phase1_last.pt"
    with pytest.raises(DiskFullError) as info:
        checkpoint.save_checkpoint(target, payload)
    _assert_says_full(info.value, target, 100_000)
    assert info.value.needed is not None and info.value.needed >= 400_000
    assert not target.exists()


def test_torch_full_disk_message_is_translated(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError [enforce fail at inline_container.cc:672]: say what it is."""
    target = tmp_path / "phase1_best.pt"

    def failing_save(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"PK" * 100)
        _free(monkeypatch, 0)  # the disk filled during the write
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(DiskFullError) as info:
        checkpoint.save_checkpoint(target, {"heads": {}})
    _assert_says_full(info.value, target, 0)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _no_leftovers(tmp_path) == []


def test_disk_full_error_pickles():
    """Errors cross process boundaries (Dagster step workers): the fields survive a round trip."""
    err = pickle.loads(pickle.dumps(DiskFullError("/d/x", 10, 2)))
    assert (err.path, err.needed, err.free, err.errno) == ("/d/x", 10, 2, errno.ENOSPC)
    assert "No space left on device" in str(err)


def test_tables_check_space_before_writing(tmp_path, monkeypatch):
    """Every stage table goes through ``write_table``: it asks for the table's size before writing a byte."""
    import pandas as pd
    import pyarrow as pa

    from pipeline.core.schema import write_table

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(DiskFullError, match="No space left on device"):
        write_table(pd.DataFrame({"x": range(1000)}), tmp_path / "t.parquet", pa.schema([("x", pa.int64())]))
    assert not list(tmp_path.iterdir())
