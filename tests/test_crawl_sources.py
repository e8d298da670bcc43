"""Each crawler against a local fake of its API (real wire format, real client library), with ~20 % injected
faults: 429 + Retry-After, 500, 503, timeouts, truncated bodies and garbage. Every item must arrive exactly once
and no corrupt file may reach the store."""

from __future__ import annotations

import bz2
import random

import numpy as np
import pandas as pd
import pytest

from tests.crawl_support import (
    FLICKR_KEY,
    GOOGLE_KEY,
    assert_store_intact,
    fast_http,
    flickr_expected,
    flickr_photos,
    flickr_source,
    ict_places,
)
from geopak_testkit.fake_apis import FakeServer, FlickrPhoto, flickr_routes, flickr_searches, image_routes, places_routes, \
    wd_entity, wikidata_routes

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.provinces import BY_KEY
from pipeline.core.schema import RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, read_table
from pipeline.core.store import ImageStore
from pipeline.sources import crawl as crawl_mod
from pipeline.sources.crawl import run_crawl
from pipeline.sources.crawl_state import CrawlState
from pipeline.sources.gldv2 import Gldv2Config, Gldv2Source
from pipeline.sources.google_places import GooglePlacesSource, PlacesConfig
from pipeline.sources.http import CrawlError, HttpStats
from pipeline.sources.yfcc100m import COLUMNS_2016, Yfcc100mSource, YfccConfig

FAULT_RATE = 0.2


def _crawl(source, province, root, boundaries, http, stats, **kw):
    paths = DataPaths.at(root)
    return run_crawl(source, province, paths, ImageStore(root), boundaries, http, stats, log=lambda m: None, **kw)


def _check_outputs(result, root, expected_ids: set[str]) -> None:
    m = read_table(DataPaths.at(root).raw_manifest(result.source, result.province), RAW_MANIFEST_SCHEMA)
    assert m["source_id"].is_unique and m["image_id"].is_unique
    assert set(m["source_id"]) == expected_ids
    read_table(DataPaths.at(root).source_rejections(result.source, result.province), REJECTIONS_SCHEMA)
    assert assert_store_intact(root) >= len(m)


def _faults_seen(srv: FakeServer) -> None:
    seen = srv.fault_counts()
    assert set(seen) >= {"429", "500", "503", "timeout", "truncated", "truncated_close", "garbage"}, seen
    total = len(srv.log)
    assert 0.12 < sum(seen.values()) / total < 0.3, (seen, total)


# ------------------------------------------------------------------------------------------------------ Flickr

def test_flickr_crawl_survives_faults(tmp_path, boundaries):
    photos = flickr_photos(160, seed=1)
    expected = flickr_expected(photos, boundaries)
    with FakeServer(fault_rate=FAULT_RATE, seed=1) as srv:
        flickr_routes(srv, photos, FLICKR_KEY)
        stats = HttpStats()
        http = fast_http()
        result = _crawl(flickr_source(srv.url + "/services/rest/", http, stats, per_page=20), "sindh", tmp_path,
                        boundaries, http, stats)
        _faults_seen(srv)
    _check_outputs(result, tmp_path, expected)
    rej = result.rejections.set_index("source_id")["reason"]
    assert set(rej) <= {reasons.LICENSE_NOT_ALLOWED, reasons.LOW_GEO_ACCURACY, reasons.OUTSIDE_PAKISTAN}
    assert len(rej) + len(result.manifest) == len(photos)  # nothing dropped unrecorded
    m = result.manifest.set_index("source_id")
    some = next(p for p in photos if p.id in expected)
    assert m.loc[some.id, "lat"] == pytest.approx(some.lat, abs=1e-6)
    assert m.loc[some.id, "license"] in {"CC BY 2.0", "CC BY-SA 2.0", "Public Domain Dedication (CC0)"}
    local = pd.Timestamp(some.taken).tz_localize("Asia/Karachi")
    assert m.loc[some.id, "taken_at"] == local.tz_convert("UTC")
    assert m.loc[some.id, "source_url"].endswith(f"/{some.id}")
    assert result.stats["retry:http_429"] > 0 and result.stats["retry:bad_image"] > 0


