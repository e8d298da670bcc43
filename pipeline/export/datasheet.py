"""``DATASHEET.md`` beside the shards: the questions of "Datasheets for Datasets" (Gebru et al., CACM 2021) answered
with the counts of the data actually exported, so a reader of the export knows what it is before using it, and
above all whether it is the synthetic sample world.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa

from pipeline.core.paths import DataPaths
from pipeline.core.report import markdown_table
from pipeline.core.schema import description
from pipeline.core.shards import DATASHEET, SPLITS
from pipeline.export.records import RECORD_SCHEMA

if TYPE_CHECKING:
    from pipeline.export.build import ShardBuild, ShardConfig

SYNTHETIC_SOURCE = "sample_world"
CARD = "README.md"  # the Hugging Face dataset card: splits and typed features, so datasets.load_dataset(folder) reads it
_HF_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool"}


def documents(build: ShardBuild, cfg: ShardConfig) -> dict[str, str]:
    """The files written beside the shards: the datasheet and the dataset card."""
    return {DATASHEET: render(build, cfg), CARD: dataset_card(build)}


def _yaml_features(fields: list[pa.Field], pad: str) -> list[str]:
    """Hugging Face's YAML form of typed features (``Features._to_yaml_list``), from an Arrow schema."""
    out = []
    for f in fields:
        out.append(f"{pad}- name: {f.name}")
        t = f.type
        if pa.types.is_list(t) and pa.types.is_struct(t.value_type):
            out += [f"{pad}  list:", *_yaml_features(list(t.value_type), pad + "  ")]
        elif pa.types.is_struct(t):
            out += [f"{pad}  struct:", *_yaml_features(list(t), pad + "  ")]
        else:
            out.append(f"{pad}  dtype: {_HF_DTYPES[t]}")
    return out


def dataset_card(build: ShardBuild) -> str:
    """A dataset card whose YAML declares the splits and every JSON field's type: Hugging Face ``datasets`` infers
    types from a shard's first 5 samples, and a field null in all of them (a title, a date note) would then fail
    on the first sample that has one. ``datasets.load_dataset("<shards folder>")`` reads this card."""
    splits = [s for s in SPLITS if any(i.split == s for i in build.shards)]
    lines = ["---", "license: other", "pretty_name: GeoPak image shards", "tags: [geolocation, pakistan, webdataset]",
             "configs:", "- config_name: default", "  data_files:"]
    lines += [x for s in splits for x in (f"  - split: {s}", f"    path: {s}/*.tar")]
    lines += ["dataset_info:", "  features:", "  - name: jpg", "    dtype: image", "  - name: json", "    struct:",
              *_yaml_features(list(RECORD_SCHEMA), "    "),
              "  - name: __key__", "    dtype: string", "  - name: __url__", "    dtype: string", "---", "",
              "# GeoPak image shards", "",
              f"WebDataset shards of the GeoPak dataset; read `{DATASHEET}` (what the data is, whether it is the "
              "synthetic sample world, licences and attribution) before using them.", "",
              "| field | meaning |", "| --- | --- |",
              *[f"| `{f.name}` | {description(f)} |" for f in RECORD_SCHEMA], ""]
    return "\n".join(lines)


def exported_frame(build: ShardBuild) -> pd.DataFrame:
    """The records of the samples that are in the shards (those the build could not copy left out)."""
    df = pd.DataFrame(build.records["record"].tolist())
    if len(build.rejections):
        df = df[~df["image_id"].isin(build.rejections["image_id"])]
    return df.reset_index(drop=True)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def _crosstab(df: pd.DataFrame, rows: str) -> pd.DataFrame:
    """Images per ``rows`` value and split, with a total column (sorted by it)."""
    if df.empty:
        return pd.DataFrame()
    t = pd.crosstab(df[rows].fillna("(none)"), df["split"]).reindex(columns=list(SPLITS), fill_value=0)
    t["total"] = t.sum(axis=1)
    return t.sort_values("total", ascending=False).reset_index()


