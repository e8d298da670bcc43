"""Issue 16 item 4: what Google's terms limit. Latitude/longitude may be cached for up to 30 consecutive calendar
days, ``place_id`` indefinitely; ``photo_reference`` is not kept once its photo is stored.

Each record and manifest row carries ``fetched_at``; coordinates older than ``refresh_after_days`` are fetched
again from Place Details by place_id; those past 30 days are deleted from the crawl state and their rows leave the
manifest (``coordinates_expired``) until a refresh brings them back; the asset check fails on any row past 30 days.
The crawler's clock is moved forward instead of waiting a month."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pandas as pd

from tests.crawl_support import GOOGLE_KEY, crawl_places, few_places, places_expected
from geopak_testkit.fake_apis import FakeServer, places_routes

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, read_table, write_table
from pipeline.defs.crawl import PLACES_TERMS_CHECK, GooglePlacesResource, google_places_photos, places_terms_check
from pipeline.defs.resources import BoundariesResource, DataRootResource
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.places_terms import expire_stored_places, terms_report

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def _at(days: float):
    return lambda: T0 + dt.timedelta(days=days)


def _state(root) -> CrawlState:
    return CrawlState(DataPaths.at(root).crawl_state("google_places", "ict"))


def _manifest(root) -> pd.DataFrame:
    return read_table(DataPaths.at(root).raw_manifest("google_places", "ict"), RAW_MANIFEST_SCHEMA)


def test_fetched_at_recorded_and_photo_reference_not_kept(tmp_path, boundaries):
    places = few_places()
    with FakeServer() as srv:
        places_routes(srv, places, GOOGLE_KEY)
        result = crawl_places(tmp_path, boundaries, srv.url, clock=_at(0))
    m = _manifest(tmp_path)
    assert len(m) == len(places_expected(places, boundaries)) == len(result.manifest)
    assert (pd.to_datetime(m["fetched_at"], utc=True) == pd.Timestamp(T0)).all()
    with _state(tmp_path) as st:
        items = st.items()
        units = st.units("place:")
    assert (items["status"] == "done").all()
    assert not any("photo_reference" in r for r in items["record"])  # stored: the reference is gone
    assert all(r["fetched_at"] == T0.isoformat(timespec="seconds") for r in items["record"])
    assert units and all("lat" not in u.payload for u, _ in units)  # finished place units keep no coordinates


def test_coordinates_are_refreshed_before_30_days_and_expired_after(tmp_path, boundaries):
    places = few_places()
    expected = places_expected(places, boundaries)
    n_places = len({i.split(":")[0] for i in expected})
    with FakeServer() as srv:
        ctl = places_routes(srv, places, GOOGLE_KEY)
        crawl_places(tmp_path, boundaries, srv.url, clock=_at(0))

        # day 10: nothing to do with the coordinates
        srv.tag = "day10"
        crawl_places(tmp_path, boundaries, srv.url, clock=_at(10))
        assert not srv.requests("/maps/api/place/details/json", tag="day10")

        # day 28 (past refresh_after_days=27): one Place Details per place, no search, no photo again
        srv.tag = "day28"
        refreshed = crawl_places(tmp_path, boundaries, srv.url, clock=_at(28))
        assert len(srv.requests("/maps/api/place/details/json", tag="day28")) == n_places
        assert not srv.requests("/maps/api/place/nearbysearch/json", tag="day28")
        assert not srv.requests("/maps/api/place/photo", tag="day28")
        assert set(refreshed.manifest["source_id"]) == expected
        assert (pd.to_datetime(_manifest(tmp_path)["fetched_at"], utc=True) == pd.Timestamp(_at(28)())).all()

        # day 60 with the JSON quota spent: the coordinates (32 days old) cannot be refreshed, so they are deleted
        ctl.json_quota = ctl.json_requests
        srv.tag = "day60"
        expired = crawl_places(tmp_path, boundaries, srv.url, clock=_at(60))
        assert expired.stopped and expired.manifest.empty and _manifest(tmp_path).empty
        rej = expired.rejections.set_index("source_id")
        assert set(rej.index) == expected and set(rej["reason"]) == {reasons.COORDINATES_EXPIRED}
        assert rej["image_id"].notna().all()  # the photos are kept; only their coordinates went
        with _state(tmp_path) as st:
            records = list(st.items()["record"])
        assert all(r["lat"] is None and r["lon"] is None and r["place_id"] for r in records)

        # the quota is back: the place_ids bring the coordinates back, the rows return
        ctl.json_quota = None
        back = crawl_places(tmp_path, boundaries, srv.url, clock=_at(60))
    assert set(back.manifest["source_id"]) == expected and back.rejections.empty
    assert (pd.to_datetime(back.manifest["fetched_at"], utc=True) == pd.Timestamp(_at(60)())).all()


def test_expiry_without_a_crawl_and_the_check_fails_on_old_rows(tmp_path, boundaries):
    places = few_places()
    paths = DataPaths.at(tmp_path)
    with FakeServer() as srv:
        places_routes(srv, places, GOOGLE_KEY)
        crawl_places(tmp_path, boundaries, srv.url, clock=_at(0))
    now = T0 + dt.timedelta(days=31)
    report = terms_report(paths.raw_manifest("google_places", "ict"), now)
    assert report["expired_rows"] == report["rows"] > 0 and report["oldest_days"] == 31.0
    assert not places_terms_check(paths, "ict").passed  # today is years after T0: every row is too old
    removed = expire_stored_places(paths, "ict", now=now)  # no key, no request: the source may be off
    assert removed == report["rows"] and _manifest(tmp_path).empty
    rej = read_table(paths.source_rejections("google_places", "ict"))
    assert (rej["reason"] == reasons.COORDINATES_EXPIRED).sum() == removed
    with _state(tmp_path) as st:
        assert all(r["lat"] is None for r in st.items()["record"])
    assert places_terms_check(paths, "ict").passed


def test_asset_check_fails_on_a_row_older_than_30_days(tmp_path, boundaries_path, monkeypatch):
    """The check reads the manifest as stored: a row whose fetched_at is 31 days old fails it (ERROR); the asset
    expires such rows before it evaluates the check, so a materialization leaves it passing."""
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    paths = DataPaths.at(tmp_path)
    places = few_places(n=4)
    with FakeServer() as srv:
        places_routes(srv, places, GOOGLE_KEY)
        resources = {"data_root": DataRootResource(path=str(tmp_path)),
                     "boundaries": BoundariesResource(source=str(boundaries_path)),
                     "google_places": GooglePlacesResource(enabled=True, api="legacy", base_url=srv.url,
                                                           queries_per_second=1000,
                                                           tile_deg=0.2, page_token_delay_s=0.01, timeout_s=0.5)}

        def check_of(result):
            return next(e.event_specific_data for e in result.all_events
                        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                        and e.event_specific_data.check_name == PLACES_TERMS_CHECK)

        first = dg.materialize([google_places_photos], resources=resources, partition_key="ict")
        assert check_of(first).passed and check_of(first).metadata["rows"].value > 0
        m = _manifest(tmp_path)
        now = pd.Timestamp.now(tz="UTC")
        m.loc[m.index[0], "fetched_at"] = now - pd.Timedelta(days=31)
        write_table(m, paths.raw_manifest("google_places", "ict"), RAW_MANIFEST_SCHEMA)
        bad = places_terms_check(paths, "ict")
        assert not bad.passed and bad.severity == dg.AssetCheckSeverity.ERROR
        assert bad.metadata["expired_rows"].value == 1 and bad.metadata["oldest_days"].value >= 31

        # switched off now: the asset still applies the limit to what is stored, then the check passes
        resources["google_places"] = GooglePlacesResource(enabled=False)
        off = dg.materialize([google_places_photos], resources=resources, partition_key="ict")
    assert off.success and check_of(off).passed
    assert len(_manifest(tmp_path)) == len(m) - 1


def test_a_record_rejected_at_discovery_keeps_no_photo_reference():
    """A rejection is final: the base ``sort_items`` drops ``forget_when_final`` fields, not only a download."""
    from types import SimpleNamespace

    from tests.crawl_support import fast_http, places_source

    from pipeline.sources.http import HttpStats

    source = places_source("http://127.0.0.1:9", fast_http(attempts=1), HttpStats(), clock=_at(0))
    ctx = SimpleNamespace(judge_located=lambda records, *a: [None] * len(records))
    fresh = {"place_id": "p", "lat": 33.7, "lon": 73.0, "fetched_at": T0.isoformat(), "photo_reference": "ref0"}
    stale = {**fresh, "fetched_at": (T0 - dt.timedelta(days=31)).isoformat(), "photo_reference": "ref1"}
    keep, rejected = source.sort_items(["p:0", "p:1"], [fresh, stale], ctx)
    assert keep == [("p:0", fresh)] and fresh["photo_reference"] == "ref0"  # kept: still needed to download
    assert [(r.item_id, r.reason) for r in rejected] == [("p:1", reasons.COORDINATES_EXPIRED)]
    assert "photo_reference" not in rejected[0].record and rejected[0].record["place_id"] == "p"
