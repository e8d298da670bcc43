"""Soak test, second half: rounds ``soak_support.HALVES[1]`` of ``soak_support.ROUNDS`` (the catalog and the filter
multiprocess; the crawl, the filter again and the labels in process), each killed and run again and its tables
compared with an uninterrupted run's; the other five rounds are in ``test_soak_kill_rerun.py``."""

from __future__ import annotations

import pytest

from tests.soak_support import HALVES, run_soak


@pytest.mark.slow  # 11 launches of a real four-step job: minutes (make test-fast skips it; CI runs it)
def test_other_rounds_killed_rerun_to_the_same_tables_leaving_nothing_behind(tmp_path, boundaries_path):
    run_soak(tmp_path, boundaries_path, HALVES[1])
