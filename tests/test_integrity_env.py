"""Issue 12 item 3: environment settings are read when a run starts, not when the code location loads."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from pipeline.defs.crawl import FlickrResource, GooglePlacesResource, crawl_resources
from pipeline.defs.resources import DataRootResource
from tests.conftest import gps_exif, jpeg_bytes
from tests.crawl_support import GOOGLE_KEY

ENV_VARS = ("GEOPAK_DATA_ROOT", "GEOPAK_BOUNDARIES", "GEOPAK_KOPPEN_TIFF", "GEOPAK_LOCAL_FOLDER",
            "GEOPAK_LOCAL_MANIFEST", "GEOPAK_LOCAL_COPY", "GEOPAK_GOOGLE_PLACES_ENABLED", "GOOGLE_MAPS_API_KEY")


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_code_location_loaded_without_env_uses_env_set_before_the_run(clean_env, tmp_path, boundaries_path):
    """Load Definitions with nothing set, then set data root, local folder, copy flag and boundaries: all apply."""
    import pipeline.definitions

    defs = importlib.reload(pipeline.definitions).defs  # the code location loads now, with the variables unset
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "lahore.jpg").write_bytes(jpeg_bytes(exif=gps_exif(31.5497, 74.3436)))
    root = tmp_path / "root"
    clean_env.setenv("GEOPAK_DATA_ROOT", str(root))
    clean_env.setenv("GEOPAK_LOCAL_FOLDER", str(folder))
    clean_env.setenv("GEOPAK_LOCAL_COPY", "0")
    clean_env.setenv("GEOPAK_BOUNDARIES", str(boundaries_path))

    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(asset_selection=[dg.AssetKey("local_images")], raise_on_error=False)

    assert result.success
    manifest = root / "raw" / "local" / "manifest.parquet"
    assert manifest.exists(), "GEOPAK_DATA_ROOT set after load was ignored"
    rows = pd.read_parquet(manifest)
    assert len(rows) == 1 and rows["source_id"].iloc[0].endswith("lahore.jpg"), "GEOPAK_LOCAL_FOLDER ignored"
    assert Path(rows["path"].iloc[0]).is_absolute(), "GEOPAK_LOCAL_COPY=0 ignored: the file was copied"


def test_configured_boundaries_env_set_after_load_is_used(clean_env, tmp_path):
    """GEOPAK_BOUNDARIES set after load names the file the run must read (unreadable: the run fails, no fallback)."""
    import pipeline.definitions

    defs = importlib.reload(pipeline.definitions).defs
    bad = tmp_path / "provinces.geojson"
    bad.write_text("not json")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "lahore.jpg").write_bytes(jpeg_bytes(exif=gps_exif(31.5497, 74.3436)))
    clean_env.setenv("GEOPAK_DATA_ROOT", str(tmp_path / "root"))
    clean_env.setenv("GEOPAK_LOCAL_FOLDER", str(folder))
    clean_env.setenv("GEOPAK_BOUNDARIES", str(bad))
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(asset_selection=[dg.AssetKey("local_images")], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert str(bad) in str(failure.step_failure_data.error)


def _probe_run(resource: GooglePlacesResource) -> tuple[dg.ExecuteInProcessResult, str]:
    @dg.asset
    def probe(google_places: GooglePlacesResource) -> str:
        return google_places.skip_reason() or "runs"

    result = dg.materialize([probe], resources={"google_places": resource})
    return result, result.output_for_node("probe")


def test_google_places_opt_in_and_key_set_after_load_take_effect(clean_env):
    resource = crawl_resources()["google_places"]  # built (as at code-location load) with nothing set
    _, before = _probe_run(resource)
    assert "opt-in" in before
    clean_env.setenv("GEOPAK_GOOGLE_PLACES_ENABLED", "1")
    clean_env.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    result, after = _probe_run(resource)
    assert after == "runs"
    # the key was read at run start, not put into the run config (which the UI shows)
    assert GOOGLE_KEY not in json.dumps(result.dagster_run.run_config, default=str)
    assert GOOGLE_KEY not in repr(resource)


def test_explicit_field_wins_over_env(clean_env):
    clean_env.setenv("GEOPAK_GOOGLE_PLACES_ENABLED", "1")
    clean_env.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    explicit_off = GooglePlacesResource(enabled=False)
    assert "opt-in" in _probe_run(explicit_off)[1]


def test_run_config_naming_a_resource_keeps_its_environment_variables(clean_env, tmp_path):
    """Run config that sets one field of a resource (as the Launchpad does) rebuilds it from its config; the
    variables it reads at run start are the class's own, so they still apply (the data root once silently
    became the repository's data/)."""
    seen = {}

    @dg.asset
    def probe(data_root: DataRootResource, flickr: FlickrResource) -> None:
        seen["root"] = str(data_root.paths.root)
        seen["flickr_missing"] = flickr.missing()

    clean_env.setenv("GEOPAK_DATA_ROOT", str(tmp_path / "root"))
    clean_env.setenv("FLICKR_API_KEY", "k-not-shown")
    clean_env.setenv("FLICKR_API_SECRET", "s-not-shown")
    result = dg.materialize(
        [probe], resources={"data_root": DataRootResource(), "flickr": FlickrResource()},
        run_config={"resources": {"data_root": {"config": {"stage_lock_wait_s": 5.0}},
                                  "flickr": {"config": {"rest_url": "http://127.0.0.1:9/"}}}},
    )
    assert result.success
    assert Path(seen["root"]) == tmp_path / "root"
    assert seen["flickr_missing"] is None
