"""Issue 20 item 1: Places API (New) as the default Google source, against a local fake of the v1 wire format.

A dense city (335 places, ~1,200 photos in a 2 km square) must be found completely, each place and photo stored
exactly once, under 20 % injected faults on the API and on the photo content host; the key travels only in the
X-Goog-Api-Key header to the API host; a daily quota stops the crawl cleanly and the next run resumes; a wrong key or
a disabled API fails naming the fix; an expired photo name is replaced, never a lost photo; coordinates follow the
terms (refreshed by Place Details with the mask ``id,location``)."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import requests

from tests.crawl_support import GOOGLE_KEY, assert_store_intact, crawl_places, fast_http
from geopak_testkit.fake_apis import FakeServer
from geopak_testkit.fake_places_v1 import V1Place, dense_city, expected_items, places_v1_routes

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.provinces import BY_KEY
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, read_table
from pipeline.defs.crawl import PLACES_COMPLETE_CHECK, GooglePlacesResource, google_places_photos
from pipeline.defs.resources import BoundariesResource, DataRootResource
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.http import CrawlError, HttpStats
from pipeline.sources.places_v1 import PLACE_MASK, PlacesV1Config, PlacesV1Source, billing_table
from pipeline.defs.metadata import metadata_text

FAULT_RATE = 0.2
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def v1_source(base_url: str, http, stats: HttpStats, key: str = GOOGLE_KEY, clock=None, **cfg) -> PlacesV1Source:
    """The Places API (New) crawler against the fake: fast pacing, 0.2° tiles split down to 0.001°."""
    defaults = dict(queries_per_second=1000, tile_deg=0.2, min_tile_deg=0.001, max_width=800)
    extra = {"clock": clock} if clock is not None else {}
    return PlacesV1Source(PlacesV1Config(key, base_url=base_url, **{**defaults, **cfg}), http, stats, **extra)


def crawl_v1(root, boundaries, base_url: str, **kw):
    return crawl_places(root, boundaries, base_url, factory=v1_source, **kw)


def _state(root) -> CrawlState:
    return CrawlState(DataPaths.at(root).crawl_state("google_places", "ict"))


def _few(n: int = 6, photos: int = 3) -> list[V1Place]:
    return [V1Place(f"ChIJfew{i:02d}", 33.70 + 0.003 * i, 73.05 + 0.002 * i, photos, 1.0 - i / 10) for i in range(n)]


def _assert_key_only_in_header(api: FakeServer, content: FakeServer) -> None:
    for e in api.log:
        assert e.headers.get("x-goog-api-key") == GOOGLE_KEY, e
        assert "key" not in e.params and GOOGLE_KEY not in json.dumps(e.params), e
    for e in content.log:  # the content host (photoUri) never sees the key, in any header or in the URL
        assert GOOGLE_KEY not in json.dumps(e.headers) + json.dumps(e.params) + e.path, e


@pytest.mark.parametrize("search", ["nearby", "text"])
def test_dense_city_found_completely_and_once_under_faults(tmp_path, boundaries, search):
    places = dense_city()
    expected = expected_items(places, boundaries)
    assert len(expected) > 1000
    with FakeServer(fault_rate=FAULT_RATE, seed=21) as api, FakeServer(fault_rate=FAULT_RATE, seed=22) as content:
        places_v1_routes(api, content, places, GOOGLE_KEY)
        result = crawl_v1(tmp_path, boundaries, api.url, http=fast_http(attempts=10), search=search,
                          text_query="things to see")
        for srv in (api, content):
            assert {"429", "500", "503", "timeout", "truncated", "garbage"} <= set(srv.fault_counts())
        _assert_key_only_in_header(api, content)
        masks = {e.headers.get("x-goog-fieldmask") for e in api.requests("/v1/places:search")}
        assert masks == {PLACE_MASK if search == "nearby" else PLACE_MASK + ",nextPageToken"}
    m = result.manifest
    assert result.stopped is None and not any(result.remaining.values())
    assert set(m["source_id"]) == expected and m["source_id"].is_unique and m["image_id"].is_unique
    assert result.rejections.empty
    assert assert_store_intact(tmp_path) == len(expected)
    cap = 20 if search == "nearby" else 60
    assert result.summary["units: split"] > 0 and result.summary["units: saturated_at_min_size"] == 0
    ict = boundaries.locate(np.array([p.lat for p in places]), np.array([p.lon for p in places])) == BY_KEY["ict"].id
    assert result.summary["units: new_places"] == ict.sum()  # each place of the province taken once
    assert result.summary["units: places_other_province"] > 0  # Rawalpindi's: found, left to punjab's partition
    with _state(tmp_path) as st:
        results = [u.get("results", 0) for u in st.unit_results("tile:")]
        records = list(st.items()["record"])
    assert max(results) == cap  # capped searches happened, and were split until under the cap
    assert not any("photo_name" in r for r in records)  # photo names are not kept once the photo is stored
    # every photo's authorAttributions travel with it; owner = their display names
    row = m.set_index("source_id").loc["ChIJcity0000:0"] if "ChIJcity0000:0" in expected else m.iloc[0]
    authors = json.loads(row["attribution"])
    assert authors and set(authors[0]) == {"displayName", "uri", "photoUri"}
    assert row["owner"] == ", ".join(a["displayName"] for a in authors)
    bill = billing_table(result.stats).set_index("request")
    assert bill.loc["photoMedia", "requests"] == len(expected)  # one billed media request a photo, despite retries
    assert bill.loc["searchNearby" if search == "nearby" else "searchText", "requests"] > 0


def test_fake_returns_next_page_token_only_when_the_mask_names_it():
    places = [V1Place(f"ChIJt{i:03d}", 33.70 + i * 1e-4, 73.05, 1, i / 100) for i in range(30)]
    body = {"textQuery": "museum", "pageSize": 20, "locationRestriction": {"rectangle": {
        "low": {"latitude": 33.6, "longitude": 73.0}, "high": {"latitude": 33.8, "longitude": 73.1}}}}
    with FakeServer() as api, FakeServer() as content:
        places_v1_routes(api, content, places, GOOGLE_KEY)
        url, key = api.url + "/v1/places:searchText", {"X-Goog-Api-Key": GOOGLE_KEY}
        without = requests.post(url, json=body, headers={**key, "X-Goog-FieldMask": "places.id"}).json()
        with_token = requests.post(url, json=body,
                                   headers={**key, "X-Goog-FieldMask": "places.id,nextPageToken"}).json()
        no_mask = requests.post(url, json=body, headers=key)
        page2 = requests.post(url, json={**body, "pageToken": with_token["nextPageToken"]},
                              headers={**key, "X-Goog-FieldMask": "places.id,nextPageToken"}).json()
        changed = requests.post(url, json={**body, "textQuery": "zoo", "pageToken": with_token["nextPageToken"]},
                                headers={**key, "X-Goog-FieldMask": "places.id"})
    assert len(without["places"]) == 20 and "nextPageToken" not in without
    assert "nextPageToken" in with_token and len(page2["places"]) == 10 and "nextPageToken" not in page2
    assert set(without["places"][0]) == {"id"}  # the mask is honoured
    assert no_mask.status_code == 400 and no_mask.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert changed.status_code == 400  # a page token only with the first page's other parameters


def test_daily_quota_stops_cleanly_and_the_next_run_resumes(tmp_path, boundaries):
    places = dense_city(n=60, seed=5)
    expected = expected_items(places, boundaries)
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        ctl.daily_quota = 4  # searches: a few, then 429 RESOURCE_EXHAUSTED "... per day"
        api.tag = "run1"
        first = crawl_v1(tmp_path, boundaries, api.url)
        assert first.stopped and "daily quota" in first.stopped and GOOGLE_KEY not in first.stopped
        assert sum(v for k, v in first.remaining.items() if k.startswith("units")) > 0
        refused = [e for e in api.requests(tag="run1") if e.status == 429]
        assert len(refused) == 1  # a daily quota is not retried
        with _state(tmp_path) as st:
            assert st.counts()["items"].get("rejected", 0) == 0
        # the photo quota (HTTP 403 with an image, as Place Photos (New) documents) stops the downloads
        ctl.daily_quota, ctl.photo_quota = None, 5
        second = crawl_v1(tmp_path, boundaries, api.url)
        assert second.stopped and "photo quota" in second.stopped
        assert 0 < len(second.manifest) < len(expected) and set(second.rejections["reason"]) <= {
            reasons.DOWNLOAD_FAILED}
        ctl.photo_quota = None
        api.tag = "run3"
        third = crawl_v1(tmp_path, boundaries, api.url)
        media_again = {e.path for e in api.requests("/v1/places/", tag="run3") if e.path.endswith("/media")}
    assert third.stopped is None and not any(third.remaining.values())
    assert set(third.manifest["source_id"]) == expected and third.rejections.empty
    assert len(media_again) == len(expected) - len(second.manifest)  # stored photos are not asked for again
    assert assert_store_intact(tmp_path) == len(expected)


def test_a_per_minute_rate_limit_is_retried_not_a_stop(tmp_path, boundaries):
    places = _few()
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        ctl.minute_limited = 0.4
        result = crawl_v1(tmp_path, boundaries, api.url, http=fast_http(attempts=10))
    assert result.stopped is None and result.stats.get("retry:http_429", 0) > 0
    assert set(result.manifest["source_id"]) == expected_items(places, boundaries)


@pytest.mark.parametrize("case", ["wrong_key", "api_disabled"])
def test_a_refused_key_fails_naming_the_fix_never_the_key(tmp_path, boundaries, case):
    wrong = "AIzaWRONG-KEY-000"
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, _few(), GOOGLE_KEY)
        ctl.service_enabled = case != "api_disabled"
        with pytest.raises(CrawlError) as err:
            crawl_v1(tmp_path, boundaries, api.url, key=wrong if case == "wrong_key" else GOOGLE_KEY)
    text = str(err.value)
    assert wrong not in text and GOOGLE_KEY not in text
    if case == "wrong_key":
        assert "API_KEY_INVALID" in text and "key is invalid" in text and "GOOGLE_MAPS_API_KEY" in text
    else:
        assert "403 PERMISSION_DENIED" in text and 'enable "Places API (New)" (places.googleapis.com)' in text


def test_expired_photo_names_are_replaced_from_place_details(tmp_path, boundaries):
    places = _few(n=6, photos=4)
    expected = expected_items(places, boundaries)
    expired = [p.place_id for p in places[:3]]
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        crawl_v1(tmp_path, boundaries, api.url, discover_only=True)  # photo names stored, photos not yet fetched
        ctl.expire_photo_names(expired)
        api.tag = "later"
        result = crawl_v1(tmp_path, boundaries, api.url)
        details = [e for e in api.requests("/v1/places/", tag="later") if not e.path.endswith("/media")]
        refused = [e for e in api.requests("/v1/places/", tag="later") if e.status == 400]
    assert set(result.manifest["source_id"]) == expected and result.rejections.empty
    assert sorted(e.path.rsplit("/", 1)[1] for e in details) == sorted(expired)  # one Place Details a place
    assert {e.headers["x-goog-fieldmask"] for e in details} == {"photos"}  # Place Details Essentials (IDs Only)
    assert len(refused) == 4 * len(expired)  # each stale name answered 400 once, then its fresh name was used
    assert result.stats["places:photo_name_expired"] == 4 * len(expired)


def test_a_media_redirect_is_not_followed_with_the_key(tmp_path, boundaries):
    places = _few(n=3)
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        ctl.ignore_skip_redirect = True  # the media endpoint answers 302 although JSON was asked for
        result = crawl_v1(tmp_path, boundaries, api.url)
        _assert_key_only_in_header(api, content)
        assert len(content.log) == len(result.manifest) > 0
    assert set(result.manifest["source_id"]) == expected_items(places, boundaries)


def test_coordinates_refreshed_by_place_details_and_expired_after_30_days(tmp_path, boundaries):
    places = _few()
    expected = expected_items(places, boundaries)

    def at(days: float):
        return lambda: T0 + dt.timedelta(days=days)

    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        crawl_v1(tmp_path, boundaries, api.url, clock=at(0))
        api.tag = "day28"
        refreshed = crawl_v1(tmp_path, boundaries, api.url, clock=at(28))
        details = api.requests("/v1/places/", tag="day28")
        assert len(details) == len(places) and {e.headers["x-goog-fieldmask"] for e in details} == {"id,location"}
        assert not api.requests("/v1/places:search", tag="day28")
        assert (pd.to_datetime(refreshed.manifest["fetched_at"], utc=True) == pd.Timestamp(at(28)())).all()
        ctl.daily_quota = ctl.json_requests  # day 60, quota spent: the 32-day-old coordinates are deleted
        expired = crawl_v1(tmp_path, boundaries, api.url, clock=at(60))
        assert expired.stopped and expired.manifest.empty
        assert set(expired.rejections["reason"]) == {reasons.COORDINATES_EXPIRED}
        ctl.daily_quota = None
        back = crawl_v1(tmp_path, boundaries, api.url, clock=at(60))
    assert set(back.manifest["source_id"]) == expected and back.rejections.empty


def test_asset_uses_places_new_by_default_and_reports_billing(tmp_path, boundaries_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    places = _few(n=5, photos=2)
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        ctl.photo_quota = 4
        resources = {"data_root": DataRootResource(path=str(tmp_path)),
                     "boundaries": BoundariesResource(source=str(boundaries_path)),
                     "google_places": GooglePlacesResource(enabled=True, base_url=api.url, queries_per_second=1000,
                                                           tile_deg=0.2, timeout_s=0.5, max_attempts=3,
                                                           backoff_base_s=0.002, backoff_max_s=0.02)}
        assert resources["google_places"].api == "new"
        first = dg.materialize([google_places_photos], resources=resources, partition_key="ict")
        md = first.asset_materializations_for_node("google_places_photos")[0].metadata
        check = next(e.event_specific_data for e in first.all_events
                     if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                     and e.event_specific_data.check_name == PLACES_COMPLETE_CHECK)
        assert first.success and md["quota_exhausted"].value is True and not check.passed
        assert "Places API Nearby Search Pro" in metadata_text(md["requests_per_sku"])
        assert "Places API Place Details Photos" in metadata_text(md["requests_per_sku"])
        assert md["estimated_list_cost_usd"].value > 0
        ctl.photo_quota = None
        second = dg.materialize([google_places_photos], resources=resources, partition_key="ict")
    md = second.asset_materializations_for_node("google_places_photos")[0].metadata
    assert md["quota_exhausted"].value is False and md["images"].value == len(places) * 2
    manifest = read_table(DataPaths.at(tmp_path).raw_manifest("google_places", "ict"), RAW_MANIFEST_SCHEMA)
    assert manifest["attribution"].notna().any()
    for run in (first, second):
        assert not any(GOOGLE_KEY in str(r) for r in run.get_asset_materialization_events() + run.all_events)
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and GOOGLE_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_switching_from_legacy_keeps_its_pending_photos(tmp_path, boundaries):
    """A crawl discovered with the legacy API and then switched to the new one: discovery restarts (new parameters)
    but finds the same places stored once, and the legacy photos still pending are fetched through Place Details
    (New) photo names, since a legacy photo_reference means nothing to the new API."""
    from geopak_testkit.fake_apis import FakePlace, places_routes

    places = _few(n=4, photos=3)
    with FakeServer() as api, FakeServer() as content:
        places_routes(api, [FakePlace(p.place_id, p.lat, p.lon, p.n_photos, p.prominence) for p in places],
                      GOOGLE_KEY)
        places_v1_routes(api, content, places, GOOGLE_KEY)
        crawl_places(tmp_path, boundaries, api.url, discover_only=True, tile_deg=0.2, page_token_delay_s=0.01)
        result = crawl_v1(tmp_path, boundaries, api.url)
        assert not api.requests("/maps/api/place/photo")
        details = [e for e in api.requests("/v1/places/") if not e.path.endswith("/media")]
    assert result.reset and set(result.manifest["source_id"]) == expected_items(places, boundaries)
    assert len(details) == len(places) and result.manifest["source_id"].is_unique
    assert result.manifest["image_id"].is_unique  # each legacy photo got its own photo, by its position
