"""Schedules, sensors and automation: all off by default; the weekly crawl asks for every province with the right
date floor (and Flickr honours it); the local-folder sensor fires on new files and never twice for the same files.
Also what the UI shows before and after runs: owners, tags, code versions, each source's status, crawl freshness."""

import datetime as dt
import json
import os

import dagster as dg
import pytest

from pipeline.defs import automation
from pipeline.defs.crawl import MIN_UPLOAD_TAG, PROVINCE_PARTITIONS, FlickrResource, flickr_photos
from pipeline.defs.ingest import local_images
from pipeline.defs.resources import BoundariesResource, DataRootResource, LocalSourceResource
from pipeline.defs.source_status import SKIPPED, STATUS_KEY, with_source_status
from pipeline.definitions import defs
from pipeline.filters.metrics import METRICS_VERSION
from pipeline.sources.flickr import upload_floor_seconds
from tests.crawl_support import FLICKR_KEY, FLICKR_SECRET
from tests.crawl_support import flickr_photos as fake_flickr_photos
from geopak_testkit.fake_apis import FakeServer, flickr_routes
from pipeline.defs.metadata import metadata_text

PROVINCES = set(PROVINCE_PARTITIONS.get_partition_keys())


def _schedule(name: str) -> dg.ScheduleDefinition:
    return next(s for s in automation.SCHEDULES if s.name == name)


def _fake_crawl(status: str):
    """An asset with the crawl asset's key that records a crawl (or a skip) without any network."""

    @dg.asset(name="flickr_photos", partitions_def=PROVINCE_PARTITIONS)
    def fake() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"status": status})

    return fake


def _requests(schedule: dg.ScheduleDefinition, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    when = dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.timezone.utc)
    data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                                            repository_def=defs.get_repository_def()))
    return list(data.run_requests or [])


def test_everything_automatic_is_off_by_default():
    assert {s.name for s in defs.schedules} == {"crawl_flickr_weekly", "crawl_google_places_weekly",
                                                "crawl_yfcc100m_weekly", "crawl_gldv2_weekly"}
    assert all(s.default_status == dg.DefaultScheduleStatus.STOPPED for s in defs.schedules)
    assert {s.name for s in defs.sensors} == {"local_images_sensor", "geopak_automation_sensor"}
    assert all(s.default_status == dg.DefaultSensorStatus.STOPPED for s in defs.sensors)
    # our automation sensor targets every asset, so Dagster adds no default (running) automation sensor
    repo = defs.get_repository_def()
    assert "default_automation_condition_sensor" not in {s.name for s in repo.sensor_defs}
    graph = defs.resolve_asset_graph()
    conditions = {k.path[-1]: graph.get(k).automation_condition for k in graph.get_all_asset_keys()}
    assert conditions["image_catalog"] is not None and conditions["geocells"] is not None
    assert conditions["geopak_model"] is not None and conditions["flickr_photos"] is None


def test_weekly_schedule_requests_every_province_with_the_last_crawl_as_floor():
    with dg.instance_for_test() as instance:
        first = dg.materialize([_fake_crawl("crawled")], partition_key="ict", instance=instance)
        dg.materialize([_fake_crawl("skipped")], partition_key="sindh", instance=instance)  # not a crawl
        requests = _requests(_schedule("crawl_flickr_weekly"), instance)
        assert {r.partition_key for r in requests} == PROVINCES and len(requests) == len(PROVINCES)
        floors = {r.partition_key: r.tags.get(MIN_UPLOAD_TAG) for r in requests}
        start = instance.get_run_record_by_id(first.run_id).start_time
        assert floors["ict"] == dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat(timespec="seconds")
        assert all(floors[p] is None for p in PROVINCES - {"ict"})  # never crawled (or only skipped): full crawl
        # a later crawl moves the floor; a later skip does not
        second = dg.materialize([_fake_crawl("crawled")], partition_key="ict", instance=instance)
        dg.materialize([_fake_crawl("skipped")], partition_key="ict", instance=instance)
        floors = {r.partition_key: r.tags.get(MIN_UPLOAD_TAG) for r in _requests(_schedule("crawl_flickr_weekly"),
                                                                                 instance)}
        start2 = instance.get_run_record_by_id(second.run_id).start_time
        assert start2 >= start
        assert floors["ict"] == dt.datetime.fromtimestamp(start2, dt.timezone.utc).isoformat(timespec="seconds")
        # sources without a date filter: every province, no floor (the run resumes unfinished work)
        places = _requests(_schedule("crawl_google_places_weekly"), instance)
        assert {r.partition_key for r in places} == PROVINCES and all(MIN_UPLOAD_TAG not in r.tags for r in places)
        assert {r.job_name for r in places} <= {None, "crawl_google_places_job"}


