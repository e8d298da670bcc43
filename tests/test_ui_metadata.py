"""Issue 15 (1, 2, 7): what a curator sees on the asset pages, read back through a real Dagster instance.

One in-process run of the main job on a small sample world (the tiny model) against a SQLite instance in a temp
folder, with the report server started here; then, for every table asset: the standard row count equals the
Parquet file's, the column schema lists every column with a description, lineage points at real columns; every
picture is a short Markdown image (rendered without a click) whose preview and full PNG the server returns; the
HTML report opens through its URL.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.core.paths import DataPaths
from pipeline.core.report import is_distance_km
from pipeline.defs.jobs import MAIN_JOB
from pipeline.defs.metadata import PREVIEW_MAX_HEIGHT, PREVIEW_MAX_WIDTH, REPORTS_URL_ENV
from tests.cluster_support import small_main_job_config

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

        home = tmp / "dagster_home"
        home.mkdir()
        with dg.DagsterInstance.local_temp(str(home)) as instance:
            result = defs.resolve_job_def(MAIN_JOB).execute_in_process(
                run_config=small_main_job_config(), instance=instance, raise_on_error=False)
            assert result.success, [str(e.step_failure_data.error) for e in result.all_events
                                    if e.event_type == dg.DagsterEventType.STEP_FAILURE]
            yield instance, DataPaths.at(data), defs, url
    server.shutdown()


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
            for preview, full in links:
                assert preview.startswith(url) and full.startswith(url), (preview, full)
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
    link = meta["report"].value
    assert link.startswith(url + "/evaluation/") and link.endswith("/report.html")
    kind, body = _fetch(link)
    assert kind == "text/html" and b"ORACLE" in body
    assert not re.findall(rb"\b\d+\.\d{4,}\b", body), "unrounded numbers in the HTML report"
    for key in ["end_to_end_median_km", "oracle_median_km (not end to end)"]:
        assert meta[key].value == round(meta[key].value, 1), key
    model = _latest(instance, "geopak_model")
    assert model["val_median_km"].value == round(model["val_median_km"].value, 1)
    assert model["val_province_acc"].value == round(model["val_province_acc"].value, 3)


def test_no_unrounded_numbers_anywhere(run):
    """Float metadata: at most 3 decimals (km: 1); Markdown tables: no number with 4 or more decimals."""
    import dagster as dg

    instance, _, defs, _ = run
    bad = []
    for a in _main_job_assets(defs):
        for key in a.keys:
            event = instance.get_latest_materialization_event(key)
            for label, value in (event.asset_materialization.metadata.items() if event else []):
                if isinstance(value, dg.FloatMetadataValue) and value.value == value.value:  # not NaN
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
        lines = meta[label].value.splitlines()
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


def test_pipes_metadata_rounds_distances_to_km_and_shares_to_three_digits():
    """``rounded`` follows the tables' rule: ``acc_25km`` is a share (3 digits), not a distance (0.1 km)."""
    from pipeline.defs.metadata import rounded

    out = rounded({"trainer_val_median_km": 49.7410, "trainer_val_acc_25km": 0.83456, "trainer_seconds": 12.34567,
                   "trainer_world_size": 2})
    assert out == {"trainer_val_median_km": 49.7, "trainer_val_acc_25km": 0.835, "trainer_seconds": 12.346,
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
