"""Shared pieces of the crawler tests: fast retry settings, source factories, store integrity checks, and a
``python -m tests.crawl_support`` entry point that runs one crawl in a subprocess (for the SIGKILL tests)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from pathlib import Path

from geopak_testkit.fake_apis import FakePlace, FlickrPhoto

from pipeline.sources.http import HttpSettings, HttpStats, RetryPolicy

FLICKR_KEY, FLICKR_SECRET = "SECRET-KEY-123", "SECRET-SECRET-456"
GOOGLE_KEY = "AIzaSECRET-KEY-789"  # googlemaps insists on the AIza prefix


def fast_http(workers: int = 4, attempts: int = 10, timeout_s: float = 0.15,
              rate_db: str | None = None) -> HttpSettings:
    """Tiny backoff and timeouts so fault-injected crawls finish in seconds (the fake's 'timeout' sleeps 0.6 s)."""
    return HttpSettings(timeout_s=timeout_s, retry=RetryPolicy(attempts, 0.002, 0.02, max_retry_after_s=0.05),
                        download_workers=workers, rate_limit_db=rate_db)


def flickr_photos(n: int, seed: int = 0, centre=(24.90, 67.10), spread: float = 0.1) -> list[FlickrPhoto]:
    """Photos around Karachi (some fall in the sea or are filtered by licence/accuracy)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        taken = f"{rng.randrange(2006, 2023)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} " \
                f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
        out.append(FlickrPhoto(str(50_000_000 + i), centre[0] + rng.uniform(-spread, spread),
                               centre[1] + rng.uniform(-spread, spread), taken,
                               license=rng.choice(["0", "4", "4", "5", "9"]), accuracy=rng.choice([6, 11, 16, 16])))
    return out


def flickr_expected(photos: list[FlickrPhoto], boundaries, province_id: int = 0, min_accuracy: int = 11,
                    licenses=tuple(str(i) for i in range(1, 11))) -> set[str]:
    import numpy as np

    where = boundaries.locate(np.array([p.lat for p in photos]), np.array([p.lon for p in photos]))
    return {p.id for p, w in zip(photos, where)
            if w == province_id and p.license in licenses and p.accuracy >= min_accuracy}


def flickr_source(rest_url: str, http: HttpSettings, stats: HttpStats, **cfg):
    from pipeline.sources.flickr import FlickrConfig, FlickrSource

    defaults = dict(queries_per_hour=3600 * 1000, min_taken_date="2005-01-01", max_taken_date="2024-01-01")
    return FlickrSource(FlickrConfig(FLICKR_KEY, FLICKR_SECRET, rest_url=rest_url, **{**defaults, **cfg}), http, stats)


def ict_places(n_dense: int = 90, seed: int = 3) -> list[FakePlace]:
    """A dense cluster in Islamabad (saturates a nearby search: > 60 places) plus a sparse scatter."""
    rng = random.Random(seed)
    dense = [FakePlace(f"ChIJdense{i:03d}", 33.70 + rng.uniform(-0.01, 0.01), 73.05 + rng.uniform(-0.01, 0.01),
                       rng.randrange(0, 4), rng.random()) for i in range(n_dense)]
    sparse = [FakePlace(f"ChIJsparse{i:03d}", 33.6 + rng.uniform(-0.05, 0.1), 72.95 + rng.uniform(-0.05, 0.2),
                        rng.randrange(0, 3), rng.random()) for i in range(20)]
    return dense + sparse


def few_places(n: int = 8, n_without_photos: int = 3, photos: int = 2, seed: int = 5) -> list[FakePlace]:
    """A handful of places in Islamabad (one search page, no paging): ``n`` with photos, some without any."""
    rng = random.Random(seed)
    out = [FakePlace(f"ChIJfew{i:02d}", 33.70 + rng.uniform(-0.02, 0.02), 73.05 + rng.uniform(-0.03, 0.03), photos,
                     rng.random()) for i in range(n)]
    out += [FakePlace(f"ChIJbare{i:02d}", 33.70 + rng.uniform(-0.02, 0.02), 73.05 + rng.uniform(-0.03, 0.03), 0,
                      rng.random()) for i in range(n_without_photos)]
    return out


def places_expected(places: list[FakePlace], boundaries, province: str = "ict") -> set[str]:
    """The item ids (``place_id:n``) a complete crawl of ``province`` stores."""
    import numpy as np

    from pipeline.core.provinces import BY_KEY

    where = boundaries.locate(np.array([p.lat for p in places]), np.array([p.lon for p in places]))
    return {f"{p.place_id}:{i}" for p, w in zip(places, where) if w == BY_KEY[province].id
            for i in range(min(p.n_photos, 10))}


def places_source(base_url: str, http: HttpSettings, stats: HttpStats, key: str = GOOGLE_KEY, clock=None, **cfg):
    """A Places crawler against the fake: fast pacing, short page-token waits, 0.2° tiles."""
    from pipeline.sources.google_places import GooglePlacesSource, PlacesConfig

    defaults = dict(queries_per_second=1000, tile_deg=0.2, min_tile_deg=0.005, page_token_delay_s=0.01,
                    max_width=800)
    extra = {"clock": clock} if clock is not None else {}
    return GooglePlacesSource(PlacesConfig(key, base_url=base_url, **{**defaults, **cfg}), http, stats, **extra)


def crawl_places(root: Path, boundaries, base_url: str, http: HttpSettings | None = None, province: str = "ict",
                 **kw):
    """One Google Places crawl of ``province`` into ``root`` (source settings in ``kw``, see ``places_source``;
    ``factory`` builds another Places source with the same arguments, e.g. the Places API (New) one)."""
    from pipeline.core.paths import DataPaths
    from pipeline.core.store import ImageStore
    from pipeline.sources.crawl import run_crawl

    discover_only = kw.pop("discover_only", False)
    factory = kw.pop("factory", places_source)
    stats = HttpStats()
    http = http or fast_http(attempts=3)
    source = factory(base_url, http, stats, **kw)
    return run_crawl(source, province, DataPaths.at(root), ImageStore(root), boundaries, http, stats,
                     log=lambda m: None, discover_only=discover_only)


def assert_store_intact(root: Path) -> int:
    """Every stored file is named by the sha256 of its bytes and decodes completely; no temp file is left behind."""
    from PIL import Image

    leftovers = [p for p in Path(root).rglob("*.tmp")]
    assert not leftovers, leftovers
    n = 0
    for path in (Path(root) / "images").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == path.stem, path
            with Image.open(io.BytesIO(data)) as img:
                img.load()
            n += 1
    return n


def main() -> None:
    """Run one Flickr crawl described by a JSON argument (used by the SIGKILL test)."""
    from pipeline.core.paths import DataPaths
    from pipeline.core.store import ImageStore
    from pipeline.labels.boundaries import ProvinceBoundaries
    from pipeline.sources.crawl import run_crawl

    spec = json.loads(sys.argv[1])
    stats = HttpStats()
    http = fast_http(workers=spec["workers"])
    source = flickr_source(spec["rest_url"], http, stats, per_page=spec["per_page"])
    paths = DataPaths.at(spec["root"])
    run_crawl(source, "sindh", paths, ImageStore(paths.root), ProvinceBoundaries.load(spec["boundaries"]), http,
              stats, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
