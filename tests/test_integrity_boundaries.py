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


def _label(root: Path, boundaries: BoundariesResource, **kw) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [labels.labelled_catalog, *dg.load_asset_checks_from_modules([labels])],
        resources=asset_resources(root, "unused", boundaries=boundaries), raise_on_error=False, **kw,
    )


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
    assert md["province_fallback"].value is True
    assert str(missing) in md["province_fallback_reason"].value
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    warn = checks["labelled_provinces_from_polygons"]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN


def test_polygons_in_use_pass_the_fallback_check(tmp_path, boundaries_path):
    _filtered_catalog(tmp_path)
    result = _label(tmp_path, BoundariesResource(source=str(boundaries_path)))
    assert result.success
    md = result.asset_materializations_for_node("labelled_catalog")[0].metadata
    assert md["province_fallback"].value is False
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()}["labelled_provinces_from_polygons"]


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
    assert len(calls) == 1, calls  # the asset and labelled_inside_pakistan share one load


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
