"""Checked parallel image downloads for the crawlers: capped, deadline-bound bodies, mirrors tried in order, every
body proven to be a whole image before it is stored, and a stop (quota, refused key) that ends the hand-out cleanly.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import requests
import urllib3
from PIL import Image

from pipeline.core import reasons
from pipeline.core.store import ImageStore, sniff_extension
from pipeline.sources.http import (
    DEFAULT_BODY_DEADLINE_S,
    ApiSession,
    BadImage,
    BodyTooSlow,
    HttpSettings,
    HttpStats,
    ImageTooLarge,
    PermanentHTTPError,
    Redactor,
    StopCrawl,
    call_with_retries,
    classify,
)

_IMAGE_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None


def read_capped(resp: requests.Response, max_bytes: int, deadline_s: float = DEFAULT_BODY_DEADLINE_S) -> bytes:
    """The body, refusing anything over ``max_bytes`` (by Content-Length up front, else while streaming) or still
    arriving ``deadline_s`` after the read began (``BodyTooSlow``, retried as a timeout)."""
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ImageTooLarge(f"Content-Length {length} > {max_bytes} bytes")
    buf = bytearray()
    start = time.monotonic()
    for chunk in _arriving(resp, 1 << 16):
        buf += chunk
        if len(buf) > max_bytes:
            raise ImageTooLarge(f"body over {max_bytes} bytes")
        if time.monotonic() - start > deadline_s:
            raise BodyTooSlow(f"body incomplete after {deadline_s:g} s ({len(buf)} bytes read); "
                              "the crawl resource's download_deadline_s sets this limit")
    return bytes(buf)


def _arriving(resp: requests.Response, size: int) -> Iterator[bytes]:
    """The body in pieces of whatever has arrived, at most ``size`` bytes each, with the errors ``iter_content``
    raises. ``iter_content`` waits until it has ``size`` bytes, so a host sending a byte per read timeout would
    keep one piece, and the deadline check after it, waiting for hours."""
    raw = resp.raw
    if not hasattr(raw, "read1"):  # not urllib3's response (a test double): no partial reads to be had
        yield from resp.iter_content(chunk_size=size)
        return
    try:
        while chunk := raw.read1(size, decode_content=True):
            yield chunk
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from exc


def fetch_url(session: requests.Session, url: str, max_bytes: int) -> Fetched:
    """The body of a 200 answer (else ``PermanentHTTPError``), its bytes charged to the session's bandwidth budget:
    before reading when the length is announced, after it otherwise."""
    pay = session.pay_bytes if isinstance(session, ApiSession) else (lambda n: None)
    with session.get(url, stream=True) as resp:
        if resp.status_code != 200:
            raise PermanentHTTPError(resp.status_code)
        length = resp.headers.get("Content-Length") or ""
        announced = int(length) if length.isdigit() and int(length) <= max_bytes else 0
        pay(announced)
        data = read_capped(resp, max_bytes, getattr(session, "body_deadline_s", DEFAULT_BODY_DEADLINE_S))
        pay(len(data) - announced)
        return Fetched(data, resp.headers.get("Content-Type"))


def fetch_first(session: requests.Session, urls: list[str], max_bytes: int) -> Fetched:
    """Try mirrors in order; a permanent failure moves on to the next URL, transient errors propagate (retry)."""
    if not urls:
        raise PermanentHTTPError(0)
    for i, url in enumerate(urls):
        try:
            return fetch_url(session, url, max_bytes)
        except PermanentHTTPError:
            if i == len(urls) - 1:
                raise
    raise AssertionError("unreachable")


def check_image(fetched: Fetched, max_pixels: int) -> None:
    """Reject what is not a complete image: wrong content type, unknown magic bytes, or a body that fails to decode."""
    ctype = (fetched.content_type or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith(_IMAGE_TYPES):
        raise BadImage(f"content type {ctype!r}")
    if sniff_extension(fetched.data) == ".bin":
        raise BadImage(f"unknown magic bytes {fetched.data[:8]!r}")
    try:
        with Image.open(io.BytesIO(fetched.data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{img.width}x{img.height} pixels")
            img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; every coefficient is still read
            img.load()
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"does not decode: {exc}") from exc


@dataclass(frozen=True)
class DownloadOutcome:
    item_id: str
    image_id: str | None = None
    path: str | None = None
    reason: str | None = None  # rejection reason when the item failed for good (or, retried, what it looked like)
    detail: str = ""
    retry_later: bool = False  # transient failures that outlasted the retries: try again on the next run
    stop: StopCrawl | None = None  # this answer ends the run's downloads (quota, refused key)


Classify = Callable[[BaseException], tuple[str, float | None] | None]


def download_one(
    item_id: str,
    fetch: Callable[[], Fetched],
    store: ImageStore,
    settings: HttpSettings,
    stats: HttpStats,
    redact: Redactor,
    classify_fn: Classify = classify,
) -> DownloadOutcome:
    def attempt() -> bytes:
        fetched = fetch()
        check_image(fetched, settings.max_image_pixels)
        return fetched.data

    try:
        data = call_with_retries(attempt, settings.retry, classify_fn, stats)
    except StopCrawl as exc:
        return DownloadOutcome(item_id, reason=reasons.DOWNLOAD_FAILED, detail=redact(str(exc))[:300],
                               retry_later=True, stop=exc)
    except ImageTooLarge as exc:
        return DownloadOutcome(item_id, reason=reasons.IMAGE_TOO_LARGE, detail=redact(str(exc))[:300])
    except BadImage as exc:
        # an HTML error page or a body cut short, on every in-run try: suspect, not proven permanent; the crawl
        # state retries it on later runs and rejects it only when it repeats (CrawlState.record_download)
        return DownloadOutcome(item_id, reason=reasons.NOT_AN_IMAGE, detail=redact(str(exc))[:300], retry_later=True)
    except PermanentHTTPError as exc:
        return DownloadOutcome(item_id, reason=reasons.DOWNLOAD_FAILED, detail=str(exc))
    except Exception as exc:  # transient errors that outlasted the retries, or a client error
        detail = redact(f"{type(exc).__name__}: {exc}")[:300]
        return DownloadOutcome(item_id, reason=reasons.DOWNLOAD_FAILED, detail=detail, retry_later=True)
    image_id, rel = store.put(data)
    stats.add("downloaded_bytes", len(data))
    return DownloadOutcome(item_id, image_id=image_id, path=rel)


def download_all(
    jobs: Iterable[tuple[str, Callable[[], Fetched]]],
    store: ImageStore,
    settings: HttpSettings,
    stats: HttpStats,
    redact: Redactor,
    classify_fn: Classify = classify,
) -> Iterator[DownloadOutcome]:
    """Download in ``settings.download_workers`` threads; yield outcomes on the caller's thread as they finish.

    At most a few jobs per worker are in flight, so a million pending items do not become a million futures.
    An outcome carrying ``stop`` (quota spent, key refused) ends the hand-out: queued jobs are cancelled, the
    downloads already running finish and are yielded, then the ``StopCrawl`` is raised; jobs never started stay
    pending in the caller's state.
    """
    workers = max(1, settings.download_workers)
    window = workers * 4
    it = iter(jobs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
        running: set[Future] = set()
        exhausted = False
        stop: StopCrawl | None = None
        while running or not exhausted:
            while not exhausted and len(running) < window:
                try:
                    item_id, fetch = next(it)
                except StopIteration:
                    exhausted = True
                    break
                running.add(pool.submit(download_one, item_id, fetch, store, settings, stats, redact, classify_fn))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.cancelled():  # queued when the stop came: never started, still pending in the state
                    continue
                outcome = fut.result()
                if outcome.stop is not None and stop is None:
                    stop, exhausted = outcome.stop, True
                    for queued in running:  # a refused key or policy would refuse them too: do not send them
                        queued.cancel()
                yield outcome
    if stop is not None:
        raise stop
