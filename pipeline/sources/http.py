"""HTTP for the crawlers: rate-limited sessions and retries with backoff. The token buckets live in
``pipeline.sources.rate_limits``, checked parallel image downloads in ``pipeline.sources.downloads``.

Retries happen per *call* (``call_with_retries``), not inside the session, because a retried Flickr call must be
signed again (fresh OAuth nonce) and an invalid-JSON body is only noticed after the session has returned. The session
(``ApiSession``) turns 429/5xx into ``RetryableStatus`` carrying Retry-After, waits for a token from the API key's
bucket before every request, and keeps the last response per thread so a caller can read headers through clients
(googlemaps) that hide them. Secrets never leave through exception text: ``Redactor`` scrubs what is logged or stored.

Wikimedia (GLDv2's images on upload.wikimedia.org, Wikidata) refuses clients whose User-Agent gives no contact: the
session sends none of its requests without one, and a 403 whose body cites the robot or User-Agent policy stops
the crawl as a configuration error (``WikimediaPolicyError``), never a per-image failure, so the same images are
fetched once the contact is set (GEOPAK_CONTACT).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import importlib.metadata
import json
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import requests

from pipeline.sources.rate_limits import Limiter, TokenBucket, rate_limiter

T = TypeVar("T")

CONTACT_ENV = "GEOPAK_CONTACT"  # read by the crawl resources (pipeline.defs.crawl) at run start


def _geopak_version() -> str:
    try:
        return importlib.metadata.version("geopak")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def user_agent(contact: str = "") -> str:
    """Wikimedia's User-Agent format: ``<client>/<version> (<contact>) <library>/<version>``; the contact (an e-mail
    or URL where the operator can be reached) is left out when there is none."""
    contact = " ".join(contact.split())
    return f"GeoPak/{_geopak_version()}{f' ({contact})' if contact else ''} python-requests/{requests.__version__}"


DEFAULT_USER_AGENT = user_agent()
_CONTACT = re.compile(r"https?://\S+|[\w.+-]+@[\w-]+(\.[\w-]+)+")
# hosts of the Wikimedia projects (GLDv2's images, Wikidata, Commons): their User-Agent policy applies
WIKIMEDIA_DOMAINS = ("wikimedia.org", "wikipedia.org", "wikidata.org", "mediawiki.org", "wikimediacommons.org")
# the wording of Wikimedia's refusals: "Please set a user-agent and respect our robot policy https://w.wiki/4wJS"
# (2025-) and "Please comply with the User-Agent policy: https://meta.wikimedia.org/wiki/User-Agent_policy"
# (tests/data/recorded/wikimedia/)
_POLICY_REFUSAL = re.compile(r"robot policy|user[- ]agent[ _]policy|w\.wiki/4wJS", re.IGNORECASE)


def has_contact(agent: str) -> bool:
    """Whether a User-Agent carries a way to reach its operator (a URL or an e-mail address)."""
    return bool(_CONTACT.search(agent or ""))


def is_wikimedia(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == d or host.endswith("." + d) for d in WIKIMEDIA_DOMAINS)


class TransientError(Exception):
    """Worth retrying: the same request may succeed later."""

    def __init__(self, cause: str, message: str = "", retry_after: float | None = None):
        super().__init__(message or cause)
        self.cause = cause
        self.retry_after = retry_after


class RetryableStatus(TransientError):
    """HTTP 429 or 5xx."""

    def __init__(self, status: int, retry_after: float | None):
        super().__init__(f"http_{status}", f"HTTP {status}", retry_after)
        self.status = status


class PermanentHTTPError(Exception):
    """A status that will not change on retry (404, 410, 403, ...)."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class BadImage(TransientError):
    """The bytes are not a complete image (HTML error page, truncated JPEG); retried, then rejected."""

    def __init__(self, message: str):
        super().__init__("bad_image", message)


class ImageTooLarge(Exception):
    """Over the configured byte or pixel limit: permanent."""


class CrawlError(RuntimeError):
    """A crawl could not finish; the message is already scrubbed of secrets."""


class StopCrawl(Exception):
    """An answer that makes every further request of this run pointless (a quota ran out, the key is refused).

    Raised by a source's call or fetcher; ``download_all`` stops handing out work, lets the downloads in flight
    finish, then re-raises it. The message must already be scrubbed of secrets.
    """


class QuotaExhausted(StopCrawl):
    """The API's quota is spent: stop cleanly, keep the remaining work in the crawl state for the next run."""


