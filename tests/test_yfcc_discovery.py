"""YFCC100M in one pass: the discovery step reads the metadata file once for every province, each province's crawl
reads only its candidates file and finds exactly what a crawl over the whole file finds; without (or with stale)
discovery output a province fails with a message that says what to run."""

from __future__ import annotations

import bz2
import os

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.core.paths import DataPaths
from pipeline.core.provinces import BY_KEY
from pipeline.core.schema import read_table
from pipeline.defs.crawl import Yfcc100mResource, yfcc100m_candidates, yfcc100m_photos
from pipeline.defs.resources import BoundariesResource, DataRootResource
from pipeline.sources import yfcc100m as yfcc_mod
from pipeline.sources.http import HttpStats
from pipeline.sources.yfcc100m import DiscoveryMissing, Yfcc100mSource, YfccConfig, discover_candidates
from tests.crawl_support import fast_http
from geopak_testkit.fake_apis import FakeServer, image_routes
from tests.test_crawl_sources import _check_outputs, _crawl, _yfcc_expected, _yfcc_lines

PROVINCES_SEEN = ("punjab", "sindh", "kpk", "balochistan")


def _metadata(tmp_path, url: str, n: int = 400, compress: bool = False):
    lines, rows = _yfcc_lines(url, n, seed=9)
    lines.insert(5, "a\tbroken\tline")
    lines.insert(9, "\t".join(["x"] * 12 + ["", ""] + ["y"] * 11))  # no coordinates: never a candidate
    text = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("yfcc100m_dataset.bz2" if compress else "yfcc100m_dataset")
    path.write_bytes(bz2.compress(text) if compress else text)
    return path, rows


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = yfcc_mod.read_delimited

    def counting(source, *a, **kw):
        reads.append(str(source))
        return real(source, *a, **kw)

    monkeypatch.setattr(yfcc_mod, "read_delimited", counting)
    return reads


