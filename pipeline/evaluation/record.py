"""What an evaluation records about itself, so its numbers can be trusted and found again.

- ``code_commit``: the git commit (and whether the tree had uncommitted changes) the evaluation ran from;
- the **test ledger** (``<data root>/evaluation/ledger.jsonl``): one line per evaluation of a model (by the sha256
  of ``model.pt``) on a split (by a hash of its image ids) with its settings (by a hash). The test split is read
  to report a number, never to choose one: a second evaluation of the same model on the same test split with
  OTHER settings is refused unless forced, and a forced one is marked at the top of its report;
- ``latest_evaluation``: the newest ``evaluation.json`` under the evaluation folder (what ``geopak report`` prints).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.store import atomic_write_bytes, stable_hash

LEDGER_FILE = "ledger.jsonl"
RECORD_FILE = "evaluation.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


def code_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool}`` of the checkout this code runs from (tracked files only)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain",
                                                                      "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False}


@dataclass
class LedgerCheck:
    """The ledger's answer for one planned evaluation: ``allowed``; the earlier evaluations of the same model on
    the same split with the same settings (``repeats``) and with other settings (``conflicts``)."""

    allowed: bool
    repeats: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def message(self) -> str:
        first = self.conflicts[0]
        return (f"this model (sha256 {first['model_sha256'][:12]}…) was already evaluated on this {first['split']} "
                f"split with other settings ({len(self.conflicts)} time(s), first at {first['evaluated_at']}, "
                f"settings {first['settings']}); a second look at test with other settings makes its numbers a "
                "choice, not an estimate")


def _entries(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


def check_ledger(evaluation_dir: Path, model_sha256: str, split: str, split_hash: str, settings: dict[str, Any],
                 force: bool) -> LedgerCheck:
    """Whether this evaluation may run: always for a new model or split, or the same settings again (the same
    numbers); with other settings on a model's test split only when ``force``."""
    same = [e for e in _entries(evaluation_dir / LEDGER_FILE)
            if e["model_sha256"] == model_sha256 and e["split"] == split and e["split_hash"] == split_hash]
    key = stable_hash(settings)
    repeats = [e for e in same if e["settings_hash"] == key]
    conflicts = [e for e in same if e["settings_hash"] != key]
    return LedgerCheck(force or not conflicts or split != "test", repeats, conflicts)


def append_ledger(evaluation_dir: Path, entry: dict[str, Any]) -> None:
    """Add one evaluation to the ledger (rewritten whole, atomically: the evaluation pool has one writer)."""
    path = evaluation_dir / LEDGER_FILE
    lines = [json.dumps(e, sort_keys=True) for e in _entries(path)] + [json.dumps(entry, sort_keys=True)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def ledger_entry(model_sha256: str, split: str, split_hash: str, settings: dict[str, Any], run_id: str,
                 evaluated_at: str, forced: bool, out_dir: Path) -> dict[str, Any]:
    return {"model_sha256": model_sha256, "split": split, "split_hash": split_hash, "settings": settings,
            "settings_hash": stable_hash(settings), "run_id": run_id, "evaluated_at": evaluated_at,
            "forced": forced, "out_dir": str(out_dir)}


def latest_evaluation(evaluation_dir: Path, run_name: str | None = None) -> Path | None:
    """The folder of the newest evaluation (by its recorded time, then folder name), optionally of one run."""
    found = []
    for rec in evaluation_dir.glob(f"*/{RECORD_FILE}"):
        data = json.loads(rec.read_text())
        if run_name is None or data.get("run_name") == run_name:
            found.append((data.get("evaluated_at", ""), rec.parent.name, rec.parent))
    return max(found)[2] if found else None