def test_flickr_bad_upload_floor_fails_before_any_request():
    """A ``min_upload_date`` that is not an ISO date is a clear error when the source is built, not mid-crawl."""
    from pipeline.sources.flickr import FlickrConfig, FlickrSource

    with pytest.raises(ValueError, match="last week"):
        FlickrSource(FlickrConfig(FLICKR_KEY, "secret", min_upload_date="last week"), fast_http(), HttpStats())
    assert FlickrSource(FlickrConfig(FLICKR_KEY, "secret", min_upload_date="2026-03-01"), fast_http(),
                        HttpStats()).upload_floor == 1772323200


def test_flickr_splits_queries_over_the_4000_cap(tmp_path, boundaries):
    """9,000 photos: a Karachi spread (needs quadtree splits) and 4,500 photos geotagged on one spot, as with a
    landmark's shared geotag (only date bisection can split those). The fake
    serves at most the first 4,000 results of a query, like Flickr; every photo must still be found, once."""
    rng = random.Random(7)
    photos = flickr_photos(4500, seed=2, spread=0.08)
    for i in range(4500):
        photos.append(FlickrPhoto(str(90_000_000 + i), 24.8601, 67.0101,
                                  f"{rng.randrange(2008, 2023)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
                                  f"{rng.randrange(24):02d}:00:00"))
    expected_all = {p.id for p, w in zip(photos, boundaries.locate(np.array([p.lat for p in photos]),
                                                                   np.array([p.lon for p in photos]))) if w == 0}
    with FakeServer() as srv:
        flickr_routes(srv, photos, FLICKR_KEY, cap=4000)
        stats = HttpStats()
        http = fast_http()
        source = flickr_source(srv.url + "/services/rest/", http, stats, min_accuracy=1, licenses=("0", "4", "5", "9"),
                               per_page=250, min_tile_deg=0.01)
        _crawl(source, "sindh", tmp_path, boundaries, http, stats, discover_only=True)
        searches = flickr_searches(srv)
    with CrawlState(DataPaths.at(tmp_path).crawl_state("flickr", "sindh")) as st:
        items = st.items()
        results = st.unit_results("q:")
    assert set(items["item_id"]) == expected_all and items["item_id"].is_unique
    assert len(expected_all) > 8000
    assert any(e.params["min_taken_date"] != "2005-01-01 00:00:00" for e in searches), "date bisection was needed"
    split = [r for r in results if "split" in r]
    paged = [r for r in results if "photos" in r]
    assert split and all(r["total"] >= 4000 for r in split)
    assert paged and all(r["total"] < 4000 for r in paged)  # only queries under the cap were paged
    assert not any(r["capped"] for r in paged)


# ----------------------------------------------------------------------------------------------- Google Places

def test_google_places_crawl_survives_faults_and_splits_saturated_tiles(tmp_path, boundaries):
    places = ict_places()
    ids = boundaries.locate(np.array([p.lat for p in places]), np.array([p.lon for p in places]))
    ict = BY_KEY["ict"].id
    expected = {f"{p.place_id}:{i}" for p, w in zip(places, ids) if w == ict for i in range(p.n_photos)}
    with FakeServer(fault_rate=FAULT_RATE, seed=3) as srv:
        places_routes(srv, places, GOOGLE_KEY, token_delay_s=0.02)
        stats = HttpStats()
        http = fast_http()
        cfg = PlacesConfig(GOOGLE_KEY, base_url=srv.url, queries_per_second=1000, tile_deg=0.2, min_tile_deg=0.005,
                           page_token_delay_s=0.01, max_width=800)
        result = _crawl(GooglePlacesSource(cfg, http, stats), "ict", tmp_path, boundaries, http, stats)
        _faults_seen(srv)
        photo_calls = srv.requests("/maps/api/place/photo")
    _check_outputs(result, tmp_path, expected)
    assert all(e.params.get("maxwidth") == "800" for e in photo_calls)
    assert result.summary["units: split"] >= 4  # the 90-place cluster saturated a tile (≤ 60 results)
    assert result.stats.get("retry:page_token_not_ready", 0) > 0  # the token needed its delay
    m = result.manifest.set_index("source_id")
    first = sorted(expected)[0]
    assert m.loc[first, "place_id"] == first.split(":")[0]
    assert "maps/contrib" in m.loc[first, "owner"]  # html_attributions kept


