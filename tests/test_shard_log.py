"""The one shard mechanism under the three caches (``pipeline.core.shard_log``): compaction keeps every row, leaves
fewer files, and a writer killed at any point of it leaves a cache that reads the same."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from geopak_model.cache import EmbeddingCache
from pipeline.catalog.build import HEADER_SCHEMA, HeaderCache
from pipeline.core.shard_log import ShardLog
from pipeline.filters.cache import ImageValueCache

COLS = {"image_id": "string", "key": "string", "v": "Float64"}


def _value_cache(path, n_shards: int = 6) -> ImageValueCache:
    """Shards of 3 rows each; ``id1`` is re-measured in the last one (later rows win)."""
    cache = ImageValueCache(path, COLS, max_shards=1000, compact_rows=100)
    for s in range(n_shards):
        cache.add(cache.frame([{"image_id": f"id{3 * s + i}", "key": "k", "v": float(3 * s + i)} for i in range(3)]))
    cache.add(cache.frame([{"image_id": "id1", "key": "k", "v": 100.0}]))
    return cache


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_value_cache_compaction_keeps_rows_with_fewer_files(tmp_path):
    cache = _value_cache(tmp_path / "c")
    before, n_before = cache.load(), len(cache.shards())
    assert cache.compact() == n_before - 1
    assert len(cache.shards()) == 1 and len(_files(cache.path)) == 1
    pd.testing.assert_frame_equal(cache.load(), before)
    assert before.set_index("image_id").loc["id1", "v"] == 100.0
    got, missing = cache.lookup(["id1", "id4", "nope"], "k", columns=["v"])
    assert missing == ["nope"] and dict(zip(got["image_id"], got["v"])) == {"id1": 100.0, "id4": 4.0}


def _die_in(target: str, path: str) -> None:
    """A child process compacting the cache that dies (no cleanup, as under SIGKILL) at ``target``."""
    cache = ImageValueCache(path, COLS, max_shards=1000, compact_rows=100)
    if target == "writing":  # half-way through writing the merged shard's temp file
        real = cache._writers

        def dying(rows):
            def write(tmp):
                real(rows)[".parquet"](tmp)
                os._exit(9)
            return {".parquet": write}
        cache._writers = dying
    else:  # after the merged shard is committed, having removed one member
        real_remove = ShardLog.remove

        def remove(self, name):
            real_remove(self, name)
            os._exit(9)
        ShardLog.remove = remove
    cache.compact()


@pytest.mark.parametrize("target", ["writing", "removing"])
def test_compaction_killed_midway_reads_the_same(tmp_path, target):
    cache = _value_cache(tmp_path / "c")
    before = cache.load()
    child = mp.get_context("fork").Process(target=_die_in, args=(target, str(cache.path)))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    pd.testing.assert_frame_equal(cache.load(), before)  # every row, later rows still winning
    if target == "writing":
        assert any(n.endswith(".tmp") for n in _files(cache.path))  # the killed writer's temp file
    cache.compact()  # the next compaction converges; its commit sweeps the dead writer's temp file
    assert len(cache.shards()) == 1 and _files(cache.path) == [cache.shards()[0].name]
    pd.testing.assert_frame_equal(cache.load(), before)


def _header_rows(ids: list[str], size: int) -> pa.Table:
    cols = {f.name: pa.nulls(len(ids), f.type) for f in HEADER_SCHEMA}
    cols.update(image_id=pa.array(ids), size=pa.array([size] * len(ids), pa.int64()),
                mtime_ns=pa.array([7] * len(ids), pa.int64()), width=pa.array(range(len(ids)), pa.int32()))
    return pa.table(cols, schema=HEADER_SCHEMA)


def test_header_cache_compaction_keeps_facts_with_fewer_files(tmp_path):
    cache = HeaderCache(tmp_path / "h")
    for s in range(5):
        cache.add(_header_rows([f"i{s}", f"i{s + 1}"], 10))  # i1..i4 twice, with equal facts
        cache.flush()
    cache.add(_header_rows(["i0"], 11))  # the same id after its file changed: another fingerprint, kept too
    cache.flush()
    ids = pa.array([f"i{k}" for k in range(7)])
    before = HeaderCache(tmp_path / "h").match(HeaderCache(tmp_path / "h").snapshot(ids), ids)
    assert cache.compact(max_shards=10) == 0  # few enough shards: left alone
    assert cache.compact(max_shards=2) == 5
    again = HeaderCache(tmp_path / "h")
    assert len(again.existing) == 1 and len(_files(tmp_path / "h")) == 1
    snap = again.snapshot(ids)
    assert again.match(snap, ids) == before and len(snap) == len(before) == 7  # duplicates dropped


def _pairs_of_features(folder, n: int, seed: int) -> tuple[EmbeddingCache, list[str]]:
    """An embedding cache of ``n`` random features committed two by two (n / 2 small shards)."""
    cache = EmbeddingCache(folder, "wid")
    rng = np.random.default_rng(seed)
    ids = [f"e{i}" for i in range(n)]
    for i in range(0, n, 2):
        cache.add(ids[i : i + 2], rng.random((2, 4)).astype(np.float16), rng.random((2, 3)).astype(np.float16))
    return cache, ids


def test_embedding_cache_compaction_keeps_features_first_copy_wins(tmp_path):
    cache, ids = _pairs_of_features(tmp_path, 8, seed=0)
    cache.add(["e0"], np.zeros((1, 4), np.float16), np.zeros((1, 3), np.float16))  # a later copy: loses
    clip, scene = EmbeddingCache(tmp_path, "wid").load(ids)
    assert clip[0].abs().sum() > 0
    assert cache.compact() == 4
    fresh = EmbeddingCache(tmp_path, "wid")
    assert fresh.generation == 1 and len(_files(tmp_path / "wid" / "shards")) == 3 and len(fresh) == 8
    c2, s2 = fresh.load(ids)
    assert np.array_equal(c2.numpy(), clip.numpy()) and np.array_equal(s2.numpy(), scene.numpy())


def test_a_reader_whose_shards_were_merged_away_reads_the_index_again(tmp_path):
    """Compaction in another process while a reader holds the old index: its next load finds the merged shard."""
    _, ids = _pairs_of_features(tmp_path, 6, seed=1)
    reader = EmbeddingCache(tmp_path, "wid")
    before = reader.load(ids[:2])  # the reader's index names the three small shards
    assert EmbeddingCache(tmp_path, "wid").compact() == 2
    after = reader.load(ids)
    assert torch.equal(after[0][:2], before[0]) and reader.generation == 1
