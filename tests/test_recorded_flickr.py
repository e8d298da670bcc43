"""Flickr parsers against responses Flickr itself sent, recorded by others (tests/data/recorded/flickr/README.md):
the licence list of June 2025, photo lists with the date extras, a year-only and an unknown date. The project's
fake Flickr server must answer with the same keys and value types as those recordings."""

from __future__ import annotations

import json
from xml.etree import ElementTree

import pandas as pd
import pytest
import requests

from tests.crawl_support import FLICKR_KEY, fast_http, flickr_source
from geopak_testkit.fake_apis import RECORDED, FakeServer, FlickrPhoto, flickr_routes

from pipeline.core import reasons
from pipeline.filters.licenses import license_family, license_reasons
from pipeline.sources.flickr import (
    LICENSE_TABLE,
    OPEN_LICENSES,
    flickr_capture_time,
    parse_licenses,
    select_licenses,
)
from pipeline.sources.http import HttpStats

FLICKR = RECORDED / "flickr"


def _xml(name: str) -> ElementTree.Element:
    return ElementTree.parse(FLICKR / name).getroot()


def _recorded_table():
    return parse_licenses(e.attrib for e in _xml("licenses.getInfo.2025-06-19.xml").iter("license"))


def _getinfo_record(name: str) -> dict:
    """A photos.getInfo recording as the search record it stands for: <dates taken takengranularity takenunknown>
    are what photos.search's date_taken extra calls datetaken, datetakengranularity and datetakenunknown."""
    photo = _xml(name).find("photo")
    dates, where = photo.find("dates").attrib, photo.find("location")
    return {"id": photo.get("id"), "owner": photo.find("owner").get("nsid"), "license": photo.get("license"),
            "datetaken": dates["taken"], "datetakengranularity": dates["takengranularity"],
            "datetakenunknown": dates["takenunknown"],
            # no <location>: what search's geo extra gives such a photo (the recorded photo list: "0")
            **{k: where.get(k) if where is not None else "0" for k in ("latitude", "longitude", "accuracy")},
            "url": "https://live.staticflickr.com/x.jpg"}


@pytest.fixture
def fake_flickr():
    with FakeServer() as srv:
        flickr_routes(srv, [FlickrPhoto("1", 24.86, 67.01, "2020-02-03 04:05:06")], FLICKR_KEY)
        yield srv


def test_offline_licence_list_is_the_one_flickr_served():
    """The built-in list is the recorded 19 June 2025 answer, CC 4.0 (ids 11-16) included, names and URLs alike."""
    table = _recorded_table()
    assert sorted(table, key=lambda lic: int(lic.id)) == list(LICENSE_TABLE)  # the service lists 0, 4, 6, 3, ...
    assert {lic.id: lic.name for lic in table if int(lic.id) >= 11} == {
        "11": "CC BY 4.0", "12": "CC BY-SA 4.0", "13": "CC BY-ND 4.0", "14": "CC BY-NC 4.0",
        "15": "CC BY-NC-SA 4.0", "16": "CC BY-NC-ND 4.0"}


def test_json_licence_recording_parses_with_numeric_ids():
    """Flickr's JSON types a licence id as a number (an older answer, 11 licences, the pre-2021 names)."""
    raw = json.loads((FLICKR / "licenses.getInfo.flickr-net.json").read_text())
    entries = raw["licenses"]["license"]
    assert all(isinstance(e["id"], int) for e in entries)
    table = parse_licenses(entries)
    assert [lic.id for lic in table][:3] == ["0", "4", "6"] and len(table) == 11
    assert dict((lic.id, lic.name) for lic in table)["4"] == "Attribution License"


