"""Issue 16 item 2: a spent quota stops the crawl cleanly, keeps the remaining work, and the next run finishes it;
a refused key fails the crawl naming the problem (never the key).

Google documents HTTP 403 from Place Photo when the quota is exceeded, and OVER_QUERY_LIMIT (with a "daily request
quota" message) from the JSON web service; the fake answers both once a set number of requests was served."""

from __future__ import annotations

import dagster as dg
import pytest

from tests.crawl_support import GOOGLE_KEY, assert_store_intact, crawl_places, few_places, places_expected
from geopak_testkit.fake_apis import FakeServer, places_routes

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.defs.crawl import PLACES_COMPLETE_CHECK, GooglePlacesResource, google_places_photos
from pipeline.defs.resources import BoundariesResource, DataRootResource
from pipeline.sources.crawl import STOPPED_KEY
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.http import CrawlError

FAST = dict(api="legacy", timeout_s=0.5, max_attempts=3, backoff_base_s=0.002, backoff_max_s=0.02, download_workers=4,
            queries_per_second=1000, tile_deg=0.2, page_token_delay_s=0.01)


def test_photo_quota_403_stops_cleanly_and_the_next_run_finishes(tmp_path, boundaries):
    places = few_places(n=8, photos=3)
    expected = places_expected(places, boundaries)
    with FakeServer() as srv:
        ctl = places_routes(srv, places, GOOGLE_KEY)
        ctl.photo_quota = 6
        srv.tag = "run1"
        first = crawl_places(tmp_path, boundaries, srv.url)  # no exception: a quota is not a crawl error
        assert first.stopped and "Place Photo quota is exhausted" in first.stopped and GOOGLE_KEY not in first.stopped
        stored = set(first.manifest["source_id"])
        assert 0 < len(stored) <= 6
        assert first.remaining["items to download"] == len(expected) - len(stored)
        assert set(first.rejections["reason"]) <= {reasons.DOWNLOAD_FAILED}  # nothing rejected for good
        with CrawlState(DataPaths.at(tmp_path).crawl_state("google_places", "ict")) as st:
            assert "quota" in st.meta_get(STOPPED_KEY)
            assert st.counts()["items"].get("rejected", 0) == 0
        # after the first 403 only the downloads already in flight (4 workers) may still ask
        denied = [e for e in srv.requests("/maps/api/place/photo", tag="run1") if e.status == 403]
        assert 1 <= len(denied) <= 4
        assert len(srv.requests("/maps/api/place/details/json", tag="run1")) == len(
            {i.split(":")[0] for i in expected}) + 1  # every place once, plus one check of the key

        ctl.photo_quota = None  # the quota resets
        srv.tag = "run2"
        second = crawl_places(tmp_path, boundaries, srv.url)
        fetched_again = {e.path.rsplit("/", 1)[1] for e in srv.requests("/places-photo/", tag="run2")}
    assert second.stopped is None and second.remaining["items to download"] == 0
    assert set(second.manifest["source_id"]) == expected and second.rejections.empty
    assert not fetched_again & {"ref-{}-{}".format(*i.split(":")) for i in stored}  # stored ones not fetched again
    assert assert_store_intact(tmp_path) == len(expected)
    with CrawlState(DataPaths.at(tmp_path).crawl_state("google_places", "ict")) as st:
        assert st.meta_get(STOPPED_KEY) is None


def test_json_quota_stops_discovery_and_the_next_run_finishes(tmp_path, boundaries):
    places = few_places()
    expected = places_expected(places, boundaries)
    with FakeServer() as srv:
        ctl = places_routes(srv, places, GOOGLE_KEY)
        ctl.json_quota = 5  # a few searches and details, then OVER_QUERY_LIMIT with the daily-quota message
        first = crawl_places(tmp_path, boundaries, srv.url)
        assert first.stopped and "OVER_QUERY_LIMIT" in first.stopped and "daily request quota" in first.stopped
        over = [e for e in srv.log if e.path.endswith("/json") and e.status == 200]
        assert len(over) == 6  # the daily quota is not retried: one refused request, then the crawl stops
        assert sum(v for k, v in first.remaining.items() if k.startswith("units")) > 0
        ctl.json_quota = None
        second = crawl_places(tmp_path, boundaries, srv.url)
    assert second.stopped is None and set(second.manifest["source_id"]) == expected
    assert not any(v for v in second.remaining.values())


def test_a_refused_key_fails_naming_the_problem_not_the_key(tmp_path, boundaries):
    places = few_places()
    with FakeServer() as srv:
        places_routes(srv, places, GOOGLE_KEY)
        wrong = "AIzaWRONG-KEY-000"
        with pytest.raises(CrawlError) as err:
            crawl_places(tmp_path / "a", boundaries, srv.url, key=wrong)
        assert "refused the API key" in str(err.value) and "REQUEST_DENIED" in str(err.value)
        assert wrong not in str(err.value) and GOOGLE_KEY not in str(err.value)
        # discovery done with a good key, downloads with a key Google refuses: Place Photo 403 + Details denied
        crawl_places(tmp_path / "b", boundaries, srv.url, discover_only=True)
        with pytest.raises(CrawlError) as err:
            crawl_places(tmp_path / "b", boundaries, srv.url, key=wrong)
        assert "refused the API key" in str(err.value) and wrong not in str(err.value)
    with CrawlState(DataPaths.at(tmp_path / "b").crawl_state("google_places", "ict")) as st:
        assert st.counts()["items"].get("rejected", 0) == 0  # the photos wait for a working key


def test_asset_reports_quota_with_a_warn_check_then_completes(tmp_path, boundaries, boundaries_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    places = few_places(n=6, photos=3)
    with FakeServer() as srv:
        ctl = places_routes(srv, places, GOOGLE_KEY)
        ctl.photo_quota = 4
        resources = {"data_root": DataRootResource(path=str(tmp_path)),
                     "boundaries": BoundariesResource(source=str(boundaries_path)),
                     "google_places": GooglePlacesResource(enabled=True, base_url=srv.url, **FAST)}

        def run():
            result = dg.materialize([google_places_photos], resources=resources, partition_key="ict")
            md = result.asset_materializations_for_node("google_places_photos")[0].metadata
            checks = {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events
                      if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION}
            return result, md, checks[PLACES_COMPLETE_CHECK]

        first, md, check = run()
        assert first.success and md["quota_exhausted"].value is True and "quota" in md["stopped_because"].value
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["quota_exhausted"].value is True and check.metadata["remaining_total"].value > 0
        ctl.photo_quota = None
        second, md, check = run()
    assert md["quota_exhausted"].value is False and check.passed
    assert md["images"].value == len(places_expected(places, boundaries))
