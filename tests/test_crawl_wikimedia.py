"""Wikimedia's rules for GLDv2 (images on upload.wikimedia.org, landmarks on Wikidata): a User-Agent with a contact
or no request at all; a 403 citing the robot / User-Agent policy (Wikimedia's real wording, tests/data/recorded/
wikimedia) stops the crawl as a configuration error and the images come once it is fixed; at most 2 downloads at a
time and the byte rate capped; 429 Retry-After honoured."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from tests.crawl_support import fast_http
from geopak_testkit.fake_apis import RECORDED, FakeServer, Reply, unique_jpeg, wikidata_routes
from tests.test_crawl_sources import _gldv2_files

from pipeline.core.paths import DataPaths
from pipeline.core.store import ImageStore
from pipeline.defs.crawl import Gldv2Resource
from pipeline.sources.crawl import run_crawl
from pipeline.sources.crawl_state import DONE, FAILED, PENDING, REJECTED, CrawlState
from pipeline.sources.gldv2 import Gldv2Config, Gldv2Source
from pipeline.sources.http import (
    CONTACT_ENV,
    CrawlError,
    HttpSettings,
    HttpStats,
    RetryPolicy,
    StopCrawl,
    WikimediaPolicyError,
    user_agent,
)

CONTACT = "geopak-tests@example.org"
REFUSALS = sorted((RECORDED / "wikimedia").glob("403-*.txt"))


def _http(contact: str = CONTACT, workers: int = 4, **kw) -> HttpSettings:
    return replace(fast_http(workers=workers), user_agent=user_agent(contact), **kw)


def _source(root, url: str, http: HttpSettings, **cfg) -> Gldv2Source:
    defaults = dict(wikidata_api_url=url + "/w/api.php", wikidata_requests_per_second=1000, block_mb=0.002,
                    downloads_per_second=0)
    return Gldv2Source(Gldv2Config(str(root / "train.csv"), str(root / "cats.csv"), **{**defaults, **cfg}), http,
                       HttpStats())


def _crawl(source: Gldv2Source, root, boundaries, http: HttpSettings):
    return run_crawl(source, "punjab", DataPaths.at(root), ImageStore(root), boundaries, http, HttpStats(),
                     log=lambda m: None)


def _statuses(root) -> dict[str, int]:
    with CrawlState(DataPaths.at(root).crawl_state("gldv2", "punjab")) as st:
        return st.items()["status"].value_counts().to_dict()


def test_user_agent_has_the_contact_from_the_environment(monkeypatch, tmp_path):
    assert user_agent(CONTACT).startswith("GeoPak/") and f"({CONTACT}) python-requests/" in user_agent(CONTACT)
    monkeypatch.setenv(CONTACT_ENV, "https://example.org/geopak")
    http = Gldv2Resource().http_settings(DataPaths.at(tmp_path))
    assert "(https://example.org/geopak) python-requests/" in http.user_agent
    assert f"({CONTACT})" in Gldv2Resource(contact=CONTACT).http_settings(DataPaths.at(tmp_path)).user_agent


def test_no_wikimedia_request_without_a_contact(tmp_path, boundaries):
    """Wikidata by default, images on upload.wikimedia.org: refused with the variable to set, nothing sent."""
    _gldv2_files(tmp_path, "https://upload.wikimedia.org/wikipedia", 20)
    http = _http(contact="")
    source = Gldv2Source(Gldv2Config(str(tmp_path / "train.csv"), str(tmp_path / "cats.csv")), http, HttpStats())
    with pytest.raises(WikimediaPolicyError, match=CONTACT_ENV) as err:
        _crawl(source, tmp_path, boundaries, http)
    assert "www.wikidata.org" in str(err.value) and "Nothing was sent" in str(err.value)

    coords = tmp_path / "coords.csv"  # offline landmarks: the images are still Wikimedia's
    coords.write_text("landmark_id,lat,lon\n1,31.5880,74.3100\n6,31.5882,74.3154\n")
    source = Gldv2Source(Gldv2Config(str(tmp_path / "train.csv"), str(tmp_path / "cats.csv"),
                                     coordinates_path=str(coords), block_mb=0.002), http, HttpStats())
    with pytest.raises(WikimediaPolicyError, match="upload.wikimedia.org"):
        _crawl(source, tmp_path, boundaries, http)
    assert set(_statuses(tmp_path)) == {PENDING}  # found, none tried, none failed: they wait for the contact


@pytest.mark.parametrize("refusal", REFUSALS, ids=[p.stem for p in REFUSALS])
def test_policy_403_stops_the_crawl_then_the_images_come(tmp_path, boundaries, refusal):
    refuse = threading.Event()
    refuse.set()
    with FakeServer() as srv:
        images, entities = _gldv2_files(tmp_path, srv.url, 30)
        wikidata_routes(srv, entities)

        def policy(req):
            if refuse.is_set():
                return Reply(403, refusal.read_bytes(), "text/plain; charset=utf-8")
            return Reply(200, unique_jpeg(req.path.rsplit("/", 1)[1]), "image/jpeg")

        srv.route("GET", "/commons/", policy)
        http = _http()
        with pytest.raises(WikimediaPolicyError) as err:
            _crawl(_source(tmp_path, srv.url, http), tmp_path, boundaries, http)
        assert isinstance(err.value, StopCrawl) and isinstance(err.value, CrawlError)
        assert refusal.read_text().split()[0] in str(err.value) and CONTACT_ENV in str(err.value)
        statuses = _statuses(tmp_path)
        assert REJECTED not in statuses and DONE not in statuses  # never a permanent download_failed
        # only what the 2 workers had started (a worker may take one more job before the queue is cancelled)
        assert statuses.get(FAILED, 0) <= 4 and len(srv.requests("/commons/")) <= 4
        assert statuses.get(PENDING, 0) >= 10  # the rest were never sent

        refuse.clear()  # the operator set a contact; Wikimedia answers again
        result = _crawl(_source(tmp_path, srv.url, http), tmp_path, boundaries, http)
    wanted = {i for i, lm in images if str(lm) in {"1", "2", "6"}}
    assert set(result.manifest["source_id"]) == wanted and set(_statuses(tmp_path)) == {DONE}


def test_wikidata_policy_403_is_named_as_such(tmp_path, boundaries):
    with FakeServer() as srv:
        _gldv2_files(tmp_path, srv.url, 10)
        srv.route("GET", "/w/api.php", lambda req: Reply(403, REFUSALS[0].read_bytes(), "text/html"))
        http = _http()
        with pytest.raises(WikimediaPolicyError, match="robot policy"):
            _crawl(_source(tmp_path, srv.url, http), tmp_path, boundaries, http)
        assert len(srv.requests("/w/api.php")) == 1  # not retried: retrying cannot help


def test_downloads_stay_within_wikimedia_limits(tmp_path, boundaries):
    """8 download workers configured: at most 2 requests in flight; 20 kB/s allowed: the bytes take their time."""
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow_image(req):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.03)
        with lock:
            in_flight[0] -= 1
        return Reply(200, unique_jpeg(req.path.rsplit("/", 1)[1], size=64), "image/jpeg")

    with FakeServer() as srv:
        images, entities = _gldv2_files(tmp_path, srv.url, 40)
        wikidata_routes(srv, entities)
        srv.route("GET", "/commons/", slow_image)
        http = _http(workers=8, rate_limit_db=str(tmp_path / "rates.sqlite"))
        start = time.monotonic()
        result = _crawl(_source(tmp_path, srv.url, http, download_mbps=0.16), tmp_path, boundaries, http)
        elapsed = time.monotonic() - start
    n_bytes = sum(len(unique_jpeg(i, size=64)) for i in result.manifest["source_id"])
    assert len(result.manifest) > 10 and peak[0] <= 2  # 8 workers configured
    assert elapsed >= (n_bytes - 20_000) / 20_000 * 0.9  # 0.16 Mbit/s = 20 kB/s, one second of burst


def test_429_retry_after_is_honoured(tmp_path, boundaries):
    seen: list[float] = []

    def busy_once(req):
        seen.append(time.monotonic())
        if len(seen) == 1:
            return Reply(429, b"slow down", "text/plain", {"Retry-After": "0.4"})
        return Reply(200, unique_jpeg(req.path.rsplit("/", 1)[1]), "image/jpeg")

    with FakeServer() as srv:
        _gldv2_files(tmp_path, srv.url, 6)
        (tmp_path / "train.csv").write_text(f"id,url,landmark_id\na,{srv.url}/commons/a.jpg,1\n")
        srv.route("GET", "/commons/", busy_once)
        coords = tmp_path / "coords.csv"
        coords.write_text("landmark_id,lat,lon\n1,31.5880,74.3100\n")
        http = _http(workers=1, retry=RetryPolicy(4, 0.001, 0.01, max_retry_after_s=5))
        _crawl(_source(tmp_path, srv.url, http, coordinates_path=str(coords)), tmp_path, boundaries, http)
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.4
