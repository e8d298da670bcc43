"""Serve the data root's pictures and HTML reports to the browser, so the Dagster UI can show and open them.

Why a server: the UI is an http page, and browsers refuse ``file://`` links and images from http pages; Dagster's
webserver serves no user files. Asset metadata therefore links to ``GEOPAK_REPORTS_URL`` (default
``http://127.0.0.1:3001``), where this serves, read-only, only ``reports/`` (every stage's PNGs) and
``evaluation/`` (the HTML/Markdown reports and their plots) of the data root; nothing else (no images, no tables).

    python -m pipeline.report_server            # GEOPAK_DATA_ROOT or data/, at GEOPAK_REPORTS_URL's port
    geopak ui                                   # this and ``dagster dev`` together (``make ui``)

The links stay valid as long as the server answers at the address the assets were written with: it binds the port
of ``GEOPAK_REPORTS_URL`` (default ``http://127.0.0.1:3001``) and refuses to start elsewhere when that port is busy,
rather than serve where no page looks. A picture opens on a small page (``/view/...``) with a link back to the UI.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import os
import posixpath
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.core.paths import DEFAULT_DATA_ROOT

SERVED = ("reports", "evaluation")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 3001
REPORTS_URL_ENV, DEFAULT_REPORTS_URL = "GEOPAK_REPORTS_URL", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
UI_PORT_ENV, DEFAULT_UI_PORT = "GEOPAK_UI_PORT", 3000
VIEW = "view"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def reports_url() -> str:
    """Where the browser reaches the reports (``GEOPAK_REPORTS_URL``), read each time: links follow the setting."""
    return os.environ.get(REPORTS_URL_ENV, DEFAULT_REPORTS_URL).rstrip("/")


def bind_address(url: str) -> tuple[str, int]:
    """Host and port to serve on for a reports URL: loopback names stay on this machine; any other name means
    browsers elsewhere reach it, so every interface. The URL must name its port (no guessing 80)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"{REPORTS_URL_ENV}={url!r}: expected http://HOST:PORT, e.g. {DEFAULT_REPORTS_URL}")
    return (DEFAULT_HOST if parts.hostname in LOOPBACK else "0.0.0.0"), parts.port


def view_page(rel: str) -> bytes:
    """An HTML page showing one served picture whole, with a link back to where the curator came from."""
    src = html.escape("/" + rel.lstrip("/"), quote=True)
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(rel)}</title>"
            "<body style='font-family:sans-serif;margin:16px'>"
            "<p><a href='javascript:history.back()'>&larr; back to the Dagster UI</a> &middot; "
            f"<a href='{src}'>{html.escape(rel)}</a></p>"
            f"<img src='{src}' alt='{html.escape(rel)}' style='max-width:100%;height:auto'></body>").encode()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files under the served folders only; no directory listings outside them, no writes."""

    def _allowed(self) -> bool:
        parts = [p for p in posixpath.normpath(unquote(urlsplit(self.path).path)).split("/") if p]
        return bool(parts) and parts[0] in SERVED and ".." not in parts

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = [p for p in posixpath.normpath(unquote(urlsplit(self.path).path)).split("/") if p]
        if parts[:1] == [VIEW]:
            self.path = "/" + "/".join(parts[1:])
            if not self._allowed() or not Path(self.translate_path(self.path)).is_file():
                self.send_error(404, "no such picture under reports/ or evaluation/")
                return
            body = view_page("/".join(parts[1:]))
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
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


def start_for_url(root: str | Path, url: str) -> http.server.HTTPServer:
    """The server at ``url``'s port (not started), or a clear error naming the setting when the port is taken."""
    host, port = bind_address(url)
    try:
        return make_server(root, host, port)
    except OSError as exc:
        raise SystemExit(f"port {port} is busy ({exc.strerror}): the pictures written for {url} cannot be served; "
                         f"stop what holds it, or set {REPORTS_URL_ENV} to another http://HOST:PORT and re-run "
                         "the assets (pages link to the address they were written with)") from exc


def run_ui(data_root: str | Path, ui_port: int) -> int:
    """``geopak ui``: the report server at ``GEOPAK_REPORTS_URL`` in this process, ``dagster dev`` beside it."""
    import subprocess
    import sys

    url = reports_url()
    server = start_for_url(data_root, url)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"reports: {url} (from {data_root}); Dagster UI: http://127.0.0.1:{ui_port}", flush=True)
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, REPORTS_URL_ENV: url, "GEOPAK_DATA_ROOT": str(data_root)}
    try:
        return subprocess.call([str(dagster), "dev", "-m", "pipeline.definitions", "-p", str(ui_port)], env=env)
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=os.environ.get("GEOPAK_DATA_ROOT") or str(DEFAULT_DATA_ROOT))
    ap.add_argument("--host", default=None, help=f"default: from {REPORTS_URL_ENV} (loopback: this machine only)")
    ap.add_argument("--port", type=int, default=None, help=f"default: {REPORTS_URL_ENV}'s port")
    args = ap.parse_args(argv)
    if args.host is None and args.port is None:
        server = start_for_url(args.data_root, reports_url())
    else:
        host, port = bind_address(reports_url())
        server = make_server(args.data_root, args.host or host, args.port if args.port is not None else port)
    print(f"serving {args.data_root}/{{{','.join(SERVED)}}} on {server.server_address[0]}:{server.server_address[1]}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