def _reasons(path, stage: str) -> str:
    """'reason: count, …' of an upstream stage's rejections file (what was not exported and why)."""
    if not path.exists():
        return f"{stage}: no rejections file"
    counts = pd.read_parquet(path, columns=["reason"])["reason"].value_counts()
    if counts.empty:
        return f"{stage}: none"
    return f"{stage}: {int(counts.sum()):,} (" + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")"


def render(build: ShardBuild, cfg: ShardConfig) -> str:
    """The datasheet's Markdown, from the build and the upstream stages' files under the same data root."""
    paths = DataPaths.at(build.root.parent)
    df = exported_frame(build)
    n = len(df)
    n_synth = int((df["source"] == SYNTHETIC_SOURCE).sum()) if n else 0
    sizes = pd.DataFrame([{"split": s, "images": sum(i.samples for i in build.shards if i.split == s),
                           "shards": sum(1 for i in build.shards if i.split == s),
                           "size": _mb(sum(i.bytes for i in build.shards if i.split == s))}
                          for s in SPLITS])
    splits = pd.read_parquet(paths.splits, columns=["split"])["split"].value_counts() if paths.splits.exists() else {}
    dated = int(df["day_of_year"].notna().sum()) if n else 0
    notes = df.loc[df["day_of_year"].isna(), "date_note"].fillna("(none)").value_counts().head(8) if n else pd.Series()
    licences = pd.DataFrame()
    if n:
        licences = (df.fillna({"license": "(none)", "license_url": "(none)"})
                    .groupby(["license", "license_url", "redistributable"], dropna=False).size()
                    .rename("images").reset_index().sort_values("images", ascending=False))
    taken = pd.to_datetime(df["taken_at"], utc=True) if n else pd.Series(dtype="datetime64[ns, UTC]")
    resized = sum(int(pd.read_parquet(i.index_path(build.root), columns=["resized"])["resized"].sum())
                  for i in build.shards if i.samples)
    not_redistributable = int((~df["redistributable"]).sum()) if n else 0
    synthetic = [
        "> **This export is the synthetic sample world**" + (" (entirely)" if n_synth == n else
                                                               f" for {n_synth:,} of its {n:,} images") +
        ": JPEGs *rendered* (not photographed) at real Pakistani places from real geodata (GeoNames, geoBoundaries, "
        "the Köppen-Geiger map). Numbers measured on them test the pipeline and say nothing about real-world "
        "accuracy; do not publish them as photographs.", ""] if n_synth else []
    lines = [
        "# Datasheet: GeoPak image shards", "",
        f"_Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by the `image_shards` asset from the "
        f"labelled catalog and the splits of `{paths.root}`; every count below is of this export._", "",
        *synthetic,
        "## Motivation",
        "- **Purpose**: training and evaluating GeoPak, a model that tells where in Pakistan a ground-level photo "
        "was taken (province, geocell and coordinates), its Köppen-Geiger climate class and its day of year.",
        "- **Created by**: the GeoPak pipeline (Dagster asset `image_shards`, owner `team:geopak-ml`) for whoever "
        "runs it; no funding body is recorded.", "",
        "## Composition",
        f"- **Instances**: {n:,} images, each one geotagged outdoor photo{' (rendered, see above)' if n_synth else ''}"
        " as a JPEG copy plus a JSON record (source, licence, attribution, coordinates, labels, split).",
        "", markdown_table(sizes), "",
        "- **Sources**:", "", markdown_table(_crosstab(df, "source")), "",
        "- **Provinces** (point in the geoBoundaries ADM1 polygons):", "", markdown_table(_crosstab(df, "province")),
        "", "- **Köppen-Geiger groups** (class at the coordinate):", "",
        markdown_table(_crosstab(df, "koppen_group")), "",
        f"- **Dates**: {dated:,} of {n:,} images have a day of year"
        + (f" (capture dates {taken.min():%Y-%m-%d} to {taken.max():%Y-%m-%d})" if taken.notna().any() else "")
        + ("; the others have `day_of_year: null` and say why in `date_note`:" if len(notes) else "."), "",
        *([markdown_table(notes.rename("images").rename_axis("date_note").reset_index()), ""] if len(notes) else []),
        "- **Splits**: train/val/test are location- and owner-disjoint (no val/test image within 1 km of a train "
        f"image, no owner in two splits); labelled images in no split (`buffer`, not exported): "
        f"{int(splits.get('buffer', 0)):,}.",
        "- **Not exported** (upstream, each with a recorded reason):",
        f"  - {_reasons(paths.catalog_rejections, 'catalog')}",
        f"  - {_reasons(paths.filter_rejections, 'filter')}",
        f"  - {_reasons(paths.label_rejections, 'labels')}",
        f"  - shards: {len(build.rejections):,}" + (" (" + ", ".join(
            f"{k} {v:,}" for k, v in build.rejections["reason"].value_counts().items()) + ")"
            if len(build.rejections) else ""),
        "- **Sensitive content**: photos may show people, vehicles and private places. Resized copies carry no "
        "EXIF; JPEGs already small enough are stored byte for byte and keep their EXIF (GPS included). Coordinates "
        "are in every record by design.", "",
        "## Collection process",
        "- Images come from the sources above: crawls of Flickr (`photos.search`), Google Places (opt-in), YFCC100M "
        "and GLDv2 metadata, a local folder/manifest, or the rendered sample world; each keeps its source id, page "
        "URL, owner and licence as the source gave them.",
        "- Coordinates are the source's geotag (or EXIF GPS); capture times are EXIF `DateTimeOriginal` with its "
        "offset or the source's date taken (`taken_at_source` says which).", "",
        "## Preprocessing, cleaning, labelling",
        "- Cleaning (filter stage): broken, tiny, near-uniform, blurred, near-duplicate and (with CLIP weights) "
        "indoor images removed, geotags checked, licences allowlisted.",
        "- Labels: province from the ADM1 polygons, Köppen-Geiger class from the map at the coordinate, day of year "
        "from the capture date (null when unknown or before 1990).",
        f"- Copies: short side at most {cfg.short_side} px, aspect kept, JPEG quality {cfg.quality} "
        f"(`{cfg.preprocess}`): {resized:,} images were resized, {n - resized:,} were already that small and are "
        "stored as they were. The originals stay in the pipeline's content-addressed store (`images/`).", "",
        "## Uses",
        "- Intended: training and evaluating image geolocation models for Pakistan; studying the pipeline.",
        "- Not intended: locating or identifying individuals, surveillance, or claims about real-world accuracy "
        "from the synthetic sample world.", "",
        "## Distribution",
        f"- Format: WebDataset tar shards in img2dataset's layout, `shards/<split>/00000.tar` with `<key>.jpg` + "
        f"`<key>.json` (key = image id, the sha256 of the original file), a Parquet index beside each shard and "
        f"`manifest.json` with each shard's sha256 ({len(build.shards):,} shards).",
        "- Read with `webdataset.WebDataset(urls)` or `datasets.load_dataset(\"webdataset\", data_files={\"train\": "
        "urls}, split=\"train\")`.",
        f"- {not_redistributable:,} images may not be redistributed under their terms (e.g. Google Places photos, "
        "unknown or all-rights-reserved licences: `redistributable: false` in their JSON); leave them out of any "
        "public release.", "",
        "## Licences and attribution",
        "Every sample's JSON carries `license`, `license_url`, `owner`, `source_url`, `attribution` (the source's "
        "required attribution, e.g. Google Places `authorAttributions`) and `credit` (title, author, source, "
        "licence in one line). Show the credit (and for Places the author attributions) wherever an image is shown.",
        "", markdown_table(licences, max_rows=50) if len(licences) else "_(no images)_", "",
        "## Maintenance",
        "- Rebuilt by materializing `image_shards` (only shards whose images, records or copy settings changed are "
        "written again); errors are reported to the pipeline's maintainers (`team:geopak-ml`).", "",
    ]
    return "\n".join(lines)
