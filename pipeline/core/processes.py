"""Process hygiene: no process of a run outlives its launcher, and one piece of work runs in one process at a time.

Killing ``dagster job execute`` (SIGKILL, a closed terminal, an OOM kill) does not kill the processes it started:
Dagster's multiprocess executor runs each step in a spawned child, and spawned pool workers block forever on their
task queue. Such orphans went on crawling and raced the rerun. So:

* ``exit_with_parent`` starts a watchdog thread in a spawned child that ends the process within ``poll_s`` of its
  parent's death (the parent is gone when this process is re-parented). ``run_crawl`` and the metrics pool call it
  in Dagster step processes; ``spawn_pool`` workers call it at start-up. It does nothing in a process that was not
  started by ``multiprocessing`` (the launcher itself, an in-process run, a test), unless given a pid to watch.
  Everything a run writes is atomic (SQLite transactions, temp file + rename), so ending at any instant is safe.
  A launched program (the trainer) opts in through ``EXIT_WITH_PARENT_ENV`` and ``exit_with_parent_if_asked``.
* ``exclusive_lock`` holds an OS file lock (``flock``) for the duration of a piece of work; a second process waits a
  little (an orphan being reaped releases it) and then fails naming the holder's pid. The OS releases the lock when
  its holder dies, so a killed run never leaves it behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_watch_guard = threading.Lock()
_watched_pid: int | None = None
# set to "1" by a step that launches a program (the trainer): that program then never outlives its launcher
EXIT_WITH_PARENT_ENV = "GEOPAK_EXIT_WITH_PARENT"


def launcher_pid() -> int | None:
    """The pid of the process that started this one through ``multiprocessing`` (Dagster's step launcher, a pool's
    owner); None when this process was not started that way."""
    parent = mp.parent_process()
    return parent.pid if parent is not None else None


def _die(parent_pid: int) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(f"geopak: process {parent_pid}, which started process {os.getpid()}, is gone: "
                         f"stopping {os.getpid()} so it does not outlive its run\n")
        sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    _die(parent_pid)


def exit_with_parent(parent_pid: int | None = None, poll_s: float = 0.2) -> int | None:
    """End this process (SIGKILL) within about ``poll_s`` once ``parent_pid`` is no longer its parent.

    ``parent_pid`` defaults to the ``multiprocessing`` parent; returns the pid watched, or None when there is none
    (then nothing is started). Idempotent: one watchdog thread per process."""
    global _watched_pid
    pid = parent_pid if parent_pid is not None else launcher_pid()
    if pid is None:
        return None
    with _watch_guard:
        if _watched_pid is not None:
            return _watched_pid
        if os.getppid() != pid:  # the parent died before we got here
            _die(pid)
        threading.Thread(target=_watch, args=(pid, poll_s), name="geopak-parent-watchdog", daemon=True).start()
        _watched_pid = pid
    return pid


def exit_with_parent_if_asked() -> int | None:
    """Watch this process's parent (``exit_with_parent``) when the launcher set ``EXIT_WITH_PARENT_ENV``; the pid
    watched, or None."""
    if os.environ.get(EXIT_WITH_PARENT_ENV) == "1":
        return exit_with_parent(os.getppid())
    return None


def _init_pool_worker(parent_pid: int) -> None:
    exit_with_parent(parent_pid)


def spawn_pool(max_workers: int) -> ProcessPoolExecutor:
    """A process pool of spawned workers that exit when the process that made the pool dies (a plain pool's idle
    workers wait on their task queue forever, and keep multiprocessing's resource tracker alive with them)."""
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_pool_worker, initargs=(os.getpid(),))


