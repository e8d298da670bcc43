"""A training loop that keeps a GPU fed (issue 22.3): ``rain`` as fast as the rest of the augmentation with the
same pixels, images hashed once per worker rather than once per epoch, persistent loader workers built once per
phase, no per-province ``nonzero()``, losses summed on the device and read once per epoch, DDP searching for
unused parameters only where a phase has some, and phase 2's validation encoded by every rank together."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

import geopak_model.data as gdata
from geopak_model.config import AugmentConfig, preset
from geopak_model.data import ImageDataset, augment_view, load_training_table, make_loader, rain, read_verified
from geopak_model.model import GeopakHeads
from geopak_model.distributed import DistEnv
from geopak_model.epochs import SplitEncoder, train_one_epoch
from geopak_model.trainer import Trainer
from tests.model_world import build_world
from tests.test_model_heads import SMALL, cell_table

REPO = Path(__file__).resolve().parents[1]


def _bench_loader():
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "bench" / "bench_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), per_cell=3, size=40)


def tiny(root: Path, **over) -> object:
    return preset("test-tiny", data_root=str(root), cpu_threads=1, **over)


# --- rain and the augmented view --------------------------------------------------------------------------------
def test_rain_draws_the_same_numbers_and_paints_the_same_streaks_as_the_convolution():
    """The new ``rain`` against the convolutions it replaced (kept in bench/bench_loader.py), over sizes with odd and
    even streak lengths and every slant: the same streaks (a missing or extra one would differ by ~0.28), the
    softening within float rounding, and the generator left in the same state."""
    bench = _bench_loader()
    for size in [(3, 224, 224), (3, 96, 96), (3, 64, 80), (3, 37, 50), (3, 300, 200)]:
        for seed in range(12):
            x = torch.rand(size, generator=torch.Generator().manual_seed(1000 + seed))
            g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            assert torch.allclose(bench.old_rain(x, g_old), rain(x, g_new), atol=1e-6, rtol=0), (size, seed)
            assert torch.equal(torch.rand(3, generator=g_old), torch.rand(3, generator=g_new))
    x = torch.rand((3, 50, 70))
    for sigma in (0.1, 0.6, 1.0, 2.3):
        assert torch.allclose(gdata.gaussian_blur(x, sigma), bench.old_gaussian_blur(x, sigma), atol=1e-6, rtol=0)


def test_the_augmented_view_runs_on_one_thread_and_restores_the_setting():
    seen: list[int] = []
    real = gdata._augment_view

    def spy(*a):
        seen.append(torch.get_num_threads())
        return real(*a)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gdata._augment_view, img = spy, __import__("PIL.Image", fromlist=["Image"]).new("RGB", (80, 60), (90, 120, 60))
        augment_view(img, 32, AugmentConfig(weather_p=1.0), torch.Generator().manual_seed(0))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        gdata._augment_view = real
        torch.set_num_threads(threads)


# --- bytes verified once ------------------------------------------------------------------------------------------
def test_a_file_is_hashed_once_per_process_until_it_changes(world, monkeypatch):
    row = pd.read_parquet(world.labelled).iloc[0]
    path = world.root / row["path"]
    hashed: list[int] = []
    real = gdata.sha256_hex
    monkeypatch.setattr(gdata, "sha256_hex", lambda data: hashed.append(len(data)) or real(data))
    gdata._VERIFIED.clear()
    data = path.read_bytes()
    for _ in range(3):  # three epochs
        assert read_verified(path, row["image_id"]) == data
    assert len(hashed) == 1
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes, rewritten in place
    with pytest.raises(gdata.BytesChangedError):
        read_verified(path, row["image_id"])
    path.write_bytes(data)
    assert read_verified(path, row["image_id"]) == data and len(hashed) == 3
    monkeypatch.setattr(gdata, "VERIFIED_MEMO_MAX", 0)  # a full memo: reads are hashed as before
    gdata._VERIFIED.clear()
    read_verified(path, row["image_id"])
    read_verified(path, row["image_id"])
    assert len(hashed) == 5


# --- loaders built once, workers persistent -------------------------------------------------------------------------
def test_loader_workers_persist_across_epochs_and_still_draw_each_epochs_batches(world):
    table, _ = load_training_table(world)
    table = table.head(8)
    keys = _bench_loader().EpochKeys(len(table), 4)
    ds = ImageDataset(table, world.root, 32, AugmentConfig(), with_labels=False)
    loader = make_loader(ds, keys, num_workers=1)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    epochs = []
    for epoch in range(2):
        keys.set_epoch(epoch)
        it = iter(loader)
        epochs.append([b["row"].tolist() for b in it])
        if epoch == 0:
            first = it
    assert it is first  # the same workers served both epochs
    assert epochs[0] != epochs[1] and sorted(sum(epochs[0], [])) == sorted(sum(epochs[1], [])) == list(range(8))
    in_proc = make_loader(ds, keys, num_workers=0)
    assert not in_proc.persistent_workers
    assert [b["row"].tolist() for b in in_proc] == epochs[1]


def test_phase_two_builds_its_loaders_once_for_all_its_epochs(world, monkeypatch, tmp_path):
    import geopak_model.epochs as epochs_mod  # the val encoder's loader
    import geopak_model.trainer as trainer_mod  # the training images' loader

    built: list[int] = []
    real = trainer_mod.make_loader
    for mod in (trainer_mod, epochs_mod):
        monkeypatch.setattr(mod, "make_loader", lambda *a, **k: built.append(1) or real(*a, **k))
    cfg = tiny(world.root, run_dir=str(tmp_path / "run"), run_phases=[2], max_val_images=8,
               phases=[{}, {}, {"epochs": 3, "batches_per_epoch": 1}])
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.prepare_cache()
    trainer.run_dir.mkdir(parents=True)
    built.clear()
    trainer.run_phase(2)
    assert len(built) == 2  # the training images and the capped validation images, not 2 per epoch
    assert trainer._val_encoder is None  # dropped (its workers stop) when the phase ends


# --- heads: no per-province nonzero --------------------------------------------------------------------------------
def test_true_province_logits_by_gather_equal_the_per_province_subsets_values_and_gradients():
    torch.manual_seed(0)
    heads = GeopakHeads(cell_table({0: 5, 1: 3, 3: 1, 5: 4}), 8, 8, SMALL).train()
    e = torch.randn(12, 16, requires_grad=True)
    pids = torch.tensor([0, 1, 1, 3, 5, 0, 5, 5, 1, 0, 3, 0])
    logits, mask = heads.cell_logits_true(e, pids)
    ref = torch.zeros_like(logits)  # the per-province loop it replaced
    for p, n in enumerate(heads.counts):
        idx = (pids == p).nonzero(as_tuple=True)[0]
        if n and len(idx):
            ref = ref.index_put((idx[:, None], torch.arange(n)[None, :]), heads.cell_heads[p](e[idx]).float())
    assert torch.allclose(logits, ref, atol=1e-6, rtol=0) and bool((logits[~mask] == 0).all())
    w = torch.randn_like(logits)
    g_new = torch.autograd.grad((logits * w).sum(), [e, *heads.cell_heads.parameters()])
    g_ref = torch.autograd.grad((ref * w).sum(), [e, *heads.cell_heads.parameters()], allow_unused=True)
    for a, b in zip(g_new, g_ref):
        assert torch.allclose(a, torch.zeros_like(a) if b is None else b, atol=1e-6)


# --- DDP: unused parameters only where a phase has some ---------------------------------------------------------------
def test_no_phase_leaves_a_parameter_unused_unless_a_loss_weight_is_zero(world, tmp_path):
    trainer = Trainer(tiny(world.root, run_dir=str(tmp_path / "a")), log=lambda m: None)
    trainer.prepare_cache()
    bn = {n: t.clone() for n, t in trainer.encoder.named_buffers()}
    for k in (0, 1, 2):
        state = trainer.new_state(k)
        assert trainer.unused_parameters(k, state.net) == [], k
    assert all(torch.equal(t, bn[n]) for n, t in trainer.encoder.named_buffers())  # statistics untouched
    off = Trainer(tiny(world.root, run_dir=str(tmp_path / "b"), loss={"koppen": 0.0}), log=lambda m: None)
    off.prepare_cache()
    unused = off.unused_parameters(1, off.new_state(1).net)
    assert unused and all(n.startswith("koppen_head.") for n in unused)


# --- one host read per epoch --------------------------------------------------------------------------------------
def test_an_epochs_host_reads_do_not_grow_with_its_steps(world, tmp_path, monkeypatch):
    """Every read of a tensor's value made by this package's code during an epoch (``item``, ``tolist``,
    ``float``/``int``/``bool``, ``numpy``) is counted: a 4-step epoch makes as many as a 2-step one."""
    trainer = Trainer(tiny(world.root, run_dir=str(tmp_path / "run")), log=lambda m: None)
    trainer.prepare_cache()
    pkg = str(REPO / "geopak_model")
    reads: list[str] = []

    def counting(name: str):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(pkg):
                reads.append(f"{Path(caller).name}:{sys._getframe(1).f_lineno} {name}")
            return real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)

    counts = {}
    for steps in (2, 4):
        state = trainer.new_state(1)
        sampler = trainer.sampler(1)
        sampler.batches = steps
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
            counting(name)
        reads.clear()
        train_one_epoch(state, trainer.batches(1, sampler), steps, trainer.cfg, trainer.loss_ctx, trainer.device,
                        None, trainer.env)
        monkeypatch.undo()
        counts[steps] = list(reads)
    assert counts[2] and len(counts[2]) == len(counts[4]), (counts[2], counts[4])
    # the first batch's gradient diagnostics: one read; the epoch's losses: one read
    assert sorted(r.split(":")[0] + " " + r.split()[-1] for r in counts[4]) == ["diagnostics.py tolist",
                                                                                  "distributed.py tolist"]


# --- validation encoded by every rank together -------------------------------------------------------------------
def _encode_rank(rank: int, world: int, root: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = preset("test-tiny", data_root=root)
        cfg.embed_batch_size = 3
        table, _ = load_training_table(__import__("pipeline.core.paths", fromlist=["DataPaths"]).DataPaths.at(root))
        from geopak_model.encoders import build_encoders

        enc = SplitEncoder(table, Path(root), cfg, torch.device("cpu"), DistEnv(rank, world), cap=20)
        failures: dict[str, int] = {}
        got = enc.encode(build_encoders(cfg.encoder), None, failures)
        enc.close()
        if rank == 0:
            torch.save({"clip": got.clip, "scene": got.scene, "labels": got.labels, "failures": failures}, out)
        else:
            assert got is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_val_split_across_two_gloo_ranks_equals_one_process(world, tmp_path):
    """Each rank encodes every second image; rank 0 gathers them in table order: the same features and labels as
    one process encoding them all (and a truncated image is counted once, whichever rank met it)."""
    import torch.multiprocessing as mp

    from geopak_model.encoders import build_encoders

    table, _ = load_training_table(world)
    victim = world.root / table.sample(n=20, random_state=0).sort_index()["path"].iloc[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    try:
        cfg = preset("test-tiny", data_root=str(world.root))
        cfg.embed_batch_size = 3
        failures: dict[str, int] = {}
        one = SplitEncoder(table, world.root, cfg, torch.device("cpu"), DistEnv(), cap=20).encode(
            build_encoders(cfg.encoder), None, failures)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / "two.pt"
        mp.spawn(_encode_rank, args=(2, str(world.root), port, str(out)), nprocs=2, join=True)
    finally:
        victim.write_bytes(data)
    two = torch.load(out, weights_only=True)
    assert len(one) == 19 and failures == {"bytes_changed": 1} == two["failures"]
    assert torch.allclose(two["clip"], one.clip, atol=1e-5) and torch.allclose(two["scene"], one.scene, atol=1e-5)
    for k, v in one.labels.items():
        assert torch.equal(two["labels"][k], v) or torch.allclose(two["labels"][k], v, equal_nan=True), k


def test_rows_gathered_in_blocks_keep_rank_order_and_ragged_counts():
    """``DistEnv.gather_rows`` at world size 1 is the identity on the CPU, and keep=False gives empty rows."""
    env = DistEnv()
    parts = {"x": torch.arange(10.0).view(5, 2), "row": torch.arange(5)}
    assert torch.equal(env.gather_rows(parts)["x"], parts["x"]) and len(env.gather_rows(parts, keep=False)["row"]) == 0
    assert env.sum_counts({"a": 2}) == {"a": 2}
