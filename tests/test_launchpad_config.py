"""The Launchpad explains itself: every config field is described and bounded, and Config <-> dataclass round-trips."""

import dataclasses

import dagster as dg
import pydantic
import pytest

from geopak_model.config import PhaseConfig, TrainConfig, preset
from pipeline.defs import geocells
from pipeline.defs.config import config_class, from_dataclass, overrides, to_dataclass
from pipeline.defs.dagster_private import ConfigTypeKind
from pipeline.defs.filtering import FilterParams
from pipeline.defs.geocells import GeocellParams, SplitParams
from pipeline.defs.ingest import SampleWorldParams
from pipeline.defs.jobs import CRAWL_JOB, MAIN_JOB
from pipeline.defs.model import ModelRunResource, train_config
from pipeline.defs.resources import BoundariesResource, DataRootResource
from pipeline.definitions import defs
from pipeline.filters.geotag import AccuracyRule
from pipeline.filters.indoor import ClipSpec
from pipeline.filters.stage import FilterConfig
from pipeline.geocells.cells import GeocellConfig
from pipeline.geocells.splits import SplitConfig
from pipeline.sources.sample_world import SampleWorldConfig

_SHAPES = (ConfigTypeKind.STRICT_SHAPE, ConfigTypeKind.PERMISSIVE_SHAPE, ConfigTypeKind.SELECTOR)
# Dagster's own sections (executor, loggers, its default io_manager) are documented by Dagster, not by us
_DAGSTER_OWNED = ("execution", "loggers", "resources.io_manager")


def _fields(config_type, path: str):
    """(path, description) of every field below ``config_type``, recursively (lists, maps, optionals included)."""
    kind = config_type.kind
    if kind in _SHAPES:
        for name, field in config_type.fields.items():
            yield f"{path}.{name}", field.description
            yield from _fields(field.config_type, f"{path}.{name}")
    elif kind in (ConfigTypeKind.ARRAY, ConfigTypeKind.NONEABLE):
        yield from _fields(config_type.inner_type, f"{path}[]")
    elif kind == ConfigTypeKind.MAP:
        yield from _fields(config_type.inner_type, f"{path}{{}}")


def _user_fields(job_name: str) -> list[tuple[str, str | None]]:
    schema = defs.resolve_job_def(job_name).run_config_schema.config_type
    out = []
    for path, description in _fields(schema, ""):
        path = path.lstrip(".")
        if path.startswith(_DAGSTER_OWNED):
            continue
        parts = path.split(".")
        # "ops.<op>" / "ops.<op>.config" and "resources.<r>" / "resources.<r>.config" are Dagster's containers
        if parts[0] in ("ops", "resources") and len(parts) >= 4 and parts[2] == "config":
            out.append((path, description))
    return out


@pytest.mark.parametrize("job_name", [MAIN_JOB, CRAWL_JOB])
def test_every_launchpad_field_is_described(job_name):
    fields = _user_fields(job_name)
    assert len(fields) > (150 if job_name == MAIN_JOB else 60)  # the walk reached the nested fields
    missing = [path for path, description in fields if not (description or "").strip()]
    assert not missing, f"{job_name}: fields without a description: {missing}"
    paths = {p for p, _ in fields}
    # nested dataclasses are nested Config sections, reached by the walk
    assert "ops.filtered_catalog.config.clip.pretrained" in paths or job_name != MAIN_JOB
    assert "resources.model_run.config.overrides.phases[][].epochs" in paths or job_name != MAIN_JOB
    assert "resources.model_run.config.overrides.loss[].tau_km" in paths or job_name != MAIN_JOB


def _config_field_names(op_entry) -> list[str]:
    """Names a Launchpad user can set under ``ops.<op>.config`` (Dagster gives a config-less op ``config: Any``)."""
    config = op_entry.config_type.fields.get("config")
    if config is None or config.config_type.kind not in _SHAPES:
        return []
    return list(config.config_type.fields)


