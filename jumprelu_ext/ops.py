"""The public JumpReLU ops: the fused kernels when compiled, else the reference."""

import torch

from . import reference
from ._backend import COMPILED
from ._checks import check_inputs

if COMPILED:
    from . import _registrations  # noqa: F401

    _jumprelu = torch.ops.jumprelu_ext.jumprelu
    _step = torch.ops.jumprelu_ext.step
    _jumprelu_l0 = torch.ops.jumprelu_ext.jumprelu_l0
else:
    _jumprelu = reference.jumprelu
    _step = reference.step
    _jumprelu_l0 = reference.jumprelu_l0


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    """JumpReLU_θ(pre) = pre · H(pre − θ), with the rectangle-kernel straight-through
    gradient for θ: ∂/∂θ = −(θ/ε)·K((pre − θ)/ε), summed over the leading dims.

    pre: [..., F] float32/float64/float16/bfloat16; threshold: [F], pre's dtype or float32.
    """
    check_inputs("jumprelu", pre, threshold, bandwidth)
    return _jumprelu(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    """H(pre − θ) in pre's dtype. No gradient to pre; to θ: −(1/ε)·K((pre − θ)/ε)."""
    check_inputs("step", pre, threshold, bandwidth)
    return _step(pre, threshold, bandwidth)


def jumprelu_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3):
    """Fused (JumpReLU_θ(pre), Σ_features H(pre − θ)): acts [..., F] and the per-row L0 [...],
    both in pre's dtype. Its backward combines both θ-gradient terms in one pass."""
    check_inputs("jumprelu_l0", pre, threshold, bandwidth)
    return _jumprelu_l0(pre, threshold, bandwidth)
