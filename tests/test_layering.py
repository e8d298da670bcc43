"""geopak_model depends on the kernel only: no module of it imports ``pipeline.*`` outside ``pipeline.core``
(issue 25), so the model can be trained and served without the stage packages (sources, filters, labels, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "geopak_model"


def pipeline_imports_outside_core(source: str) -> list[tuple[int, str]]:
    """(line, module) of every ``pipeline`` import outside ``pipeline.core``, top-level or inside functions."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "pipeline" else [f"pipeline.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if (name == "pipeline" or name.startswith("pipeline.")) and not (
                    name == "pipeline.core" or name.startswith("pipeline.core.")):
                bad.append((node.lineno, name))
    return bad


@pytest.mark.parametrize("source, expected", [
    ("from pipeline.core.store import atomic_path", []),
    ("import pipeline.core.shards as s", []),
    ("from pipeline.core import reasons", []),
    ("from pipeline.labels.koppen import KOPPEN_CODES", [(1, "pipeline.labels.koppen")]),
    ("def f():\n    import pipeline.filters.decode", [(2, "pipeline.filters.decode")]),
    ("from pipeline import labels", [(1, "pipeline.labels")]),
    ("from pipeline_extra import x\nfrom . import data", []),
])
def test_checker_flags_exactly_the_stage_imports(source, expected):
    assert pipeline_imports_outside_core(source) == expected


def test_geopak_model_imports_only_the_kernel():
    modules = sorted(MODEL_DIR.rglob("*.py"))
    assert len(modules) > 10, f"found only {len(modules)} modules under {MODEL_DIR}"
    offences = [f"{p.relative_to(MODEL_DIR.parent)}:{line}: {name}" for p in modules
                for line, name in pipeline_imports_outside_core(p.read_text(encoding="utf-8"))]
    assert not offences, "geopak_model imports pipeline outside pipeline.core:\n" + "\n".join(offences)
