"""Issue 16 item 5: an expired page token no longer fails the crawl, and Place Details is asked only for places
whose search result shows a photo.

A page token answered INVALID_REQUEST is tried ``page_token_tries`` times (each after the ~2 s wait), then the
tile is searched again from page 1; if its tokens still fail, the tile is left ``deferred`` (what it found is
kept) and the next run searches it again."""

from __future__ import annotations

import numpy as np

from tests.crawl_support import GOOGLE_KEY, crawl_places, few_places, ict_places, places_expected
from geopak_testkit.fake_apis import FakeServer, places_routes

from pipeline.core.paths import DataPaths
from pipeline.core.provinces import BY_KEY
from pipeline.sources.crawl_state import DEFERRED, CrawlState


def test_expired_page_tokens_defer_the_tile_and_the_next_run_completes_it(tmp_path, boundaries):
    places = ict_places()  # a 90-place cluster: its tile needs pages 2 and 3, and a split
    expected = places_expected(places, boundaries)
    with FakeServer() as srv:
        ctl = places_routes(srv, places, GOOGLE_KEY, token_delay_s=0.0)
        ctl.token_ttl_s = 0.0  # every token has expired by the time it is used
        srv.tag = "run1"
        first = crawl_places(tmp_path, boundaries, srv.url, page_token_tries=2, search_restarts=1)
        searches = srv.requests("/maps/api/place/nearbysearch/json", tag="run1")
        token_calls = [e for e in searches if "pagetoken" in e.params]
        deferred_tiles = first.summary["tiles left for the next run (page token expired)"]
        assert deferred_tiles >= 1 and first.remaining["units tile"] == deferred_tiles
        # per deferred tile: 2 tries of its token, a new search, 2 tries of the new token
        first_pages = {}
        for e in searches:
            if "pagetoken" not in e.params:
                first_pages[e.params["location"]] = first_pages.get(e.params["location"], 0) + 1
        assert max(first_pages.values()) == 2 and len(token_calls) == 4 * int(deferred_tiles)
        with CrawlState(DataPaths.at(tmp_path).crawl_state("google_places", "ict")) as st:
            deferred = [u.unit_id for u, status in st.units("tile:") if status == DEFERRED]
        assert len(deferred) == deferred_tiles
        assert 0 < len(first.manifest) < len(expected)  # what the first pages found is kept and downloaded

        ctl.token_ttl_s = None
        srv.tag = "run2"
        second = crawl_places(tmp_path, boundaries, srv.url)
        stored_first = {"ref-{}-{}".format(*i.split(":")) for i in first.manifest["source_id"]}
        again = {e.path.rsplit("/", 1)[1] for e in srv.requests("/places-photo/", tag="run2")}
    assert set(second.manifest["source_id"]) == expected and second.manifest["source_id"].is_unique
    assert second.summary["units: split"] >= 4 and not second.remaining.get("units tile")
    assert not again & stored_first


def test_no_place_details_for_places_without_photos(tmp_path, boundaries):
    places = few_places(n=6, n_without_photos=5)
    where = boundaries.locate(np.array([p.lat for p in places]), np.array([p.lon for p in places]))
    in_ict = [p for p, w in zip(places, where) if w == BY_KEY["ict"].id]
    with FakeServer() as srv:
        ctl = places_routes(srv, places, GOOGLE_KEY)
        result = crawl_places(tmp_path, boundaries, srv.url)
    bare = {p.place_id for p in in_ict if p.n_photos == 0}
    assert len(bare) == 5
    assert not bare & set(ctl.details_ids)
    assert set(ctl.details_ids) == {p.place_id for p in in_ict if p.n_photos}
    assert result.summary["units: places_without_photos"] >= 5  # overlapping tile circles see a place twice
    assert set(result.manifest["source_id"]) == places_expected(places, boundaries)