class CredentialsRejected(StopCrawl, CrawlError):
    """The API refuses the key (invalid, or the API is not enabled for it): the crawl fails naming the problem."""


class WikimediaPolicyError(StopCrawl, CrawlError):
    """Wikimedia refuses (or would refuse) this client under its User-Agent / robot policy: a configuration error.

    Raised before a Wikimedia request without a contact in the User-Agent, and on a 403 that cites the policy. The
    crawl stops; downloads it interrupted stay pending and are fetched by the next run once the contact is set."""

    @classmethod
    def missing_contact(cls, url: str) -> "WikimediaPolicyError":
        return cls(f"{urlsplit(url).hostname} (Wikimedia) needs a User-Agent with a contact (an e-mail or URL), "
                   f"under its User-Agent policy (foundation.wikimedia.org/wiki/Policy:Wikimedia_Foundation_User-"
                   f"Agent_Policy): set {CONTACT_ENV}, e.g. {CONTACT_ENV}=you@example.org, or the crawl resource's "
                   f"`contact` field. Nothing was sent.")

    @classmethod
    def refused(cls, url: str, body: str) -> "WikimediaPolicyError":
        return cls(f"{urlsplit(url).hostname} answered 403 under Wikimedia's robot/User-Agent policy: "
                   f"{' '.join(body.split())[:200]!r}. Set {CONTACT_ENV} (an e-mail or URL reaching you) or the crawl "
                   f"resource's `contact`, and stay within wikitech.wikimedia.org/wiki/Robot_policy; the images not "
                   f"fetched stay pending for the next run.")


class Redactor:
    """Replaces secret values and ``key=...``-style query parameters in any text that is logged or stored."""

    _PARAM = re.compile(r"(?i)\b(key|api_key|apikey|secret|signature|oauth_[a-z_]+)=([^&\s'\"]+)")

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return self._PARAM.sub(r"\1=***", text)


class _ScrubLogRecords(logging.Filter):
    """urllib3 logs request lines at DEBUG, query string (and a Maps key) included: scrub them if anyone listens."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = Redactor()(record.getMessage()), ()
        return True


_SCRUBBER = _ScrubLogRecords()


def install_log_scrubber() -> None:
    """Scrub urllib3's request log lines (idempotent). Every ``ApiSession`` installs it when made, not this module
    when imported: importing a module changes no global logging."""
    logger = logging.getLogger("urllib3.connectionpool")
    if _SCRUBBER not in logger.filters:
        logger.addFilter(_SCRUBBER)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    now = now or dt.datetime.now(dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter (half fixed, half random).

    A server's Retry-After is a floor, capped by ``max_retry_after_s``.
    """

    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_retry_after_s: float = 600.0

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        cap = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        backoff = (rng or random).uniform(cap / 2, cap)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after_s))
        return backoff


DEFAULT_BODY_DEADLINE_S = 300.0  # a whole body; ``timeout_s`` bounds each read, so a trickle never times out


class BodyTooSlow(TimeoutError):
    """A response body still incomplete at its deadline (transient: retried like a timeout)."""


@dataclass(frozen=True)
class HttpSettings:
    timeout_s: float = 30.0
    body_deadline_s: float = DEFAULT_BODY_DEADLINE_S
    retry: RetryPolicy = RetryPolicy()
    download_workers: int = 8
    max_image_bytes: int = 25 * 2**20
    max_image_pixels: int = 90_000_000
    user_agent: str = DEFAULT_USER_AGENT
    rate_limit_db: str | None = None  # SQLite file that shares each key's budget between processes


@dataclass
class HttpStats:
    """Thread-safe counters a crawl reports as metadata (requests, statuses, retries by cause)."""

    counts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def group(self, prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in self.snapshot().items() if k.startswith(prefix)}


