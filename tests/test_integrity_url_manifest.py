"""A manifest of image URLs, fetched for real (``requests``) from an HTTP server on 127.0.0.1: good images are
stored content-addressed with their manifest coordinates; an error page, a 404 and a dead port are rejected
with reasons, and a re-run downloads nothing again."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pandas as pd
import pytest

from pipeline.core import reasons
from pipeline.core.store import ImageStore
from pipeline.labels.boundaries import load_province_locator
from pipeline.sources.local import LocalSource, LocalSourceConfig
from tests.conftest import jpeg_bytes

FILES = {"/lahore.jpg": (jpeg_bytes(colour=(200, 80, 40)), "image/jpeg"),
         "/karachi.jpg": (jpeg_bytes(colour=(40, 80, 200)), "image/jpeg"),
         "/oops.jpg": (b"<html><body>rate limited</body></html>", "text/html")}


@pytest.fixture()
def server() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            body, ctype = FILES.get(self.path, (b"not found", "text/plain"))
            self.send_response(200 if self.path in FILES else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_url_manifest_downloads_stores_and_rejects_with_reasons(tmp_path, server, boundaries_path):
    base, hits = server
    csv = tmp_path / "urls.csv"
    pd.DataFrame({
        "id": ["lhr", "khi", "oops", "gone", "dead"],
        "lat": [31.55, 24.86, 31.5, 31.5, 31.5],
        "lon": [74.34, 67.01, 74.3, 74.3, 74.3],
        "url": [f"{base}/lahore.jpg", f"{base}/karachi.jpg", f"{base}/oops.jpg", f"{base}/gone.jpg",
                "http://127.0.0.1:9/nothing.jpg"],  # port 9 (discard) is closed on loopback
    }).to_csv(csv, index=False)
    locator = load_province_locator(boundaries_path)
    store = ImageStore(tmp_path / "data")

    def run(previous=None):
        return LocalSource(LocalSourceConfig(manifest=str(csv), download_timeout_s=5.0), store,
                           lambda la, lo: locator.locate(la, lo) >= 0, previous=previous).run()

    result = run()
    sid_of = {f"manifest:urls.csv:{k}": k for k in ("lhr", "khi", "oops", "gone", "dead")}
    kept = result.manifest.assign(source_id=result.manifest["source_id"].map(sid_of)).set_index("source_id")
    assert sorted(kept.index) == ["khi", "lhr"]
    assert kept.loc["lhr", "lat"] == pytest.approx(31.55) and kept.loc["khi", "lon"] == pytest.approx(67.01)
    for sid in ("lhr", "khi"):
        stored = store.abspath(kept.loc[sid, "path"])
        assert stored.read_bytes() == FILES[f"/{'lahore' if sid == 'lhr' else 'karachi'}.jpg"][0]
    why = dict(zip(result.rejections["source_id"].map(sid_of), result.rejections["reason"]))
    assert why["oops"] == reasons.NOT_AN_IMAGE  # an HTML page served as the image
    assert why["gone"] == reasons.DOWNLOAD_FAILED and why["dead"] == reasons.DOWNLOAD_FAILED
    first = len(hits)
    again = run(previous=result.manifest)  # unchanged manifest: stored images are reused, not downloaded again
    assert sorted(again.manifest["source_id"].map(sid_of)) == ["khi", "lhr"]
    assert {h for h in hits[first:]} <= {"/oops.jpg", "/gone.jpg"}  # only the failures are retried
