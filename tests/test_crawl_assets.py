"""The crawl assets in Dagster: skipped (never failed) when a source is off or unconfigured; materialized against
local fakes with keys from EnvVar; the catalog unions their manifests; no key value reaches the event log, the
metadata, the run config or any file."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from tests.crawl_support import FLICKR_KEY, FLICKR_SECRET, GOOGLE_KEY, flickr_photos, ict_places
from geopak_testkit.fake_apis import FakeServer, flickr_routes, places_routes

from pipeline.defs.crawl import (
    CRAWL_ASSETS,
    FlickrResource,
    Gldv2Resource,
    GooglePlacesResource,
    Yfcc100mResource,
    crawl_resources,
    google_places_photos,
)
from pipeline.defs.ingest import image_catalog
from pipeline.defs.jobs import CRAWL_JOB, MAIN_JOB, YFCC_DISCOVERY_JOB
from pipeline.defs.resources import BoundariesResource, DataRootResource
from pipeline.defs.metadata import metadata_text

FAST = dict(timeout_s=0.15, max_attempts=10, backoff_base_s=0.002, backoff_max_s=0.02, download_workers=4)


def _base(root: Path, boundaries_path: Path) -> dict:
    return {"data_root": DataRootResource(path=str(root)),
            "boundaries": BoundariesResource(source=str(boundaries_path))}


def test_unconfigured_sources_are_skipped_not_failed(tmp_path, boundaries_path, monkeypatch):
    for var in ("FLICKR_API_KEY", "FLICKR_API_SECRET", "GOOGLE_MAPS_API_KEY", "GEOPAK_GOOGLE_PLACES_ENABLED",
                "GEOPAK_YFCC100M_METADATA", "GEOPAK_GLDV2_TRAIN_CSV", "GEOPAK_GLDV2_CATEGORIES_CSV"):
        monkeypatch.delenv(var, raising=False)
    resources = {**_base(tmp_path, boundaries_path), **crawl_resources()}
    result = dg.materialize(CRAWL_ASSETS, resources=resources, partition_key="ict")
    assert result.success
    # materialized as skipped (so the partitions view says why), with nothing for the catalog to read
    events = result.get_asset_materialization_events()
    metadata = {e.asset_key.path[-1]: e.materialization.metadata for e in events}
    assert {m["status"].value for m in metadata.values()} == {"skipped"}
    assert all(m["dagster/row_count"].value == 0 and e.partition == "ict" for m, e in zip(metadata.values(), events))
    reasons = {name: m["reason"].value for name, m in metadata.items()}
    assert set(reasons) == {"flickr_photos", "google_places_photos", "yfcc100m_photos", "gldv2_photos"}
    assert "FLICKR_API_KEY" in reasons["flickr_photos"]
    assert "opt-in" in reasons["google_places_photos"] and "terms" in reasons["google_places_photos"]
    # with no crawl output at all the catalog still builds (it globs raw/**/manifest.parquet)
    cat = dg.materialize([image_catalog], resources=resources)
    assert cat.success
    assert cat.asset_materializations_for_node("image_catalog")[0].metadata["rows"].value == 0


def test_google_places_stays_off_unless_opted_in(monkeypatch):
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    monkeypatch.delenv("GEOPAK_GOOGLE_PLACES_ENABLED", raising=False)
    assert "opt-in" in crawl_resources()["google_places"].skip_reason()
    monkeypatch.setenv("GEOPAK_GOOGLE_PLACES_ENABLED", "1")
    assert crawl_resources()["google_places"].skip_reason() is None


def test_crawl_job_is_partitioned_and_separate_from_the_main_job():
    from pipeline.definitions import defs

    crawl = defs.resolve_job_def(CRAWL_JOB)
    assert crawl.partitions_def is not None
    assert set(crawl.partitions_def.get_partition_keys()) == {"sindh", "punjab", "kpk", "ict", "gb", "balochistan",
                                                               "ajk"}
    main_nodes = {n.name for n in defs.resolve_job_def(MAIN_JOB).nodes}
    assert not main_nodes & {a.key.path[-1] for a in CRAWL_ASSETS}
    # the unpartitioned YFCC100M discovery runs once in its own job, not once per province of a crawl backfill
    crawl_nodes = {n.name for n in crawl.nodes}
    assert "yfcc100m_candidates" not in crawl_nodes and "yfcc100m_photos" in crawl_nodes
    discovery = defs.resolve_job_def(YFCC_DISCOVERY_JOB)
    assert discovery.partitions_def is None and {n.name for n in discovery.nodes} == {"yfcc100m_candidates"}


def test_materialize_with_env_keys_leaks_no_secret(tmp_path, boundaries_path, monkeypatch):
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("FLICKR_API_SECRET", FLICKR_SECRET)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GOOGLE_KEY)
    root, home = tmp_path / "data", tmp_path / "dagster_home"
    home.mkdir()
    instance = dg.DagsterInstance.local_temp(str(home))
    with FakeServer(fault_rate=0.2, seed=21) as srv:
        flickr_routes(srv, flickr_photos(60, seed=21, centre=(33.70, 73.06), spread=0.04), FLICKR_KEY)
        places_routes(srv, ict_places(30), GOOGLE_KEY, token_delay_s=0.02)
        resources = {
            **_base(root, boundaries_path),
            "flickr": FlickrResource(api_key=dg.EnvVar("FLICKR_API_KEY"), api_secret=dg.EnvVar("FLICKR_API_SECRET"),
                                     rest_url=srv.url + "/services/rest/", queries_per_hour=3.6e6,
                                     min_taken_date="2005-01-01", max_taken_date="2024-01-01", **FAST),
            "google_places": GooglePlacesResource(enabled=True, api_key=dg.EnvVar("GOOGLE_MAPS_API_KEY"),
                                                  api="legacy", base_url=srv.url, queries_per_second=1000, tile_deg=0.2,
                                                  page_token_delay_s=0.01, **FAST),
            "yfcc100m": Yfcc100mResource(),
            "gldv2": Gldv2Resource(),
        }
        ok = dg.materialize(CRAWL_ASSETS, resources=resources, partition_key="ict", instance=instance)
        assert ok.success
        # an unreachable API: the run fails, with the URL's key scrubbed from the error
        broken = {**resources, "google_places": GooglePlacesResource(
            enabled=True, api_key=dg.EnvVar("GOOGLE_MAPS_API_KEY"), api="legacy", base_url="http://127.0.0.1:9",
            **{**FAST, "max_attempts": 2})}
        failed = dg.materialize([google_places_photos], resources=broken, partition_key="punjab", instance=instance,
                                raise_on_error=False)
        assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "key=***" in failure.event_specific_data.error.to_string()

    md = ok.asset_materializations_for_node("flickr_photos")[0].metadata
    assert md["images"].value > 0 and md["api_requests_this_run"].value > 0
    assert "| cause |" in metadata_text(md["retries_per_cause"]) and ".preview.png" in md["map"].value
    gmd = ok.asset_materializations_for_node("google_places_photos")[0].metadata
    assert gmd["images"].value > 0

    cat = dg.materialize([image_catalog], resources=resources, instance=instance)
    per_source = cat.asset_materializations_for_node("image_catalog")[0].metadata["rows_per_source"]
    assert "| flickr |" in metadata_text(per_source) and "| google_places |" in metadata_text(per_source)

    secrets = [FLICKR_KEY, FLICKR_SECRET, GOOGLE_KEY]
    for run in (ok, failed, cat):
        for record in instance.all_logs(run.run_id):
            assert not any(s in str(record) for s in secrets)
        run_record = instance.get_run_by_id(run.run_id)
        assert not any(s in str(run_record.run_config) for s in secrets)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 50
    leaks = [str(p) for p in files for s in secrets if s.encode() in p.read_bytes()]
    assert not leaks, leaks


@pytest.mark.parametrize("resource,reason", [
    (Yfcc100mResource(metadata_path="x"), None),
    (Gldv2Resource(train_csv="a"), "GEOPAK_GLDV2_TRAIN_CSV and GEOPAK_GLDV2_CATEGORIES_CSV are not set"),
    (FlickrResource(api_key="k", api_secret="s", enabled=False), "disabled in its resource config (enabled: false)"),
])
def test_skip_reasons(resource, reason):
    assert resource.skip_reason() == reason
