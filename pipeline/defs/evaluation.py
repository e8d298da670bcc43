"""Trained model → evaluation report on the location-disjoint test split (end to end, oracle beside it)."""

import dagster as dg
import pandas as pd
from pydantic import Field

from pipeline.core import reasons
from pipeline.core.report import round_km
from pipeline.core.store import atomic_path
from pipeline.defs.metadata import data_file, md_table, plot, progress_logger, report_link, synthetic_note
from pipeline.defs.model import ModelRunResource, geopak_model
from pipeline.defs.resources import BoundariesResource, DataRootResource, writes_stage
from pipeline.evaluation.report import METHODS, data_table, headline_table
from pipeline.evaluation.run import EvaluationRequest, TestReuseRefused, evaluate_model


class EvaluationParams(dg.Config):
    """How to evaluate; which trained model is the model_run resource's run_name (the one the model steps wrote)."""

    split: str = Field(default="test", description="the split evaluated (train, val or test)")
    top_provinces: int = Field(default=0, ge=0, description="hypotheses: top provinces; 0: the value chosen on val "
                               "(model.pt); another value is other settings for the test ledger (≥ 0)")
    top_cells: int = Field(default=0, ge=0, description="hypotheses: top cells per province; 0: the value chosen on "
                           "val (model.pt); another value is other settings for the test ledger (≥ 0)")
    batch_size: int = Field(default=32, ge=1, description="images per forward pass (≥ 1)")
    knn_baseline: bool = Field(default=True, description="also score the kNN baseline on the model's encoder "
                               "features (from the predictor's one read of each image; needs knn_gallery.npz)")
    bootstrap_samples: int = Field(default=2000, ge=100, description="paired bootstrap resamples behind every "
                                   "95 % interval (≥ 100)")
    bootstrap_seed: int = Field(default=0, ge=0, description="seed of the bootstrap resampling: the same seed and "
                                "predictions give the same intervals (≥ 0)")
    force: bool = Field(default=False, description="evaluate although this model was already evaluated on this "
                        "test split with OTHER settings (the ledger <data root>/evaluation/ledger.jsonl refuses "
                        "it otherwise); the report then says at its top that test was looked at again")


