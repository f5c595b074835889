"""SAELens-style eager JumpReLU and Step (autograd Functions in the input dtype, as SAELens 6.x
writes them in sae_lens/saes/jumprelu_sae.py). Benchmark-only code: the benchmarks measure the
fused ops against these; tests/test_baselines.py uses them as an independent formulation.
"""

import torch

from jumprelu_ext.reference import sum_leading_dims


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class EagerJumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre * (pre > threshold)).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold) * grad
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, sum_leading_dims(grad_threshold).to(threshold), None


class EagerStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, sum_leading_dims(grad_threshold).to(threshold), None  # no gradient to pre, like SAELens


def eager_jumprelu_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float):
    """What a JumpReLU SAE computes without fused ops: JumpReLU for the activations and
    a separate Step pass for the L0 term (two passes forward, two backward)."""
    acts = EagerJumpReLU.apply(pre, threshold, bandwidth)
    l0 = EagerStep.apply(pre, threshold, bandwidth).sum(-1)
    return acts, l0
