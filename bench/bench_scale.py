"""Scale bench driver (issue 13): every ``bench/scale_*.py`` section in a fresh subprocess, one Markdown table.

Each section makes its own synthetic inputs, measures, and prints one JSON object per line on stdout::

    {"stage": "near-duplicate search", "size": 1000000, "seconds": 12.3, "peak_rss_mb": 812.0,
     "measured": true, "note": "vs brute force: 4000x", "baseline_seconds": null}

(everything else on stderr, which is passed through here so progress shows); ``in_child`` and ``peak_rss_mb``
below are for sections that measure several sizes. A fresh process per section keeps
each section's peak RSS its own. A section that fails or times out becomes a row saying so, after the rows it
did print; the driver itself does not stop. The table goes to stdout and to ``bench/results/scale.md``.

Usage: python bench/bench_scale.py [--sizes 1000000,10000000] [--quick] [--only dedup,labels]
                                   [--timeout 7200] [--out bench/results/scale.md] [--stages tables [--folder F]]

``--stages tables`` (issue 26) runs the table chain instead of the sections: catalog rows → labels → splits →
geocells → cell assignment at every size, each stage in its own process (``scale_labels.py``), nothing
extrapolated, the pre-issue-26 outputs compared at 1 M, and appends a dated section to the results file.
Run it under ``nice -n 10`` on a shared machine; the load average printed with the table says how shared it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
COLUMNS = ("stage", "size", "time", "peak RSS", "measured", "baseline", "note")


def _child_main(queue, fn, args) -> None:
    """Body of ``in_child``'s process: peak RSS counted from here (not the parent's high-water mark), result or
    error on the queue so the parent never hangs."""
    reset_peak()
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def in_child(fn, *args):
    """``fn(*args)`` in a forked child, so the peak RSS it reads (``peak_rss_mb``) is its own; for sections."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_child_main, args=(queue, fn, args))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its child process: {value}")
    return value


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0; elsewhere nothing), so a later
    ``peak_rss_mb`` measures from here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mb(field: str) -> float | None:
    """One memory line of /proc/self/status (``VmRSS``, ``VmHWM``), MB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """This process's resident set now (VmRSS), MB; 0 where /proc is missing."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB; ru_maxrss where /proc is missing."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sections(only: list[str] | None) -> list[Path]:
    """The section scripts present, in name order; ``only`` picks some by name (``dedup`` = scale_dedup.py)."""
    found = sorted(BENCH.glob("scale_*.py"))
    if only:
        unknown = sorted(set(only) - {p.stem.removeprefix("scale_") for p in found})
        if unknown:
            raise SystemExit(f"no section named {unknown}; present: {[p.stem for p in found]}")
        found = [p for p in found if p.stem.removeprefix("scale_") in only]
    return found


def _tee(stream, sink, tail: deque) -> None:
    """Copy a child's stderr to ours line by line, keeping the last lines for an error row."""
    for line in stream:
        sink.write(line)
        sink.flush()
        tail.append(line.rstrip())


