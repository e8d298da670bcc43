"""Regenerate the README's screenshots of the Dagster UI (docs/ui/*.png) in headless Chromium.

    .venv/bin/python docs/ui/screenshots.py                       # runs the main job on a small sample world first
    .venv/bin/python docs/ui/screenshots.py --dagster-home H --data-root D   # an instance where it already ran

It starts ``dagster-webserver`` and the report server (``python -m pipeline.report_server``) on free loopback
ports and opens, through the Chrome DevTools protocol, with ordinary (visible) scrollbars, at 1280 and 1400 px wide:
every asset page of the main job, to check what a curator sees, and each shot's page, scrolled to its key picture,
saved as a palette PNG (< 400 KB; ``NAME.png`` at 1400 px, ``NAME-1280.png`` at 1280 px). It FAILS, listing every
problem, when a metadata value is wider than the Value column that shows it, a picture is cut or did not load, a
value hides behind "[Show Markdown]"/"[Show JSON]", or the synthetic-data note is missing from a page that needs it.
Needs ``chromium`` (Debian: ``apt-get install -y chromium``); fails with the reason when something is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
WIDTHS, WIDTH, HEIGHT = (1280, 1400), 1400, 1000  # WIDTH: the README's shots
MAX_BYTES = 400_000

# (file name, asset, metadata label to scroll to (None: top of the page), what the shot shows)
SHOTS = [
    ("sample_world.png", "sample_world_images", "map", "sample world: points by province, row count, columns"),
    ("filter_examples.png", "filtered_catalog", "rejection_examples", "filter: rejected images per reason"),
    ("labels_map.png", "labelled_catalog", "map", "labels: labelled images by province"),
    ("columns.png", "labelled_catalog", None, "labels: row count, column descriptions and lineage"),
    ("geocells_map.png", "geocells", "map", "geocells: centres sized by images, Voronoi polygons"),
    ("training_curves.png", "geopak_model", "synthetic_data", "model: the synthetic-data note, training curves"),
    ("evaluation.png", "evaluation_report", "synthetic_data", "evaluation: synthetic-data note, report link, CDF"),
]
# figures drawn from the sample world: their pages must carry the synthetic-data note (pipeline.defs.metadata)
NEEDS_SYNTHETIC_NOTE = {"sample_world_images", "image_catalog", "filtered_catalog", "labelled_catalog",
                        "dataset_splits", "geocells", "cell_assignments", "geopak_model", "evaluation_report"}
SMALL_RUN = {"ops": {
    "sample_world_images": {"config": {"n_images": 400, "image_size": 160}},  # compute.workers: 2 (default)
}, "resources": {"model_run": {"config": {"preset": "test-tiny", "phases": [0, 1]}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"nothing answered at {url} within {timeout_s:.0f} s")


@contextmanager
def process(cmd: list[str], env: dict, log: Path):
    """A child in its own process group, stopped (TERM, then KILL) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_main_job(home: Path, data: Path, env: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    config = home / "screenshots_run.yaml"
    config.write_text(json.dumps(SMALL_RUN))  # JSON is YAML
    dagster = Path(sys.executable).with_name("dagster")
    print(f"running the main job into {data} (a few minutes)", file=sys.stderr)
    proc = subprocess.run([str(dagster), "job", "execute", "-m", "pipeline.definitions", "-j", "run_pipeline_job",
                           "-c", str(config)], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("the main job failed:\n" + (proc.stdout + proc.stderr)[-4000:])


class Browser:
    """Just enough of the Chrome DevTools protocol: navigate, evaluate, capture."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str):
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    async def wait_for(self, expr: str, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.js(expr):
                return
            await asyncio.sleep(0.5)
        raise SystemExit(f"timed out waiting for {what}")


# every <img> on the page has loaded (a broken one has naturalWidth 0)
IMAGES_LOADED = "Array.from(document.images).every(i => i.complete)"
BROKEN_IMAGES = "Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)"
# metadata values (the second cell of an outer metadata row) whose content reaches past what the page shows of
# them: the cell's right edge, any clipping ancestor's, or the window's
CUT_OFF_VALUES = """(() => {
  const out = [];
  for (const tr of document.querySelectorAll('tr')) {
    if (tr.parentElement.closest('td')) continue;  // a row of a table inside a value: judged with its value
    const tds = Array.from(tr.children).filter(c => c.tagName === 'TD');
    if (tds.length < 2) continue;
    const key = tds[0], value = tds[tds.length - 1];  // label | (updated) | value
    let room = document.documentElement.clientWidth;
    for (let el = value; el; el = el.parentElement) {
      if (el === value || getComputedStyle(el).overflowX !== 'visible')
        room = Math.min(room, el.getBoundingClientRect().right);
    }
    // where the content ends: its text, pictures and tables (a block stretches to the cell, so it says nothing)
    let right = 0;
    const walker = document.createTreeWalker(value, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      if (!n.textContent.trim()) continue;
      const rg = document.createRange(); rg.selectNodeContents(n);
      for (const r of rg.getClientRects()) right = Math.max(right, r.right);
    }
    for (const el of value.querySelectorAll('img, table, pre')) {
      right = Math.max(right, el.getBoundingClientRect().left + el.scrollWidth);
    }
    if (right > room + 1) out.push(`${key.innerText.trim().split('\\n')[0]}: ${Math.round(right - room)} px too wide`);
  }
  return out;
})()"""
HIDDEN_VALUES = """Array.from(document.querySelectorAll('tr')).filter(tr => tr.children.length >= 2 &&
  /^\\[Show (Markdown|JSON)\\]$/.test(tr.lastElementChild.innerText.trim()))
  .map(tr => tr.children[0].innerText.trim())"""
# pictures wider than the table cell that holds them (the cell clips its content: part of the picture is lost)
CUT_OFF_IMAGES = """Array.from(document.images).map(i => {
  const r = i.getBoundingClientRect();
  let right = Infinity;
  for (let el = i.parentElement; el; el = el.parentElement) {
    const s = getComputedStyle(el);
    if (s.overflowX !== 'visible') right = Math.min(right, el.getBoundingClientRect().right);
  }
  return [i.src, Math.round(r.width), Math.round(right - r.left)];
}).filter(([src, w, room]) => w > room + 1).map(([src, w, room]) => `${src}: ${w} px shown in ${room} px`)"""


def scroll_to_label(label: str) -> str:
    """JS: scroll the metadata row labelled ``label`` to the top of its scroll container; true when found."""
    return f"""(() => {{
      const cell = Array.from(document.querySelectorAll('td'))
        .find(td => td.textContent.trim() === {json.dumps(label)});
      if (!cell) return false;
      cell.closest('tr').scrollIntoView({{block: 'start'}});
      let el = cell.parentElement;
      while (el && el.scrollHeight <= el.clientHeight) el = el.parentElement;
      if (el) el.scrollTop -= 90;  // keep the section header and the row's label in view
      return true;
    }})()"""


def compress(png: bytes) -> bytes:
    """A palette PNG: UI screenshots have few colours, so 256 keep them sharp at a fraction of the size."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


async def open_asset(b: Browser, base: str, asset: str, label: str | None) -> list[str]:
    """Open an asset page, wait for its pictures; the problems a curator would meet on it."""
    await b.call("Page.navigate", url=f"{base}/assets/{asset}")
    await b.wait_for("document.body && /Latest materialization|Materialized/.test(document.body.innerText)", 60,
                     f"the {asset} page")
    if label:
        await b.wait_for(scroll_to_label(label), 30, f"metadata row {label!r} on {asset}")
    await asyncio.sleep(1.5)  # layout settles, pictures start loading
    await b.wait_for(IMAGES_LOADED, 30, f"pictures on {asset}")
    problems = [f"picture did not load: {src}" for src in await b.js(BROKEN_IMAGES)]
    problems += [f"picture cut off: {c}" for c in await b.js(CUT_OFF_IMAGES)]
    problems += [f"value cut off: {c}" for c in await b.js(CUT_OFF_VALUES)]
    problems += [f"value hidden behind a click: {c}" for c in await b.js(HIDDEN_VALUES)]
    if asset in NEEDS_SYNTHETIC_NOTE and not await b.js("document.body.innerText.includes('Synthetic data.')"):
        problems.append("no synthetic-data note")
    return [f"{asset}: {p}" for p in problems]


async def shoot(ws_url: str, base: str, out: Path, shots, assets: list[str]) -> list[str]:
    import websockets

    written, problems = [], []
    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        b = Browser(ws)
        await b.call("Page.enable")
        # the "Join the Dagster community" dialog, dismissed as its Skip button would (localStorage)
        await b.call("Page.addScriptToEvaluateOnNewDocument", source="localStorage.setItem('communityNux', '\"1\"')")
        for width in WIDTHS:
            await b.call("Emulation.setDeviceMetricsOverride", width=width, height=HEIGHT, deviceScaleFactor=1,
                         mobile=False)
            for asset in assets:  # every page, checked whole (not only the shots)
                problems += [f"{width} px: {p}" for p in await open_asset(b, base, asset, None)]
            for name, asset, label, what in shots:
                await open_asset(b, base, asset, label)  # checked above
                if label:
                    await b.js(scroll_to_label(label))
                await asyncio.sleep(0.5)
                shot = await b.call("Page.captureScreenshot", format="png")
                png = compress(base64.b64decode(shot["data"]))
                if len(png) > MAX_BYTES:
                    problems.append(f"{name} at {width} px: {len(png)} bytes, over {MAX_BYTES}")
                    continue
                file = name if width == WIDTH else name.replace(".png", f"-{width}.png")
                (out / file).write_bytes(png)
                written.append(f"{file}: {what} ({len(png) // 1024} KB)")
    if problems:
        raise SystemExit("curator view problems:\n" + "\n".join(problems))
    return written


def start_chromium(stack: ExitStack, tmp: Path, env: dict) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    port = free_port()
    proc = stack.enter_context(process(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",  # ordinary scrollbars, as people have
         f"--remote-debugging-port={port}", f"--user-data-dir={tmp / 'chromium'}",
         f"--window-size={WIDTH},{HEIGHT}", "about:blank"], env, tmp / "chromium.log"))
    wait_http(f"http://127.0.0.1:{port}/json/version", 30, proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as resp:
        pages = [t for t in json.load(resp) if t["type"] == "page"]
    return pages[0]["webSocketDebuggerUrl"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dagster-home", type=Path, help="an instance where the main job ran (default: run it now)")
    ap.add_argument("--data-root", type=Path, help="that run's data root")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", nargs="*", help="file names of SHOTS to redo")
    args = ap.parse_args(argv)
    if bool(args.dagster_home) != bool(args.data_root):
        ap.error("--dagster-home and --data-root go together")
    # processes stop (ExitStack) before their temp folder goes
    with tempfile.TemporaryDirectory(prefix="geopak-ui-", ignore_cleanup_errors=True) as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        home = (args.dagster_home or tmp / "dagster_home").resolve()
        data = (args.data_root or tmp / "data").resolve()
        report_port, web_port = free_port(), free_port()
        env = {**os.environ, "DAGSTER_HOME": str(home), "GEOPAK_DATA_ROOT": str(data), "HF_HUB_OFFLINE": "1",
               "MPLBACKEND": "Agg", "GEOPAK_REPORTS_URL": f"http://127.0.0.1:{report_port}"}
        if not args.dagster_home:
            run_main_job(home, data, env)
        else:  # pictures link to the port of the run that made them: serve the reports there
            found = _reports_port(home)
            if found:
                report_port = found
                env["GEOPAK_REPORTS_URL"] = f"http://127.0.0.1:{report_port}"
            print(f"instance {home}: reports served on port {report_port}", file=sys.stderr)
        bindir = Path(sys.executable).parent
        server = stack.enter_context(process(
            [sys.executable, "-m", "pipeline.report_server", "--data-root", str(data), "--port", str(report_port)],
            env, tmp / "report_server.log"))
        web = stack.enter_context(process(
            [str(bindir / "dagster-webserver"), "-m", "pipeline.definitions", "-h", "127.0.0.1", "-p", str(web_port)],
            env, tmp / "webserver.log"))
        wait_http(f"http://127.0.0.1:{report_port}/reports/", 30, server)
        wait_http(f"http://127.0.0.1:{web_port}/server_info", 120, web)
        ws_url = start_chromium(stack, tmp, env)
        args.out.mkdir(parents=True, exist_ok=True)
        shots = [s for s in SHOTS if not args.only or s[0] in args.only]
        assets = [] if args.only else main_job_assets(env)
        for line in asyncio.run(shoot(ws_url, f"http://127.0.0.1:{web_port}", args.out, shots, assets)):
            print(line)


def main_job_assets(env: dict) -> list[str]:
    """The main job's asset keys (its pages are the curator's), listed by the project's own definitions."""
    code = ("from pipeline.definitions import defs; from pipeline.defs.jobs import MAIN_JOB; "
            "print(' '.join(k.to_user_string() for k in "
            "defs.resolve_job_def(MAIN_JOB).asset_layer.executable_asset_keys))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def _reports_port(home: Path) -> int | None:
    """The report-server port baked into the instance's latest picture links, if any."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("sample_world_images"))
    if event is None or event.asset_materialization is None:
        return None
    text = str(getattr(event.asset_materialization.metadata.get("map"), "value", ""))
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", text)
    return int(m.group(1)) if m else None


if __name__ == "__main__":
    main()
