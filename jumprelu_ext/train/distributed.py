"""Training on several processes with torch.distributed (launched by torchrun).

Two layouts, both over PyTorch's own collectives (NCCL on GPUs, gloo on CPU):

- data parallel (default under torchrun): every rank holds the whole SAE and reads its own share
  of each global batch; the loss is normalised by the global row count, so summing the ranks'
  gradients (one all-reduce over all of them, θ included) gives exactly the single-process
  gradient, and every rank takes the same Adam step and decoder renormalisation.
- feature sharded (``--shard-features``): rank r holds features [r·F/W, (r+1)·F/W): those
  encoder columns, decoder rows, thresholds and their Adam state. Every rank sees the whole
  batch; the partial reconstructions and the per-row feature sums (L0, penalties) are summed
  with an all-reduce whose backward passes the gradient through unchanged (every rank computes
  the same loss from the same sums).

Checkpoints hold the whole, unsharded SAE and optimizer state in the single-process format,
gathered to rank 0, so a run resumes at any world size and in either layout. This module holds
the process group and the collectives (it imports no SAE code, so the data pipeline can use it);
``sharding.py`` holds the feature-sharded SAE.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Layout:
    rank: int = 0
    world_size: int = 1
    shard_features: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.world_size > 1 and not self.shard_features

    @property
    def sharded(self) -> bool:
        return self.world_size > 1 and self.shard_features

    @property
    def description(self) -> str:
        return "features sharded" if self.sharded else "data parallel"

    @property
    def data_shard(self) -> tuple[int, int]:
        """(rank, world_size) of the data stream: ranks split batches only in data-parallel runs."""
        return (self.rank, self.world_size) if self.data_parallel else (0, 1)


def init(device_name: str, shard_features: bool) -> tuple[Layout, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if shard_features:
            print(
                "warning: --shard-features splits the features across the ranks torchrun starts; "
                "in a single process it does nothing",
                file=sys.stderr,
            )
        return Layout(), resolve_device(device_name)
    # torch.distributed.fsdp.sharded_grad_scaler takes `dist.group.WORLD` as a default argument
    # when it is imported, and torch._dynamo (which the optimizer imports) imports it. Imported
    # after init_process_group, that default keeps the group alive past destroy_process_group:
    # its gloo threads then outlive the interpreter's finalisation and can abort a rank that has
    # finished its work ("terminate called without an active exception"). Import it first.
    import torch._dynamo  # noqa: F401

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = resolve_device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device_name in ("auto", "cpu"):
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        raise UserError(f"--device {device_name} is not supported under torchrun (use cuda or cpu)")
    return Layout(dist.get_rank(), dist.get_world_size(), shard_features), device


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device`` (``auto``: CUDA when there is one), checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine")
    return device


def finish(layout: Layout) -> None:
    """Wait for every rank (rank 0 writes the report after the others are done) before leaving
    the process group: a rank that tears down its connections early aborts the others."""
    if layout.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """All-reduce ``tensor`` in place (sum over ranks) when there are several; returns it."""
    if layout.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def global_mean(share: torch.Tensor, layout: Layout) -> float:
    """A loss term's value over the global batch: data-parallel ranks hold their share of it."""
    value = share.detach().double().reshape(1)
    if layout.data_parallel:
        dist.all_reduce(value)
    return value.item()


def all_reduce_gradients(parameters, layout: Layout) -> None:
    """Sum every gradient over the ranks in one flat all-reduce (data parallel)."""
    if not layout.data_parallel:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_rows(rows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Every rank's [n_r, d] rows, concatenated in rank order, on every rank (n_r may differ)."""
    if layout.world_size == 1:
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(layout.world_size)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device))
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros(max(counts), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def agree(flag: bool, layout: Layout, device) -> bool:
    """True on every rank when it is true on any (e.g. one rank got SIGTERM)."""
    if layout.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return bool(value.item())


def feature_mean(values: torch.Tensor, layout: Layout) -> float:
    """The mean of a per-feature vector over all features (a collective in sharded runs)."""
    total = values.detach().double().sum().reshape(1)
    if layout.sharded:
        dist.all_reduce(total)
    return total.item() / (values.numel() * (layout.world_size if layout.sharded else 1))


def firing_fractions(firing, layout: Layout, dense_rate: float) -> tuple[float, float]:
    """(dead, dense) fractions of all features over the tracked window: counts are summed over
    the ranks' rows when data parallel, features counted over the ranks' shards when sharded."""
    counts = torch.cat([firing.counts.double(), torch.tensor([float(firing.tokens)], device=firing.counts.device)])
    if layout.data_parallel:
        dist.all_reduce(counts)
    counts, tokens = counts[:-1], counts[-1]
    if tokens == 0:
        return float("nan"), float("nan")
    dead_dense = torch.stack([(counts == 0).sum(), (counts / tokens > dense_rate).sum()]).double()
    if layout.sharded:
        dist.all_reduce(dead_dense)
    total_features = counts.numel() * (layout.world_size if layout.sharded else 1)
    dead, dense = (dead_dense / total_features).tolist()
    return dead, dense
