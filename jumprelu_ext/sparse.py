"""The sparse step's ops: an SAE's encoder and decoder whose cost after the encoder's product
follows the active features, not the dictionary's width (docs/ops.md#the-sparse-step).

``sparse_encode`` forms pre = x @ W_enc + b_enc in row chunks and keeps, per row, only its
*support*: the entries that are active (pre > θ), in θ's window (|pre − θ| < ε/2, where the
straight-through θ gradient lives), or whose activation pre·H(pre − θ) is NaN. ``sparse_decode`` reads only those entries. Their
backward passes never form a [rows, F] tensor. The compiled kernels when available, else a
pure-PyTorch reference with the same semantics (dense inside, so only for tests and fallback).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference
from ._backend import COMPILED
from ._checks import check_inputs, compute_dtype

ACTIVE, WINDOW = 1, 2  # flag bits: pre > θ; K((pre − θ)/ε) = 1


class SparseActs(NamedTuple):
    """JumpReLU activations of a batch, row-compressed over their support.

    Row r's entries are ``offsets[r] … offsets[r+1]−1`` (features ascending): ``indices`` the
    features, ``values`` pre·H(pre − θ) in the compute dtype (float32, float64 for float64 inputs;
    0 for an entry that is only in the window), ``flags`` ACTIVE | WINDOW. ``l0`` [rows] float32
    counts the active features per row. ``values`` and ``l0`` carry gradients to the encoder and θ.
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    flags: torch.Tensor
    l0: torch.Tensor

    @property
    def rows(self) -> int:
        return self.offsets.shape[0] - 1

    def entry_rows(self) -> torch.Tensor:
        """Each entry's row, int64 [nnz]."""
        return torch.repeat_interleave(torch.arange(self.rows, device=self.indices.device), self.offsets.diff())

    def row_sums(self, per_entry: torch.Tensor) -> torch.Tensor:
        """Σ over each row's entries of a per-entry quantity: [rows]."""
        return per_entry.new_zeros(self.rows).index_add(0, self.entry_rows(), per_entry)

    def density(self, features: int) -> float:
        """The support's share of [rows, features]: what the step policy decides on."""
        return self.indices.shape[0] / max(self.rows * features, 1)

    def to_dense(self, features: int) -> torch.Tensor:
        """The [rows, features] activations (for inspection and tests)."""
        dense = self.values.new_zeros(self.rows, features)
        return dense.index_put((self.entry_rows(), self.indices), self.values)


def check_encoder_inputs(x, W_enc, b_enc, threshold, bandwidth, ste_to_input, fire_counts) -> None:
    op = "sparse_encode"
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [rows, d_in], got shape {list(x.shape)}")
    if W_enc.dim() != 2 or W_enc.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: W_enc must be [d_in = {x.shape[1]}, features], got shape {list(W_enc.shape)}")
    if W_enc.dtype != x.dtype or b_enc.dtype != x.dtype:
        raise TypeError(f"{op}: x, W_enc and b_enc must share one dtype, got {x.dtype}, {W_enc.dtype}, {b_enc.dtype}")
    if tuple(b_enc.shape) != (W_enc.shape[1],):
        raise ValueError(f"{op}: b_enc must be [{W_enc.shape[1]}], got shape {list(b_enc.shape)}")
    if not (x.device == W_enc.device == b_enc.device):
        raise ValueError(
            f"{op}: x, W_enc and b_enc must be on one device, got {x.device}, {W_enc.device}, {b_enc.device}"
        )
    # θ, ε and the fire counts against a [0, F] stand-in for pre: the dense ops' checks and messages.
    check_inputs(op, x.new_empty(0, W_enc.shape[1]), threshold, bandwidth, ste_to_input, fire_counts)


def sparse_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
    chunk_rows: int = 0,
) -> SparseActs:
    """JumpReLU_θ(x @ W_enc + b_enc) as ``SparseActs``: x [rows, d_in], W_enc [d_in, F] and b_enc
    [F] in one dtype; θ [F] float32 or that dtype. Gradients as the dense ``jumprelu_l0``'s, for
    x, W_enc, b_enc and θ. ``chunk_rows``: rows per encoder product (0: automatic, tiles of about
    8M elements of pre on the CPU, chunks of 128M on a GPU; docs/ops.md#row-chunks). ``fire_counts`` as in ``jumprelu_l0``."""
    check_encoder_inputs(x, W_enc, b_enc, threshold, bandwidth, ste_to_input, fire_counts)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"sparse_encode: chunk_rows must be an int >= 0 (0: automatic), got {chunk_rows!r}")
    if not COMPILED:
        return _reference_encode(x, W_enc, b_enc, threshold, bandwidth, ste_to_input, fire_counts)
    if fire_counts is None:
        out = torch.ops.jumprelu_ext.sparse_encode(x, W_enc, b_enc, threshold, bandwidth, ste_to_input, chunk_rows)
    else:
        out = torch.ops.jumprelu_ext.sparse_encode.counted(
            x, W_enc, b_enc, threshold, bandwidth, ste_to_input, chunk_rows, fire_counts
        )
    return SparseActs(*out)


def sparse_decode(acts: SparseActs, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_support values · W_dec[feature] per row: [rows, d_in] in the values' dtype (no b_dec)."""
    if not isinstance(W_dec, torch.Tensor) or W_dec.dim() != 2:
        raise ValueError("sparse_decode: W_dec must be a [features, d_in] tensor")
    if not COMPILED:
        return _reference_decode(acts, W_dec)
    return torch.ops.jumprelu_ext.sparse_decode(acts.offsets, acts.indices, acts.values, W_dec)


def support_flags(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """ACTIVE | WINDOW per element of a dense pre (uint8), by the ops' own window rule."""
    pre, threshold = pre.detach(), threshold.detach()
    active = pre.to(compute_dtype(pre)) > threshold.to(compute_dtype(pre))
    return active.to(torch.uint8) * ACTIVE + reference.window(pre, threshold, bandwidth).to(torch.uint8) * WINDOW


@torch.no_grad()
def support_density(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> float:
    """The active-or-window share of a dense pre: what the sparse step would keep of it."""
    return (support_flags(pre, threshold, bandwidth) != 0).float().mean().item()


def _reference_encode(x, W_enc, b_enc, threshold, bandwidth, ste_to_input, fire_counts) -> SparseActs:
    """The dense computation, then its support gathered: gradients flow through the dense
    reference op, so this is the semantics the kernels are held to."""
    pre = torch.addmm(b_enc, x, W_enc)
    acts, l0 = reference.jumprelu_l0(pre, threshold, bandwidth, ste_to_input, fire_counts)
    flags = support_flags(pre, threshold, bandwidth)
    in_support = (flags != 0) | acts.detach().isnan()
    rows, indices = in_support.nonzero(as_tuple=True)
    offsets = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = in_support.sum(1).cumsum(0)
    values = acts[rows, indices].to(compute_dtype(x))
    return SparseActs(offsets, indices, values, flags[rows, indices], l0)


def _reference_decode(acts: SparseActs, W_dec: torch.Tensor) -> torch.Tensor:
    terms = acts.values.unsqueeze(1) * W_dec.to(acts.values.dtype)[acts.indices]
    return terms.new_zeros(acts.rows, W_dec.shape[1]).index_add(0, acts.entry_rows(), terms)


if COMPILED:
    from . import _sparse_registrations  # noqa: F401,E402
