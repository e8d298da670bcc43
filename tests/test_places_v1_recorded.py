"""Issue 20 item 7 for Places API (New): the parser reads responses that Google's documentation shows, and the local
fake answers in the same shape (same keys, same JSON types) as those recordings (tests/data/recorded/places_v1,
README there names each page and its licence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import requests

from tests.crawl_support import GOOGLE_KEY, fast_http
from geopak_testkit.fake_apis import FakeServer, Reply
from geopak_testkit.fake_places_v1 import V1Place, places_v1_routes

from pipeline.sources.http import CredentialsRejected, HttpStats, Redactor, RetryableStatus
from pipeline.sources.places_source import place_row
from pipeline.sources.places_tiles import Tile
from pipeline.sources.places_v1 import (
    PlacesV1Api,
    PlacesV1Config,
    location_of,
    photo_records,
    rpc_failure,
)

RECORDED = Path(__file__).parent / "data" / "recorded" / "places_v1"
TILE = Tile((-74.26, 40.48, -73.70, 40.92))


def recorded(name: str) -> dict:
    return json.loads((RECORDED / name).read_text())


def shape(value):
    """Keys and JSON types, recursively (a list by the shape of its first element)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, int | float) else type(value).__name__


def _api(url: str) -> PlacesV1Api:
    cfg = PlacesV1Config(GOOGLE_KEY, base_url=url, queries_per_second=1000)
    return PlacesV1Api(cfg, fast_http(attempts=1), HttpStats(), Redactor([GOOGLE_KEY]))


@pytest.fixture
def replay():
    """A server that answers each v1 method with a recorded body (status given per route)."""
    with FakeServer() as srv:
        def serve(method: str, path: str, name: str, status: int = 200) -> None:
            srv.route(method, path, lambda req: Reply(status, (RECORDED / name).read_bytes()))
        yield srv, serve


def test_parser_reads_the_documented_searches(replay):
    srv, serve = replay
    serve("POST", "/v1/places:searchNearby", "searchNearby.future-opening.json")
    pages = {"": "searchText.pageSize5.page1.json",
             recorded("searchText.pageSize5.page1.json")["nextPageToken"]: "searchText.pageSize5.page2.json"}
    srv.route("POST", "/v1/places:searchText",
              lambda req: Reply(200, (RECORDED / pages[json.loads(req.body).get("pageToken", "")]).read_bytes()))
    api = _api(srv.url)
    nearby = api.search_nearby(TILE, "")
    assert [p["id"] for p in nearby] == ["ChIJp1-VoKWJplQRMz8g-7Wa3Do"]
    assert all(math.isnan(v) for v in location_of(nearby[0]))  # no location asked for: no coordinates, no crash
    first, token = api.search_text(TILE, "pizza in New York", "")
    second, last = api.search_text(TILE, "pizza in New York", "", token)
    assert [p["id"] for p in first][0] == "ChIJifIePKtZwokRVZ-UdRGkZzs" and len(first) == len(second) == 5
    assert token.startswith("AeCrKXsZ") and last.startswith("AeCrKXvP")


def test_parser_reads_documented_photos_and_media(replay):
    srv, serve = replay
    serve("GET", "/v1/places/ChIJ2fzCmcW7j4AR2JzfXBBoh6E/photos/", "photoMedia.skipHttpRedirect.json")
    serve("GET", "/v1/places/ChIJ2fzCmcW7j4AR2JzfXBBoh6E", "placeDetails.photos.json")
    api = _api(srv.url)
    place = {"id": "ChIJ2fzCmcW7j4AR2JzfXBBoh6E",
             **api.details("ChIJ2fzCmcW7j4AR2JzfXBBoh6E", "photos", "placeDetails:photos", "a test")}
    ids, records, bad = photo_records(place, 37.42, -122.08, "2026-04-13T00:00:00+00:00", 10)
    assert ids == ["ChIJ2fzCmcW7j4AR2JzfXBBoh6E:0"] and bad == 0
    record = records[0]
    assert (record["width"], record["height"]) == (6000, 4000)
    assert record["attribution"] == [{"displayName": "John Smith", "uri": "//maps.google.com/maps/contrib/101563",
                                      "photoUri": "//lh3.googleusercontent.com/a-/AD_cFT-b=s100-p-k-no-mo"}]
    row = place_row(record)
    assert row["owner"] == "John Smith" and json.loads(row["attribution"]) == record["attribution"]
    assert api.photo_uri(record["photo_name"], 800) == "https://lh3.googleusercontent.com/a-/AD_cFT-b=s100-p-k-no-mo"
    media = srv.requests("/v1/places/ChIJ2fzCmcW7j4AR2JzfXBBoh6E/photos/")[0]
    assert media.params == {"maxWidthPx": "800", "skipHttpRedirect": "true"}


