"""The distributed runtime of training: one process or one ``torchrun`` rank (NCCL with one GPU per rank, gloo on
CPU), and the few collectives the trainer needs, each skipped at world size 1 (open_clip's ``distributed.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def collective_device(backend: str, local_rank: int = 0) -> torch.device:
    """Where a process group's collectives need their tensors: NCCL only reduces CUDA tensors (a CPU tensor
    raises "No backend type associated with device type cpu"), gloo reduces CPU tensors."""
    return torch.device("cuda", local_rank) if str(backend).lower() == "nccl" else torch.device("cpu")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the collectives' device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def mean(self, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Average over ranks (identical keys on every rank) of floats or 0-dim tensors still on the device they
        were summed on: one all_reduce on the group's device and ONE host read for all of them."""
        if not values:
            return {}
        keys = sorted(values)
        where = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), self.device)
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=where).reshape(()) for k in keys])
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
            t = t / self.world
        return dict(zip(keys, t.cpu().tolist()))

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a decision only rank 0 could make, e.g. from its validation)."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Per-key sums over ranks of small integer counts (e.g. unreadable images by reason)."""
        if self.world == 1:
            return dict(counts)
        every: list[dict[str, int]] = [{} for _ in range(self.world)]
        dist.all_gather_object(every, counts)
        out: dict[str, int] = {}
        for d in every:
            for k, v in d.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def gather_rows(self, parts: dict[str, torch.Tensor], keep: bool = True, block: int = 4096
                    ) -> dict[str, torch.Tensor]:
        """Every rank's rows of ``parts`` (same keys, dtypes and trailing shapes on every rank, any row count),
        concatenated in rank order on the CPU of the ranks with ``keep`` (the others get empty tensors).

        All-gathers of at most ``block`` zero-padded rows per rank at a time on the group's device, so device
        memory stays bounded whatever the table's size (gloo and NCCL alike)."""
        if self.world == 1:
            return {k: v.cpu() for k, v in parts.items()} if keep else {k: v[:0].cpu() for k, v in parts.items()}
        n = torch.tensor([len(next(iter(parts.values())))], dtype=torch.int64, device=self.device)
        counts_t = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(counts_t, n)
        counts = [int(c.item()) for c in counts_t]
        got: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in range(self.world)] for k in parts}
        for start in range(0, max(counts), block):
            size = min(block, max(counts) - start)
            for k, v in parts.items():
                mine = v[start: start + size].to(self.device)
                buf = torch.zeros((size, *v.shape[1:]), dtype=v.dtype, device=self.device)
                buf[: len(mine)] = mine
                bufs = [torch.empty_like(buf) for _ in range(self.world)]
                dist.all_gather(bufs, buf)
                if keep:
                    for r, b in enumerate(bufs):
                        got[k][r].append(b[: max(0, min(size, counts[r] - start))].cpu())
        return {k: torch.cat([t for per_rank in got[k] for t in per_rank]) if keep else v[:0].cpu()
                for k, v in parts.items()}


def setup_runtime(pref: str) -> tuple[DistEnv, torch.device]:
    """Single process, or one rank of ``torchrun`` (NCCL with one GPU per rank, gloo on CPU).

    Under torchrun (``LOCAL_RANK`` set) a process group is started at world size 1 too: whatever needs one (DDP,
    collectives, ``bench/gpu_check.py``'s DDP step) then runs on one GPU exactly as on eight, and NCCL is
    initialised by the first one-GPU run rather than the first multi-GPU one. ``DistEnv`` still skips every
    collective at world size 1, and the trainer wraps its module in DDP only when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pref == "cuda" or (pref == "auto" and torch.cuda.is_available())
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if world > 1 or "LOCAL_RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        env = DistEnv(dist.get_rank(), dist.get_world_size(), collective_device(dist.get_backend(), local))
        return env, torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistEnv(), torch.device("cuda" if use_cuda else "cpu")
