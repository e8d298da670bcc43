"""Issue 12, item 11: the crawl metadata ``units: total`` is the source's total once per search, not once per page
(every Flickr page repeats its search's total, so summing pages multiplied it by the page count)."""

from __future__ import annotations

from tests.crawl_support import FLICKR_KEY, fast_http, flickr_photos, flickr_source
from geopak_testkit.fake_apis import FakeServer, flickr_routes

from pipeline.core.paths import DataPaths
from pipeline.core.store import ImageStore
from pipeline.sources.crawl import run_crawl
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.http import HttpStats


def _discover(tmp_path, boundaries, photos, cap: int, per_page: int):
    with FakeServer() as srv:
        flickr_routes(srv, photos, FLICKR_KEY, cap=cap)
        stats, http = HttpStats(), fast_http()
        source = flickr_source(srv.url + "/services/rest/", http, stats, per_page=per_page, min_tile_deg=0.01,
                               result_cap=cap)
        result = run_crawl(source, "sindh", DataPaths.at(tmp_path), ImageStore(tmp_path), boundaries, http, stats,
                           log=lambda m: None, discover_only=True)
    with CrawlState(DataPaths.at(tmp_path).crawl_state("flickr", "sindh")) as st:
        found = len(st.items())
        pages = len([r for r in st.unit_results("q:") if "photos" in r])
    return result, found, pages


def test_flickr_units_total_counts_each_search_once_not_each_page(tmp_path, boundaries):
    """160 photos, 20 a page: one search of 8 pages reports its total once (the bug reported 8 × 160)."""
    photos = flickr_photos(160, seed=1)
    result, found, pages = _discover(tmp_path, boundaries, photos, cap=4000, per_page=20)
    assert pages > 1
    assert result.summary["units: total"] == found


def test_flickr_units_total_leaves_out_split_searches(tmp_path, boundaries):
    """A search over the cap is split; only the searches that were paged count, each once, so the total is the
    number of photos found (none lies on a tile edge here)."""
    photos = flickr_photos(160, seed=1)
    result, found, pages = _discover(tmp_path, boundaries, photos, cap=50, per_page=20)
    assert result.summary.get("units: split", 0) >= 1 and pages > 1, result.summary
    assert result.summary["units: total"] == found