def test_google_places_failure_never_shows_the_key(tmp_path, boundaries):
    stats = HttpStats()
    http = fast_http(attempts=2)
    cfg = PlacesConfig(GOOGLE_KEY, base_url="http://127.0.0.1:9", queries_per_second=1000, tile_deg=0.2)
    with pytest.raises(CrawlError) as err:
        _crawl(GooglePlacesSource(cfg, http, stats), "ict", tmp_path, boundaries, http, stats)
    assert GOOGLE_KEY not in str(err.value) and "key=***" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# ---------------------------------------------------------------------------------------------------- YFCC100M

def _yfcc_lines(base_url: str, n: int, seed: int = 4, columns=COLUMNS_2016) -> tuple[list[str], dict]:
    rng = random.Random(seed)
    lines, rows = [], {}
    for i in range(n):
        inside = i % 4 != 0
        lat, lon = (31.5 + rng.uniform(-0.3, 0.3), 74.3 + rng.uniform(-0.3, 0.3)) if inside else \
            (rng.uniform(20, 40), rng.uniform(55, 80))
        row = {"line": str(i), "photoid": str(7_000_000 + i), "hash": f"{i:032x}", "uid": "1@N01",
               "unickname": "some+one", "datetaken": "2012-05-06 10:20:30.0", "dateuploaded": "1336300000",
               "capturedevice": "Canon", "title": "Badshahi+Mosque", "description": "", "usertags": "lahore,mosque",
               "machinetags": "", "longitude": f"{lon:.6f}", "latitude": f"{lat:.6f}",
               "accuracy": str(rng.choice([6, 11, 16, 16])), "pageurl": f"http://www.flickr.com/photos/x/{i}/",
               "downloadurl": f"{base_url}/orig/{i}.jpg", "licensename": "Attribution+License",
               "licenseurl": "http://creativecommons.org/licenses/by/2.0/", "serverid": "1", "farmid": "1",
               "secret": "s", "secretoriginal": "s", "ext": "jpg", "marker": "1" if i % 25 == 0 else "0"}
        lines.append("\t".join(row[c] for c in columns))
        rows[row["photoid"]] = row
    return lines, rows


def _yfcc_expected(rows: dict, boundaries, province: str = "punjab", dead: set[str] = frozenset()) -> set[str]:
    ids = list(rows)
    where = boundaries.locate(np.array([float(rows[i]["latitude"]) for i in ids]),
                              np.array([float(rows[i]["longitude"]) for i in ids]))
    return {i for i, w in zip(ids, where) if w == BY_KEY[province].id and rows[i]["marker"] == "0"
            and int(rows[i]["accuracy"]) >= 11 and i not in dead}