def test_flickr_honours_the_floor_from_the_run_tag(tmp_path, boundaries_path, monkeypatch):
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("FLICKR_API_SECRET", FLICKR_SECRET)
    floor = "2026-03-01T10:00:00+00:00"
    with FakeServer() as srv, dg.instance_for_test() as instance:
        flickr_routes(srv, fake_flickr_photos(8, seed=3, centre=(33.70, 73.06), spread=0.03), FLICKR_KEY)
        resources = {
            "data_root": DataRootResource(path=str(tmp_path)),
            "boundaries": BoundariesResource(source=str(boundaries_path)),
            "flickr": FlickrResource(rest_url=srv.url + "/services/rest/", queries_per_hour=3.6e6,
                                     min_taken_date="2005-01-01", max_taken_date="2024-01-01", timeout_s=2.0),
        }
        full = dg.materialize([flickr_photos], resources=resources, partition_key="ict", instance=instance)
        assert full.success
        def searches() -> list:  # photos.search calls only (each run also reads the licence list once)
            return [r for r in srv.requests("/services/rest/", ok_only=True)
                    if r.params.get("method") == "flickr.photos.search"]

        assert searches() and all("min_upload_date" not in r.params for r in searches())
        seen = len(searches())
        weekly = dg.materialize([flickr_photos], resources=resources, partition_key="ict", instance=instance,
                                tags={MIN_UPLOAD_TAG: floor})
        assert weekly.success
        later = searches()[seen:]
        assert later and all(r.params.get("min_upload_date") == str(upload_floor_seconds(floor)) for r in later)
        md = weekly.asset_materializations_for_node("flickr_photos")[0].metadata
        assert md["parameters_changed"].value is True  # a new window: discovery restarts, downloads are kept
        assert md["images"].value >= full.asset_materializations_for_node("flickr_photos")[0].metadata[
            "images"].value


def _sensor(folder, instance, cursor=None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                  resources={"local_source": LocalSourceResource(folder=str(folder))})
    return automation.local_images_sensor(ctx), ctx


