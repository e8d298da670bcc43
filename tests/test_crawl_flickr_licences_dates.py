"""A Flickr crawl against the fake service (which answers licenses.getInfo with the recorded 2025 list): CC 4.0
photos are kept when allowed, under the service's licence names; a coarse or unknown date keeps the photo and its
coordinates but gives no day of year, and the manifest says why."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.crawl_support import FLICKR_KEY, fast_http, flickr_source
from geopak_testkit.fake_apis import FakeServer, FlickrPhoto, flickr_routes, flickr_searches

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, read_table
from pipeline.core.store import ImageStore
from pipeline.labels.dates import day_of_year
from pipeline.sources.crawl import run_crawl
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.http import HttpStats

KARACHI = (24.86, 67.01)


def _photos() -> list[FlickrPhoto]:
    taken = "2019-03-14 10:11:12"
    out = [FlickrPhoto(str(100 + i), KARACHI[0] + i * 1e-4, KARACHI[1], taken, license=str(i)) for i in range(17)]
    out += [FlickrPhoto("200", *KARACHI, "2010-01-01 00:00:00", license="11", granularity=6),
            FlickrPhoto("201", *KARACHI, "2011-07-01 00:00:00", license="12", granularity=4),
            FlickrPhoto("202", *KARACHI, "2015-05-05 05:05:05", license="14", taken_unknown=True)]
    return out


def _crawl(root, boundaries, srv, **cfg):
    stats, http = HttpStats(), fast_http()
    source = flickr_source(srv.url + "/services/rest/", http, stats, **cfg)
    return run_crawl(source, "sindh", DataPaths.at(root), ImageStore(root), boundaries, http, stats,
                     log=lambda m: None)


def test_cc40_kept_with_service_names_and_coarse_dates_lose_the_day(tmp_path, boundaries):
    with FakeServer(fault_rate=0.2, seed=3) as srv:
        flickr_routes(srv, _photos(), FLICKR_KEY)
        result = _crawl(tmp_path, boundaries, srv)
        methods = [e.params.get("method") for e in srv.requests("/services/rest/", ok_only=True)]
    assert methods.count("flickr.photos.licenses.getInfo") == 1  # read once per crawl
    m = read_table(DataPaths.at(tmp_path).raw_manifest("flickr", "sindh"), RAW_MANIFEST_SCHEMA).set_index("source_id")
    kept = {str(100 + i) for i in range(1, 17)} | {"200", "201", "202"}
    assert set(m.index) == kept  # every licence but All Rights Reserved, CC 4.0 (11-16) included
    assert result.rejections.set_index("source_id").loc["100", "reason"] == reasons.LICENSE_NOT_ALLOWED
    assert m.loc["111", "license"] == "CC BY 4.0" and m.loc["116", "license"] == "CC BY-NC-ND 4.0"
    assert m.loc["109", "license"] == "Public Domain Dedication (CC0)"
    assert m.loc["111", "taken_at_source"] == "flickr:datetaken" and pd.isna(m.loc["111", "date_note"])
    assert m.loc["200", "date_note"] == "flickr datetakengranularity=6 (year): 2010-01-01 00:00:00"
    assert m.loc["201", "date_note"] == "flickr datetakengranularity=4 (month): 2011-07-01 00:00:00"
    assert m.loc["202", "date_note"] == "flickr datetakenunknown=1"
    coarse = m.loc[["200", "201", "202"]]
    assert coarse["taken_at"].isna().all() and coarse["taken_at_source"].isna().all()
    assert coarse[["lat", "lon"]].notna().all().all()  # the photo and its coordinates are kept
    doy = day_of_year(m["taken_at"])
    assert doy.loc[["200", "201", "202"]].isna().all() and (doy.drop(["200", "201", "202"]) == 73).all()


@pytest.mark.parametrize("licenses, kept", [
    (("CC BY-SA*",), {"105", "112"}),
    (("CC0", "Public Domain Mark", "No known copyright restrictions"), {"107", "109", "110"}),
    (("11", "CC BY-NC 4.0"), {"111", "114"}),
])
def test_allowlist_by_name_family_or_pattern(tmp_path, boundaries, licenses, kept):
    with FakeServer() as srv:
        flickr_routes(srv, _photos()[:17], FLICKR_KEY)
        _crawl(tmp_path, boundaries, srv, licenses=licenses)
    m = read_table(DataPaths.at(tmp_path).raw_manifest("flickr", "sindh"))
    assert set(m["source_id"]) == kept


def test_a_licence_that_names_nothing_fails_before_any_request():
    from pipeline.sources.flickr import FlickrConfig, FlickrSource

    with pytest.raises(ValueError, match="matches none of Flickr's licences"):
        FlickrSource(FlickrConfig(FLICKR_KEY, "s", licenses=("CC BY 3.0",)), fast_http(), HttpStats())
    with pytest.raises(ValueError, match="unknown licence family or name"):
        FlickrSource(FlickrConfig(FLICKR_KEY, "s", licenses=("copyleft",)), fast_http(), HttpStats())


def test_offline_list_serves_when_getinfo_fails(tmp_path, boundaries):
    """No licenses.getInfo (an error answer every time): the June 2025 list decides, CC 4.0 still kept."""
    with FakeServer() as srv:
        flickr_routes(srv, _photos()[:17], FLICKR_KEY, getinfo=False)
        _crawl(tmp_path, boundaries, srv)
    m = read_table(DataPaths.at(tmp_path).raw_manifest("flickr", "sindh")).set_index("source_id")
    assert len(m) == 16 and m.loc["113", "license"] == "CC BY-ND 4.0"


def test_photos_of_an_older_crawl_get_their_date_fields(tmp_path, boundaries):
    """A photo stored by a crawl that kept no granularity loses its false day once it is found again."""
    photos = [FlickrPhoto("300", *KARACHI, "2010-01-01 00:00:00", license="4", granularity=6)]
    with FakeServer() as srv:
        flickr_routes(srv, photos, FLICKR_KEY)
        _crawl(tmp_path, boundaries, srv)
        state_path = DataPaths.at(tmp_path).crawl_state("flickr", "sindh")
        with CrawlState(state_path) as st:  # make it look like a record of the earlier crawler
            st.update_records({"300": {"datetakengranularity": None}})
            st._con.execute("UPDATE meta SET value = ? WHERE key = 'params'", (json.dumps({"old": True}),))
            st._con.commit()
        result = _crawl(tmp_path, boundaries, srv)
        assert len(flickr_searches(srv)) == 2  # the changed parameters searched again; nothing was downloaded twice
        assert len(srv.requests("/flickr-img/")) == 1
    row = result.manifest.set_index("source_id").loc["300"]
    assert pd.isna(row["taken_at"]) and row["date_note"].startswith("flickr datetakengranularity=6")