def test_yfcc100m_crawl_bz2_mirror_faults_and_malformed_lines(tmp_path, boundaries):
    with FakeServer(fault_rate=FAULT_RATE, seed=4) as srv:
        lines, rows = _yfcc_lines(srv.url, 220)
        lines.insert(7, "a\tbroken\tline")
        path = tmp_path / "yfcc100m_dataset.bz2"
        path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        # the mirror misses two photos; one of them is still at its original URL, the other is gone everywhere
        mirror_missing = {f"{int(rows[i]['line']):032x}.jpg" for i in list(rows)[1:3]}
        image_routes(srv, "/mirror/", missing=mirror_missing)
        image_routes(srv, "/orig/", missing={f"{rows[list(rows)[2]]['line']}.jpg"})
        stats = HttpStats()
        http = fast_http()
        cfg = YfccConfig(str(path), mirror_url_template=srv.url + "/mirror/{hash}.{ext}", block_mb=0.01,
                         downloads_per_second=0)
        result = _crawl(Yfcc100mSource(cfg, http, stats), "punjab", tmp_path, boundaries, http, stats)
        _faults_seen(srv)
    gone = list(rows)[2]
    expected = _yfcc_expected(rows, boundaries, dead={gone})
    _check_outputs(result, tmp_path, expected)
    rej = result.rejections.set_index("source_id")["reason"]
    if gone in _yfcc_expected(rows, boundaries):
        assert rej[gone] == reasons.DOWNLOAD_FAILED
    assert {reasons.NOT_A_PHOTO, reasons.LOW_GEO_ACCURACY} <= set(rej)
    assert result.summary["malformed lines skipped"] == 1 and result.summary["units: rows"] == 220
    m = result.manifest.set_index("source_id")
    row = m.loc[sorted(expected)[0]]
    assert row["title"] == "Badshahi Mosque" and row["owner"] == "some one" and row["license"] == "Attribution License"
    assert row["taken_at"] == pd.Timestamp("2012-05-06 05:20:30", tz="UTC")


def test_yfcc100m_resumes_by_chunk_and_reads_23_column_dumps(tmp_path, boundaries, monkeypatch):
    """A run that dies after a few chunks resumes at the next chunk: no chunk is processed twice; a finished file is
    not read again. Uses the 23-column layout (no line number, no hash)."""
    from pipeline.sources.yfcc100m import COLUMNS_SQL

    with FakeServer() as srv:
        image_routes(srv, "/orig/")
        lines, rows = _yfcc_lines(srv.url, 300, seed=5, columns=COLUMNS_SQL)
        path = tmp_path / "yfcc.tsv"
        path.write_text("\n".join(lines) + "\n")
        stats, http = HttpStats(), fast_http()
        source = Yfcc100mSource(YfccConfig(str(path), block_mb=0.005, downloads_per_second=0), http, stats)
        handled: list[int] = []
        real = crawl_mod.scan_in_chunks

        def dying_scan(ctx, name, batches, handle):
            def counted(batch):
                handled.append(batch.num_rows)
                if len(handled) == 3:
                    raise KeyboardInterrupt  # dies mid-scan, like a killed process
                return handle(batch)

            real(ctx, name, batches, counted)

        monkeypatch.setattr("pipeline.sources.yfcc100m.scan_in_chunks", dying_scan)
        with pytest.raises(KeyboardInterrupt):
            _crawl(source, "punjab", tmp_path, boundaries, http, stats)
        monkeypatch.setattr("pipeline.sources.yfcc100m.scan_in_chunks", real)
        n_chunks = len(list(crawl_mod.read_delimited(str(path), COLUMNS_SQL, ["photoid"], "\t", False, 0.005)))
        seen: list[int] = []

        def spying_scan(ctx, name, batches, handle):
            real(ctx, name, batches, lambda b: (seen.append(1), handle(b))[1])

        monkeypatch.setattr("pipeline.sources.yfcc100m.scan_in_chunks", spying_scan)
        result = _crawl(source, "punjab", tmp_path, boundaries, http, stats)
        assert len(seen) == n_chunks - 2 and n_chunks > 4  # the two finished chunks were not processed again
        seen.clear()
        _crawl(source, "punjab", tmp_path, boundaries, http, stats)
        assert seen == []  # a finished file is not scanned again
    _check_outputs(result, tmp_path, _yfcc_expected(rows, boundaries))


