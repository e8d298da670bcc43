"""Trained model → evaluation report on the location-disjoint test split (end to end, oracle beside it)."""

import datetime as dt

import dagster as dg
import pandas as pd
from pydantic import Field

from pipeline.core import reasons
from pipeline.core.store import atomic_path
from pipeline.core.report import round_km
from pipeline.defs.metadata import md_table, plot, progress_logger, report_link
from pipeline.defs.model import geopak_model
from pipeline.defs.resources import BoundariesResource, DataRootResource, writes_stage
from pipeline.evaluation.report import (
    METHODS,
    baseline_verdict,
    evaluate,
    headline_table,
    make_plots,
    test_predictions,
    write_report,
)


class EvaluationParams(dg.Config):
    run_name: str = Field(default="geopak", description="which trained model under <data root>/model/")
    split: str = Field(default="test", description="the split evaluated (train, val or test)")
    top_provinces: int = Field(default=0, ge=0, description="hypotheses: top provinces; 0: the checkpoint's "
                               "inference setting (≥ 0)")
    top_cells: int = Field(default=0, ge=0, description="hypotheses: top cells per province; 0: the checkpoint's "
                           "inference setting (≥ 0)")
    batch_size: int = Field(default=32, ge=1, description="images per forward pass (≥ 1)")
    knn_baseline: bool = Field(default=True, description="also score the nearest training image in the frozen "
                               "encoders' space (embeds the test images)")


def _split_table(paths, split: str) -> pd.DataFrame:
    labelled = pd.read_parquet(paths.labelled, columns=[
        "image_id", "path", "lat", "lon", "province_id", "koppen_id", "koppen_group", "day_of_year"])
    cells = pd.read_parquet(paths.geocells, columns=["cell_id", "center_lat", "center_lon"])
    table = (labelled.merge(pd.read_parquet(paths.cell_assignments, columns=["image_id", "cell_id"]), on="image_id")
             .merge(pd.read_parquet(paths.splits, columns=["image_id", "split"]), on="image_id")
             .merge(cells, on="cell_id"))
    return table[table["split"] == split].reset_index(drop=True)


def verified_reader(store, test: pd.DataFrame):
    """A reader of the test images' bytes that checks them against their image id as it reads them (issue 13.4),
    and the dict it fills: image_id -> message for every image whose bytes changed. Such an image (and a missing
    file) raises ``ImageLoadError``, so ``test_predictions`` reports it as unreadable instead of scoring it."""
    from geopak_model.data import BytesChangedError, read_verified
    from geopak_model.predictor import ImageLoadError

    ids = dict(zip(test["path"], test["image_id"]))
    changed: dict[str, str] = {}

    def read(rel: str) -> bytes:
        try:
            return read_verified(store.abspath(rel), ids[rel])
        except BytesChangedError as exc:
            changed[ids[rel]] = str(exc)
            raise ImageLoadError(f"{reasons.BYTES_CHANGED}: {exc}") from exc
        except OSError as exc:
            raise ImageLoadError(f"{rel}: {exc}") from exc

    return read, changed