def test_local_folder_sensor_fires_on_new_files_once(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with dg.instance_for_test() as instance:
        result, ctx = _sensor(folder, instance)
        assert isinstance(result, dg.SkipReason) and "nothing" in result.skip_message
        (folder / "a.jpg").write_bytes(b"x" * 10)
        (folder / ".hidden").write_bytes(b"ignored")
        result, ctx = _sensor(folder, instance, ctx.cursor)
        assert isinstance(result, dg.RunRequest) and json.loads(ctx.cursor)["files"] == 1
        again, ctx2 = _sensor(folder, instance, ctx.cursor)  # same files: no second run
        assert isinstance(again, dg.SkipReason)
        assert {k: v for k, v in json.loads(ctx2.cursor or ctx.cursor).items() if k not in ("dirs", "scanned_at")} \
            == {k: v for k, v in json.loads(ctx.cursor).items() if k not in ("dirs", "scanned_at")}
        sub = folder / "trip"
        sub.mkdir()
        (sub / "b.jpg").write_bytes(b"y" * 20)
        os.utime(sub / "b.jpg", (2e9, 2e9))
        new, ctx3 = _sensor(folder, instance, ctx.cursor)
        assert isinstance(new, dg.RunRequest) and new.run_key != result.run_key
        assert json.loads(ctx3.cursor)["files"] == 2


def test_local_folder_sensor_fires_when_folder_returns_to_an_earlier_state(tmp_path):
    """A file added and then removed brings back the first fingerprint; the run for it must not reuse the first
    run's key (Dagster drops a request whose run key it has seen, so the removed file stayed in the manifest)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x" * 10)
    with dg.instance_for_test() as instance:
        first, ctx = _sensor(folder, instance)
        (folder / "b.jpg").write_bytes(b"y" * 20)
        os.utime(folder / "b.jpg", (2e9, 2e9))
        second, ctx = _sensor(folder, instance, ctx.cursor)
        (folder / "b.jpg").unlink()
        third, ctx = _sensor(folder, instance, ctx.cursor)
    assert all(isinstance(r, dg.RunRequest) for r in (first, second, third))
    assert len({first.run_key, second.run_key, third.run_key}) == 3
    assert json.loads(ctx.cursor)["files"] == 1


def test_local_folder_sensor_skips_when_no_local_source(monkeypatch):
    monkeypatch.delenv("GEOPAK_LOCAL_FOLDER", raising=False)
    monkeypatch.delenv("GEOPAK_LOCAL_MANIFEST", raising=False)
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"local_source": LocalSourceResource()})
        result = automation.local_images_sensor(ctx)
    assert isinstance(result, dg.SkipReason) and "GEOPAK_LOCAL_FOLDER" in result.skip_message


@pytest.mark.parametrize("age_days,stale", [(2.0, False), (45.0, True)])
def test_freshness_table_warns_on_old_crawls(age_days, stale):
    now = dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)
    last = {"ict": automation.LastCrawl(now - dt.timedelta(days=age_days + 0.1), now - dt.timedelta(days=age_days))}
    table = automation.freshness_table(last, 30.0, now).set_index("province")
    assert bool(table.loc["ict", "stale"]) is stale and table.loc["ict", "age_days"] == age_days
    assert table.loc["sindh", "last_crawl"] == "never" and not table.loc["sindh", "stale"]


def test_freshness_check_reads_the_instance(monkeypatch):
    monkeypatch.setenv(automation.MAX_AGE_ENV, "7")  # read when the check is defined (the code location loads)
    check = automation.crawl_freshness_check_for(flickr_photos)
    with dg.instance_for_test() as instance:
        dg.materialize([_fake_crawl("crawled")], partition_key="gb", instance=instance)
        result = dg.materialize([_fake_crawl("crawled"), check], partition_key="ict", instance=instance)
        evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "crawled_recently")
    assert evaluation.passed  # crawled just now
    assert evaluation.metadata["max_age_days"].value == 7.0
    assert "| gb |" in metadata_text(evaluation.metadata["per_province"])
    assert "never" in metadata_text(evaluation.metadata["per_province"])


def test_every_asset_has_owner_code_version_and_tags():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners and node.owners[0].startswith("team:geopak-"), key
        assert node.code_version, key
        assert node.tags.get("stage") == node.group_name, key
    sources = {k.path[-1]: graph.get(k).tags.get("source") for k in graph.get_all_asset_keys()}
    assert sources["flickr_photos"] == "flickr" and sources["local_images"] == "local"
    assert graph.get(dg.AssetKey("filtered_catalog")).code_version.endswith(f"metrics{METRICS_VERSION}")


def test_source_status_is_visible_before_any_run_without_secrets(monkeypatch):
    import pipeline.definitions as definitions

    for var in ("FLICKR_API_KEY", "FLICKR_API_SECRET", "GEOPAK_LOCAL_FOLDER", "GEOPAK_LOCAL_MANIFEST"):
        monkeypatch.delenv(var, raising=False)
    reasons = definitions.source_reasons()
    assert "FLICKR_API_KEY" in reasons["flickr_photos"] and "GEOPAK_LOCAL_FOLDER" in reasons["local_images"]
    assert reasons["sample_world_images"] is None
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("FLICKR_API_SECRET", FLICKR_SECRET)
    reasons = definitions.source_reasons()
    assert reasons["flickr_photos"] is None
    assets = with_source_status([flickr_photos, local_images], reasons)
    status = {a.key.path[-1]: a.specs_by_key[a.key].metadata[STATUS_KEY] for a in assets}
    assert status["flickr_photos"].startswith("configured") and status["local_images"].startswith("skipped")
    assert FLICKR_KEY not in json.dumps(status) and FLICKR_SECRET not in json.dumps(status)


def test_a_disabled_local_source_looks_like_a_skipped_crawl(tmp_path, boundaries_path, monkeypatch):
    from tests.conftest import asset_resources

    monkeypatch.delenv("GEOPAK_LOCAL_FOLDER", raising=False)
    monkeypatch.delenv("GEOPAK_LOCAL_MANIFEST", raising=False)
    result = dg.materialize([local_images], resources=asset_resources(tmp_path, boundaries_path))
    md = result.asset_materializations_for_node("local_images")[0].metadata
    assert md["status"].value == SKIPPED and md["dagster/row_count"].value == 0
    assert "GEOPAK_LOCAL_FOLDER" in md["reason"].value


def test_local_folder_sensor_stats_folders_not_files_when_nothing_changed(tmp_path, monkeypatch):
    """The cheap signal: once the folders' mtimes have settled, a tick stats each folder and walks no file."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i in range(5):
        (folder / "trip" / f"{i}.jpg").write_bytes(b"x")
    old = 1.6e9
    for d in (folder / "trip", folder):
        os.utime(d, (old, old))
    with dg.instance_for_test() as instance:
        first, ctx = _sensor(folder, instance)
        assert isinstance(first, dg.RunRequest)
        monkeypatch.setattr(automation, "folder_scan", lambda _: pytest.fail("walked the files"))
        again, _ = _sensor(folder, instance, ctx.cursor)
        assert isinstance(again, dg.SkipReason)
        (folder / "trip" / "new.jpg").write_bytes(b"y")  # changes trip/'s mtime
        monkeypatch.undo()
        new, _ = _sensor(folder, instance, ctx.cursor)
    assert isinstance(new, dg.RunRequest) and new.run_key != first.run_key