def test_one_pass_serves_every_province(tmp_path, boundaries, monkeypatch):
    root = tmp_path / "root"
    paths = DataPaths.at(root)
    with FakeServer() as srv:
        image_routes(srv, "/orig/")
        meta, rows = _metadata(tmp_path, srv.url)
        reads = _count_reads(monkeypatch)
        result = discover_candidates(str(meta), boundaries, paths, block_mb=0.01, log=lambda m: None)
        assert len(reads) == 1 and result.rows == 401 and result.malformed_lines["count"] == 1
        # the counts are what a point-in-polygon test of every row says
        for key in PROVINCES_SEEN:
            assert result.provinces[key]["in_province"] == sum(
                1 for r in rows.values()
                if boundaries.locate([float(r["latitude"])], [float(r["longitude"])])[0] == BY_KEY[key].id)
        # nothing more is read: a rerun finds the record fresh, every province crawls from its own file
        again = discover_candidates(str(meta), boundaries, paths, block_mb=0.01, log=lambda m: None)
        assert again.reused and again.run_id == result.run_id
        http, stats = fast_http(), HttpStats()
        cfg = YfccConfig(str(meta), block_mb=0.01, downloads_per_second=0, discovery_path=str(paths.yfcc_discovery))
        results = {key: _crawl(Yfcc100mSource(cfg, http, stats), key, root, boundaries, http, stats)
                   for key in PROVINCES_SEEN}
        assert len(reads) == 1
        # the same as a province crawl that scans the whole file itself
        direct_root = tmp_path / "direct"
        direct = _crawl(Yfcc100mSource(YfccConfig(str(meta), block_mb=0.01, downloads_per_second=0), http, stats),
                        "punjab", direct_root, boundaries, http, stats)
    for key, res in results.items():
        _check_outputs(res, root, _yfcc_expected(rows, boundaries, province=key))
        assert res.summary["malformed lines skipped"] == 1
        assert res.summary["metadata rows (one discovery pass)"] == 401
    assert sorted(results["punjab"].manifest["source_id"]) == sorted(direct.manifest["source_id"])
    got = results["punjab"].rejections.sort_values("source_id")[["source_id", "reason"]].reset_index(drop=True)
    want = direct.rejections.sort_values("source_id")[["source_id", "reason"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)  # rows of the bbox outside the polygon are judged as before


def test_bz2_discovery_equals_plain(tmp_path, boundaries):
    (tmp_path / "p").mkdir()
    (tmp_path / "b").mkdir()
    plain, _ = _metadata(tmp_path / "p", "http://x", n=300)
    packed, _ = _metadata(tmp_path / "b", "http://x", n=300, compress=True)
    logs: list[str] = []
    a = discover_candidates(str(plain), boundaries, DataPaths.at(tmp_path / "ra"), block_mb=0.01, log=logs.append)
    b = discover_candidates(str(packed), boundaries, DataPaths.at(tmp_path / "rb"), block_mb=0.01, workers=2,
                            log=logs.append)
    c = discover_candidates(str(packed), boundaries, DataPaths.at(tmp_path / "rc"), block_mb=0.01, workers=1,
                            log=logs.append)
    assert a.decompressor == "none" and b.decompressor == "indexed_bzip2 (2 threads)"
    assert c.decompressor == "bz2 (pyarrow, 1 thread)" and any("pyarrow in one thread" in m for m in logs)
    for other in (b, c):
        assert a.provinces == other.provinces and a.rows == other.rows
    for key in a.provinces:
        ta = pq.read_table(DataPaths.at(tmp_path / "ra").yfcc_candidates(key))
        for root in ("rb", "rc"):
            assert ta.equals(pq.read_table(DataPaths.at(tmp_path / root).yfcc_candidates(key)))


def test_partition_needs_discovery_then_consumes_its_file(tmp_path, boundaries, boundaries_path, monkeypatch):
    root = tmp_path / "root"
    with FakeServer() as srv:
        image_routes(srv, "/orig/")
        meta, rows = _metadata(tmp_path, srv.url, n=200)
        resources = {"data_root": DataRootResource(path=str(root)),
                     "boundaries": BoundariesResource(source=str(boundaries_path)),
                     "yfcc100m": Yfcc100mResource(metadata_path=str(meta), block_mb=0.01, downloads_per_second=0,
                                                  timeout_s=2.0)}
        # no discovery output: a clear failure that names the asset to run
        failed = dg.materialize([yfcc100m_photos], resources=resources, partition_key="punjab", raise_on_error=False)
        assert not failed.success
        error = next(e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
        assert "materialize the yfcc100m_candidates asset first" in error.event_specific_data.error.to_string()

        found = dg.materialize([yfcc100m_candidates], resources=resources)
        md = found.asset_materializations_for_node("yfcc100m_candidates")[0].metadata
        assert md["status"].value == "discovered" and md["rows_read"].value == 201
        reads = _count_reads(monkeypatch)
        ok = dg.materialize([yfcc100m_photos], resources=resources, partition_key="punjab")
        assert ok.success and reads == []  # the partition read its candidates file, not the metadata file
        manifest = read_table(DataPaths.at(root).raw_manifest("yfcc100m", "punjab"))
        assert set(manifest["source_id"]) == _yfcc_expected(rows, boundaries)
        again = dg.materialize([yfcc100m_candidates], resources=resources)
        assert again.asset_materializations_for_node("yfcc100m_candidates")[0].metadata["status"].value.startswith(
            "unchanged")

        # the metadata file changed since discovery: the partition says so instead of crawling stale candidates
        with open(meta, "ab") as f:
            f.write(b"\n")
        os.utime(meta, ns=(1, 1))
        stale = dg.materialize([yfcc100m_photos], resources=resources, partition_key="punjab", raise_on_error=False)
        assert not stale.success
        error = next(e for e in stale.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
        assert "materialize yfcc100m_candidates again" in error.event_specific_data.error.to_string()


def test_source_without_discovery_output_raises_clearly(tmp_path):
    cfg = YfccConfig(str(tmp_path / "meta.tsv"), discovery_path=str(tmp_path / "nothing.json"))
    (tmp_path / "meta.tsv").write_text("")
    with pytest.raises(DiscoveryMissing, match="yfcc100m_candidates"):
        Yfcc100mSource(cfg, fast_http(), HttpStats()).params()

