"""Issue 16 item 3: GEOPAK_GOOGLE_PLACES_ENABLED=1 opts in whatever the run config says about the resource.

Run config that names ``google_places`` makes Dagster rebuild the resource from its class defaults; the instance's
``env`` map (which names the opt-in and key variables) used to be lost that way, so the crawl was skipped while the
warning asked for the variable that was set. Checked with the code location's own resources, through ``materialize``
and through ``crawl_job`` with the YAML document ``dagster job execute -c`` takes."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from tests.crawl_support import GOOGLE_KEY, few_places, places_expected
from geopak_testkit.fake_apis import FakeServer, places_routes

from pipeline.defs.crawl import CRAWL_ASSETS, GooglePlacesResource, crawl_resources, google_places_photos
from pipeline.defs.jobs import CRAWL_JOB
from pipeline.defs.resources import default_resources

OTHER_SOURCES = ("FLICKR_API_KEY", "FLICKR_API_SECRET", "GEOPAK_YFCC100M_METADATA", "GEOPAK_GLDV2_TRAIN_CSV",
                 "GEOPAK_GLDV2_CATEGORIES_CSV", "GEOPAK_LOCAL_FOLDER", "GEOPAK_LOCAL_MANIFEST")


@pytest.fixture
def opted_in(monkeypatch, tmp_path, boundaries_path):
    for var in OTHER_SOURCES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GEOPAK_GOOGLE_PLACES_ENABLED", "1")
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    monkeypatch.setenv("GEOPAK_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("GEOPAK_BOUNDARIES", str(boundaries_path))
    return monkeypatch


def _status(result: dg.ExecuteInProcessResult) -> tuple[str, dict]:
    md = result.asset_materializations_for_node("google_places_photos")[0].metadata
    return md["status"].value, md


def _crawled(result: dg.ExecuteInProcessResult) -> int:
    status, md = _status(result)
    assert status == "crawled", md.get("reason")
    return md["images"].value


def _places_config(url: str) -> str:
    # only the endpoint (and test pacing) under google_places: nothing about the opt-in, the key or ``env``
    return f"""
resources:
  google_places:
    config:
      api: legacy
      base_url: "{url}"
      queries_per_second: 1000
      page_token_delay_s: 0.01
"""


def test_env_opt_in_holds_with_run_config_naming_the_resource(opted_in, boundaries):
    places = few_places()
    with FakeServer() as srv:
        places_routes(srv, places, GOOGLE_KEY)
        resources = {**default_resources(), **crawl_resources()}
        only_base_url = {"resources": {"google_places": {"config": {"api": "legacy", "base_url": srv.url}}}}
        result = dg.materialize([google_places_photos], resources=resources, partition_key="ict",
                                run_config=only_base_url)
        assert result.success
        assert _crawled(result) == len(places_expected(places, boundaries))
        assert len(srv.requests("/maps/api/place/nearbysearch/json")) > 0
    assert GOOGLE_KEY not in str(result.dagster_run.run_config)


def test_env_opt_in_holds_in_crawl_job_with_a_yaml_run_config(opted_in, boundaries):
    from pipeline.definitions import defs

    places = few_places(n=5)
    with FakeServer() as srv:
        places_routes(srv, places, GOOGLE_KEY)
        run_config = yaml.safe_load(_places_config(srv.url))
        result = defs.resolve_job_def(CRAWL_JOB).execute_in_process(run_config=run_config, partition_key="ict")
        assert result.success
        assert _crawled(result) == len(places_expected(places, boundaries))


@pytest.mark.parametrize("config", [
    {},  # a run config that names the resource but sets nothing still reads the opt-in and the key
    {"api": "new"},
    {"base_url": "http://127.0.0.1:9", "tile_deg": 0.3},
])
def test_opt_in_and_key_come_from_the_environment_under_any_run_config(opted_in, config):
    @dg.asset
    def probe(google_places: GooglePlacesResource) -> str:
        return google_places.skip_reason() or "runs"

    result = dg.materialize([probe], resources={"google_places": crawl_resources()["google_places"]},
                            run_config={"resources": {"google_places": {"config": config}}})
    assert result.output_for_node("probe") == "runs"
    opted_in.setenv("GEOPAK_GOOGLE_PLACES_ENABLED", "0")
    result = dg.materialize([probe], resources={"google_places": crawl_resources()["google_places"]},
                            run_config={"resources": {"google_places": {"config": config}}})
    assert "opt-in" in result.output_for_node("probe")


def test_explicit_enabled_false_in_run_config_still_wins(opted_in):
    @dg.asset
    def probe(google_places: GooglePlacesResource) -> str:
        return google_places.skip_reason() or "runs"

    result = dg.materialize([probe], resources={"google_places": crawl_resources()["google_places"]},
                            run_config={"resources": {"google_places": {"config": {"enabled": False}}}})
    assert "opt-in" in result.output_for_node("probe")


def test_crawl_assets_still_skip_without_the_opt_in(opted_in, tmp_path):
    opted_in.delenv("GEOPAK_GOOGLE_PLACES_ENABLED")
    resources = {**default_resources(), **crawl_resources()}
    result = dg.materialize(CRAWL_ASSETS, resources=resources, partition_key="ict",
                            run_config={"resources": {"google_places": {"config": {"base_url": "http://127.0.0.1:9"}}}})
    assert result.success
    status, md = _status(result)
    assert status == "skipped" and "GEOPAK_GOOGLE_PLACES_ENABLED" in md["reason"].value
