"""Soak test, first half: rounds ``soak_support.HALVES[0]`` of ``soak_support.ROUNDS`` (start-up, the crawl and the
labels multiprocess, the catalog and the filter in process), each killed and run again and its tables compared with
an uninterrupted run's. The other five rounds are in ``test_soak_kill_rerun_b.py``, a file of their own so that
``--dist loadfile`` runs the halves on both workers; ``soak_support`` says what each round checks."""

from __future__ import annotations

import pytest

from tests.soak_support import HALVES, run_soak


@pytest.mark.slow  # 11 launches of a real four-step job: minutes (make test-fast skips it; CI runs it)
def test_killed_runs_rerun_to_the_same_tables_leaving_nothing_behind(tmp_path, boundaries_path):
    run_soak(tmp_path, boundaries_path, HALVES[0])
