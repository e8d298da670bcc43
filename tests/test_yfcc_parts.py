"""YFCC100M as released in 2014 (ten parts, yfcc100m_dataset-0 … -9, bz2, 23 fields) as well as one file: parts read
in order, each resumed on its own, by the province crawl and by the one-pass discovery; user tags split before they
are decoded; dates that can only be placeholders keep the photo but give no day."""

from __future__ import annotations

import bz2

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.crawl_support import fast_http
from geopak_testkit.fake_apis import FakeServer, image_routes
from tests.test_crawl_sources import _check_outputs, _crawl, _yfcc_expected, _yfcc_lines

from pipeline.core.paths import DataPaths
from pipeline.sources import crawl as crawl_mod
from pipeline.sources import yfcc100m as yfcc_mod
from pipeline.sources.http import HttpStats
from pipeline.sources.yfcc100m import (
    COLUMNS_SQL,
    Yfcc100mSource,
    YfccConfig,
    discover_candidates,
    metadata_parts,
    yfcc_capture_time,
    yfcc_tags,
)


def _release(folder, url: str, n: int = 300, parts: int = 3) -> tuple[list[str], dict, list[str]]:
    """The 2014 layout: ``parts`` bz2 files of consecutive lines, plus the hash file that is not metadata."""
    lines, rows = _yfcc_lines(url, n, seed=12, columns=COLUMNS_SQL)
    lines.insert(40, "a\tbroken\tline")
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(lines) // parts)
    names = []
    for k in range(parts):
        name = f"yfcc100m_dataset-{k}.bz2"
        (folder / name).write_bytes(bz2.compress(("\n".join(lines[k * size:(k + 1) * size]) + "\n").encode()))
        names.append(name)
    (folder / "yfcc100m_hash.bz2").write_bytes(bz2.compress(b"0\tabc\n"))
    return lines, rows, names


def test_tags_are_split_before_they_are_decoded():
    assert yfcc_tags("lahore,paris%2C+france,new+york,,badshahi%20mosque") == \
        ["lahore", "paris, france", "new york", "badshahi mosque"]
    assert yfcc_tags("") == [] and yfcc_tags(None) == []


