"""The crawlers' HTTP layer and crawl state: rate limiting, retries, Retry-After, image checks, redaction."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.conftest import jpeg_bytes
from geopak_testkit.fake_apis import FakeServer, Reply, image_routes

from pipeline.core import reasons
from pipeline.core.store import ImageStore
from pipeline.sources.crawl_state import DONE, FAILED, PENDING, REJECTED, CrawlState, Rejected, Unit
from pipeline.sources.downloads import Fetched, check_image, download_all, fetch_url
from pipeline.sources.http import (
    ApiSession,
    BadImage,
    BodyTooSlow,
    HttpSettings,
    HttpStats,
    ImageTooLarge,
    Redactor,
    RetryableStatus,
    RetryPolicy,
    call_with_retries,
    classify,
    parse_retry_after,
)
from pipeline.sources.rate_limits import SharedTokenBucket, TokenBucket


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_token_bucket_paces_to_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(4.0, capacity=1.0, clock=clock, sleep=clock.sleep)
    for _ in range(9):
        bucket.acquire()
    assert clock.t == pytest.approx(2.0)  # first token free, then 8 more at 4/s


def _waits_from_threads(holders, per_holder: int) -> list[float]:
    """Every wait the holders' ``acquire`` returned, taken from one thread per holder on a frozen clock: each
    token's place in the queue shows in its wait, so a lost update shows as a repeated or missing place."""
    waits: list[float] = []
    lock = threading.Lock()

    def take(holder) -> None:
        for _ in range(per_holder):
            w = holder.acquire()
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=take, args=(h,)) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(waits)


def test_token_bucket_is_thread_safe():
    bucket = TokenBucket(200.0, clock=lambda: 0.0, sleep=lambda s: None)
    waits = _waits_from_threads([bucket] * 4, 10)
    assert waits == pytest.approx([k / 200 for k in range(40)])  # 40 tokens, the first free, each place once


def test_shared_bucket_splits_one_budget_between_holders(tmp_path):
    """Two holders of one key (as two Dagster run processes would be) get the key's rate together, not each."""
    holders = [SharedTokenBucket(tmp_path / "rl.sqlite", "k", 100.0, clock=lambda: 0.0, sleep=lambda s: None)
               for _ in range(2)]
    waits = _waits_from_threads(holders, 15)
    assert waits == pytest.approx([k / 100 for k in range(30)])  # one queue of 30 places, not two of 15


def test_shared_bucket_refills_on_the_injected_clock(tmp_path):
    clock = FakeClock()
    a, b = (SharedTokenBucket(tmp_path / "rl.sqlite", "k", 4.0, clock=clock, sleep=clock.sleep) for _ in range(2))
    for _ in range(4):
        a.acquire()
        b.acquire()
    assert clock.t == pytest.approx(7 / 4)  # 8 tokens of one budget at 4/s, the first free