@dg.asset(
    pool="evaluation",  # one writer of evaluation/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="evaluation",
    kinds={"pytorch", "html"},
    deps=[geopak_model],
    description="End-to-end errors on the test split, beside every baseline (province median, kNN retrieval, "
                "majority) and the oracle error (labelled).",
    check_specs=[dg.AssetCheckSpec("beats_every_baseline", asset="evaluation_report",
                                   description="GeoPak's end-to-end median error is below, and its share within "
                                               "25 km above, every baseline's")],
)
@writes_stage("evaluation")
def evaluation_report(
    context: dg.AssetExecutionContext, config: EvaluationParams, data_root: DataRootResource,
    boundaries: BoundariesResource,
) -> dg.MaterializeResult:
    from geopak_model.predictor import GeopakPredictor

    paths = data_root.paths
    checkpoint = paths.model_dir / config.run_name / "model.pt"
    predictor = GeopakPredictor.from_checkpoint(checkpoint, weights_dir=paths.weights_dir)  # where training found them
    test = _split_table(paths, config.split)
    train = _split_table(paths, "train")
    context.log.info(f"evaluating {checkpoint} on {len(test)} {config.split} images")
    knn = None
    if config.knn_baseline:
        from pipeline.evaluation.baselines import knn_locations

        knn = knn_locations(predictor.cfg, paths.root, train, test, paths.weights_dir)
    image_bytes, changed = verified_reader(data_root.store, test)
    df, failed = test_predictions(predictor, test, train, image_bytes,
                                  batch_size=config.batch_size, progress=progress_logger(context, "predicted", 256),
                                  top_provinces=config.top_provinces or None, top_cells=config.top_cells or None,
                                  knn=knn)
    rep = evaluate(df)
    inf = predictor.cfg.inference
    make_plots(rep, df, getattr(boundaries.locator(), "polygons", None))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = paths.evaluation_dir / f"{config.run_name}-{stamp}"
    notes = [
        f"checkpoint: {checkpoint} (preset {predictor.cfg.preset})",
        f"inference: top {config.top_provinces or inf.top_provinces} provinces × top {config.top_cells or inf.top_cells}"
        f" cells; point estimate '{inf.point}'; retrieval refinement: "
        + (f"{inf.refine_neighbours} look-alikes within {inf.refine_radius_km:g} km" if predictor.gallery is not None
           else "no gallery beside the checkpoint"),
        "every baseline is computed from the training split only",
        "the ORACLE row is given the true province and cell; it is what GEOPAK reported and is not achievable",
        "on the sample world these are synthetic images: the numbers test the pipeline, not real-world accuracy",
    ]
    if changed:
        notes.append(f"{len(changed)} {config.split} images were not scored: their bytes no longer hash to their "
                     f"image id ({reasons.BYTES_CHANGED}): {', '.join(sorted(changed)[:20])}")
    written = write_report(rep, out_dir, f"GeoPak evaluation ({config.split} split)", notes)
    with atomic_path(out_dir / "predictions.parquet") as tmp:
        df.to_parquet(tmp)
    verdict = baseline_verdict(rep)
    check = dg.AssetCheckResult(
        check_name="beats_every_baseline", passed=bool(verdict["passed"]), severity=dg.AssetCheckSeverity.WARN,
        metadata={"comparison": dg.MetadataValue.md(verdict["table"])},
    )
    return dg.MaterializeResult(check_results=[check], metadata={
        # opens in the browser through the report server (a file:// link is blocked from the UI's http page)
        "report": dg.MetadataValue.url(report_link(paths, written["report.html"])),
        "error_cdf": plot(paths, "evaluation_error_cdf.png", rep.plots["error_cdf.png"], "error CDF"),
        "error_map": plot(paths, "evaluation_error_map.png", rep.plots["error_map.png"], "error map"),
        "test_images": rep.n_images,
        "unreadable_images": len(failed),
        "bytes_changed_images": len(changed),
        "unreadable_detail": md_table(pd.DataFrame(
            [{"image_id": f["image_id"], "reason": reasons.BYTES_CHANGED if f["image_id"] in changed
              else "unreadable", "error": f["error"]} for f in failed], columns=["image_id", "reason", "error"])),
        "end_to_end_median_km": round_km(rep.metric("pred", "median_km")),
        "beats_every_baseline": bool(verdict["passed"]),
        "baseline_comparison": dg.MetadataValue.md(verdict["table"]),
        "oracle_median_km (not end to end)": round_km(rep.metric("oracle", "median_km")),
        "distance_errors": md_table(headline_table(rep)),
        "classification": md_table(rep.other),
        "per_province": md_table(rep.provinces),
        "province_confusion": md_table(rep.confusion.reset_index()),
        "province_accuracy": plot(paths, "evaluation_province_accuracy.png", rep.plots["province_accuracy.png"],
                                  "per-province accuracy"),
        "report_html": dg.MetadataValue.path(str(written["report.html"])),
        "report_md": dg.MetadataValue.path(str(written["report.md"])),
        "methods": dg.MetadataValue.md("\n".join(f"- `{k}`: {v}" for k, v in METHODS.items())),
    })
