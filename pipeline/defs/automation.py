"""Automation, every piece of it off until you turn it on in the UI (the Automation page: schedules and sensors).

- **Weekly crawl schedules**, one per crawl source (``crawl_<source>_weekly``, Mondays 03:00 UTC): one run per
  province partition. A Flickr run carries the run tag ``geopak/min_upload_date`` = the start of that province's
  last successful crawl, so it searches only photos uploaded since (the crawl state restarts discovery for the new
  window and keeps every download). A province never crawled gets a full crawl. Google Places has no date filter
  and YFCC100M / GLDv2 are fixed snapshots: their weekly run resumes unfinished work (quota stops, downloads left
  to retry) and finds nothing new otherwise.
- **``local_images_sensor``**: materializes ``local_images`` when files appear in (or change under) the local
  folder or the manifest changes. Each tick stats only the folders (a new file changes its folder's mtime) and
  the manifest; it walks the files only when one changed. Cursor: those mtimes, plus file count, newest mtime and
  total size; the same files never fire twice.
- **Declarative automation**: the catalog, filter, labels and geocell stages follow their inputs
  (``AutomationCondition.eager()``); training and evaluation follow at most weekly (``on_cron``), since a training
  run is hours on a GPU. Conditions only act while ``geopak_automation_sensor`` runs; it is defined here, STOPPED,
  and targets every asset, so Dagster creates no ``default_automation_condition_sensor`` of its own.
- **Crawl freshness**: a check per crawl asset lists every province's last crawl and WARNs when one is older than
  ``max_age_days`` (default ``GEOPAK_CRAWL_MAX_AGE_DAYS``, else 30, read when the code location loads). It runs in
  every crawl run and from the asset's Checks tab at any time.
"""


import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from pipeline.defs.dagster_private import UnresolvedAssetJobDefinition
from pipeline.defs.crawl import CRAWL_ASSETS, MIN_UPLOAD_TAG, PROVINCE_PARTITIONS, SOURCE_OF_ASSET
from pipeline.defs.ingest import local_images
from pipeline.defs.metadata import md_table
from pipeline.defs.resources import LocalSourceResource

CRAWL_CRON = "0 3 * * 1"  # Mondays 03:00 UTC
MODEL_CRON = "0 4 * * 0"  # Sundays 04:00 UTC: training and evaluation follow their inputs at most weekly
MAX_AGE_ENV = "GEOPAK_CRAWL_MAX_AGE_DAYS"
DEFAULT_MAX_AGE_DAYS = 30.0
DATE_FLOOR_SOURCES = frozenset({"flickr"})  # sources whose crawler honours the min_upload_date floor
EAGER_GROUPS = ("catalog", "filter", "labels", "geocells")
WEEKLY_GROUPS = ("model", "evaluation")


@dataclass(frozen=True)
class LastCrawl:
    started_at: dt.datetime  # start of the run that crawled (the floor of the next incremental crawl)
    materialized_at: dt.datetime


def last_crawls(instance: dg.DagsterInstance, asset_key: dg.AssetKey, page: int = 200) -> dict[str, LastCrawl]:
    """Province -> its latest materialization that really crawled (``status: crawled``; skipped ones do not
    count), newest first through the event log until every province is found or the log ends."""
    found: dict[str, LastCrawl] = {}
    wanted = set(PROVINCE_PARTITIONS.get_partition_keys())
    cursor = None
    while True:
        result = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key), limit=page,
                                                 cursor=cursor, ascending=False)
        for record in result.records:
            mat = record.asset_materialization
            if mat is None or mat.partition in found or mat.partition not in wanted:
                continue
            status = mat.metadata.get("status")
            if status is None or status.value != "crawled":
                continue
            run = instance.get_run_record_by_id(record.run_id)
            start = run.start_time if run is not None and run.start_time else record.timestamp
            found[mat.partition] = LastCrawl(dt.datetime.fromtimestamp(start, dt.timezone.utc),
                                             dt.datetime.fromtimestamp(record.timestamp, dt.timezone.utc))
        if found.keys() >= wanted or not result.has_more:
            return found
        cursor = result.cursor


def _source(asset: dg.AssetsDefinition) -> str:
    return SOURCE_OF_ASSET[asset.key.path[-1]]


def crawl_job_for(asset: dg.AssetsDefinition) -> UnresolvedAssetJobDefinition:
    source = _source(asset)
    return dg.define_asset_job(
        f"crawl_{source}_job", selection=dg.AssetSelection.assets(asset), partitions_def=PROVINCE_PARTITIONS,
        description=f"Crawl {source} for one province (the weekly schedule's job).",
    )


