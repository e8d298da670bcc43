"""Crawler speed against a local fake API with fixed latency and a server-side rate limit, same process.

1. Query rate: a real Flickr crawl (flickrapi → fake ``photos.search``, many small pages) paced by the key's token
   bucket, as a share of the allowed rate (goal ≥ 95 %), with the server's 429 count; baseline: the same crawl with
   the limit lifted, which the server rejects. Measured for the in-process bucket and for the SQLite-shared bucket,
   and for two processes sharing one key through the shared bucket (their sum must stay under the allowance).
2. Downloads: images from a fake server with fixed latency, parallel workers vs one worker.

Usage: python bench/bench_crawl.py [--rate 40] [--queries 200] [--latency-ms 5] [--images 160]
       [--image-latency-ms 50] [--workers 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geopak_testkit.fake_apis import FakeServer, FlickrPhoto, flickr_routes, image_routes  # noqa: E402

KEY, SECRET = "BENCH-KEY", "BENCH-SECRET"


def _photos(n: int) -> list[FlickrPhoto]:
    return [FlickrPhoto(str(10_000 + i), 24.90 + (i % 37) * 0.001, 67.10 + (i % 41) * 0.001,
                        f"2015-01-{1 + i % 28:02d} 10:00:00") for i in range(n)]


def _flickr_discovery(rest_url: str, rate_per_s: float, rate_db: str | None, root: str) -> tuple[int, float]:
    """(API queries, seconds) for a discovery-only Flickr crawl of one province, one photo per page."""
    from pipeline.core.paths import DataPaths
    from pipeline.core.store import ImageStore
    from pipeline.labels.boundaries import ProvinceBoundaries
    from pipeline.sources.crawl import run_crawl
    from pipeline.sources.flickr import FlickrConfig, FlickrSource
    from pipeline.sources.http import HttpSettings, HttpStats, RetryPolicy

    stats = HttpStats()
    http = HttpSettings(timeout_s=5, retry=RetryPolicy(8, 0.01, 0.2, max_retry_after_s=1.0), rate_limit_db=rate_db)
    cfg = FlickrConfig(KEY, SECRET, rest_url=rest_url, queries_per_hour=rate_per_s * 3600, per_page=1,
                       min_taken_date="2010-01-01", max_taken_date="2020-01-01", min_accuracy=1)
    paths = DataPaths.at(root)
    boundaries = ProvinceBoundaries.load()
    start = time.perf_counter()
    run_crawl(FlickrSource(cfg, http, stats), "sindh", paths, ImageStore(root), boundaries, http, stats,
              log=lambda m: None, discover_only=True)
    return stats.snapshot().get("api:requests", 0), time.perf_counter() - start


def _worker(rest_url: str, rate: float, rate_db: str, root: str, out) -> None:
    out.put(_flickr_discovery(rest_url, rate, rate_db, root))


def _server_rate(srv: FakeServer) -> tuple[int, int, float]:
    """(requests, rejected, accepted per second) as the server saw them: first to last request."""
    entries = srv.requests("/services/rest/")
    rejected = srv.fault_counts().get("rate_limited", 0)
    span = max(e.t for e in entries) - min(e.t for e in entries)
    return len(entries), rejected, (len(entries) - rejected - 1) / span


def query_rate(rate: float, queries: int, latency_ms: float) -> None:
    print(f"== query rate: allowed {rate:.0f} queries/s, server latency {latency_ms:.0f} ms, {queries} pages ==")
    with FakeServer(latency_s=latency_ms / 1000, rate_limit_per_s=rate) as srv:
        flickr_routes(srv, _photos(queries), KEY)
        url = srv.url + "/services/rest/"
        with tempfile.TemporaryDirectory() as tmp:
            for i, (label, db) in enumerate([("token bucket, in-process", None),
                                             ("token bucket, SQLite-shared", f"{tmp}/rl.db")]):
                srv.log.clear()
                _, secs = _flickr_discovery(url, rate, db, f"{tmp}/r{i}")
                n, rejected, accepted = _server_rate(srv)
                print(f"{label:34s} {n:4d} queries, accepted {accepted:5.1f}/s = {accepted / rate:6.1%} of allowed; "
                      f"429s: {rejected}; whole crawl incl. start-up {secs:.2f} s")
            srv.log.clear()
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(url, rate, f"{tmp}/shared.db", f"{tmp}/p{i}", out))
                     for i in range(2)]
            for p in procs:
                p.start()
            for _ in procs:
                out.get(timeout=600)
            for p in procs:
                p.join()
            n, rejected, accepted = _server_rate(srv)
            print(f"{'two processes sharing one key':34s} {n:4d} queries, accepted {accepted:5.1f}/s = "
                  f"{accepted / rate:6.1%} of allowed; 429s: {rejected}")
    # baseline: the same crawl with no client-side pacing; the server's 429s (Retry-After: 1) set its pace
    base = max(20, queries // 5)
    with FakeServer(latency_s=latency_ms / 1000, rate_limit_per_s=rate) as srv, tempfile.TemporaryDirectory() as tmp:
        flickr_routes(srv, _photos(base), KEY)
        _flickr_discovery(srv.url + "/services/rest/", 1e6, None, tmp)
        n, rejected, accepted = _server_rate(srv)
        print(f"{'baseline: no client pacing':34s} {n:4d} queries, accepted {accepted:5.1f}/s = "
              f"{accepted / rate:6.1%} of allowed; 429s: {rejected}")


def downloads(images: int, latency_ms: float, workers: int) -> None:
    from pipeline.core.store import ImageStore
    from pipeline.sources.downloads import download_all, fetch_url
    from pipeline.sources.http import HttpSettings, HttpStats, Redactor, download_session

    print(f"== downloads: {images} images, server latency {latency_ms:.0f} ms each ==")
    with FakeServer(latency_s=latency_ms / 1000) as srv:
        image_routes(srv)
        rates = {}
        for n_workers in (1, workers):
            with tempfile.TemporaryDirectory() as tmp:
                settings = HttpSettings(timeout_s=10, download_workers=n_workers)
                session = download_session(settings, HttpStats())
                jobs = [(str(i), (lambda u=f"{srv.url}/img/w{n_workers}-{i}.jpg": fetch_url(session, u, 10**7)))
                        for i in range(images)]
                start = time.perf_counter()
                outcomes = download_all(jobs, ImageStore(tmp), settings, HttpStats(), Redactor())
                done = sum(1 for o in outcomes if o.image_id)
                secs = time.perf_counter() - start
                rates[n_workers] = done / secs
                print(f"{n_workers:2d} worker(s): {done} images in {secs:5.2f} s = {done / secs:6.1f} images/s")
        print(f"speed-up {workers} workers vs 1: {rates[workers] / rates[1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--image-latency-ms", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    query_rate(args.rate, args.queries, args.latency_ms)
    downloads(args.images, args.image_latency_ms, args.workers)


if __name__ == "__main__":
    main()
