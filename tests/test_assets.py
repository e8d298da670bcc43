"""materialize() tests of the source → catalog → filter → labels assets on a small sample world."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.schema import CATALOG_SCHEMA, LABELLED_SCHEMA, read_table
from tests.conftest import asset_resources
from pipeline.defs import filtering, ingest, labels
from pipeline.defs.metadata import metadata_text


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, boundaries_path):
    root = tmp_path_factory.mktemp("data")
    resources = asset_resources(root, boundaries_path)
    assets = dg.load_assets_from_modules([ingest, filtering, labels])
    checks = dg.load_asset_checks_from_modules([ingest, filtering, labels])
    result = dg.materialize(
        [*assets, *checks],
        resources=resources,
        run_config={"ops": {"sample_world_images": {"config": {"n_images": 160, "image_size": 160,
                                                                "defect_fraction": 0.1}}},
                    "resources": {"compute": {"config": {"workers": 1}}}},
    )
    return result, DataPaths.at(root)


def test_materialize_succeeds_with_checks(small_world):
    result, _ = small_world
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == {
        "image_catalog_unique_ids", "labelled_inside_pakistan", "labelled_koppen_not_null",
        "filtered_nonempty_per_province", "filtered_disjoint_from_rejections", "filter_rejections_have_reasons",
        "labelled_provinces_from_polygons", "indoor_filter_evaluated",
    }
    # offline there are no CLIP weights: the indoor filter is skipped and its WARN check says so
    assert all(e.passed != (e.check_name == "indoor_filter_evaluated") for e in evaluations)


def test_files_and_metadata(small_world):
    result, paths = small_world
    catalog = read_table(paths.catalog, CATALOG_SCHEMA)
    labelled = read_table(paths.labelled, LABELLED_SCHEMA)
    truth = pd.read_parquet(paths.sample_world_truth)
    assert 0 < len(labelled) <= len(catalog) < 160
    assert catalog["image_id"].is_unique
    # every planned good image is labelled with the province it was placed in
    good = truth[truth["defect"] == ""].merge(labelled, on="image_id", suffixes=("_plan", ""))
    assert len(good) == (truth["defect"] == "").sum()
    assert (good["province_key_plan"] == good["province_key"]).all()
    rejected = pd.concat([pd.read_parquet(p) for p in (paths.catalog_rejections, paths.filter_rejections,
                                                       paths.label_rejections)])
    assert {reasons.NO_COORDINATES, reasons.NOT_AN_IMAGE, reasons.OUTSIDE_PAKISTAN} <= set(rejected["reason"])
    # no silent loss: each manifest row is catalogued or rejected
    manifest = pd.read_parquet(paths.raw_manifest("sample_world"))
    assert len(manifest) == len(catalog) + (rejected["stage"] == "catalog").sum()
    md = result.asset_materializations_for_node("labelled_catalog")[0].metadata
    assert md["rows"].value == len(labelled)
    assert "| province key |" in metadata_text(md["rows_per_province_source"])
    assert ".preview.png" in md["map"].value  # a served preview, shown inline
    assert paths.report("labelled_catalog_map.png").stat().st_size > 1000
