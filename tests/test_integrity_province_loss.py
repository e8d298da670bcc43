"""Issue 12 item 10: the filter's per-province loss check blocks only real losses (most of a meaningful number of
images); a small province losing its only image is a WARN, and the run goes on."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from pipeline.core.paths import DataPaths
from pipeline.defs import filtering
from pipeline.defs.resources import BoundariesResource, DataRootResource

LAHORE = (31.5497, 74.3436)  # Punjab
ISLAMABAD = (33.6844, 73.0479)  # ICT
CHECK = "filtered_nonempty_per_province"


def _points(where: tuple[float, float], n: int) -> list[tuple[float, float]]:
    return [(where[0] + 0.001 * i, where[1]) for i in range(n)]


def _run(root: Path, boundaries_path: Path, catalog: list, kept: list, **check_config) -> dg.ExecuteInProcessResult:
    """Stand-in filtered_catalog writes the two files the check compares; `downstream` shows whether it blocked."""
    paths = DataPaths.at(root)

    @dg.asset(key=filtering.filtered_catalog.key)
    def fake_filtered_catalog() -> None:
        for path, pts in ((paths.catalog, catalog), (paths.filtered, kept)):
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(pts, columns=["lat", "lon"], dtype=float).to_parquet(path)

    @dg.asset(deps=[filtering.filtered_catalog.key])
    def downstream() -> None:
        return None

    check_op = f"{filtering.filtered_catalog.key.path[-1]}_{CHECK}"
    return dg.materialize(
        [fake_filtered_catalog, downstream, filtering.filtered_nonempty_per_province],
        resources={"data_root": DataRootResource(path=str(root)),
                   "boundaries": BoundariesResource(source=str(boundaries_path))},
        run_config={"ops": {check_op: {"config": check_config}}} if check_config else None,
        raise_on_error=False,
    )


def _evaluation(result: dg.ExecuteInProcessResult):
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == CHECK)


def _downstream_ran(result: dg.ExecuteInProcessResult) -> bool:
    return bool(result.asset_materializations_for_node("downstream"))


def test_small_province_losing_its_only_image_warns_and_does_not_block(tmp_path, boundaries_path):
    punjab = _points(LAHORE, 30)
    result = _run(tmp_path, boundaries_path, catalog=punjab + _points(ISLAMABAD, 1), kept=punjab)
    ev = _evaluation(result)
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.WARN
    assert ev.metadata["warned_losses"].value == "ict" and ev.metadata["blocking_losses"].value == "none"
    assert result.success and _downstream_ran(result)


def test_province_losing_most_of_many_images_blocks(tmp_path, boundaries_path):
    punjab = _points(LAHORE, 30)
    result = _run(tmp_path, boundaries_path, catalog=punjab, kept=punjab[:10])  # 20 of 30 lost
    ev = _evaluation(result)
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
    assert ev.metadata["blocking_losses"].value == "punjab"
    assert not _downstream_ran(result)


def test_moderate_loss_passes(tmp_path, boundaries_path):
    punjab = _points(LAHORE, 30)
    result = _run(tmp_path, boundaries_path, catalog=punjab, kept=punjab[:20])  # a third lost
    assert _evaluation(result).passed and _downstream_ran(result)


def test_thresholds_are_config(tmp_path, boundaries_path):
    """The same 20-of-30 loss only warns when a meaningful number is set above 30."""
    punjab = _points(LAHORE, 30)
    result = _run(tmp_path, boundaries_path, catalog=punjab, kept=punjab[:10], min_images=40)
    ev = _evaluation(result)
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.WARN and _downstream_ran(result)
