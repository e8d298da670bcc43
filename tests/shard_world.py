"""A small data root for the shard tests: the model world (``tests.model_world``) with a test split, a buffer
image, three images that need a copy made (a 12 MP-like large JPEG, a PNG, an EXIF-rotated JPEG), and rows
re-sourced as Flickr (owner, CC licence, page URL) and Google Places (authorAttributions JSON), so every kind of
licence and attribution an export carries is there to check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.paths import DataPaths
from pipeline.core.schema import LABELLED_SCHEMA, SPLITS_SCHEMA, write_table
from pipeline.core.store import ImageStore
from tests.model_world import build_world

FLICKR_OWNER = "12345678@N01"
PLACES_ATTRIBUTION = [{"displayName": "Ayesha Khan", "uri": "https://maps.google.com/maps/contrib/1",
                       "photoUri": "https://lh3.googleusercontent.com/a/x"}]


def _jpeg(size: tuple[int, int], seed: int, exif_orientation: int | None = None, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), np.int16)
    arr = np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    Image.fromarray(arr).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def build_shard_world(root: Path, per_cell: int = 3) -> DataPaths:
    paths = build_world(root, per_cell=per_cell, size=48)
    labelled = pd.read_parquet(paths.labelled).sort_values("image_id").reset_index(drop=True)
    splits = pd.read_parquet(paths.splits).set_index("image_id").loc[labelled["image_id"]].reset_index()
    store = ImageStore(paths.root)
    # three images that need a copy made: large (resized), PNG (re-encoded), rotated by EXIF (made upright)
    for row, data, size in ((1, _jpeg((1200, 900), 1), (1200, 900)), (2, _jpeg((200, 150), 2, fmt="PNG"), (200, 150)),
                            (3, _jpeg((120, 80), 3, exif_orientation=6), (80, 120))):
        image_id, rel = store.put(data)
        labelled.loc[row, ["image_id", "path", "width", "height"]] = [image_id, rel, size[0], size[1]]
        splits.loc[row, "image_id"] = image_id
    n = len(labelled)
    flickr, places = labelled.index[4:12], labelled.index[12:16]
    labelled.loc[flickr, "source"] = "flickr"
    labelled.loc[flickr, "owner"] = FLICKR_OWNER
    labelled.loc[flickr, "license"] = "CC BY-SA 4.0"
    labelled.loc[flickr, "source_url"] = [f"https://www.flickr.com/photos/{FLICKR_OWNER}/{i}" for i in flickr]
    labelled.loc[places, "source"] = "google_places"
    labelled.loc[places, "owner"] = "Ayesha Khan"
    labelled.loc[places, "license"] = "Google Places photo: Maps Platform terms restrict storing and redistributing it"
    labelled["attribution"] = None
    labelled.loc[places, "attribution"] = json.dumps(PLACES_ATTRIBUTION)
    labelled.loc[labelled.index[16:20], "source"] = "sample_world"
    # splits: every 5th image test, one buffer (in no split: not exported)
    splits.loc[splits.index[::5], "split"] = "test"
    splits.loc[n - 1, "split"] = "buffer"
    write_table(labelled, paths.labelled, LABELLED_SCHEMA)
    write_table(splits, paths.splits, SPLITS_SCHEMA)
    return paths