class ApiSession(requests.Session):
    """A session that rate-limits, applies a default timeout and raises ``RetryableStatus`` on 429/5xx.

    ``bandwidth`` (a bucket of bytes) paces the bodies ``fetch_url`` reads, for hosts that publish a byte-rate
    limit. No request leaves for a Wikimedia host without a contact in the User-Agent, and a policy 403 from any
    host raises ``WikimediaPolicyError``."""

    def __init__(
        self,
        limiter: Limiter | None = None,
        timeout_s: float = 30.0,
        user_agent: str = DEFAULT_USER_AGENT,
        stats: HttpStats | None = None,
        label: str = "api",
        bandwidth: Limiter | None = None,
        body_deadline_s: float = DEFAULT_BODY_DEADLINE_S,
    ):
        super().__init__()
        self.label = label
        self.limiter = limiter
        self.bandwidth = bandwidth
        self.timeout_s = timeout_s
        self.body_deadline_s = body_deadline_s
        self.stats = stats or HttpStats()
        self.headers["User-Agent"] = user_agent
        self._local = threading.local()
        install_log_scrubber()

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        if is_wikimedia(url) and not has_contact(str(self.headers.get("User-Agent", ""))):
            raise WikimediaPolicyError.missing_contact(url)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout_s
        if self.limiter is not None:
            self.limiter.acquire()
        self.stats.add(f"{self.label}:requests")
        resp = super().request(method, url, *args, **kwargs)
        self._local.response = resp
        self.stats.add(f"{self.label}:status:{resp.status_code}")
        if resp.status_code == 429 or resp.status_code >= 500:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            resp.close()
            raise RetryableStatus(resp.status_code, retry_after)
        if resp.status_code == 403 and (body := _short_text(resp)) and _POLICY_REFUSAL.search(body):
            resp.close()
            raise WikimediaPolicyError.refused(url, body)
        return resp

    def pay_bytes(self, n: int) -> None:
        """Charge ``n`` body bytes to the bandwidth budget, waiting while it is overdrawn."""
        if self.bandwidth is not None and n > 0:
            self.bandwidth.acquire(float(n))

    @property
    def last_response(self) -> requests.Response | None:
        """The last response this thread received (clients such as googlemaps do not hand it out)."""
        return getattr(self._local, "response", None)


def _short_text(resp: requests.Response, limit: int = 65536) -> str:
    """A refusal's text (a small text/HTML body), '' for images and large bodies, which are left unread."""
    ctype = (resp.headers.get("Content-Type") or "").lower()
    length = resp.headers.get("Content-Length")
    if not ctype.startswith(("text/", "application/json")) or (length and length.isdigit() and int(length) > limit):
        return ""
    try:
        return resp.content[:limit].decode("utf-8", "replace")  # cached on the response: later readers see it too
    except requests.RequestException:
        return ""


def api_session(http: HttpSettings, stats: HttpStats, key: str, rate_per_s: float) -> ApiSession:
    """A session for one API key, paced by that key's (shared) token bucket."""
    return ApiSession(rate_limiter(key, rate_per_s, http.rate_limit_db), http.timeout_s, http.user_agent, stats, "api",
                      body_deadline_s=http.body_deadline_s)


def download_session(http: HttpSettings, stats: HttpStats, rate_per_s: float = 0.0, bytes_per_s: float = 0.0,
                     host: str = "") -> ApiSession:
    """A session for image downloads; ``rate_per_s`` > 0 paces this process's requests to the image host,
    ``bytes_per_s`` > 0 the bytes every process reads from ``host`` (one bucket shared through ``rate_limit_db``)."""
    limiter = TokenBucket(rate_per_s) if rate_per_s > 0 else None
    bandwidth = rate_limiter(f"bytes:{host}", bytes_per_s, http.rate_limit_db, capacity=bytes_per_s) \
        if bytes_per_s > 0 else None
    return ApiSession(limiter, http.timeout_s, http.user_agent, stats, "download", bandwidth, http.body_deadline_s)


def classify(exc: BaseException) -> tuple[str, float | None] | None:
    """(cause, retry_after) when ``exc`` is transient, else None. Unwraps googlemaps' TransportError."""
    inner = getattr(exc, "base_exception", None)
    if isinstance(inner, BaseException):
        exc = inner
    if isinstance(exc, TransientError):
        return exc.cause, exc.retry_after
    if isinstance(exc, requests.Timeout | TimeoutError):
        return "timeout", None
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError):
        return "truncated_body", None
    if isinstance(exc, requests.ConnectionError | ConnectionError):
        return "connection", None
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        return "invalid_json", None
    return None


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    classify_fn: Callable[[BaseException], tuple[str, float | None] | None] = classify,
    stats: HttpStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, a non-transient error occurs, or the attempts run out (then re-raise)."""
    for attempt in range(policy.max_attempts):
        try:
            return fn()
        except Exception as exc:
            verdict = classify_fn(exc)
            if verdict is None or attempt == policy.max_attempts - 1:
                raise
            cause, retry_after = verdict
            if stats is not None:
                stats.add(f"retry:{cause}")
            sleep(policy.delay(attempt, retry_after))
    raise AssertionError("unreachable")