def test_part_files_in_numeric_order(tmp_path):
    for k in (10, 2, 0, 1):
        (tmp_path / f"yfcc100m_dataset-{k}.bz2").write_bytes(b"")
    (tmp_path / "yfcc100m_hash.bz2").write_bytes(b"")
    (tmp_path / "yfcc100m_dataset.sql").write_bytes(b"")
    want = [str(tmp_path / f"yfcc100m_dataset-{k}.bz2") for k in (0, 1, 2, 10)]
    assert metadata_parts(str(tmp_path)) == want
    assert metadata_parts(str(tmp_path / "yfcc100m_dataset-*.bz2")) == want
    assert metadata_parts(str(tmp_path / "yfcc100m_dataset-1.bz2")) == [want[1]]
    (tmp_path / "yfcc100m_dataset-1").write_bytes(b"")  # the same part, unpacked beside the packed one
    with pytest.raises(ValueError, match="more than once"):
        metadata_parts(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        metadata_parts(str(tmp_path / "nothing-here"))


def test_parts_crawl_like_one_file_and_resume_part_by_part(tmp_path, boundaries, monkeypatch):
    with FakeServer() as srv:
        image_routes(srv, "/orig/")
        lines, rows, names = _release(tmp_path / "release", srv.url)
        single = tmp_path / "yfcc100m_dataset"
        single.write_text("\n".join(lines) + "\n")
        http = fast_http()
        cfg = YfccConfig(str(tmp_path / "release"), block_mb=0.004, downloads_per_second=0)
        reads: list[str] = []
        real_read, real_scan = yfcc_mod.read_delimited, yfcc_mod.scan_in_chunks

        def reading(src, *a, **kw):
            reads.append(str(src))
            return real_read(src, *a, **kw)

        monkeypatch.setattr(yfcc_mod, "read_delimited", reading)
        handled: list[str] = []

        def dying(ctx, name, batches, handle):
            def counted(batch):
                handled.append(name)
                if name.startswith("part1@") and handled.count(name) == 2:
                    raise KeyboardInterrupt  # killed in the middle of the second part
                return handle(batch)
            real_scan(ctx, name, batches, counted)

        monkeypatch.setattr(yfcc_mod, "scan_in_chunks", dying)
        root = tmp_path / "root"
        with pytest.raises(KeyboardInterrupt):
            _crawl(Yfcc100mSource(cfg, http, HttpStats()), "punjab", root, boundaries, http, HttpStats())
        monkeypatch.setattr(yfcc_mod, "scan_in_chunks", real_scan)
        reads.clear()
        result = _crawl(Yfcc100mSource(cfg, http, HttpStats()), "punjab", root, boundaries, http, HttpStats())
        assert [r.rsplit("/", 1)[1] for r in reads] == names[1:]  # the first part was finished: not read again
        direct = _crawl(Yfcc100mSource(YfccConfig(str(single), block_mb=0.004, downloads_per_second=0), http,
                                       HttpStats()), "punjab", tmp_path / "direct", boundaries, http, HttpStats())
    _check_outputs(result, root, _yfcc_expected(rows, boundaries))
    assert sorted(result.manifest["source_id"]) == sorted(direct.manifest["source_id"])
    assert result.summary["malformed lines skipped"] == 1 and result.summary["units: rows"] == 300
    with crawl_mod.CrawlState(DataPaths.at(root).crawl_state("yfcc100m", "punjab")) as st:
        assert all(st.meta_get(f"part{k}@{name}_complete") for k, name in enumerate(names))


def test_discovery_reads_the_parts_once_and_resumes_after_a_kill(tmp_path, boundaries, monkeypatch):
    lines, rows, names = _release(tmp_path / "release", "http://x")
    single = tmp_path / "yfcc100m_dataset"
    single.write_text("\n".join(lines) + "\n")
    whole = discover_candidates(str(single), boundaries, DataPaths.at(tmp_path / "a"), block_mb=0.01,
                                log=lambda m: None)
    paths = DataPaths.at(tmp_path / "b")
    real = yfcc_mod._discover_part
    done: list[str] = []

    def dying(part, *a, **kw):
        if part.endswith(names[2]):
            raise KeyboardInterrupt
        done.append(part)
        return real(part, *a, **kw)

    monkeypatch.setattr(yfcc_mod, "_discover_part", dying)
    with pytest.raises(KeyboardInterrupt):
        discover_candidates(str(tmp_path / "release"), boundaries, paths, block_mb=0.01, log=lambda m: None)
    assert len(done) == 2 and not paths.yfcc_discovery.exists()

    def counted(part, *a, **kw):
        done.append(part)
        return real(part, *a, **kw)

    monkeypatch.setattr(yfcc_mod, "_discover_part", counted)
    parts = discover_candidates(str(tmp_path / "release"), boundaries, paths, block_mb=0.01, log=lambda m: None)
    assert done[2:] == [str(tmp_path / "release" / names[2])]  # only the unfinished part was read
    assert parts.rows == whole.rows == 300 and parts.provinces == whole.provinces
    assert parts.malformed_lines["count"] == whole.malformed_lines["count"] == 1
    for key in whole.provinces:
        a = pq.read_table(DataPaths.at(tmp_path / "a").yfcc_candidates(key)).to_pandas()
        b = pq.read_table(paths.yfcc_candidates(key)).to_pandas()
        pd.testing.assert_frame_equal(a, b)  # the same rows in the same order
    assert not (paths.yfcc_discovery.parent / "parts").exists()
    http = fast_http()
    cfg = YfccConfig(str(tmp_path / "release"), block_mb=0.01, downloads_per_second=0,
                     discovery_path=str(paths.yfcc_discovery))
    found = _crawl(Yfcc100mSource(cfg, http, HttpStats()), "punjab", tmp_path / "b", boundaries, http, HttpStats(),
                   discover_only=True)
    with crawl_mod.CrawlState(DataPaths.at(tmp_path / "b").crawl_state("yfcc100m", "punjab")) as st:
        ids = set(st.items()["item_id"])
    assert _yfcc_expected(rows, boundaries) <= ids and found.summary["metadata rows (one discovery pass)"] == 300


@pytest.mark.parametrize("text, note", [
    ("2012-05-06 10:20:30.0", None),
    ("null", "yfcc100m datetaken unreadable: 'null'"),
    ("", "yfcc100m datetaken missing"),
    ("1000-01-01 00:00:00.0", "yfcc100m datetaken before 1826 (a placeholder): 1000-01-01 00:00:00"),
    ("1990-01-01 00:00:00.0", "yfcc100m datetaken looks month- or year-only (1st at 00:00:00): 1990-01-01 00:00:00"),
    ("2007-06-01 00:00:00.0", "yfcc100m datetaken looks month- or year-only (1st at 00:00:00): 2007-06-01 00:00:00"),
    ("2007-06-01 00:00:01.0", None),
])
def test_yfcc_dates(text, note):
    got = yfcc_capture_time(text)
    assert got["date_note"] == note
    assert (got["taken_at"] is None) == (note is not None)
    assert got["taken_at_source"] == (None if note else "yfcc100m:datetaken")


def test_yfcc_licences_take_the_filter_spellings(tmp_path):
    from pipeline.core import reasons

    row = {"marker": "0", "accuracy": "16", "downloadurl": "http://x/1.jpg"}
    source = Yfcc100mSource(YfccConfig(str(tmp_path), licenses=("Attribution-ShareAlike*", "cc0")), fast_http(),
                            HttpStats())
    assert source._check({**row, "licensename": "Attribution-ShareAlike+License"}) is None
    assert source._check({**row, "licensename": "Attribution+License"}) == reasons.LICENSE_NOT_ALLOWED
    with pytest.raises(ValueError, match="unknown licence family or name"):
        Yfcc100mSource(YfccConfig(str(tmp_path), licenses=("copyleft",)), fast_http(), HttpStats())
