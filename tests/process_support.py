"""Helpers for tests that kill real processes: poll with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core.processes import pid_running as running  # alive and not a zombie


def wait_until(cond: Callable[[], bool], deadline_s: float) -> bool:
    """True as soon as ``cond()`` holds; False if it still does not after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def live_processes(parent: int | None = None, group: int | None = None) -> list[int]:
    """Live processes (not zombies) whose parent is ``parent`` and/or whose process group is ``group``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z" and parent in (None, int(ppid)) and group in (None, int(pgrp)):
            found.append(int(stat.parent.name))
    return found


def described(pids: list[int]) -> str:
    """``pid: command line`` of each process, for a failure message."""
    lines = []
    for pid in pids:
        try:
            lines.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300])
        except OSError:
            lines.append(f"{pid}: (gone)")
    return "\n".join(lines)