def test_parser_reads_the_documented_errors(replay):
    srv, serve = replay
    serve("POST", "/v1/places:searchNearby", "error.api-key-invalid.json", 400)
    serve("POST", "/v1/places:searchText", "error.resource-exhausted.aip193.json", 429)
    api = _api(srv.url)
    with pytest.raises(CredentialsRejected, match="API_KEY_INVALID.*key is invalid"):
        api.search_nearby(TILE, "")
    with pytest.raises(RetryableStatus):  # a 429 that names no daily quota is a rate limit: retried
        api.search_text(TILE, "x", "")
    failure = rpc_failure(api.session.last_response, Redactor())
    assert (failure.status, failure.reason, failure.daily_quota) == ("RESOURCE_EXHAUSTED", "RESOURCE_AVAILABILITY",
                                                                     False)


@pytest.fixture(scope="module")
def fake_answers() -> dict[str, tuple[dict, dict]]:
    """(fake's answer, recording) per documented request, the fake asked with the recording's field mask."""
    places = [V1Place(f"ChIJshape{i:02d}", 33.70 + i * 1e-4, 73.05, 2, i / 10) for i in range(12)]
    out: dict[str, tuple[dict, dict]] = {}
    with FakeServer() as api, FakeServer() as content:
        ctl = places_v1_routes(api, content, places, GOOGLE_KEY)
        key = {"X-Goog-Api-Key": GOOGLE_KEY}

        def ask(method, path, mask=None, **kw) -> requests.Response:
            headers = {**key, **({"X-Goog-FieldMask": mask} if mask else {})}
            return requests.request(method, api.url + path, headers=headers, **kw)

        circle = {"circle": {"center": {"latitude": 33.70, "longitude": 73.05}, "radius": 500.0}}
        nearby = ask("POST", "/v1/places:searchNearby", "places.id,places.displayName",
                     json={"locationRestriction": circle}).json()
        rec = recorded("searchNearby.future-opening.json")
        out["searchNearby"] = nearby, {"places": [{k: rec["places"][0][k] for k in ("id", "displayName")}]}
        rect = {"rectangle": {"low": {"latitude": 33.6, "longitude": 73.0}, "high": {"latitude": 33.8,
                                                                                       "longitude": 73.1}}}
        text = ask("POST", "/v1/places:searchText", "places.id,nextPageToken",
                   json={"textQuery": "pizza", "pageSize": 5, "locationRestriction": rect}).json()
        out["searchText"] = text, recorded("searchText.pageSize5.page1.json")
        out["placeDetails"] = (ask("GET", "/v1/places/ChIJshape00", "id,displayName").json(),
                               recorded("placeDetails.id-displayName.json"))
        photos = ask("GET", "/v1/places/ChIJshape00", "photos").json()
        out["photos"] = photos, recorded("placeDetails.photos.json")
        media = ask("GET", f"/v1/{photos['photos'][0]['name']}/media",
                    params={"maxWidthPx": 400, "skipHttpRedirect": "true"}).json()
        out["photoMedia"] = media, recorded("photoMedia.skipHttpRedirect.json")
        wrong = requests.post(api.url + "/v1/places:searchNearby", json={"locationRestriction": circle},
                              headers={"X-Goog-Api-Key": "AIzaWRONG", "X-Goog-FieldMask": "places.id"})
        out["error"] = wrong.json(), recorded("error.api-key-invalid.json")
        ctl.daily_quota = 0
        daily = ask("POST", "/v1/places:searchNearby", "places.id", json={"locationRestriction": circle})
        out["quota"] = daily.json(), recorded("error.resource-exhausted.aip193.json")
        assert wrong.status_code == 400 and daily.status_code == 429
    return out


@pytest.mark.parametrize("kind", ["searchNearby", "searchText", "placeDetails", "photos", "photoMedia", "error"])
def test_fake_answers_in_the_recorded_shape(fake_answers, kind):
    fake, rec = fake_answers[kind]
    assert shape(fake) == shape(rec)


def test_fake_quota_error_has_the_recorded_status_and_error_info_shape(fake_answers):
    fake, rec = fake_answers["quota"]
    assert set(fake["error"]) == set(rec["error"]) and fake["error"]["status"] == rec["error"]["status"]

    def error_info(body: dict) -> dict:
        return next(d for d in body["error"]["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))

    fake_info, rec_info = error_info(fake), error_info(rec)
    assert set(fake_info) == set(rec_info)  # @type, reason, domain, metadata
    assert set(shape(fake_info["metadata"]).values()) == set(shape(rec_info["metadata"]).values()) == {"str"}
    # the fake's names a daily quota (not retried, a clean stop); the recorded one does not (a retried rate limit)
    assert _failure(fake).daily_quota and not _failure(rec).daily_quota


def _failure(body: dict):
    resp = requests.Response()
    resp.status_code, resp._content = body["error"]["code"], json.dumps(body).encode()
    return rpc_failure(resp, Redactor())