def _split_table(paths, split: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    wanted = ["image_id", "path", "source", "lat", "lon", "province_id", "koppen_id", "koppen_group", "day_of_year"]
    have = set(pq.read_schema(paths.labelled).names)
    labelled = pd.read_parquet(paths.labelled, columns=[c for c in wanted if c in have])
    cells = pd.read_parquet(paths.geocells, columns=["cell_id", "center_lat", "center_lon"])
    table = (labelled.merge(pd.read_parquet(paths.cell_assignments, columns=["image_id", "cell_id"]), on="image_id")
             .merge(pd.read_parquet(paths.splits, columns=["image_id", "split"]), on="image_id")
             .merge(cells, on="cell_id"))
    return table[table["split"] == split].reset_index(drop=True)


def verified_reader(store, test: pd.DataFrame):
    """A reader of the test images' bytes, and the dict it fills: image_id -> message for every image whose bytes
    changed. It reads what the model was trained on: the image shards' copies when the data root has them (each
    shard's sha256 checked once), else the files, each checked against its image id as read (issue 13.4). An
    image that cannot be read raises ``ImageLoadError``, so ``test_predictions`` reports it instead of scoring it."""
    from geopak_model.data import image_source
    from geopak_model.predictor import ImageLoadError

    images = image_source(test, store.root)
    rows = {rel: i for i, rel in enumerate(test["path"])}
    ids = dict(zip(test["path"], test["image_id"]))
    changed: dict[str, str] = {}

    def read(rel: str) -> bytes:
        try:
            return images.read(rows[rel])
        except (OSError, ValueError) as exc:
            why = images.failure_reason(rows[rel], exc)
            if why == reasons.BYTES_CHANGED:
                changed[ids[rel]] = str(exc)
            raise ImageLoadError(f"{why}: {rel}: {exc}") from exc

    return read, changed


@dg.asset(
    pool="evaluation",  # one writer of evaluation/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="evaluation",
    kinds={"pytorch", "html"},
    deps=[geopak_model],
    description="End-to-end errors on the test split (read once) with 95 % paired bootstrap intervals, beside "
                "every baseline with its settings chosen on val (province median and cluster, kNN, global median, "
                "majority) and the oracle error (labelled); refuses a second look at test with other settings.",
    check_specs=[dg.AssetCheckSpec("beats_every_baseline", asset="evaluation_report",
                                   description="for every baseline, the 95 % paired bootstrap interval of GeoPak's "
                                               "difference excludes zero in GeoPak's favour, on the median error "
                                               "and on the share within 25 km; otherwise it names the baselines "
                                               "GeoPak is not distinguishable from")],
)
@writes_stage("evaluation")
def evaluation_report(
    context: dg.AssetExecutionContext, config: EvaluationParams, data_root: DataRootResource,
    boundaries: BoundariesResource, model_run: ModelRunResource,
) -> dg.MaterializeResult:
    paths = data_root.paths
    checkpoint = paths.model_dir / model_run.run_name / "model.pt"
    test = _split_table(paths, config.split)
    image_bytes, changed = verified_reader(data_root.store, test)
    req = EvaluationRequest(run_name=model_run.run_name, **{k: getattr(config, k)
                                                            for k in EvaluationRequest.__dataclass_fields__
                                                            if k != "run_name"})
    try:
        data = data_table(pd.read_parquet(paths.labelled, columns=["image_id", "province_id"]).merge(
            pd.read_parquet(paths.splits, columns=["image_id", "split"]), on="image_id"),
            pd.read_parquet(paths.geocells, columns=["province_id"]))
        res = evaluate_model(req, checkpoint, paths.evaluation_dir, test, _split_table(paths, "train"), image_bytes,
                             paths.weights_dir, context.run_id, getattr(boundaries.locator(), "polygons", None),
                             data, progress_logger(context, "predicted", 256), context.log.info)
    except TestReuseRefused as exc:
        raise dg.Failure(str(exc)) from exc
    rep, failed, verdict, written = res.report, res.failed, res.verdict, res.written
    with atomic_path(res.out_dir / "predictions.parquet") as tmp:
        res.predictions.to_parquet(tmp)
    check = dg.AssetCheckResult(
        check_name="beats_every_baseline", passed=bool(verdict["passed"]), severity=dg.AssetCheckSeverity.WARN,
        metadata={"decision": verdict["decision"], "comparison": md_table(verdict["frame"], max_rows=100)},
    )
    sections = {name.split(" (")[0].split(":")[0]: table for name, table in rep.sections.items()}
    return dg.MaterializeResult(check_results=[check], metadata={
        **synthetic_note(paths.labelled),  # first: every figure below inherits the caveat
        # opens in the browser through the report server (a file:// link is blocked from the UI's http page)
        # a short Markdown link (a URL value shows the whole address, one long word that would not fit)
        "report": dg.MetadataValue.md(f"[open the HTML report]({report_link(paths, written['report.html'])})"),
        **({"FORCED": res.banner} if res.banner else {}),
        "error_cdf": plot(paths, "evaluation_error_cdf.png", rep.plots["error_cdf.png"], "error CDF"),
        "error_map": plot(paths, "evaluation_error_map.png", rep.plots["error_map.png"], "error map"),
        "test_images": rep.n_images,
        "test_image_reads": res.reads,
        "unreadable_images": len(failed),
        "bytes_changed_images": len(changed),
        "unreadable_detail": md_table(pd.DataFrame(
            [{"image_id": f["image_id"], "reason": reasons.BYTES_CHANGED if f["image_id"] in changed
              else "unreadable", "error": f["error"]} for f in failed], columns=["image_id", "reason", "error"])),
        "end_to_end_median_km": round_km(rep.metric("pred", "median_km")),
        "end_to_end_median_km_95ci": " to ".join(f"{round_km(x)} km" for x in rep.boot.interval("pred", "median_km")),
        "beats_every_baseline": "yes" if verdict["passed"] else "no (see the beats_every_baseline check)",
        "baseline_decision": verdict["decision"],
        "baseline_comparison": md_table(verdict["frame"], max_rows=100),
        "oracle_median_km (not end to end)": round_km(rep.metric("oracle", "median_km")),
        "distance_errors": md_table(headline_table(rep)),
        **{f"val: {name}": md_table(table, max_rows=max(len(table), 1)) for name, table in sections.items()
           if not name.startswith("GeoPak against")},
        "classification": md_table(rep.other),
        "per_province": md_table(rep.provinces),
        "province_confusion": md_table(rep.confusion.reset_index()),
        "province_accuracy": plot(paths, "evaluation_province_accuracy.png", rep.plots["province_accuracy.png"],
                                  "per-province accuracy"),
        "notes": md_table(pd.DataFrame({"note": res.notes}), max_rows=100),
        "report_html": data_file(paths, written["report.html"]),
        "report_md": data_file(paths, written["report.md"]),
        "methods": md_table(pd.DataFrame(list(METHODS.items()), columns=["method", "what it is"]), max_rows=100),
    })
