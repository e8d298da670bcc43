"""Kill a crawl (a subprocess, SIGKILL) midway, run it again: nothing lost, nothing that had completed fetched again.

The fake Flickr server counts requests. After the kill, the crawl state on disk says which query pages and which
downloads had completed; the second run must request none of them, and must end with every photo exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.crawl_support import (
    assert_store_intact,
    fast_http,
    flickr_expected,
    flickr_photos,
    flickr_source,
)
from geopak_testkit.fake_apis import FakeServer, flickr_routes, flickr_searches

from pipeline.core.paths import DataPaths
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, read_table
from pipeline.core.store import ImageStore
from pipeline.sources.crawl import run_crawl
from pipeline.sources.crawl_state import DONE, CrawlState
from pipeline.sources.flickr import Query, _naive_seconds
from pipeline.sources.http import HttpStats

REPO = Path(__file__).resolve().parents[1]


def _unit_of(params: dict) -> str:
    bbox = tuple(float(v) for v in params["bbox"].split(","))
    return Query(bbox, _naive_seconds(params["min_taken_date"]), _naive_seconds(params["max_taken_date"]),
                 int(params["page"])).unit_id


@pytest.mark.parametrize("kill_after", [("/services/rest/", 5), ("/flickr-img/", 30)], ids=["searching", "downloading"])
def test_sigkill_then_resume(tmp_path, boundaries, boundaries_path, kill_after):
    photos = flickr_photos(150, seed=11)
    expected = flickr_expected(photos, boundaries)
    prefix, threshold = kill_after
    paths = DataPaths.at(tmp_path)
    with FakeServer(latency_s=0.01) as srv:
        flickr_routes(srv, photos, "SECRET-KEY-123")
        reached = threading.Event()
        srv.on_request = lambda e: reached.set() if len(srv.requests(prefix)) >= threshold else None
        srv.tag = "run1"
        spec = {"rest_url": srv.url + "/services/rest/", "root": str(tmp_path), "per_page": 10, "workers": 2,
                "boundaries": str(boundaries_path)}
        proc = subprocess.Popen([sys.executable, "-m", "tests.crawl_support", json.dumps(spec)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            assert reached.wait(60), proc.communicate(timeout=5)[0]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        with CrawlState(paths.crawl_state("flickr", "sindh")) as st:
            units_done = st.unit_ids(DONE)
            items = st.items()
        done_items = set(items.loc[items["status"] == DONE, "item_id"])
        assert units_done, "the first run finished some query pages before it was killed"
        if prefix == "/flickr-img/":
            assert done_items, "the first run finished some downloads before it was killed"
        assert len(done_items) < len(expected), "killed midway, not at the end"

        srv.tag = "run2"
        stats = HttpStats()
        http = fast_http(workers=2)
        source = flickr_source(srv.url + "/services/rest/", http, stats, per_page=10)
        run_crawl(source, "sindh", paths, ImageStore(tmp_path), boundaries, http, stats, log=lambda m: None)
        second_searches = {_unit_of(e.params) for e in flickr_searches(srv, tag="run2")}
        second_images = {e.path.rsplit("/", 1)[1].removesuffix(".jpg")
                         for e in srv.requests("/flickr-img/", tag="run2")}
    assert not second_searches & units_done, "a finished query page was fetched again"
    assert not second_images & done_items, "a finished download was fetched again"
    manifest = read_table(paths.raw_manifest("flickr", "sindh"), RAW_MANIFEST_SCHEMA)
    assert manifest["source_id"].is_unique and set(manifest["source_id"]) == expected
    assert assert_store_intact(tmp_path) == len(expected)
