"""Issue 15 (1, 2, 7): what a curator sees on the asset pages, read back through a real Dagster instance.

The suite's one full run of the main job: ``dagster job execute`` on a small sample world (the tiny model) with a
temporary DAGSTER_HOME (SQLite), the report server started here; it must write every stage (the former smoke
test). Then, for every table asset: the standard row count equals the
Parquet file's, the column schema lists every column with a description, lineage points at real columns; every
picture is a short Markdown image (rendered without a click) whose preview and full PNG the server returns; the
HTML report opens through its URL.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.paths import DataPaths
from pipeline.core.report import is_distance_km
from pipeline.defs.jobs import MAIN_JOB
from pipeline.defs.metadata import (
    MAX_LABEL_WORD, PREVIEW_MAX_HEIGHT, PREVIEW_MAX_WIDTH, SYNTHETIC_KEY, VALUE_COLUMN_PX,
    metadata_text, table_width_px,
)
from pipeline.report_server import REPORTS_URL_ENV, VIEW
from tests.cluster_support import REPO, small_main_job_config

# Every table asset of the main job -> the Parquet file its row count and columns describe.
TABLE_FILES = {
    "sample_world_images": lambda p: p.raw_manifest("sample_world"),
    "image_catalog": lambda p: p.catalog,
    "filtered_catalog": lambda p: p.filtered,
    "labelled_catalog": lambda p: p.labelled,
    "dataset_splits": lambda p: p.splits,
    "geocells": lambda p: p.geocells,
    "cell_assignments": lambda p: p.cell_assignments,
}
# the UI renders Markdown inline only below this length (ui-core MetadataEntry.tsx, Dagster 1.13)
INLINE_MARKDOWN_LIMIT = 1000
pytestmark = pytest.mark.slow  # one end-to-end run of the main job (tiny model), shared by the module

LOCAL_ENV = ("GEOPAK_LOCAL_FOLDER", "GEOPAK_LOCAL_MANIFEST", "GEOPAK_GOOGLE_PLACES_ENABLED", "GOOGLE_MAPS_API_KEY",
             "FLICKR_API_KEY", "GEOPAK_YFCC100M_METADATA", "GEOPAK_GLDV2_TRAIN_CSV")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(instance, data paths, definitions, reports URL) after one successful run of the main job."""
    import dagster as dg

    from pipeline.report_server import serve_in_thread

    tmp = tmp_path_factory.mktemp("ui_metadata")
    data = tmp / "data"
    server = serve_in_thread(data)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEOPAK_DATA_ROOT", str(data))
        mp.setenv(REPORTS_URL_ENV, url)
        for var in LOCAL_ENV:
            mp.delenv(var, raising=False)
        from pipeline.definitions import defs

        # the suite's one full run of the main job, as `make run` starts it: `dagster job execute` with a
        # DAGSTER_HOME (the smoke test's assertions are test_the_command_line_run_wrote_every_stage below)
        home = tmp / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        config = tmp / "run.yaml"
        config.write_text(yaml.safe_dump(small_main_job_config()))
        env = {**os.environ, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([str(Path(sys.executable).with_name("dagster")), "job", "execute", "-m",
                               "pipeline.definitions", "-j", MAIN_JOB, "-c", str(config)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "RUN_SUCCESS" in proc.stdout + proc.stderr, \
            (proc.stdout + proc.stderr)[-4000:]
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield instance, DataPaths.at(data), defs, url
    server.shutdown()


def test_the_command_line_run_wrote_every_stage(run):
    """What `make run` must leave: labels in every province, cells for every image, a model, the image shards
    (every train/val/test image once, the datasheet beside them), the report, and the run history."""
    import pandas as pd

    from pipeline.core.shards import ShardSet

    instance, paths, _, _ = run
    data = paths.root
    labelled = pd.read_parquet(paths.labelled)
    assert len(labelled) > 150 and labelled["province_key"].nunique() == 7
    cells = pd.read_parquet(paths.geocells)
    assigned = pd.read_parquet(paths.cell_assignments)
    assert len(cells) > 0 and set(assigned["image_id"]) == set(labelled["image_id"])
    assert (data / "model" / "geopak" / "model.pt").is_file()
    shards = ShardSet.find(data)
    splits = pd.read_parquet(paths.splits)
    kept = splits[splits["split"].isin(["train", "val", "test"])]
    assert sorted(shards.index()["key"]) == sorted(kept["image_id"]) and shards.urls("train")
    assert "synthetic sample world** (entirely)" in (data / "shards" / "DATASHEET.md").read_text()
    reports = list((data / "evaluation").glob("*/report.html"))
    assert len(reports) == 1 and "ORACLE" in reports[0].read_text()
    (main,) = instance.get_runs()
    assert main.job_name == MAIN_JOB and main.status.value == "SUCCESS", "run history kept in DAGSTER_HOME"


def _latest(instance, key: str) -> dict:
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None and event.asset_materialization is not None, f"{key} was not materialized"
    return dict(event.asset_materialization.metadata)


def _main_job_assets(defs) -> list:
    job = defs.resolve_job_def(MAIN_JOB)
    keys = set(job.asset_layer.executable_asset_keys)
    return [a for a in defs.resolve_asset_graph().assets_defs if a.keys & keys]


def test_every_parquet_asset_is_listed(run):
    """A new table asset must join TABLE_FILES (and so get these checks), not slip past them."""
    _, _, defs, _ = run
    parquet = {s.key.to_user_string() for a in _main_job_assets(defs) for s in a.specs if "parquet" in s.kinds}
    assert parquet - {"local_images"} == set(TABLE_FILES)


def test_row_counts_and_column_schemas_match_the_files(run):
    instance, paths, _, _ = run
    for key, where in TABLE_FILES.items():
        meta = _latest(instance, key)
        file_meta = pq.read_metadata(where(paths))
        assert meta["dagster/row_count"].value == file_meta.num_rows > 0, key
        columns = meta["dagster/column_schema"].value.columns
        assert [c.name for c in columns] == file_meta.schema.to_arrow_schema().names, key
        undescribed = [c.name for c in columns if not (c.description or "").strip()]
        assert not undescribed, f"{key}: columns without a description in pipeline/core/schema.py: {undescribed}"
        assert all(c.type and c.type != "unknown" for c in columns), key


def test_disabled_local_source_has_no_table(run):
    instance, paths, _, _ = run
    meta = _latest(instance, "local_images")
    # skipped (pipeline.defs.source_status): the catalog reads no rows from it, and there is no file to describe
    assert meta["status"].value == "skipped" and meta["dagster/row_count"].value == 0
    assert "dagster/column_schema" not in meta and not paths.raw_manifest("local").exists()


def test_column_schemas_are_declared_before_a_run(run):
    _, _, defs, _ = run
    graph = defs.resolve_asset_graph()
    import dagster as dg

    for key in [*TABLE_FILES, "local_images"]:
        schema = graph.get(dg.AssetKey(key)).metadata.get("dagster/column_schema")
        assert schema is not None and schema.columns, key
        assert all(c.description for c in schema.columns), key


def test_column_lineage_points_at_real_upstream_columns(run):
    instance, _, defs, _ = run
    import dagster as dg

    graph = defs.resolve_asset_graph()
    declared = {k.to_user_string(): {c.name for c in graph.get(k).metadata["dagster/column_schema"].columns}
                for k in graph.get_all_asset_keys() if "dagster/column_schema" in graph.get(k).metadata}
    seen = 0
    for key in TABLE_FILES:
        meta = _latest(instance, key)
        if "dagster/column_lineage" not in meta:
            continue
        upstream = {k.to_user_string() for k in graph.get(dg.AssetKey(key)).parent_keys}
        for column, deps in meta["dagster/column_lineage"].value.deps_by_column.items():
            for dep in deps:
                asset = dep.asset_key.to_user_string()
                assert asset in upstream or asset in declared, (key, column, asset)
                assert dep.column_name in declared[asset], (key, column, asset, dep.column_name)
                seen += 1
    assert seen > 50
    lineage = _latest(instance, "labelled_catalog")["dagster/column_lineage"].value.deps_by_column
    assert {d.column_name for d in lineage["province_id"]} == {"lat", "lon"}
    assert {d.column_name for d in lineage["day_of_year"]} == {"taken_at"}


def _fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.headers.get_content_type(), resp.read()


def test_pictures_render_inline_and_are_served(run):
    """Every picture: Markdown short enough to render without a click, a preview that fits, the full PNG."""
    from PIL import Image
    import io

    instance, paths, _, url = run
    pictures = 0
    for key in [*TABLE_FILES, "geopak_model", "evaluation_report"]:
        for label, value in _latest(instance, key).items():
            text = str(getattr(value, "value", ""))
            assert "data:image" not in text, f"{key}/{label}: base64 image (hidden behind [Show Markdown])"
            links = re.findall(r'\[!\[[^\]]*\]\((\S+)(?: "[^"]*")?\)\]\(([^)]+)\)', text)
            if not links:
                continue
            assert len(text) < INLINE_MARKDOWN_LIMIT, f"{key}/{label}: {len(text)} chars, not shown inline"
            for preview, view in links:
                assert preview.startswith(url) and view.startswith(f"{url}/{VIEW}/"), (preview, view)
                kind, page = _fetch(view)  # the picture's page, with a way back to the UI
                assert kind == "text/html" and b"history.back()" in page
                full = url + view[len(f"{url}/{VIEW}"):]
                kind, body = _fetch(preview)
                with Image.open(io.BytesIO(body)) as im:
                    assert kind == "image/png" and im.width <= PREVIEW_MAX_WIDTH and im.height <= PREVIEW_MAX_HEIGHT
                kind, body = _fetch(full)
                assert kind == "image/png" and (paths.root / full[len(url) + 1:]).read_bytes() == body
                pictures += 1
    # sample map, filter chart + contact sheet, labels map, splits map, geocell map, curves, CDF, accuracy, map
    assert pictures >= 10


def test_report_opens_from_the_ui_and_numbers_are_rounded(run):
    instance, _, _, url = run
    meta = _latest(instance, "evaluation_report")
    link = re.fullmatch(r"\[open the HTML report\]\((\S+)\)", meta["report"].value).group(1)
    assert link.startswith(url + "/evaluation/") and link.endswith("/report.html")
    kind, body = _fetch(link)
    assert kind == "text/html" and b"ORACLE" in body
    # the synthetic-data caveat is a box above the title, not the fifth bullet
    assert b'class="caveat"' in body and body.index(b'class="caveat"') < body.index(b"<h1>")
    assert not re.findall(rb"\b\d+\.\d{4,}\b", body), "unrounded numbers in the HTML report"
    for key in ["end_to_end_median_km", "oracle_median_km (not end to end)"]:
        assert meta[key].value == round(meta[key].value, 1), key
    model = _latest(instance, "geopak_model")
    assert model["val_median_km"].value == round(model["val_median_km"].value, 1)
    assert model["val_province_acc_pct"].value == round(model["val_province_acc_pct"].value, 1)
    assert 0 <= model["val_province_acc_pct"].value <= 100


def test_no_unrounded_numbers_anywhere(run):
    """Float metadata: at most 3 decimals (km: 1); Markdown tables: no number with 4 or more decimals."""
    import dagster as dg

    instance, _, defs, _ = run
    bad = []
    for a in _main_job_assets(defs):
        for key in a.keys:
            event = instance.get_latest_materialization_event(key)
            for label, value in (event.asset_materialization.metadata.items() if event else []):
                if isinstance(value, dg.FloatMetadataValue) and math.isfinite(value.value):
                    digits = 1 if is_distance_km(label) else 3
                    if round(value.value, digits) != value.value:
                        bad.append((key.to_user_string(), label, value.value))
                if isinstance(value, dg.MarkdownMetadataValue) and "http" not in value.value:
                    bad += [(key.to_user_string(), label, n) for n in re.findall(r"\b\d+\.\d{4,}\b", value.value)]
    assert not bad, bad


def test_server_serves_only_reports(run):
    _, paths, _, url = run
    assert paths.catalog.exists()
    with pytest.raises(urllib.error.HTTPError) as err:
        _fetch(f"{url}/catalog/image_catalog.parquet")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError):
        _fetch(f"{url}/reports/../catalog/image_catalog.parquet")


def test_sample_world_defects_table_has_no_blank_label(run):
    instance, _, _, _ = run
    meta = _latest(instance, "sample_world_images")
    for label in ("deliberate_defects", "planned_per_province"):
        lines = metadata_text(meta[label]).splitlines()
        assert lines and not any(re.match(r"^\|\s*\|", ln) for ln in lines), (label, lines[:4])
        assert not re.search(r"\|\s+\|", lines[0]), (label, lines[0])


def test_markdown_table_keeps_long_cells_and_rounds_km():
    import pandas as pd

    from pipeline.core.report import markdown_table

    long = "x" * 200
    md = markdown_table(pd.DataFrame({"parameter": ["accuracy_rules"], "value": [long],
                                      "median_km": [49.741029379003365], "share": [0.123456],
                                      "≤25 km (%)": [12.5]}))
    assert long in md and "| 49.7 |" in md and "| 0.123 |" in md and "49.74" not in md and "| 12.5 |" in md


def test_pipes_metadata_rounds_distances_to_km_and_shares_to_percent():
    """``rounded`` follows the tables' rule: ``acc_25km`` is a share (a percentage to 0.1, its key saying so), not a
    distance (0.1 km); other numbers keep 3 digits."""
    from pipeline.defs.metadata import rounded

    out = rounded({"trainer_val_median_km": 49.7410, "trainer_val_acc_25km": 0.83456, "trainer_seconds": 12.34567,
                   "trainer_world_size": 2})
    assert out == {"trainer_val_median_km": 49.7, "trainer_val_acc_25km_pct": 83.5, "trainer_seconds": 12.346,
                   "trainer_world_size": 2}


def test_picture_preview_fits_and_never_upscales(tmp_path):
    from PIL import Image
    import io

    from pipeline.defs.metadata import plot, preview_png

    buf = io.BytesIO()
    Image.new("RGB", (1800, 400), "white").save(buf, "PNG")
    wide = buf.getvalue()
    with Image.open(io.BytesIO(preview_png(wide))) as im:
        assert im.size == (PREVIEW_MAX_WIDTH, round(400 * PREVIEW_MAX_WIDTH / 1800))
    buf = io.BytesIO()
    Image.new("RGB", (100, 50), "white").save(buf, "PNG")
    assert preview_png(buf.getvalue()) == buf.getvalue()
    paths = DataPaths.at(tmp_path)
    md = plot(paths, "wide.png", wide, "a [wide] plot").value
    assert len(md) < INLINE_MARKDOWN_LIMIT and Path(paths.report("wide.preview.png")).exists()
    assert "[![a (wide) plot: reports/wide.png](" in md and "wide.preview.png" in md


# what a curator must never read: Python reprs, raw booleans, absolute paths
REPR = re.compile(r"\b[A-Z][A-Za-z]+\((?:[a-z_]+=|\))|\{'|^(True|False|None|\[\]|\{\})$|^\['")
SYNTHETIC_ASSETS = ["sample_world_images", "image_catalog", "filtered_catalog", "labelled_catalog", "dataset_splits",
                    "geocells", "cell_assignments", "geopak_model", "evaluation_report"]


def _texts(value) -> list[str]:
    """Every piece of text a metadata value shows (each cell of a table)."""
    import dagster as dg

    if isinstance(value, dg.TableMetadataValue):
        return [str(v) for r in value.records for v in r.data.values()] + [c.name for c in value.schema.columns]
    return [str(getattr(value, "value", value))]


def _problems(key: str, meta: dict, root: Path) -> list[str]:
    """Curator-text rules broken by one materialization's metadata (see ``test_curator_text``)."""
    import dagster as dg

    bad = []
    for label, value in meta.items():
        if label.startswith("dagster/"):
            continue
        if max(len(w) for w in label.split()) > MAX_LABEL_WORD:
            bad.append(f"{key}/{label}: a label word over {MAX_LABEL_WORD} characters narrows the Value column")
        if isinstance(value, dg.BoolMetadataValue) or isinstance(getattr(value, "value", None), bool):
            bad.append(f"{key}/{label}: raw boolean")
        if isinstance(value, dg.JsonMetadataValue):
            bad.append(f"{key}/{label}: JSON (a table reads better)")
        if isinstance(value, dg.TableMetadataValue):
            names = [c.name for c in value.schema.columns]
            rows = [[r.data.get(n, "") for n in names] for r in value.records]
            if table_width_px(names, rows) > VALUE_COLUMN_PX and len(names) > 2:
                bad.append(f"{key}/{label}: {table_width_px(names, rows):.0f} px wide")
        for text in _texts(value):
            if REPR.search(text.strip()):
                bad.append(f"{key}/{label}: Python repr or raw boolean {text[:60]!r}")
            if str(root) in text:
                bad.append(f"{key}/{label}: absolute path {text[:60]!r}")
    return bad


def test_curator_text(run):
    """Issue 24: the synthetic-data note first on every asset drawn from the sample world; no repr, raw boolean,
    JSON or absolute path anywhere; every table within the Value column's width."""
    instance, paths, _, _ = run
    bad = []
    for key in [*TABLE_FILES, "geopak_model", "evaluation_report"]:
        meta = _latest(instance, key)
        if key in SYNTHETIC_ASSETS:
            first = next(k for k in meta if not k.startswith("dagster/"))
            assert first == SYNTHETIC_KEY, f"{key}: the synthetic-data note is not first ({first})"
            assert "Synthetic data" in meta[SYNTHETIC_KEY].value
        bad += _problems(key, meta, paths.root)
    assert not bad, bad
    import dagster as dg

    # the sample world has no CLIP weights: the indoor filter is skipped, and a WARN check says so
    key = dg.AssetCheckKey(dg.AssetKey("filtered_catalog"), "indoor_filter_evaluated")
    [record] = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
    evaluation = record.event.dagster_event.event_specific_data
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN


def test_curator_rules_catch_what_they_should(tmp_path):
    """The rules of ``test_curator_text`` fail on the mistakes issue 24 found (so that test can fail)."""
    import dagster as dg
    import pandas as pd

    from pipeline.defs.metadata import md_table

    wide = pd.DataFrame({"province_key": ["punjab"], **{f"column_{i}_long": [i] for i in range(8)}})
    raw = dg.MetadataValue.table(records=[dg.TableRecord({c: 1 for c in wide.columns})],
                                 schema=dg.TableSchema(columns=[dg.TableColumn(c) for c in wide.columns]))
    meta = {"rules": "{'flickr': AccuracyRule(min_level=11.0, max_metres=None)}", "flag": True, "none": "[]",
            "file": dg.MetadataValue.path(str(tmp_path / "x.parquet")), "wide": raw, "js": dg.MetadataValue.json({}),
            "outcomes_per_province_and_source": 1}
    assert {p.split(":")[0] for p in _problems("a", meta, tmp_path)} == {f"a/{k}" for k in meta}
    # md_table turns the same wide table into rows that fit, with one rounding rule
    fitted = md_table(wide.assign(median_km=[12.345], acc_25km=[0.5], ok=[True]))
    assert not _problems("a", {"t": fitted}, tmp_path)
    text = metadata_text(fitted)
    assert "median km: 12.3" in text and "acc 25km: 50.0 %" in text and "ok: yes" in text


def test_report_server_address_view_page_and_busy_port(tmp_path):
    """Issue 24.5: the server binds GEOPAK_REPORTS_URL's port, or says which setting to change; a picture opens on
    a page with a way back to the UI."""
    import socket

    from pipeline.report_server import bind_address, serve_in_thread, start_for_url

    assert bind_address("http://127.0.0.1:3001") == ("127.0.0.1", 3001)
    assert bind_address("http://geopak-host:3005/") == ("0.0.0.0", 3005)  # reached from other machines
    with pytest.raises(ValueError, match="GEOPAK_REPORTS_URL"):
        bind_address("http://127.0.0.1")  # no port: no guessing
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "a.png").write_bytes(b"png")
    (tmp_path / "catalog.parquet").write_bytes(b"x")
    server = serve_in_thread(tmp_path)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        kind, page = _fetch(f"{url}/{VIEW}/reports/a.png")
        assert kind == "text/html" and b"history.back()" in page and b"src='/reports/a.png'" in page
        for bad in (f"{VIEW}/catalog.parquet", f"{VIEW}/reports/missing.png", f"{VIEW}/reports/../catalog.parquet"):
            with pytest.raises(urllib.error.HTTPError):
                _fetch(f"{url}/{bad}")
        with pytest.raises(SystemExit, match="GEOPAK_REPORTS_URL"):  # the port is taken (by this server)
            start_for_url(tmp_path, url)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    start_for_url(tmp_path, f"http://127.0.0.1:{free}").server_close()
