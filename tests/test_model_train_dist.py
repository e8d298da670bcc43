"""Distributed runtime without a GPU: the collectives' device follows the process group's backend (NCCL only
reduces CUDA tensors; a CPU tensor there crashed multi-GPU training at the end of epoch 1)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from geopak_model import distributed
from geopak_model.distributed import DistEnv, collective_device, setup_runtime


def test_collective_device_per_backend() -> None:
    """NCCL -> the rank's CUDA device, gloo -> CPU."""
    assert collective_device("nccl", 1) == torch.device("cuda", 1)
    assert collective_device("NCCL", 0) == torch.device("cuda", 0)
    assert collective_device("gloo", 3) == torch.device("cpu")


def test_mean_reduces_on_the_group_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DistEnv.mean`` hands all_reduce a tensor on the env's device (meta stands in for CUDA here)."""
    seen: list[torch.device] = []

    class Reduced(Exception):
        pass

    def fake_all_reduce(t: torch.Tensor, *a: object, **kw: object) -> None:
        seen.append(t.device)
        raise Reduced

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    with pytest.raises(Reduced):
        DistEnv(0, 2, torch.device("meta")).mean({"a": 1.0})
    assert seen == [torch.device("meta")]

    def sum_of_two(t: torch.Tensor, *a: object, **kw: object) -> None:
        seen.append(t.device)
        t.mul_(2)  # two ranks with the same values

    monkeypatch.setattr(dist, "all_reduce", sum_of_two)
    assert DistEnv(0, 2).mean({"b": 3.0, "a": 1.5}) == {"a": 1.5, "b": 3.0}
    assert seen[-1] == torch.device("cpu")
    assert distributed.DistEnv().device == torch.device("cpu")


def test_setup_runtime_starts_a_group_at_world_size_one_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchrun --nproc_per_node=1`` sets LOCAL_RANK: a real gloo group starts at world size 1 (before, none did,
    and a one-GPU DDP step failed); the env still skips collectives at world size 1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    assert not dist.is_initialized()
    env, device = setup_runtime("cpu")
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert (env.rank, env.world, env.device, device) == (0, 1, torch.device("cpu"), torch.device("cpu"))
        assert env.mean({"a": torch.tensor(2.0), "b": 1.0}) == {"a": 2.0, "b": 1.0}
        assert env.broadcast_int(7) == 7
    finally:
        dist.destroy_process_group()


def test_without_torchrun_no_group_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no group without torchrun"))
    env, device = setup_runtime("cpu")
    assert (env.world, device) == (1, torch.device("cpu"))
