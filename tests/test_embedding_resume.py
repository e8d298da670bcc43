"""A killed embedding build resumes losing at most one chunk (issue 13.3): the ``--embed-only`` step runs as a
real subprocess on the tiny model world, committing a shard every 4 images; it is SIGKILLed once 3 shards exist
and it is mid-way through the 4th chunk; the rerun recomputes only what was not committed, never rewrites a
committed shard, and ends with exactly the features of an uninterrupted build. (The rerun and the reference
build run in the test's process: only the kill needs a process of its own.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from geopak_model.cache import INDEX_SUFFIX, SHARDS, EmbeddingCache
from geopak_model.config import preset
from geopak_model.data import load_training_table
from geopak_model.trainer import embed_only
from tests.model_world import build_world
from tests.process_support import running, wait_until

REPO = Path(__file__).resolve().parents[1]
CHUNK = 4  # images per committed shard
BATCH = 2


def _embed(cfg_path: Path, result: Path) -> subprocess.Popen:
    """The embed step as the pipeline runs it: ``python -m geopak_model.train --embed-only`` in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "geopak_model.train", "--config", str(cfg_path), "--embed-only",
         "--embed-chunk-images", str(CHUNK), "--result", str(result)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _shards(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Committed shards: name -> (inode, mtime_ns) of each of their three files, to prove none is rewritten."""
    out = {}
    for index in sorted((cache_dir / SHARDS).glob(f"*{INDEX_SUFFIX}")):
        name = index.name.removesuffix(INDEX_SUFFIX)
        for f in (index, index.with_name(f"{name}.clip.npy"), index.with_name(f"{name}.scene.npy")):
            st = f.stat()
            out[f.name] = (st.st_ino, st.st_mtime_ns)
    return out


def test_sigkilled_embed_build_resumes_losing_at_most_one_chunk(tmp_path):
    paths = build_world(tmp_path / "world", per_cell=4, size=40)
    cfg = preset("test-tiny", data_root=str(paths.root), cpu_threads=1, embed_batch_size=BATCH, num_workers=0,
                 cache_dir=str(tmp_path / "emb"))
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())

    # the build reads the train+val images in table order; image 3 * CHUNK + BATCH becomes a FIFO, so the build
    # commits 3 shards, computes one batch of the 4th chunk and then blocks reading it, until it is killed
    table, _ = load_training_table(paths)
    need = table[table["split"].isin([cfg.train_split, cfg.val_split])].drop_duplicates("image_id")
    blocked = paths.root / need["path"].iloc[3 * CHUNK + BATCH]
    real_bytes = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)

    proc = _embed(cfg_path, tmp_path / "first.json")
    cache_dir = None

    def three_shards() -> bool:
        nonlocal cache_dir
        found = list((tmp_path / "emb").glob(f"*/{SHARDS}/*{INDEX_SUFFIX}"))
        if found:
            cache_dir = found[0].parents[1]
        return len(found) >= 3

    try:
        assert wait_until(three_shards, 60), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ""
        time.sleep(0.5)
        assert proc.poll() is None  # blocked on the FIFO, still alive
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not running(proc.pid)
    assert cache_dir is not None and not (tmp_path / "first.json").exists()
    committed = _shards(cache_dir)
    cache = EmbeddingCache(cache_dir.parent, cache_dir.name)
    assert len(cache) == 3 * CHUNK  # the killed chunk's computed batch was never committed: lost, < one chunk

    blocked.unlink()
    blocked.write_bytes(real_bytes)
    stats = embed_only(cfg, log=lambda m: None, embed_chunk=(CHUNK, 60.0))  # the rerun (in process)
    lost = stats["computed"] - (len(need) - 3 * CHUNK)
    assert stats["reused"] == 3 * CHUNK and lost == 0, stats  # nothing committed is recomputed
    assert stats["computed"] + stats["reused"] == len(need) and stats["unreadable"] == 0
    after = _shards(cache_dir)
    assert {k: after[k] for k in committed} == committed  # the committed shards were not rewritten
    assert len(after) // 3 == 3 + -(-stats["computed"] // CHUNK)

    # an uninterrupted build of the same images in another cache folder: the very same features
    ref_stats = embed_only(preset("test-tiny", data_root=str(paths.root), cpu_threads=1, embed_batch_size=BATCH,
                                  num_workers=0, cache_dir=str(tmp_path / "ref")), log=lambda m: None,
                           embed_chunk=(CHUNK, 60.0))
    assert ref_stats["weights_id"] == cache_dir.name and ref_stats["computed"] == len(need)
    ref = EmbeddingCache(tmp_path / "ref", cache_dir.name)
    resumed = EmbeddingCache(cache_dir.parent, cache_dir.name)
    ids = need["image_id"]
    for a, b in zip(resumed.load(ids), ref.load(ids)):
        assert torch.equal(a, b)


def test_a_cache_in_the_previous_layout_is_read_and_appended_to_not_rewritten(tmp_path):
    """A cache written before shards (one generation: clip-<gen>.npy, scene-<gen>.npy, index-<gen>.parquet named
    by meta.json) reads as one more shard; appending adds a shard and leaves its files as they were."""
    import json

    import numpy as np
    import pandas as pd

    d = tmp_path / "wid"
    d.mkdir()
    rng = np.random.default_rng(0)
    clip, scene = rng.standard_normal((3, 4)).astype(np.float16), rng.standard_normal((3, 6)).astype(np.float16)
    np.save(d / "clip-2.npy", clip)
    np.save(d / "scene-2.npy", scene)
    pd.DataFrame({"image_id": ["c", "a", "b"], "row": [0, 1, 2]}).to_parquet(d / "index-2.parquet")
    (d / "meta.json").write_text(json.dumps({"generation": 2, "rows": 3, "clip_dim": 4, "scene_dim": 6,
                                             "precision": "fp32"}))
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    cache = EmbeddingCache(tmp_path, "wid")
    assert len(cache) == 3 and cache.missing(["a", "z"]) == ["z"] and cache.precision == "fp32"
    cache.add(["z"], np.ones((1, 4), np.float16), np.ones((1, 6), np.float16))
    c, s = EmbeddingCache(tmp_path, "wid").load(["z", "b", "c"])
    assert torch.equal(c[1:], torch.from_numpy(clip[[2, 0]])) and torch.equal(s[0], torch.ones(6, dtype=torch.float16))
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="feature dims"):
        cache.add(["y"], np.ones((1, 5), np.float16), np.ones((1, 6), np.float16))

    # a writer killed between its feature files and its index left them behind: the next append removes them
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = d / SHARDS / f"000007-{dead.pid}-deadbeef.clip.npy"
    np.save(orphan, np.ones((1, 4), np.float16))
    live = d / SHARDS / f"000008-{os.getpid()}-cafecafe.clip.npy"  # a live writer's, mid-shard: kept
    np.save(live, np.ones((1, 4), np.float16))
    cache.add(["y"], np.ones((1, 4), np.float16), np.ones((1, 6), np.float16))
    assert not orphan.exists() and live.exists() and len(EmbeddingCache(tmp_path, "wid")) == 5


def test_uncommitted_shard_files_of_another_host_are_kept_until_stale(tmp_path):
    """On a shared data root (two pods, two machines) a writer's pid means nothing elsewhere: another host's
    feature files without an index may be mid-shard and are kept (removing them would leave its shard's index
    pointing at missing features), until they are a day old; this host's dead writer's files go at once."""
    import numpy as np

    from pipeline.core import processes

    cache = EmbeddingCache(tmp_path, "wid")
    cache.add(["a"], np.ones((1, 4), np.float16), np.ones((1, 6), np.float16))
    written = EmbeddingCache(tmp_path, "wid").shard_names()[0]
    assert written.split("-")[1] == f"{os.getpid()}_{processes.HOST_TAG}"  # <seq>-<pid>_<host>-<random>
    dead = subprocess.Popen(["true"])
    dead.wait()
    shards = tmp_path / "wid" / SHARDS
    other = "0123abcd" if processes.HOST_TAG != "0123abcd" else "fedcba98"
    remote = shards / f"000005-{dead.pid}_{other}-aaaaaaaa.clip.npy"  # same pid, other host: maybe running there
    stale = shards / f"000006-{dead.pid}_{other}-bbbbbbbb.clip.npy"
    local = shards / f"000007-{dead.pid}_{processes.HOST_TAG}-cccccccc.clip.npy"
    for f in (remote, stale, local):
        np.save(f, np.ones((1, 4), np.float16))
    old = time.time() - processes.FOREIGN_WRITER_STALE_S - 60
    os.utime(stale, (old, old))
    cache.add(["b"], np.ones((1, 4), np.float16), np.ones((1, 6), np.float16))
    assert remote.exists() and not stale.exists() and not local.exists()
    assert len(EmbeddingCache(tmp_path, "wid")) == 2