@pytest.mark.parametrize("name", ["licenses.getInfo.2025-06-19.xml", "licenses.getInfo.flickr-net.json"])
def test_the_filter_knows_every_licence_flickr_ever_listed(name):
    """Each recorded name (today's and the older spellings) maps to the family its id means."""
    if name.endswith(".xml"):
        table = _recorded_table()
    else:
        table = parse_licenses(json.loads((FLICKR / name).read_text())["licenses"]["license"])
    expected = {"0": "all_rights_reserved", "7": "no_known_restrictions", "8": "us_government", "9": "cc0",
                "10": "public_domain"}
    for lic in table:
        assert license_family(lic.name) == expected.get(lic.id, "cc"), lic
        assert license_family(lic.url) in (expected.get(lic.id, "cc"), None), lic  # URLs agree where recognised


@pytest.mark.parametrize("selectors, ids", [
    (OPEN_LICENSES, {str(i) for i in range(1, 17)}),
    (["CC BY*"], {"1", "2", "3", "4", "5", "6", "11", "12", "13", "14", "15", "16"}),
    (["all CC BY"], {"1", "2", "3", "4", "5", "6", "11", "12", "13", "14", "15", "16"}),
    (["CC BY-SA*"], {"5", "12"}),
    (["CC0", "Public Domain Mark", "No known copyright restrictions"], {"9", "10", "7"}),
    (["cc by 4.0", "4", "CC-BY-NC-4.0"], {"11", "4", "14"}),
])
def test_allowlist_by_id_name_family_and_pattern(selectors, ids):
    assert select_licenses(selectors, _recorded_table()) == ids


def test_the_filter_takes_the_same_allowlist_spellings():
    df = pd.DataFrame({"source": ["flickr"] * 5,
                       "license": ["CC BY 4.0", "CC BY-NC 4.0", "Public Domain Mark", "All Rights Reserved",
                                   "CC-BY-SA-4.0"]})
    code, _ = license_reasons(df, {"*": ("CC BY*",)})
    assert code.tolist() == ["", "", reasons.LICENSE_NOT_ALLOWED, reasons.LICENSE_NOT_ALLOWED, ""]
    code, _ = license_reasons(df, {"*": ("CC BY 4.0", "Public Domain Mark")})
    assert code.tolist() == ["", reasons.LICENSE_NOT_ALLOWED, "", reasons.LICENSE_NOT_ALLOWED,
                             reasons.LICENSE_NOT_ALLOWED]
    assert license_reasons(df)[0].tolist()[:3] == ["", "", ""]  # the default families keep CC 4.0
    with pytest.raises(ValueError, match="unknown licence family or name"):
        license_reasons(df, {"*": ("copyleft",)})


def test_recorded_photo_list_becomes_manifest_rows(fake_flickr):
    """people.getPublicPhotos with the same extras as our search (recorded 29 April 2024): the date is exact."""
    photos = list(_xml("people.getPublicPhotos.2024-04-29.first2.xml").iter("photo"))
    source = flickr_source(fake_flickr.url + "/services/rest/", fast_http(), HttpStats())
    first = source._record(dict(photos[0].attrib))
    row = source.manifest_row(first)
    assert first["datetakengranularity"] == "0" and first["url"].endswith("_b.jpg")  # url_l
    assert row["taken_at"] == pd.Timestamp("2024-04-07 16:09:01", tz="Asia/Karachi").tz_convert("UTC")
    assert row["taken_at_source"] == "flickr:datetaken" and row["date_note"] is None
    assert row["license"] == "All Rights Reserved" and row["owner"] == "George"
    assert source._check(first) == reasons.LICENSE_NOT_ALLOWED  # id 0 is not in the default allowlist


def test_recorded_year_only_date_keeps_coordinates_but_no_day(fake_flickr):
    """photos.getInfo of 5240741057 (recorded 5 Nov 2023): taken "1950-01-01 00:00:00", granularity 6 (year)."""
    source = flickr_source(fake_flickr.url + "/services/rest/", fast_http(), HttpStats())
    row = source.manifest_row(_getinfo_record("photos.getInfo.5240741057.granularity6.xml"))
    assert (row["lat"], row["lon"], row["geo_accuracy"]) == (53.035568, -3.029119, 11.0)
    assert row["taken_at"] is None and row["taken_at_source"] is None
    assert row["date_note"] == "flickr datetakengranularity=6 (year): 1950-01-01 00:00:00"
    assert row["license"] == "No known copyright restrictions"


