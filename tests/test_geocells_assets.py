"""materialize() of sample world → labels → splits → geocells → cell assignments, with the blocking checks."""

from __future__ import annotations

import dagster as dg
import geopandas as gpd
import pandas as pd
import pytest

from pipeline.core.paths import DataPaths
from pipeline.defs import filtering, geocells, ingest, labels
from tests.conftest import asset_resources


@pytest.fixture(scope="module")
def run(tmp_path_factory, boundaries_path):
    root = tmp_path_factory.mktemp("data")
    modules = [ingest, filtering, labels, geocells]
    result = dg.materialize(
        [*dg.load_assets_from_modules(modules), *dg.load_asset_checks_from_modules(modules)],
        resources=asset_resources(root, boundaries_path),
        run_config={"ops": {
            "sample_world_images": {"config": {"n_images": 160, "image_size": 128, "workers": 1}},
            "dataset_splits": {"config": {"seed": 3}},
            "geocells": {"config": {"urban_cap_km": 4.0, "neighbours": 4}},
        }},
    )
    return result, DataPaths.at(root)


def test_materialize_with_blocking_checks(run):
    result, _ = run
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert {"dataset_splits_no_leak", "geocells_within_cap", "cell_assignments_complete"} <= set(checks)
    assert all(checks.values())


def test_files_have_the_columns_the_model_reads(run):
    _, paths = run
    labelled = pd.read_parquet(paths.labelled)
    cells = pd.read_parquet(paths.geocells)
    assert list(cells.columns) == ["cell_id", "province_id", "local_id", "center_lat", "center_lon", "radius_km",
                                   "count", "cap_km", "urban"]
    assert set(cells["cap_km"]) <= {4.0, 50.0}  # the run config reached the fitting
    assert list(pd.read_parquet(paths.geocell_neighbours).columns) == ["cell_id", "neighbour_id", "distance_km"]
    assign = pd.read_parquet(paths.cell_assignments)
    assert list(assign.columns) == ["image_id", "cell_id", "province_id", "distance_km"]
    splits = pd.read_parquet(paths.splits)
    assert list(splits.columns) == ["image_id", "split", "group_id"]
    assert set(assign["image_id"]) == set(labelled["image_id"]) == set(splits["image_id"])
    assert set(splits["split"]) <= {"train", "val", "test", "buffer"} and (splits["split"] == "val").any()
    # cells are fitted on train only: member counts add up to the training images
    assert cells["count"].sum() == (splits["split"] == "train").sum()
    polys = gpd.read_parquet(paths.geocell_polygons)
    assert polys.crs.to_epsg() == 4326 and len(polys) == len(cells) and polys.is_valid.all()


def test_metadata_tables_and_maps(run):
    result, paths = run
    md = result.asset_materializations_for_node("dataset_splits")[0].metadata
    assert md["leaks_within_km"].value == 0
    assert "random per-image split" in md["leakage"].value
    assert "| province |" in md["per_province"].value
    cells_md = result.asset_materializations_for_node("geocells")[0].metadata
    assert "max_radius_km" in cells_md["per_province"].value and cells_md["cells_over_cap"].value == 0
    for name in ("dataset_splits_map.png", "geocells_map.png"):
        assert paths.report(name).stat().st_size > 5000
    assert "geocells_map.preview.png" in cells_md["map"].value
