"""Splits + labelled catalog → image shards (WebDataset tars, img2dataset layout) and the dataset's datasheet.

A thin wrapper over ``pipeline.export.build``: the embedding cache, phase-2 training and the evaluation read these
copies instead of the original files (``pipeline.core.shards``), and the same shards are the dataset export.
"""

import dagster as dg
import pandas as pd

from pipeline.core.shards import DATASHEET, MANIFEST, SPLITS
from pipeline.defs.config import config_class, to_dataclass
from pipeline.defs.geocells import dataset_splits
from pipeline.defs.labels import labelled_catalog
from pipeline.defs.metadata import breakable, data_file, md_table, progress_logger
from pipeline.defs.resources import ComputeResource, DataRootResource, writes_stage
from pipeline.export import datasheet
from pipeline.export.build import ShardConfig, build_shards, decode_work

ShardParams = config_class(ShardConfig, name="ShardParams",
                           doc="Size and JPEG quality of the stored copies, samples per shard.")
# below this many images to decode, worker processes cost more than they save (spawn + imports ~2 s)
PARALLEL_FROM = 256


@dg.asset(
    pool="shards",  # one writer of shards/ at a time, across runs (dagster_home/dagster.yaml)
    group_name="model",
    kinds={"webdataset"},
    deps=[dataset_splits, labelled_catalog],
    description="Every train/val/test image once, pre-resized (short side 320), in WebDataset tar shards with a "
                "Parquet index and each shard's sha256; every sample's licence and attribution in its JSON; "
                "DATASHEET.md beside them.",
)
@writes_stage("shards")
def image_shards(context: dg.AssetExecutionContext, config: ShardParams, data_root: DataRootResource,
                 compute: ComputeResource) -> dg.MaterializeResult:
    cfg = to_dataclass(config, ShardConfig)
    paths = data_root.paths
    progress = progress_logger(context, "shards written", 10)

    def mapper(fn, jobs):
        if not jobs:
            return []
        heavy = sum(decode_work(pd.DataFrame([{"image_id": r[0], "path": r[1], "width": r[2]["original_width"],
                                                "height": r[2]["original_height"]} for r in j.rows]), cfg,
                                paths.root) for j in jobs)
        context.log.info(f"writing {len(jobs)} shards ({heavy} images to decode and resize)")
        if heavy < PARALLEL_FROM:
            out = []
            for i, job in enumerate(jobs):
                out.append(fn(job))
                progress(i + 1, len(jobs))
            return out
        return compute.map_chunks(fn, jobs, progress=progress)

    built = build_shards(paths, cfg, mapper, datasheet.documents)
    per_split = pd.DataFrame([{
        "split": s, "images": sum(i.samples for i in built.shards if i.split == s),
        "shards": sum(1 for i in built.shards if i.split == s),
        "MB": round(sum(i.bytes for i in built.shards if i.split == s) / 2**20, 1),
        "not copied": sum(len(i.rejected) for i in built.shards if i.split == s)} for s in SPLITS])
    exported = datasheet.exported_frame(built)
    licences = (exported.fillna({"license": "(none)"}).groupby(["source", "license"]).size().rename("images")
                .reset_index() if len(exported) else pd.DataFrame())
    total_bytes = sum(i.bytes for i in built.shards)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": int(per_split["images"].sum()),
        "per_split": md_table(per_split),
        "shards": len(built.shards),
        "MB": round(total_bytes / 2**20, 1),
        "written_now": built.written,
        "kept_unchanged": built.kept,
        "removed": built.removed,
        "images_resized": built.counts.get("resized", 0) + built.counts.get("from_filter", 0),
        # the filter's single decode made the copy (pipeline.core.copies) vs the original decoded a second time
        "copies_from_filter": built.counts.get("from_filter", 0),
        "copies_decoded_again": built.counts.get("resized", 0),
        "invalid_copies_remade": built.counts.get("invalid_cached", 0),
        "images_copied_as_is": built.counts.get("copied", 0),
        "reused_from_last_shard": built.counts.get("reused", 0),
        "not_copied": len(built.rejections),
        "not_copied_by_reason": md_table(built.rejections["reason"].value_counts().rename("images")
                                         .rename_axis("reason").reset_index()),
        "licences": md_table(licences),
        "copy": f"short side ≤ {cfg.short_side} px, JPEG quality {cfg.quality} ({cfg.preprocess})",
        "seconds": round(built.seconds, 1),
        "manifest": data_file(paths, built.root / MANIFEST),
        "datasheet": data_file(paths, built.root / DATASHEET),
        "dataset_card": data_file(paths, built.root / datasheet.CARD),
        # what webdataset.WebDataset(...) takes (brace pattern over the training shards)
        "train_urls": breakable(
            built.root / "train" / f"{{00000..{max(0, int(per_split.loc[0, 'shards']) - 1):05d}}}.tar"),
    })
