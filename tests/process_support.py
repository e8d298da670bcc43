"""Helpers for tests that kill real processes: poll with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.core.processes import pid_running as running  # alive and not a zombie


def wait_until(cond: Callable[[], bool], deadline_s: float) -> bool:
    """True as soon as ``cond()`` holds; False if it still does not after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()
