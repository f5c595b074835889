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
gathered to rank 0, so a run resumes at any world size and in either layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError
from .sae import JumpReLUSAE

# The dimension of each parameter that indexes features (b_dec has none: it is replicated).
FEATURE_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "log_threshold": 0, "threshold": 0}


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
    def data_shard(self) -> tuple[int, int]:
        """(rank, world_size) of the data stream: ranks split batches only in data-parallel runs."""
        return (self.rank, self.world_size) if self.data_parallel else (0, 1)


def init(device_name: str, shard_features: bool, resolve_device) -> tuple[Layout, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Layout(), resolve_device(device_name)
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


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the incoming gradient unchanged, since every rank
    computes the same loss from the summed value and needs ∂loss/∂(its own part) = ∂loss/∂sum."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


class FeatureShardedSAE(JumpReLUSAE):
    """This rank's features of a JumpReLU SAE; decode and the per-row feature sums add up the
    other ranks' parts, so outputs and losses are those of the whole SAE."""

    def decode(self, acts):
        partial = torch.nn.functional.linear(acts, self.W_dec.t())
        return _SumOverRanks.apply(partial) + self.b_dec

    def activate(self, pre):
        acts, l0 = super().activate(pre)
        return acts, _SumOverRanks.apply(l0)

    def sum_over_features(self, per_row):
        return _SumOverRanks.apply(per_row)


def build_sae(d_in: int, d_sae: int, layout: Layout, device, **options) -> JumpReLUSAE:
    """The SAE this rank trains: the whole SAE, or its feature shard, initialised exactly as the
    same rows of the whole SAE (every rank draws from the same global seed)."""
    if not layout.sharded:
        return JumpReLUSAE(d_in, d_sae, device=device, **options)
    if d_sae % layout.world_size:
        raise UserError(f"--shard-features: d_sae {d_sae} is not divisible by the world size {layout.world_size}")
    local = d_sae // layout.world_size
    return FeatureShardedSAE(d_in, local, device=device, first_feature=layout.rank * local, **options)


def _slice(tensor, dim, layout, d_sae):
    size = d_sae // layout.world_size
    return tensor.narrow(dim, layout.rank * size, size).clone()


def _gather_to_main(tensor, dim, layout):
    """Rank 0: the ranks' parts joined along ``dim``, on the CPU; other ranks: None. Parts come one
    rank at a time, so rank 0's device holds one extra part at most, never the whole tensor."""
    tensor = tensor.detach().contiguous()
    if not layout.is_main:
        dist.send(tensor, dst=0)
        return None
    parts, buffer = [tensor.cpu()], torch.empty_like(tensor)
    for rank in range(1, layout.world_size):
        dist.recv(buffer, src=rank)
        parts.append(buffer.cpu())
    return torch.cat(parts, dim)


def _map_sae_state(sae_state: dict, fn) -> dict:
    """Apply ``fn(tensor, feature_dim)`` to every per-feature tensor of an SAE state dict."""
    return {k: fn(v, FEATURE_DIM[k]) if k in FEATURE_DIM else v for k, v in sae_state.items()}


def _map_states(sae_state: dict, optimizer_state: dict, names: list[str], fn) -> tuple[dict, dict]:
    """``_map_sae_state``, and the same for the per-feature tensors of the Adam state."""
    adam = {}
    for index, values in optimizer_state["state"].items():
        dim = FEATURE_DIM.get(names[index])
        adam[index] = {k: fn(v, dim) if dim is not None and k != "step" else v for k, v in values.items()}
    return _map_sae_state(sae_state, fn), {"state": adam, "param_groups": optimizer_state["param_groups"]}


def _optimizer_param_names(sae, optimizer) -> list[str]:
    names = {id(p): n for n, p in sae.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_states(sae, optimizer, layout: Layout) -> tuple[dict, dict]:
    """(SAE state, optimizer state) of the whole SAE, as a single process would hold them; in
    sharded runs gathered to rank 0 (a collective: call it on every rank; only rank 0's is whole)."""
    states = sae.state_dict(), optimizer.state_dict()
    if not layout.sharded:
        return states
    names = _optimizer_param_names(sae, optimizer)
    return _map_states(*states, names, lambda t, dim: _gather_to_main(t, dim, layout))


def shard_states(sae_state: dict, optimizer_state: dict, sae, optimizer, layout: Layout, d_sae: int):
    """This rank's part of whole-SAE (SAE state, optimizer state)."""
    if not layout.sharded:
        return sae_state, optimizer_state
    names = _optimizer_param_names(sae, optimizer)
    return _map_states(sae_state, optimizer_state, names, lambda t, dim: _slice(t, dim, layout, d_sae))


def whole_sae(sae, layout: Layout, d_sae: int):
    """The whole SAE for export: on rank 0 (None elsewhere), gathered to the CPU in sharded runs."""
    if not layout.sharded:
        return sae
    state = _map_sae_state(sae.state_dict(), lambda t, dim: _gather_to_main(t, dim, layout))
    if not layout.is_main:
        return None
    whole = JumpReLUSAE(sae.d_in, d_sae, sae.bandwidth, threshold_param=sae.threshold_param, device="meta")
    whole.load_state_dict({k: v.cpu() for k, v in state.items()}, assign=True)
    return whole


def gather_features(values: torch.Tensor, layout: Layout, device) -> torch.Tensor | None:
    """A per-feature vector over all features, on the CPU of rank 0 (None elsewhere when sharded)."""
    if not layout.sharded:
        return values
    return _gather_to_main(values.to(device), 0, layout)


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