def stop_pool(pool: ProcessPoolExecutor, grace_s: float = 10.0) -> bool:
    """Shut ``pool`` down and wait for its workers, at most ``grace_s``; then terminate the ones left. True when
    every worker exited by itself.

    Never leave a pool with ``shutdown(wait=False)`` in a ``multiprocessing`` child (a Dagster step): such a
    process's exit path (``multiprocessing.process._bootstrap`` → ``util._exit_function``) runs the queue finalizers
    and then joins every non-daemon child *before* ``threading._shutdown`` would join the executor's manager thread.
    The call queue's feeder thread is told to close first, the manager's shutdown sentinel lands in the buffer after
    that close marker and is never written, and the idle worker waits on its task pipe forever while the step
    process waits for it: the filter's exit hang (issue 21). Waiting here, while the feeder still runs, delivers
    the sentinels; the bound keeps a stuck worker from holding the run.
    """
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown() forgets both: keep them first
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if manager is not None:
        manager.join(grace_s)
    deadline = time.monotonic() + (0.0 if manager is not None else grace_s)
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
    left = [proc for proc in workers if proc.is_alive()]
    for proc in left:
        sys.stderr.write(f"geopak: pool worker {proc.pid} did not exit within {grace_s:g} s of its pool's shutdown; "
                         "terminating it\n")
        proc.terminate()
    for proc in left:
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
    if manager is not None:
        manager.join(5.0)  # its workers are gone: it finishes at once
    return not left


def wait_limit(raw: str | None, setting: str, default: float) -> float:
    """A wait's limit in seconds from a setting's text (``setting`` names it in the error); empty or unset:
    ``default``. 0 means no limit; anything but a number ≥ 0 is refused rather than read as "wait forever"."""
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise ValueError(f"{setting} must be a number of seconds ≥ 0 (0: no limit), not {raw!r}")
    return value


SQLITE_BUSY_S = 60.0  # how long a SQLite write waits for another process's write (sqlite3.connect's timeout)


def begin_immediate(con: sqlite3.Connection, what: str) -> None:
    """``BEGIN IMMEDIATE`` on ``con`` (opened with ``timeout=SQLITE_BUSY_S``); a database another process still
    holds after that wait raises an error naming the file and ``what`` waited, instead of "database is locked"."""
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        files = [row[2] for row in con.execute("PRAGMA database_list") if row[2]]
        path = files[0] if files else "(in memory)"
        raise sqlite3.OperationalError(
            f"{what}: {path} stayed locked by another process's write for {SQLITE_BUSY_S:g} s ({exc}). A process "
            f"stuck mid-write holds it: find it with `fuser {path}`, stop it and run again") from exc


# A short id of this host: a pid means nothing on another machine sharing the data root (shared storage, k8s pods)
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# another host's unfinished file is removed once this old (its writer finishes or dies long before)
FOREIGN_WRITER_STALE_S = 24 * 3600.0


def writer_tag() -> str:
    """``<pid>_<host>``: who is writing a temp or uncommitted file, put in its name (see ``writer_gone``)."""
    return f"{os.getpid()}_{HOST_TAG}"


def writer_gone(tag: str, path: Path) -> bool:
    """Whether the writer named by ``tag`` (``writer_tag``; a bare pid from before hosts were recorded counts as this
    host's) can no longer finish ``path``: its pid is checked on its own host only; another host's file is judged
    by age (``FOREIGN_WRITER_STALE_S``). A file that vanished meanwhile is not ours to remove."""
    pid, _, host = tag.partition("_")
    if host in ("", HOST_TAG):
        return not (pid.isdigit() and pid_running(int(pid)))
    try:
        return time.time() - path.stat().st_mtime > FOREIGN_WRITER_STALE_S
    except FileNotFoundError:
        return False


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (an exited one awaiting its reaper, a zombie, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 succeeded
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_started_at(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch, about 1 s precision), from /proc; None where unknown. Tells a
    recycled pid from the process that once had it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class LockHeldError(RuntimeError):
    """Another live process holds the lock; the message names its pid."""

    def __init__(self, what: str, path: Path, holder: str):
        self.what, self.path, self.holder = what, path, holder
        super().__init__(f"{what} is already running in process {holder or '(unknown pid)'} (lock {path}); wait "
                         f"for it to finish or stop that process, then run again")

    def __reduce__(self) -> tuple[type, tuple[str, Path, str]]:
        return LockHeldError, (self.what, self.path, self.holder)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    return ""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str, wait_s: float = 30.0, poll_s: float = 0.1,
                   holder: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block.

    If another process holds it, wait up to ``wait_s`` (a killed run's orphan may still be on its way out), then
    raise ``LockHeldError`` naming the holder. The lock file's content is ``holder`` (default: this pid), e.g.
    ``"4242 (run 1f0c...)"`` so the error names the Dagster run that holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeldError(what, path, _holder(fd)) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder or os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