def run_section(script: Path, sizes: str, quick: bool, timeout: float, extra: list[str] | None = None) -> list[dict]:
    """Run one section; its JSON rows, plus a failure row when it exits non-zero, times out or prints nothing."""
    cmd = [sys.executable, str(script), "--sizes", sizes] + (["--quick"] if quick else []) + (extra or [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    name = script.stem.removeprefix("scale_")
    print(f"== section {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tail: deque = deque(maxlen=20)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tee = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, tail), daemon=True)
    tee.start()
    rows: list[dict] = []
    bad_lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad_lines.append(line)
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad_lines.append(line)
        rc = proc.wait()
    finally:
        timer.cancel()
    tee.join(timeout=5)
    elapsed = time.perf_counter() - t0
    error = None
    if rc and elapsed >= timeout:
        error = f"killed after the {timeout:.0f} s timeout"
    elif rc:
        last = next((ln for ln in reversed(tail) if ln.strip()), "no stderr")
        error = f"exit status {rc}: {last}"
    elif not rows:
        error = "printed no result rows"
    if bad_lines:
        print(f"section {name}: {len(bad_lines)} stdout lines were not JSON objects, e.g. {bad_lines[0][:200]!r}",
              file=sys.stderr, flush=True)
    if error:
        rows.append({"stage": f"{name} (section)", "size": None, "seconds": None, "peak_rss_mb": None,
                     "measured": False, "note": f"FAILED: {error}", "error": True})
    return rows


def _fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def _fmt_size(n) -> str:
    if n is None:
        return "–"
    n = int(n)
    for div, suffix in ((1_000_000, " M"), (1_000, "k")):
        if n >= div and n % (div // 10 or 1) == 0:
            return f"{n / div:g}{suffix}"
    return f"{n:,}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    """One Markdown table: measured rows say so; extrapolated rows are marked and their note says from what."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        rss = r.get("peak_rss_mb")
        measured = "error" if r.get("error") else ("measured" if r.get("measured", True)
                                                   else r.get("status", "extrapolated"))
        lines.append("| " + " | ".join(_cell(c) for c in (
            r.get("stage", "?"), _fmt_size(r.get("size")), _fmt_seconds(r.get("seconds")),
            "–" if rss is None else f"{float(rss) / 1024:.2f} GB" if float(rss) >= 1024 else f"{float(rss):.0f} MB",
            measured, _fmt_seconds(r.get("baseline_seconds")), r.get("note", ""),
        )) + " |")
    return "\n".join(lines)


TABLE_STEPS = ("catalog", "labels", "splits", "geocells", "assign", "reference")
CHAIN = ("labels", "splits", "geocells", "cell assignment")  # the pipeline's table stages after the catalog


def run_tables(sizes: str, timeout: float, folder: str | None) -> list[dict]:
    """The table chain at each size, every stage in its own process (``scale_labels.py``), all sizes measured;
    then one row per size with the chain's total time and its largest peak."""
    top = max(int(x) for x in sizes.split(","))
    extra = ["--steps", ",".join(TABLE_STEPS), "--max-measured", str(top)] + (["--folder", folder] if folder else [])
    rows = run_section(BENCH / "scale_labels.py", sizes, False, timeout, extra)
    for n in sorted({r["size"] for r in rows if r.get("size")}):
        chain = [r for r in rows if r.get("size") == n and r.get("stage") in CHAIN and r.get("measured")]
        if len(chain) != len(CHAIN):
            continue
        seconds = sum(r["seconds"] for r in chain)
        rows.append({"stage": "table chain (labels → cell assignment)", "size": n, "seconds": seconds,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in chain), "measured": True,
                     "note": f"sum of the four stages, largest peak of them; {'within' if seconds <= 900 else 'over'}"
                             f" the 15 min goal; catalog generation (synthetic input) not counted"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    ap.add_argument("--only", default="", help="comma-separated section names (dedup, labels, catalog, ...)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per section before it is killed")
    ap.add_argument("--out", default=str(BENCH / "results" / "scale.md"))
    ap.add_argument("--stages", default="", choices=["", "tables"],
                    help="tables: the table chain (catalog → labels → splits → geocells → cell assignment, and the "
                         "pre-issue-26 outputs compared up to 1 M), appended to --out as a dated section")
    ap.add_argument("--folder", default=None, help="--stages tables: keep the files here (a catalog there is reused)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    if args.stages == "tables":
        rows = run_tables(args.sizes, args.timeout, args.folder)
    for script in [] if args.stages else sections(only):
        rows.extend(run_section(script, args.sizes, args.quick, args.timeout))
    body = table(rows)
    header = (f"Scale bench, {started}: {len(os.sched_getaffinity(0))} cores, load average {load_before:.1f} before "
              f"and {os.getloadavg()[0]:.1f} after (other work slows every figure); sizes {args.sizes}"
              f"{' (--quick)' if args.quick else ''}. Each section ran in its own process; peak RSS is its own.")
    text = f"{header}\n\n{body}\n"
    if args.stages == "tables":  # a dated section after the ones already there
        text = (f"## Table chain (`bench_scale.py --stages tables`), {started}\n\n{header} Disk free at the start: "
                f"{shutil.disk_usage(tempfile.gettempdir()).free / 1e9:.0f} GB in {tempfile.gettempdir()}.\n\n{body}\n")
    print(text)
    sys.path.insert(0, str(REPO))
    from pipeline.core.store import atomic_write_bytes

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.stages and out.exists():
        text = out.read_text().rstrip("\n") + "\n\n" + text
    atomic_write_bytes(out, text.encode())
    print(f"written to {out}", file=sys.stderr)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
