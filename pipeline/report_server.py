"""Serve the data root's pictures and HTML reports to the browser, so the Dagster UI can show and open them.

Why a server: the UI is an http page, and browsers refuse ``file://`` links and images from http pages; Dagster's
webserver serves no user files. Asset metadata therefore links to ``GEOPAK_REPORTS_URL`` (default
``http://127.0.0.1:3001``), where this serves, read-only, only ``reports/`` (every stage's PNGs) and
``evaluation/`` (the HTML/Markdown reports and their plots) of the data root; nothing else (no images, no tables).

    python -m pipeline.report_server            # GEOPAK_DATA_ROOT or data/, on 127.0.0.1:3001
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import posixpath
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.core.paths import DEFAULT_DATA_ROOT

SERVED = ("reports", "evaluation")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 3001


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files under the served folders only; no directory listings outside them, no writes."""

    def _allowed(self) -> bool:
        parts = [p for p in posixpath.normpath(unquote(urlsplit(self.path).path)).split("/") if p]
        return bool(parts) and parts[0] in SERVED and ".." not in parts

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._allowed():
            self.send_error(404, "only reports/ and evaluation/ are served")
            return
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if not self._allowed():
            self.send_error(404, "only reports/ and evaluation/ are served")
            return
        super().do_HEAD()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")  # a re-run rewrites the same file names
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # quiet: the browser asks for every picture on every page view


def make_server(root: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> http.server.HTTPServer:
    """A threading server over ``root`` (not started); port 0 picks a free one."""
    handler = functools.partial(_Handler, directory=str(Path(root).expanduser().resolve()))
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve_in_thread(root: str | Path, host: str = DEFAULT_HOST, port: int = 0) -> http.server.HTTPServer:
    """Start serving in a daemon thread (tests, the screenshot script); ``server.shutdown()`` stops it."""
    server = make_server(root, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("GEOPAK_DATA_ROOT") or str(DEFAULT_DATA_ROOT))
    ap.add_argument("--host", default=DEFAULT_HOST, help="127.0.0.1: this machine only")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = ap.parse_args(argv)
    server = make_server(args.data_root, args.host, args.port)
    print(f"serving {args.data_root}/{{{','.join(SERVED)}}} at http://{args.host}:{server.server_address[1]}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