@pytest.mark.parametrize("job_name", [MAIN_JOB, CRAWL_JOB])
def test_no_empty_op_entries(job_name):
    """A config-less asset check runs in its asset's own step (``check_specs``), so ``ops`` lists no check op with
    nothing to configure: every entry is an asset's op or has config fields."""
    ops = defs.resolve_job_def(job_name).run_config_schema.config_type.fields["ops"].config_type.fields
    asset_ops = {a.node_def.name for a in defs.resolve_asset_graph().assets_defs if a.keys}
    empty = sorted(name for name, entry in ops.items() if name not in asset_ops and not _config_field_names(entry))
    assert not empty, f"{job_name}: op entries with nothing to configure: {empty}"
    check_ops = set(ops) - asset_ops
    if job_name == MAIN_JOB:  # the walk saw the checks that do have settings, and the folded checks still exist
        assert check_ops == {"filtered_catalog_filtered_nonempty_per_province"}
        checks = {k.name for k in defs.resolve_job_def(job_name).asset_layer.asset_graph.asset_check_keys}
        assert {"image_catalog_unique_ids", "filtered_disjoint_from_rejections", "filter_rejections_have_reasons",
                "labelled_inside_pakistan", "labelled_koppen_not_null", "labelled_provinces_from_polygons",
                "dataset_splits_no_leak", "geocells_within_cap", "cell_assignments_complete"} <= checks
    else:
        assert check_ops and all(name.endswith("_crawled_recently") for name in check_ops)


def test_descriptions_show_bounds():
    field = defs.resolve_job_def(MAIN_JOB).run_config_schema.config_type.fields["ops"].config_type.fields[
        "filtered_catalog"].config_type.fields["config"].config_type.fields["indoor_threshold"]
    assert "≥ 0.0" in field.description and "≤ 1.0" in field.description and "indoor" in field.description


