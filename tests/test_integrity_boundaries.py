"""Issue 12 item 2: a configured boundary file is never silently replaced; the fallback is recorded and warned;
the locator is loaded once per run."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from pipeline.core.paths import DataPaths
from pipeline.core.schema import CATALOG_SCHEMA, write_table
from pipeline.defs import labels
from pipeline.defs.resources import BoundariesResource
from pipeline.labels import boundaries as boundaries_module
from tests.conftest import asset_resources

CITIES = [("lahore", 31.5497, 74.3436), ("karachi", 24.8607, 67.0011), ("islamabad", 33.6844, 73.0479)]


def _filtered_catalog(root: Path) -> None:
    """A three-row filtered catalog (big cities, so polygons and gazetteer agree) for labelled_catalog to read."""
    rows = [
        {"image_id": f"{i:064x}", "source": "test", "source_id": name, "source_url": None, "path": f"x/{name}.jpg",
         "lat": lat, "lon": lon, "geo_accuracy": 5.0, "taken_at": pd.Timestamp("2022-05-01 10:00", tz="UTC"),
         "owner": None, "license": "CC-BY-4.0", "title": None, "tags": None, "place_id": None,
         "width": 64, "height": 64}
        for i, (name, lat, lon) in enumerate(CITIES)
    ]
    write_table(pd.DataFrame(rows), DataPaths.at(root).filtered, CATALOG_SCHEMA)


@dg.asset(deps=[labels.labelled_catalog])
def downstream() -> None:
    """Stands for dataset_splits: whether it ran shows whether labelled_catalog's checks blocked."""


def _label(root: Path, boundaries: BoundariesResource, **kw) -> dg.ExecuteInProcessResult:
    """labelled_catalog (its checks run in its own step) and a downstream asset, in one run."""
    return dg.materialize(
        [labels.labelled_catalog, downstream],
        resources=asset_resources(root, "unused", boundaries=boundaries), raise_on_error=False, **kw,
    )


def _downstream_ran(result: dg.ExecuteInProcessResult) -> bool:
    return bool(result.asset_materializations_for_node("downstream"))


def test_configured_unreadable_boundary_file_fails_the_run(tmp_path):
    _filtered_catalog(tmp_path)
    bad = tmp_path / "provinces.geojson"
    bad.write_text("not json")
    result = _label(tmp_path, BoundariesResource(source=str(bad)))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = str(failure.step_failure_data.error)
    assert str(bad) in message and "could not be read" in message
    assert not DataPaths.at(tmp_path).labelled.exists()


def test_unconfigured_fallback_is_recorded_in_metadata_and_warned(tmp_path, monkeypatch):
    _filtered_catalog(tmp_path)
    missing = tmp_path / "shipped-file-gone.geojson"
    monkeypatch.setattr(boundaries_module, "default_boundaries_path", lambda: missing)
    result = _label(tmp_path, BoundariesResource())
    assert result.success  # a WARN check does not fail the run
    md = result.asset_materializations_for_node("labelled_catalog")[0].metadata
    assert md["province_fallback"].value == "yes"
    assert str(missing) in md["province_fallback_reason"].value.replace("\u200b", "")  # break points for the UI
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    warn = checks["labelled_provinces_from_polygons"]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert not warn.blocking and _downstream_ran(result)
    assert warn.metadata["province_fallback"].value is True and str(missing) in warn.metadata["reason"].value


def test_polygons_in_use_pass_the_fallback_check(tmp_path, boundaries_path):
    _filtered_catalog(tmp_path)
    result = _label(tmp_path, BoundariesResource(source=str(boundaries_path)))
    assert result.success
    md = result.asset_materializations_for_node("labelled_catalog")[0].metadata
    assert md["province_fallback"].value == "no"
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()}["labelled_provinces_from_polygons"]


def test_failing_blocking_check_stops_downstream(tmp_path, boundaries_path, monkeypatch):
    """The folded checks keep their blocking semantics: a failing ERROR check of labelled_catalog's step fails the
    step after the materialization is recorded, and the downstream asset of the same run does not run."""
    _filtered_catalog(tmp_path)
    real_check = labels.koppen_check

    def check_a_copy_missing_one_class(labelled: Path) -> dg.AssetCheckResult:
        df = pd.read_parquet(labelled)
        df.loc[0, "koppen_id"] = -1  # the real check's logic decides, on a copy with one class missing
        copy = tmp_path / "labelled_copy.parquet"
        df.to_parquet(copy)
        return real_check(copy)

    monkeypatch.setattr(labels, "koppen_check", check_a_copy_missing_one_class)
    result = _label(tmp_path, BoundariesResource(source=str(boundaries_path)))
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    failed = checks["labelled_koppen_not_null"]
    assert not failed.passed and failed.blocking and failed.severity == dg.AssetCheckSeverity.ERROR
    assert failed.metadata["missing"].value == 1 and failed.metadata["rows"].value == len(CITIES)
    assert checks["labelled_inside_pakistan"].passed and checks["labelled_provinces_from_polygons"].passed
    assert result.asset_materializations_for_node("labelled_catalog")  # recorded, as with a separate check op
    assert not _downstream_ran(result)
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "labelled_koppen_not_null" in str(failure.step_failure_data.error)


def test_locator_loaded_once_per_run(tmp_path, boundaries_path, monkeypatch):
    _filtered_catalog(tmp_path)
    calls: list[str] = []
    real_load = boundaries_module.ProvinceBoundaries.load.__func__

    def counting_load(cls, path_or_url=None):
        calls.append(str(path_or_url))
        return real_load(cls, path_or_url)

    monkeypatch.setattr(boundaries_module.ProvinceBoundaries, "load", classmethod(counting_load))
    result = _label(tmp_path, BoundariesResource(source=str(boundaries_path)))
    assert result.success
    assert len(calls) == 1, calls  # the asset and its labelled_inside_pakistan check share one load


def test_locator_reloads_when_the_file_changes(tmp_path, boundaries_path):
    """Cached by path, mtime and size: an edited file is read again, an unchanged one is not."""
    copy = tmp_path / "b.geojson"
    copy.write_bytes(Path(boundaries_path).read_bytes())
    resource = BoundariesResource(source=str(copy))
    first = resource.locator()
    assert resource.locator() is first
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert resource.locator() is not first


def test_load_province_locator_never_replaces_a_configured_file(tmp_path):
    with pytest.raises(boundaries_module.BoundaryFileError, match="missing.geojson"):
        boundaries_module.load_province_locator(tmp_path / "missing.geojson")