def test_recorded_unknown_date_is_not_a_capture_time(fake_flickr):
    """photos.getInfo of 25868667441 (recorded 19 Dec 2023): takenunknown=1, the date is the upload's."""
    source = flickr_source(fake_flickr.url + "/services/rest/", fast_http(), HttpStats())
    row = source.manifest_row(_getinfo_record("photos.getInfo.25868667441.takenunknown.xml"))
    assert row["taken_at"] is None and row["date_note"] == "flickr datetakenunknown=1"


@pytest.mark.parametrize("granularity, unknown, note", [
    (0, "0", None), ("0", 0, None), (None, None, None),  # JSON has typed it both ways; absent: an older record
    (4, "0", "flickr datetakengranularity=4 (month): 2012-06-01 00:00:00"),
    ("8", "0", "flickr datetakengranularity=8 (circa): 2012-06-01 00:00:00"),
    ("5", "0", "flickr datetakengranularity=5 (not day-exact): 2012-06-01 00:00:00"),
    (0, "1", "flickr datetakenunknown=1"), (0, True, "flickr datetakenunknown=1"),
])
def test_granularity_and_unknown_in_either_json_type(granularity, unknown, note):
    got = flickr_capture_time({"datetaken": "2012-06-01 00:00:00", "datetakengranularity": granularity,
                               "datetakenunknown": unknown})
    assert got["date_note"] == note
    assert (got["taken_at"] is None) == (note is not None)


def test_fake_flickr_answers_like_the_recordings(fake_flickr):
    """Same keys as the recorded photo list for the extras we ask for; same JSON types as the recorded JSON."""
    auth = {"Authorization": f'OAuth oauth_consumer_key="{FLICKR_KEY}"'}
    reply = requests.post(fake_flickr.url + "/services/rest/", headers=auth, timeout=5, data={
        "method": "flickr.photos.search", "format": "json", "nojsoncallback": "1", "bbox": "60,23,78,37",
        "min_taken_date": "2000-01-01 00:00:00", "max_taken_date": "2030-01-01 00:00:00",
        "extras": "geo,date_taken,license,owner_name,tags,url_l", "per_page": "5"}).json()
    fake = reply["photos"]["photo"][0]
    recorded_xml = dict(next(_xml("people.getPublicPhotos.2024-04-29.first2.xml").iter("photo")).attrib)
    ours = {"id", "owner", "secret", "server", "farm", "title", "ispublic", "isfriend", "isfamily", "license",
            "datetaken", "datetakengranularity", "datetakenunknown", "ownername", "tags", "latitude", "longitude",
            "accuracy", "context", "url_l", "height_l", "width_l"}
    assert ours <= set(recorded_xml) and ours <= set(fake)
    recorded_json = json.loads((FLICKR / "photos-response.flickr-net.first2.json").read_text())
    for key, value in recorded_json["photos"].items():
        if key != "photo":
            assert type(reply["photos"][key]) is type(value), key
    for key, value in recorded_json["photos"]["photo"][0].items():
        assert type(fake[key]) is type(value), key
    # attributes the JSON recording lacks: text, as Flickr's JSON format page says of every attribute
    extras = ours - set(recorded_json["photos"]["photo"][0]) - {"isfriend", "isfamily"}
    assert all(isinstance(fake[k], str) for k in extras), {k: fake[k] for k in extras}

    licences = requests.post(fake_flickr.url + "/services/rest/", headers=auth, timeout=5, data={
        "method": "flickr.photos.licenses.getInfo", "format": "json", "nojsoncallback": "1"}).json()
    recorded = json.loads((FLICKR / "licenses.getInfo.flickr-net.json").read_text())["licenses"]["license"][0]
    for entry in licences["licenses"]["license"]:
        assert set(entry) == set(recorded) and all(type(entry[k]) is type(recorded[k]) for k in recorded)
    assert parse_licenses(licences["licenses"]["license"]) == _recorded_table()
