"""Feature sharding (``--shard-features``): rank r holds features [r·F/W, (r+1)·F/W), their
encoder columns, decoder rows, thresholds and Adam state; every rank sees the whole batch and the
partial reconstructions and per-row feature sums are summed over ranks. Checkpoints and the
exported SAE are gathered to rank 0 in the single-process format (docs/trainer.md#distributed-layouts)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..sae import JumpReLUSAE
from ..sparse import sparse_decode
from .distributed import Layout
from .errors import UserError

# The dimension of each parameter that indexes features (b_dec has none: it is replicated).
FEATURE_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "log_threshold": 0, "threshold": 0}


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


class _SumGradOverRanks(torch.autograd.Function):
    """Forward: the tensor unchanged. Backward: the gradient summed over ranks. For a replicated
    parameter that each rank uses with its own features (b_dec at the encoder's input), so
    every rank's copy receives the whole SAE's gradient."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class FeatureShardedSAE(JumpReLUSAE):
    """This rank's features of a JumpReLU SAE; decode and the per-row feature sums add up the
    other ranks' parts, so outputs and losses are those of the whole SAE."""

    def decode(self, acts):
        partial = torch.nn.functional.linear(acts, self.W_dec.t())
        return _SumOverRanks.apply(partial) + self.b_dec

    def decode_sparse(self, acts):
        return _SumOverRanks.apply(sparse_decode(acts, self.W_dec)) + self.b_dec

    def activate(self, pre, fire_counts=None):
        acts, l0 = super().activate(pre, fire_counts)  # fire counts: this rank's features
        return acts, _SumOverRanks.apply(l0)

    def encoder_b_dec(self):
        return _SumGradOverRanks.apply(self.b_dec)

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
    whole = JumpReLUSAE(
        sae.d_in,
        d_sae,
        sae.bandwidth,
        threshold_param=sae.threshold_param,
        device="meta",
        apply_b_dec_to_input=sae.apply_b_dec_to_input,
    )
    whole.load_state_dict({k: v.cpu() for k, v in state.items()}, assign=True)
    return whole


def gather_features(values: torch.Tensor, layout: Layout, device) -> torch.Tensor | None:
    """A per-feature vector over all features, on the CPU of rank 0 (None elsewhere when sharded)."""
    if not layout.sharded:
        return values
    return _gather_to_main(values.to(device), 0, layout)