# ------------------------------------------------------------------------------------------------------- GLDv2

def _gldv2_files(root, base_url: str, n: int, seed: int = 6):
    rng = random.Random(seed)
    cats = {1: "Badshahi_Mosque", 2: "Minar-e-Pakistan", 3: "Mazar-e-Quaid", 4: "No_coords", 5: "Unknown_thing",
            6: "Lahore_Fort"}
    (root / "cats.csv").write_text("landmark_id,category\n" + "".join(
        f"{k},http://commons.wikimedia.org/wiki/Category:{v}\n" for k, v in cats.items()))
    images = [(f"{i:016x}", rng.choice(list(cats))) for i in range(n)]
    (root / "train.csv").write_text("id,url,landmark_id\n" + "".join(
        f"{i},{base_url}/commons/{i}.jpg,{lm}\n" for i, lm in images))
    (root / "attribution.csv").write_text("id,url,author,license,title\n" + "".join(
        f'{i},{base_url}/commons/{i}.jpg,"Author, {i[-3:]}",CC-BY-SA-4.0,"File:{i}.jpg"\n' for i, _ in images))
    entities = [
        wd_entity("Q1", "Category:Badshahi Mosque", (31.5880, 74.3100)),  # item with P625
        wd_entity("Q2", "Category:Minar-e-Pakistan", None, main_topic="Q3", category_item=True),  # P301 → P625
        wd_entity("Q3", None, (31.5925, 74.3095)),
        wd_entity("Q4", "Category:Mazar-e-Quaid", (24.8750, 67.0410)),  # Sindh
        wd_entity("Q5", "Category:No coords", None),
        wd_entity("Q6", "Category:Lahore Fort", (31.5882, 74.3154)),
    ]
    return images, entities


def test_gldv2_locates_landmarks_through_wikidata_and_caches(tmp_path, boundaries):
    with FakeServer(fault_rate=FAULT_RATE, seed=6) as srv:
        images, entities = _gldv2_files(tmp_path, srv.url, 150)
        wikidata_routes(srv, entities)
        image_routes(srv, "/commons/")
        stats, http = HttpStats(), fast_http()
        cfg = Gldv2Config(str(tmp_path / "train.csv"), str(tmp_path / "cats.csv"), str(tmp_path / "attribution.csv"),
                          wikidata_api_url=srv.url + "/w/api.php", wikidata_requests_per_second=1000, batch_size=2,
                          block_mb=0.002, downloads_per_second=0)
        result = _crawl(Gldv2Source(cfg, http, stats), "punjab", tmp_path, boundaries, http, stats)
        _faults_seen(srv)
        wikidata_calls = len(srv.requests("/w/api.php", ok_only=True))
        srv.fault_rate = 0.0
        sindh = _crawl(Gldv2Source(cfg, http, HttpStats()), "sindh", tmp_path, boundaries, http, HttpStats())
        assert len(srv.requests("/w/api.php", ok_only=True)) == wikidata_calls  # answers came from the disk cache
    punjab_landmarks = {"1", "2", "6"}
    _check_outputs(result, tmp_path, {i for i, lm in images if str(lm) in punjab_landmarks})
    assert set(sindh.manifest["source_id"]) == {i for i, lm in images if lm == 3}
    m = result.manifest
    assert set(m["place_id"]) == {"gldv2:1", "gldv2:2", "gldv2:6"}
    assert m.groupby("place_id")[["lat", "lon"]].nunique().max().max() == 1  # one landmark, one coordinate
    minar = m[m["place_id"] == "gldv2:2"].iloc[0]
    assert (minar["lat"], minar["lon"]) == (31.5925, 74.3095)  # through the category item's main topic
    assert minar["owner"].startswith("Author, ") and minar["license"] == "CC-BY-SA-4.0"
    assert result.summary["landmarks: located"] == 4 and result.summary["landmarks: in_province"] == 3
    assert result.summary["categories resolved via no_item"] == 1