def test_importing_http_changes_no_global_state():
    """No logging filter and no limiter registry on import: a session installs the scrubber, a first use makes the
    registry."""
    code = ("import logging, pipeline.sources.downloads, pipeline.sources.http as h, pipeline.sources.rate_limits as r\n"
            "log = logging.getLogger('urllib3.connectionpool')\n"
            "assert not log.filters and r._process is None, (log.filters, r._process)\n"
            "h.ApiSession(); r.rate_limiter('k', 1.0)\n"
            "assert len(log.filters) == 1 and r._process is not None\n"
            "h.ApiSession(); assert len(log.filters) == 1\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    import datetime as dt

    now = dt.datetime(2024, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:07 GMT", now) == pytest.approx(7.0)


def test_backoff_grows_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=8.0, max_retry_after_s=30.0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (3, 8.0), (6, 8.0)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert min(delays) >= cap / 2 and max(delays) <= cap and len(set(delays)) > 1
    assert policy.delay(0, retry_after=20.0) == 20.0
    assert policy.delay(0, retry_after=1000.0) == 30.0  # a silly server cannot stall the crawl for ever


def test_call_with_retries_retries_transient_errors_only():
    sleeps: list[float] = []
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise RetryableStatus(429, retry_after=0.5)
        return "ok"

    stats = HttpStats()
    policy = RetryPolicy(5, 0.001, 0.002)
    assert call_with_retries(flaky, policy, stats=stats, sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 0.5] and stats.snapshot()["retry:http_429"] == 2
    with pytest.raises(KeyError):
        call_with_retries(lambda: {}["x"], policy, sleep=sleeps.append)
    assert len(sleeps) == 2  # a non-transient error is not retried
    with pytest.raises(RetryableStatus):
        call_with_retries(lambda: (_ for _ in ()).throw(RetryableStatus(503, None)), policy, sleep=sleeps.append)
    assert len(sleeps) == 2 + 4  # gave up after max_attempts


def test_session_honours_retry_after_from_a_real_429():
    with FakeServer() as srv:
        hits = []

        def handler(req):
            hits.append(time.monotonic())
            if len(hits) == 1:
                return Reply(429, b"slow down", "text/plain", {"Retry-After": "0.3"})
            return Reply(200, b'{"ok": true}')

        srv.route("GET", "/api", handler)
        session = ApiSession(timeout_s=2)
        body = call_with_retries(lambda: session.get(srv.url + "/api").json(), RetryPolicy(3, 0.001, 0.002))
        assert body == {"ok": True}
        assert hits[1] - hits[0] >= 0.3


def test_classify_knows_transient_failures():
    assert classify(requests.Timeout())[0] == "timeout"
    assert classify(requests.ConnectionError())[0] == "connection"
    assert classify(requests.exceptions.ChunkedEncodingError())[0] == "truncated_body"
    import json

    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('{"photos": ')
    assert classify(err.value)[0] == "invalid_json"
    assert classify(ValueError("bad argument")) is None


def test_check_image_rejects_what_is_not_a_complete_image():
    good = jpeg_bytes((64, 48))
    check_image(Fetched(good, "image/jpeg"), 10**8)
    check_image(Fetched(good, None), 10**8)
    with pytest.raises(BadImage, match="content type"):
        check_image(Fetched(b"<html>error</html>", "text/html; charset=utf-8"), 10**8)
    with pytest.raises(BadImage, match="magic"):
        check_image(Fetched(b"<html>error</html>", "image/jpeg"), 10**8)  # an error page that lies about its type
    with pytest.raises(BadImage, match="decode"):
        check_image(Fetched(good[: len(good) // 2], "image/jpeg"), 10**8)  # truncated
    with pytest.raises(ImageTooLarge):
        check_image(Fetched(good, "image/jpeg"), 1000)


def test_redactor_scrubs_secrets_and_key_parameters():
    r = Redactor(["SECRET-KEY-123"])
    text = "GET /maps/api/place/photo?maxwidth=1600&key=AIzaOTHER&photoreference=x failed; SECRET-KEY-123"
    out = r(text)
    assert "SECRET-KEY-123" not in out and "AIzaOTHER" not in out and "maxwidth=1600" in out


def test_library_debug_logs_do_not_carry_keys(caplog):
    import googlemaps

    with FakeServer() as srv, caplog.at_level("DEBUG", logger="urllib3"):
        srv.route("GET", "/maps/api/place/details/json", lambda req: Reply(200, b'{"status": "OK", "result": {}}'))
        client = googlemaps.Client(key="AIzaSECRET-KEY-789", base_url=srv.url, requests_session=ApiSession())
        client.place("ChIJx")
    assert "/maps/api/place/details/json" in caplog.text and "AIzaSECRET-KEY-789" not in caplog.text


def test_download_all_checks_limits_and_records_why(tmp_path):
    store = ImageStore(tmp_path)
    with FakeServer() as srv:
        image_routes(srv, missing={"gone.jpg"})
        srv.route("GET", "/html", lambda req: Reply(200, b"<html>captcha</html>", "text/html"))
        srv.route("GET", "/huge", lambda req: Reply(200, jpeg_bytes((300, 300)), "image/jpeg"))
        session = ApiSession(timeout_s=2)
        settings = HttpSettings(timeout_s=2, retry=RetryPolicy(3, 0.001, 0.002), download_workers=3,
                                max_image_bytes=6000)
        jobs = [(n, (lambda u=srv.url + p: fetch_url(session, u, settings.max_image_bytes)))
                for n, p in [("ok", "/img/a.jpg"), ("gone", "/img/gone.jpg"), ("html", "/html"), ("huge", "/huge")]]
        jobs += [(f"ok{i}", (lambda u=f"{srv.url}/img/{i}.jpg": fetch_url(session, u, 6000))) for i in range(20)]
        out = {o.item_id: o for o in download_all(jobs, store, settings, HttpStats(), Redactor())}
    assert out["ok"].image_id and store.abspath(out["ok"].path).is_file()
    assert (out["gone"].reason, out["gone"].retry_later) == (reasons.DOWNLOAD_FAILED, False)
    assert out["html"].reason == reasons.NOT_AN_IMAGE
    assert out["huge"].reason == reasons.IMAGE_TOO_LARGE
    assert all(out[f"ok{i}"].image_id for i in range(20)) and len(out) == 24


def test_crawl_state_is_transactional_and_idempotent(tmp_path):
    path = tmp_path / "state.sqlite"
    with CrawlState(path) as st:
        st.add_units([Unit("u1", {"a": 1}), Unit("u2", {"a": 2})])
        st.complete_unit("u1", items=[("p1", {"x": 1}), ("p2", {"x": 2})],
                         rejected=[Rejected("p3", {"x": 3}, reasons.LICENSE_NOT_ALLOWED)],
                         new_units=[Unit("u3", {})])
        st.complete_unit("u2", items=[("p1", {"x": 99})])  # found again: stored once, first record kept
        with pytest.raises(RuntimeError):
            with st._tx() as con:  # a unit that dies half way leaves no trace
                con.execute("UPDATE units SET status = 'done' WHERE unit_id = 'u3'")
                raise RuntimeError("killed")
    with CrawlState(path) as st:  # reopened, as a resumed run would
        assert [u.unit_id for u in st.pending_units()] == ["u3"]
        assert [i for i, _ in st.pending_items()] == ["p1", "p2"]
        assert dict(st.pending_items())["p1"] == {"x": 1}
        st.record_download("p1", "a" * 64, "images/a.jpg", None, "", False)
        st.record_download("p2", None, None, reasons.DOWNLOAD_FAILED, "HTTP 503", True)
        assert st.counts()["items"] == {DONE: 1, FAILED: 1, REJECTED: 1}
        assert [i for i, _ in st.pending_items()] == ["p2"]  # failed transiently: tried again next run
        # parameters change: discovery restarts, filter rejections are judged again, downloads are kept
        assert st.sync_params({"v": 1}, [reasons.LICENSE_NOT_ALLOWED]) is False
        assert st.sync_params({"v": 2}, [reasons.LICENSE_NOT_ALLOWED]) is True
        items = st.items().set_index("item_id")
        assert set(items.index) == {"p1", "p2"} and items.loc["p1", "status"] == DONE
        assert not st.has_units()
        assert PENDING not in st.counts()["units"]


def test_a_body_that_trickles_is_cut_off_at_its_deadline():
    """Each read gets a byte within the per-read timeout, so only the whole-body deadline ends the download; the
    error is transient (retried as a timeout)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
            end = time.monotonic() + 5.0  # then the connection closes: a reader without a deadline sees a cut body
            while not stop.wait(0.05) and time.monotonic() < end:
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    session = ApiSession(timeout_s=2, body_deadline_s=0.5)
    start = time.monotonic()
    try:
        with pytest.raises(BodyTooSlow, match="incomplete after 0.5 s") as caught:
            fetch_url(session, f"http://127.0.0.1:{listener.getsockname()[1]}/img.jpg", 10**6)
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - start < 5
    assert classify(caught.value) == ("timeout", None)