def crawl_schedule_for(asset: dg.AssetsDefinition, job: UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    source = _source(asset)
    floor_note = ("only photos uploaded since the province's last crawl (run tag " + MIN_UPLOAD_TAG + ")"
                  if source in DATE_FLOOR_SOURCES else "resumes unfinished work (no date filter for this source)")

    @dg.schedule(name=f"crawl_{source}_weekly", cron_schedule=CRAWL_CRON, job=job, execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Weekly {source} crawl of every province: {floor_note}. Off by default.")
    def _schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest]:
        last = last_crawls(context.instance, asset.key)
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ""
        for province in PROVINCE_PARTITIONS.get_partition_keys():
            tags = {"geopak/schedule": f"crawl_{source}_weekly"}
            if source in DATE_FLOOR_SOURCES and province in last:
                tags[MIN_UPLOAD_TAG] = last[province].started_at.isoformat(timespec="seconds")
            yield dg.RunRequest(run_key=f"{source}|{province}|{tick}", partition_key=province, tags=tags)

    return _schedule


def _max_age_default() -> float:
    raw = os.environ.get(MAX_AGE_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_MAX_AGE_DAYS
    except ValueError:
        return DEFAULT_MAX_AGE_DAYS


class CrawlFreshnessParams(dg.Config):
    max_age_days: float = Field(default_factory=_max_age_default, gt=0, description=(
        f"WARN when a province's last crawl is older than this many days (default: {MAX_AGE_ENV}, else "
        f"{DEFAULT_MAX_AGE_DAYS:g}) (> 0)"))


def freshness_table(last: dict[str, LastCrawl], max_age_days: float, now: dt.datetime) -> pd.DataFrame:
    """One row per province: its last crawl, age in days and whether that is too old (never crawled: not stale,
    since nothing was promised; an unconfigured source is never crawled)."""
    rows = []
    for province in PROVINCE_PARTITIONS.get_partition_keys():
        crawl = last.get(province)
        age = (now - crawl.materialized_at).total_seconds() / 86400 if crawl else None
        rows.append((province, crawl.materialized_at.strftime("%Y-%m-%d %H:%M UTC") if crawl else "never",
                     round(age, 1) if age is not None else None, bool(age is not None and age > max_age_days)))
    return pd.DataFrame(rows, columns=["province", "last_crawl", "age_days", "stale"])


def crawl_freshness_check_for(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=asset, name="crawled_recently", blocking=False,
                    description="WARN when a province's last crawl is older than max_age_days "
                                f"({MAX_AGE_ENV}, default {DEFAULT_MAX_AGE_DAYS:g}); lists every province.")
    def _check(context: dg.AssetCheckExecutionContext, config: CrawlFreshnessParams) -> dg.AssetCheckResult:
        table = freshness_table(last_crawls(context.instance, asset.key), config.max_age_days,
                                dt.datetime.now(dt.timezone.utc))
        stale = table.loc[table["stale"], "province"].tolist()
        return dg.AssetCheckResult(
            passed=not stale, severity=dg.AssetCheckSeverity.WARN,
            metadata={"stale_provinces": ", ".join(stale) or "none", "max_age_days": config.max_age_days,
                      "never_crawled": ", ".join(table.loc[table["last_crawl"] == "never", "province"]) or "none",
                      "per_province": md_table(table)},
        )

    return _check


# ------------------------------------------------------------------------------------------------ local folder
FIRES_KEY = "fires"  # in the sensor's cursor, next to the fingerprint: how many runs it requested
DIRS_KEY, SCANNED_KEY = "dirs", "scanned_at"  # the cheap signal: each folder's mtime, and when they were read
SETTLE_S = 2.0  # a folder changed this close to the last scan may change again within one mtime tick: look again


def _visible(name: str) -> bool:
    return not name.startswith(".")  # hidden files and folders are skipped, as the ingest skips them


def folder_scan(folder: str) -> tuple[dict[str, float], dict[str, int]]:
    """The full walk (what the sensor compares: file count, newest mtime, total size) and every visible folder's
    mtime (ns), relative to ``folder``; a folder that is not there counts as empty."""
    files, newest, size, dirs = 0, 0.0, 0, {}
    if not Path(folder).is_dir():
        return {"files": 0, "newest_mtime": 0.0, "bytes": 0}, {}
    for root, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in subdirs if _visible(d)]
        try:
            dirs[os.path.relpath(root, folder)] = os.stat(root).st_mtime_ns
        except OSError:  # removed while we looked
            continue
        for name in filter(_visible, names):
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            files, newest, size = files + 1, max(newest, st.st_mtime), size + st.st_size
    return {"files": files, "newest_mtime": newest, "bytes": size}, dirs


def folders_changed(folder: str, dirs: dict[str, int], scanned_at: float) -> bool:
    """Whether anything may have been added, removed or renamed under ``folder`` since the scan that recorded
    ``dirs``: one stat per folder, none per file. A new file or folder changes its parent folder's mtime; a
    folder whose mtime is within ``SETTLE_S`` of that scan is looked at again (its mtime tick may hide a change).
    Not seen: a file rewritten in place under its name (its folder's mtime stays); the next change nearby or a
    manual run of local_images picks it up."""
    if not dirs:
        return True
    settled_ns = int((scanned_at - SETTLE_S) * 1e9)
    for rel, mtime_ns in dirs.items():
        try:
            now_ns = os.stat(os.path.join(folder, rel)).st_mtime_ns
        except OSError:
            return True
        if now_ns != mtime_ns or now_ns >= settled_ns:
            return True
    return False


def _manifest_stat(manifest: str | None) -> dict[str, float]:
    st = Path(manifest).stat() if manifest and Path(manifest).is_file() else None
    return {"manifest_mtime": st.st_mtime if st else 0.0, "manifest_bytes": st.st_size if st else 0}


@dg.sensor(
    name="local_images_sensor", target=[local_images], minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Materializes local_images when files appear in or change under the local folder "
    "(GEOPAK_LOCAL_FOLDER) or the local manifest changes. Off by default.",
)
def local_images_sensor(context: dg.SensorEvaluationContext, local_source: LocalSourceResource):
    """Each tick stats the folders seen last time (not every file) and the manifest; only when one changed does
    it walk the folder and compare file count, newest mtime and total size with the last run's."""
    cfg = local_source.config()
    if not (cfg.folder or cfg.manifest):
        return dg.SkipReason("no local source configured (GEOPAK_LOCAL_FOLDER / GEOPAK_LOCAL_MANIFEST)")
    before = json.loads(context.cursor) if context.cursor else {}
    fires = int(before.pop(FIRES_KEY, 0))
    old_dirs, scanned_at = before.pop(DIRS_KEY, {}), float(before.pop(SCANNED_KEY, 0.0))
    manifest = _manifest_stat(cfg.manifest)
    if (before and cfg.folder and not folders_changed(cfg.folder, old_dirs, scanned_at)
            and all(before.get(k) == v for k, v in manifest.items())):
        return dg.SkipReason(f"no change: {before.get('files', 0)} files, as at the last run")
    started = time.time()
    files, dirs = folder_scan(cfg.folder) if cfg.folder else ({"files": 0, "newest_mtime": 0.0, "bytes": 0}, {})
    now = {**files, **manifest}
    if now["files"] == 0 and now["manifest_bytes"] == 0:
        return dg.SkipReason(f"nothing in {cfg.folder or cfg.manifest} yet")
    cursor = {**now, DIRS_KEY: dirs, SCANNED_KEY: started}
    if before == now:  # the folders changed but not the files the ingest reads: remember the new mtimes only
        context.update_cursor(json.dumps({**cursor, FIRES_KEY: fires}, sort_keys=True))
        return dg.SkipReason(f"no change: {now['files']} files, as at the last run")
    # the run key counts this sensor's runs: a folder back to an earlier state (a file added, then removed) is a
    # change too, and a run key equal to that earlier run's would make Dagster drop the request silently
    context.update_cursor(json.dumps({**cursor, FIRES_KEY: fires + 1}, sort_keys=True))
    key = f"{fires + 1}|" + "|".join(f"{k}={now[k]}" for k in sorted(now))
    return dg.RunRequest(run_key=key, tags={"geopak/trigger": "local folder changed"})


# ------------------------------------------------------------------------------------------ declarative automation
def with_automation_conditions(assets: list) -> list:
    """Downstream stages follow their inputs when ``geopak_automation_sensor`` is on (crawls and sources do not:
    the schedules and the folder sensor start them)."""

    def add(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.group_name in EAGER_GROUPS:
            return spec.replace_attributes(automation_condition=dg.AutomationCondition.eager())
        if spec.group_name in WEEKLY_GROUPS:
            return spec.replace_attributes(automation_condition=dg.AutomationCondition.on_cron(MODEL_CRON, "UTC"))
        return spec

    return dg.map_asset_specs(add, assets)


automation_sensor = dg.AutomationConditionSensorDefinition(
    "geopak_automation_sensor", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="Evaluates the stages' automation conditions (catalog → geocells follow their inputs; model and "
    "evaluation weekly). Off by default: turn it on to let downstream stages follow new data.",
)

CRAWL_JOBS = {a.key: crawl_job_for(a) for a in CRAWL_ASSETS}
SCHEDULES = [crawl_schedule_for(a, CRAWL_JOBS[a.key]) for a in CRAWL_ASSETS]
SENSORS = [local_images_sensor, automation_sensor]
FRESHNESS_CHECKS = [crawl_freshness_check_for(a) for a in CRAWL_ASSETS]
