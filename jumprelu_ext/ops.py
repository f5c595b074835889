"""The public JumpReLU ops: the fused kernels when compiled, else the reference (docs/ops.md)."""

import torch

from . import reference
from ._backend import COMPILED
from ._checks import check_inputs


def _compiled(op):
    """The op, or with fire_counts its .counted overload (docs/ops.md#fire-counts)."""
    plain, counted = op.default, op.counted

    def run(pre, threshold, bandwidth, ste_to_input, fire_counts):
        if fire_counts is None:
            return plain(pre, threshold, bandwidth, ste_to_input)
        return counted(pre, threshold, bandwidth, ste_to_input, fire_counts)

    return run


if COMPILED:
    from . import _registrations  # noqa: F401

    _jumprelu = _compiled(torch.ops.jumprelu_ext.jumprelu)
    _step = _compiled(torch.ops.jumprelu_ext.step)
    _jumprelu_l0 = _compiled(torch.ops.jumprelu_ext.jumprelu_l0)
else:
    _jumprelu = reference.jumprelu
    _step = reference.step
    _jumprelu_l0 = reference.jumprelu_l0


def jumprelu(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """JumpReLU_θ(pre) = pre · H(pre − θ), with the rectangle-kernel straight-through
    gradient for θ: ∂/∂θ = −(θ/ε)·K((pre − θ)/ε), summed over the leading dims.

    pre: [..., F] float32/float64/float16/bfloat16; threshold: [F], pre's dtype or float32.
    ste_to_input: pre also receives the straight-through term, +(θ/ε)·K((pre − θ)/ε) per element
    (Anthropic, January 2025; SAELens's ``jumprelu_ste_to_input``).
    fire_counts: int64 [F] or None; gains each feature's count of rows with a non-zero output.
    """
    check_inputs("jumprelu", pre, threshold, bandwidth, ste_to_input, fire_counts)
    return _jumprelu(pre, threshold, bandwidth, ste_to_input, fire_counts)


def step(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """H(pre − θ) in pre's dtype. To θ: −(1/ε)·K((pre − θ)/ε); to pre: nothing, or with
    ste_to_input +(1/ε)·K((pre − θ)/ε) per element. fire_counts: as for ``jumprelu``."""
    check_inputs("step", pre, threshold, bandwidth, ste_to_input, fire_counts)
    return _step(pre, threshold, bandwidth, ste_to_input, fire_counts)


def jumprelu_l0(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
):
    """Fused (JumpReLU_θ(pre), Σ_features H(pre − θ)): acts [..., F] in pre's dtype and the per-row
    L0 [...] in float32 (exact counts). Its backward combines both θ-gradient terms in one pass.
    fire_counts: int64 [F] or None; gains each feature's count of rows where acts != 0."""
    check_inputs("jumprelu_l0", pre, threshold, bandwidth, ste_to_input, fire_counts)
    return _jumprelu_l0(pre, threshold, bandwidth, ste_to_input, fire_counts)
