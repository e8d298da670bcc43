"""No process of a run outlives its launcher; a finished crawl item stays finished; one crawler per partition
(issue 12.4).

The kill tests start a real launcher (``python -c``) that spawns a step process the way Dagster's multiprocess
executor does (``multiprocessing`` spawn), let the step start its work (a crawl that never ends, or the filter's
metrics pool), SIGKILL the launcher and require every process it started to be gone within a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from tests.process_support import running, wait_until
from tests.crawl_support import fast_http

from pipeline.core.paths import DataPaths
from pipeline.core.processes import LockHeldError
from pipeline.core.store import ImageStore
from pipeline.sources.crawl import CrawlContext, Source, run_crawl
from pipeline.sources.crawl_state import DONE, FAILED, PENDING, CrawlState
from pipeline.sources.downloads import Fetched
from pipeline.sources.http import HttpStats

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 20.0  # generous for a loaded machine; the watchdog acts within about 0.2 s

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")

LAUNCHER = """
import multiprocessing as mp, sys, time
import tests.test_integrity_processes as t
if __name__ == "__main__":
    step = mp.get_context("spawn").Process(target=getattr(t, sys.argv[1]), args=tuple(sys.argv[2:]))
    step.start()
    print(step.pid, flush=True)
    time.sleep(600)
"""


# --------------------------------------------------------------------------- what the spawned step processes run
class EndlessSource(Source):
    """A source whose discovery never ends (a long crawl); it says when it has started."""

    name = "endless"

    def __init__(self, ready: Path | None = None):
        self.ready = ready

    def params(self) -> dict:
        return {}

    def discover(self, ctx: CrawlContext) -> None:
        if self.ready is not None:
            self.ready.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)

    def judge(self, records: list[dict], ctx: CrawlContext) -> list[str | None]:
        return [None] * len(records)

    def fetcher(self, record: dict) -> Callable[[], Fetched]:
        raise NotImplementedError

    def manifest_row(self, record: dict) -> dict:
        return {}


class EmptySource(EndlessSource):
    """Same name and state as ``EndlessSource``, but finds nothing and ends at once."""

    def discover(self, ctx: CrawlContext) -> None:
        return None


def _crawl(root: Path, boundaries_path: str, source: Source, lock_wait_s: float = 30.0) -> None:
    from pipeline.labels.boundaries import ProvinceBoundaries

    http = fast_http()
    run_crawl(source, "sindh", DataPaths.at(root), ImageStore(root), ProvinceBoundaries.load(boundaries_path), http,
              HttpStats(), log=lambda m: None, lock_wait_s=lock_wait_s)


def crawl_step(root: str, boundaries_path: str) -> None:
    _crawl(Path(root), boundaries_path, EndlessSource(Path(root) / "ready"))


def measure_step(image: str) -> None:
    """The filter's metrics over many copies of one image: minutes of work, in this process and a pool worker."""
    from pipeline.filters.metrics import MetricsParams, measure_many

    measure_many([(str(i), image) for i in range(200_000)], MetricsParams(), workers=2, min_pool_items=0)


# ------------------------------------------------------------------------------------------------------ helpers
def _ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    ppids = _ppids()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in ppids.items() if pp in frontier} - found
        found |= frontier
    return found


@pytest.fixture
def launch() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start launchers in their own process group; whatever of a group survives the test is killed."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def _kill_launcher_and_wait(proc: subprocess.Popen, tree: set[int]) -> set[int]:
    """SIGKILL the launcher; return the processes it started that are still running after the deadline."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _wait(lambda: not any(running(p) for p in tree))
    return {p for p in tree if running(p)}


# -------------------------------------------------------------------------------------------------------- tests
def test_crawl_step_stops_when_its_launcher_is_killed(tmp_path, boundaries_path, launch):
    proc = launch("crawl_step", str(tmp_path), str(boundaries_path))
    assert _wait(lambda: (tmp_path / "ready").exists() or proc.poll() is not None), "the crawl never started"
    assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
    step = int((tmp_path / "ready").read_text())
    tree = _descendants(proc.pid)
    assert step in tree
    left = _kill_launcher_and_wait(proc, tree)
    assert not left, f"processes of the killed run still running: {sorted(left)} (crawl step {step})"


def test_filter_step_pool_and_tracker_stop_when_the_launcher_is_killed(tmp_path, launch):
    image = tmp_path / "img.jpg"
    image.write_bytes(jpeg_bytes((64, 64)))
    proc = launch("measure_step", str(image))
    step = int(proc.stdout.readline())  # type: ignore[union-attr]
    # the step's pool worker is up (a child of the step); the launcher's resource tracker is up too
    assert _wait(lambda: bool(_descendants(step)) or proc.poll() is not None), "no pool worker started"
    tree = _descendants(proc.pid)
    assert step in tree and len(tree) >= 3, f"expected step, pool worker and resource tracker, got {tree}"
    left = _kill_launcher_and_wait(proc, tree)
    assert not left, f"processes of the killed run still running: {sorted(left)} (filter step {step})"


def test_second_crawler_of_a_partition_fails_naming_the_holder(tmp_path, boundaries_path, boundaries, launch):
    """Two processes, one partition: the second fails at once (after its short wait) and names the first's pid;
    once the first is killed, the OS releases the lock and the partition can be crawled again."""
    proc = launch("crawl_step", str(tmp_path), str(boundaries_path))
    assert _wait(lambda: (tmp_path / "ready").exists() or proc.poll() is not None), "the crawl never started"
    holder = int((tmp_path / "ready").read_text())
    with pytest.raises(LockHeldError) as info:
        _crawl(tmp_path, str(boundaries_path), EmptySource(), lock_wait_s=0.3)
    assert str(holder) in str(info.value) and "endless/sindh" in str(info.value)
    os.kill(holder, signal.SIGKILL)
    assert _wait(lambda: not running(holder))
    _crawl(tmp_path, str(boundaries_path), EmptySource(), lock_wait_s=5.0)  # the dead holder's lock is gone


def test_a_finished_item_is_never_downgraded(tmp_path):
    """A late failure report (an orphan's, a duplicate download) must not undo a finished download."""
    with CrawlState(tmp_path / "state.sqlite") as st:
        st.complete_unit("u1", items=[("a", {"x": 1}), ("b", {"x": 2})])
        st.record_download("a", "img-a", "images/a.jpg", None, "", retry_later=False)
        st.record_download("a", None, None, "download_failed", "timeout", retry_later=True)
        st.record_download("a", None, None, "not_an_image", "", retry_later=False)
        st._con.execute("UPDATE items SET status = ? WHERE item_id = 'a'", (PENDING,))  # any writer, not just ours
        st.record_download("b", None, None, "download_failed", "timeout", retry_later=True)
        items = st.items().set_index("item_id")
        assert items.loc["a", "status"] == DONE and items.loc["a", "image_id"] == "img-a"
        assert items.loc["a", "path"] == "images/a.jpg"
        assert items.loc["b", "status"] == FAILED, "other items still move as before"
        assert [i for i, _ in st.pending_items()] == ["b"]


def test_lock_error_is_json_safe_and_picklable(tmp_path):
    """The error crosses the step-process boundary; its message stays readable."""
    import pickle

    err = pickle.loads(pickle.dumps(LockHeldError("the x/y crawl", tmp_path / "crawl.lock", "123")))
    assert "process 123" in str(err) and json.dumps(str(err))


def _wait(cond: Callable[[], bool], deadline_s: float = DEADLINE_S) -> bool:
    return wait_until(cond, deadline_s)
