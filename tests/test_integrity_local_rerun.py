"""Issue 12 item 8: a manifest re-run hashes and copies only new or changed files, as the folder mode does."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pipeline.core import reasons
from pipeline.core.store import ImageStore
from pipeline.sources import local as local_module
from pipeline.sources.local import LocalSource, LocalSourceConfig
from tests.conftest import gps_exif, jpeg_bytes


class CountingStore(ImageStore):
    """Counts the bytes handed to the store: a reused file must not be read, hashed or copied again."""

    def __init__(self, root):
        super().__init__(root)
        self.puts = 0

    def put(self, data: bytes) -> tuple[str, str]:
        self.puts += 1
        return super().put(data)


@pytest.fixture()
def manifest_corpus(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(jpeg_bytes(colour=(1, 90, 9), exif=gps_exif(36.0, 75.0)))  # EXIF far from manifest
    (imgs / "b.jpg").write_bytes(jpeg_bytes(colour=(2, 90, 9), exif=gps_exif(31.5, 74.3, when="2021:13:01 10:00:00")))
    (imgs / "c.jpg").write_bytes(jpeg_bytes(colour=(3, 90, 9)))
    csv = tmp_path / "m.csv"
    pd.DataFrame({
        "id": ["a", "b", "c", "far"],
        "lat": ["33.6844", "31.5", "30.18", "51.5"],
        "lon": ["73.0479", "74.3", "66.99", "-0.12"],
        "path": ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/c.jpg"],
        "date": ["2021-05-01", "", "", ""],
    }).to_csv(csv, index=False)
    return imgs, csv


def _run(tmp_path, boundaries, cfg, previous=None):
    store = CountingStore(tmp_path / "data")
    src = LocalSource(cfg, store, lambda la, lo: boundaries.locate(la, lo) >= 0, previous=previous)
    return src.run(), store


def test_manifest_rerun_reuses_unchanged_files(manifest_corpus, tmp_path, boundaries, monkeypatch):
    imgs, csv = manifest_corpus
    cfg = LocalSourceConfig(manifest=str(csv))
    first, store1 = _run(tmp_path, boundaries, cfg)
    assert (first.stats["new"], first.stats["reused"], store1.puts) == (3, 0, 3)
    assert first.stats["manifest_exif_disagree"] == 1 and first.stats["exif_date_unusable"] == 1

    hashed: list[int] = []
    real_hash = local_module.sha256_hex
    monkeypatch.setattr(local_module, "sha256_hex", lambda data: hashed.append(len(data)) or real_hash(data))
    second, store2 = _run(tmp_path, boundaries, cfg, previous=first.manifest)
    assert (second.stats["new"], second.stats["reused"], store2.puts, hashed) == (0, 3, 0, [])
    pd.testing.assert_frame_equal(second.manifest, first.manifest)
    pd.testing.assert_frame_equal(second.rejections, first.rejections)
    # what the headers say is still counted on a reuse
    assert second.stats["manifest_exif_disagree"] == 1 and second.stats["exif_date_unusable"] == 1


def test_manifest_rerun_reads_changed_files_and_applies_new_metadata(manifest_corpus, tmp_path, boundaries):
    imgs, csv = manifest_corpus
    cfg = LocalSourceConfig(manifest=str(csv))
    first, _ = _run(tmp_path, boundaries, cfg)
    (imgs / "c.jpg").write_bytes(jpeg_bytes(colour=(4, 90, 9), size=(100, 64)))  # new bytes, new size
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[df["id"] == "a", "lat"] = "51.5"  # a's metadata moves it out of Pakistan; its file is unchanged
    df.to_csv(csv, index=False)
    second, store = _run(tmp_path, boundaries, cfg, previous=first.manifest)
    assert (second.stats["new"], second.stats["reused"], store.puts) == (1, 1, 1)
    rej = second.rejections.set_index("source_id")
    assert rej.loc["manifest:m.csv:a", "reason"] == reasons.OUTSIDE_PAKISTAN
    c = second.manifest.set_index("source_id").loc["manifest:m.csv:c"]
    assert c["image_id"] != first.manifest.set_index("source_id").loc["manifest:m.csv:c", "image_id"]


def test_touched_file_is_read_again(manifest_corpus, tmp_path, boundaries):
    imgs, csv = manifest_corpus
    cfg = LocalSourceConfig(manifest=str(csv))
    first, _ = _run(tmp_path, boundaries, cfg)
    st = (imgs / "b.jpg").stat()
    os.utime(imgs / "b.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second, store = _run(tmp_path, boundaries, cfg, previous=first.manifest)
    assert (second.stats["new"], second.stats["reused"], store.puts) == (1, 2, 1)


def test_reuse_respects_a_changed_copy_setting(manifest_corpus, tmp_path, boundaries):
    """Rows referenced in place are copied into the store when the setting changes, not reused as they were."""
    imgs, csv = manifest_corpus
    first, _ = _run(tmp_path, boundaries, LocalSourceConfig(manifest=str(csv), copy_into_store=False))
    second, store = _run(tmp_path, boundaries, LocalSourceConfig(manifest=str(csv)), previous=first.manifest)
    assert (second.stats["new"], second.stats["reused"], store.puts) == (3, 0, 3)
    assert not any(p.startswith("/") for p in second.manifest["path"])