def test_out_of_range_value_fails_with_a_readable_message(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="indoor_threshold") as err:
        FilterParams(indoor_threshold=1.5)
    assert "less than or equal to 1" in str(err.value)
    result = dg.materialize(
        [geocells.dataset_splits],
        resources={"data_root": DataRootResource(path=str(tmp_path)), "boundaries": BoundariesResource()},
        run_config={"ops": {"dataset_splits": {"config": {"train": 1.5}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "train" in message and "less than or equal to 1" in message


def test_choices_are_checked_before_launch():
    job = defs.resolve_job_def(MAIN_JOB)
    bad = {"ops": {"geocells": {"config": {"cluster_selection_method": "kmeans"}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="cluster_selection_method"):
        dg.validate_run_config(job, bad)
    bad_preset = {"resources": {"model_run": {"config": {"preset": "huge"}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="preset"):
        dg.validate_run_config(job, bad_preset)
    dg.validate_run_config(job, {"ops": {"geocells": {"config": {"cluster_selection_method": "leaf"}}}})


@pytest.mark.parametrize("params,dc", [
    (FilterParams, FilterConfig), (SplitParams, SplitConfig), (GeocellParams, GeocellConfig),
    (SampleWorldParams, SampleWorldConfig),
])
def test_defaults_are_the_dataclass_defaults(params, dc):
    assert to_dataclass(params(), dc) == dc()


def test_round_trip_dataclass_config_dataclass():
    cases = [
        FilterConfig(min_sharpness=9.5, allowed_formats=("JPEG",), accuracy_rules={"*": AccuracyRule(max_metres=50)},
                     allowed_licenses={"flickr": ("cc",), "*": ()}, clip=ClipSpec("ViT-B-16", "openai", None, True),
                     chunk_size=4),
        SplitConfig(train=0.6, val=0.2, test=0.2, owner_disjoint=False),
        GeocellConfig(cluster_selection_method="leaf", neighbours=3),
        SampleWorldConfig(n_images=12, image_size=64),
        preset("gpu-full"),
        preset("cpu-small", loss={"tau_km": {"ict": 5.0}}, augment={"crop_scale": (0.5, 1.0)}),
    ]
    for value in cases:
        cls = config_class(type(value))
        back = to_dataclass(from_dataclass(value, cls), type(value))
        assert back == value, type(value).__name__
    assert isinstance(to_dataclass(from_dataclass(preset("gpu-full"), config_class(TrainConfig)), TrainConfig)
                      .phases[0], PhaseConfig)


def test_conversion_is_by_keyword_and_nested():
    cfg = FilterParams(clip={"model": "ViT-L-14", "pretrained": "", "download": False},
                       accuracy_rules={"yfcc100m": {"min_level": 12}}).to_config()
    assert cfg.clip == ClipSpec(model="ViT-L-14", pretrained="", cache_dir=None, download=False)
    assert cfg.accuracy_rules == {"yfcc100m": AccuracyRule(min_level=12)}
    assert isinstance(cfg.allowed_formats, tuple) and cfg.chunk_size == FilterConfig().chunk_size


def test_model_overrides_are_typed_and_merged_into_the_preset_by_name(tmp_path):
    params = ModelRunResource(preset="test-tiny", overrides={
        "cpu_threads": 1, "phases": [{"epochs": 3}, {}, {"lr": 0.5}], "loss": {"cell": 2.0},
        "encoder": {"clip_activation": "gelu"}})
    assert overrides(params.overrides) == {"cpu_threads": 1, "phases": [{"epochs": 3}, {}, {"lr": 0.5}],
                                           "loss": {"cell": 2.0}, "encoder": {"clip_activation": "gelu"}}
    cfg = train_config(params, DataRootResource(path=str(tmp_path)))
    base = preset("test-tiny")
    assert cfg.phases[0].epochs == 3 and cfg.phases[0].lr == base.phases[0].lr  # merged, not replaced
    assert cfg.phases[2].lr == 0.5 and cfg.phases[1] == base.phases[1]
    assert cfg.loss.cell == 2.0 and cfg.loss.province == base.loss.province
    assert cfg.encoder.clip_activation == "gelu" and cfg.encoder.image_size == base.encoder.image_size
    assert cfg.cpu_threads == 1 and cfg.data_root == str(tmp_path)
    # nothing set: exactly the preset
    assert train_config(ModelRunResource(), DataRootResource(path=str(tmp_path))) == preset(
        "cpu-small", data_root=str(tmp_path))
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 1"):
        ModelRunResource(overrides={"phases": [{"batch_size": 0}]})


def test_a_field_without_description_is_an_error():
    @dataclasses.dataclass
    class Undocumented:
        documented: int = dataclasses.field(default=1, metadata={"doc": "fine"})
        silent: int = 2

    with pytest.raises(TypeError, match="Undocumented.silent has no description"):
        config_class(Undocumented)


@pytest.mark.parametrize("job_name", [MAIN_JOB, CRAWL_JOB])
def test_launchpad_text_is_curator_text(job_name):
    """Descriptions read as plain Markdown: no reStructuredText double backquotes, no issue numbers; every resource
    is described, and none shows an always-empty ``env`` map."""
    import re

    texts = [(p, d or "") for p, d in _user_fields(job_name)]
    resources = defs.get_repository_def().get_top_level_resources()
    texts += [(f"resources.{key}", r.description or "") for key, r in resources.items()]
    assert not [key for key, r in resources.items() if not (r.description or "").strip()]
    assert not [p for p, d in texts if "``" in d or re.search(r"#\d|\bissue \d", d)]
    assert not [p for p, _ in _user_fields(job_name) if p.startswith("resources.") and p.endswith(".config.env")]


@pytest.mark.parametrize("dc,bad", [
    (GeocellConfig, {"urban_cap_km": 0.0}), (GeocellConfig, {"cluster_selection_method": "kmeans"}),
    (SplitConfig, {"min_distance_km": -1.0}), (SampleWorldConfig, {"image_size": 2048}),
    (AccuracyRule, {"max_metres": -5.0}),
])
def test_dataclass_bounds_come_from_the_field_metadata(dc, bad):
    """The bound the Launchpad shows is the one the dataclass enforces: both read the field's metadata."""
    ((name, value),) = bad.items()
    meta = {f.name: f.metadata for f in dataclasses.fields(dc)}[name]
    with pytest.raises(ValueError, match=name):
        dc(**bad)
    description = config_class(dc).model_fields[name].description or ""
    assert meta["doc"] in description
    assert all(f"{bound}" in description for key, bound in meta.items() if key in ("ge", "gt", "le", "lt"))
