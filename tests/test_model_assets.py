"""materialize() of the model group on a tiny synthetic world: training runs in a subprocess, metadata has the
checkpoint, per-epoch metrics, curves and the comparison with the majority baselines."""

from __future__ import annotations

import dagster as dg
import pydantic
import pytest
import torch

from pipeline.defs import model
from pipeline.defs.resources import DataRootResource, TorchrunResource
from tests.model_world import build_world
from pipeline.defs.metadata import metadata_text


@pytest.mark.slow
def test_materialize_model_group(tmp_path):
    paths = build_world(tmp_path, per_cell=4, size=40)
    overrides = {"cpu_threads": 1, "phases": [{"epochs": 1}, {"epochs": 2}, {"epochs": 1}]}
    params = {"preset": "test-tiny", "overrides": overrides}
    result = dg.materialize(
        dg.load_assets_from_modules([model]),
        resources={"data_root": DataRootResource(path=str(tmp_path)), "torchrun": TorchrunResource(),
                   "pipes_subprocess_client": dg.PipesSubprocessClient(), "model_run": model.ModelRunResource()},
        run_config={"resources": {"model_run": {"config": params}}},  # one setting for both model steps
    )
    assert result.success
    cache_md = result.asset_materializations_for_node("embedding_cache")[0].metadata
    assert cache_md["cached_images"].value == 56 and cache_md["computed_now"].value == 56
    md = result.asset_materializations_for_node("geopak_model")[0].metadata
    ckpt = tmp_path / md["checkpoint"].value  # relative to the data root
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["phase"] in (1, 2)  # better of phases 1-2
    assert "| province accuracy |" in metadata_text(md["model_vs_baselines"])
    assert "ORACLE" in metadata_text(md["model_vs_baselines"])
    assert metadata_text(md["metrics_per_epoch"]).count("\n") >= 4  # header + 4 epochs
    assert "geopak_training_curves.preview.png" in md["loss_curves"].value
    assert paths.report("geopak_training_curves.png").stat().st_size > 1000
    checks = result.get_asset_check_evaluations()
    assert [c.check_name for c in checks] == ["beats_majority_baselines"]


def test_bad_preset_is_a_clear_failure(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="preset"):  # the Launchpad lists the presets to pick from
        model.train_config(model.ModelRunResource(preset="nope"), DataRootResource(path=str(tmp_path)))
