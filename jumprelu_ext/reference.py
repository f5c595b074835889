"""Pure-PyTorch JumpReLU ops with exactly the semantics of the compiled kernels.

H(u) = 1 iff u > 0; K(u) = 1 iff -1/2 < u < 1/2. Arithmetic in fp32 (fp64 for fp64);
outputs in pre's dtype, the threshold gradient in the threshold's dtype. Tests compare
the kernels against this module, and the package falls back to it when the compiled
extension cannot be loaded.
"""

import torch

from ._checks import check_inputs, compute_dtype


def sum_leading_dims(x: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [F] (works for F = 0, where reshape(-1, F) is ambiguous)."""
    return x.sum(dim=tuple(range(x.dim() - 1))) if x.dim() > 1 else x


def _upcast(pre, threshold):
    dtype = compute_dtype(pre)
    return pre.to(dtype), threshold.to(dtype)


def _heaviside(x, t):
    return (x > t).to(x.dtype)


def threshold_grad(pre, threshold, bandwidth, grad_elem=None, elem_is_jumprelu=True, grad_row=None):
    """-(1/ε) Σ_rows K((pre-θ)/ε) · (c·grad_elem + grad_row), c = θ (JumpReLU) or 1 (step)."""
    x, t = _upcast(pre, threshold)
    # Divide by a tensor on the same device: a Python-scalar divisor may become a
    # multiply by its reciprocal, which rounds differently at the window's edges.
    eps = torch.full((), bandwidth, dtype=x.dtype, device=x.device)
    u = (x - t) / eps
    in_window = ((u > -0.5) & (u < 0.5)).to(x.dtype)
    weight = torch.zeros_like(x)
    if grad_elem is not None:
        weight = weight + (t if elem_is_jumprelu else 1.0) * grad_elem.to(x.dtype)
    if grad_row is not None:
        weight = weight + grad_row.to(x.dtype).unsqueeze(-1)
    return (-sum_leading_dims(in_window * weight) / eps).to(threshold.dtype)


def jumprelu_forward(pre, threshold):
    x, t = _upcast(pre, threshold)
    return (x * _heaviside(x, t)).to(pre.dtype)


def step_forward(pre, threshold):
    x, t = _upcast(pre, threshold)
    return _heaviside(x, t).to(pre.dtype)


def l0_forward(pre, threshold):
    x, t = _upcast(pre, threshold)
    return _heaviside(x, t).sum(-1).to(pre.dtype)


def jumprelu_input_grad(grad, pre, threshold):
    x, t = _upcast(pre, threshold)
    return (grad.to(x.dtype) * _heaviside(x, t)).to(pre.dtype)


class _SavesInputs(torch.autograd.Function):
    """Saves only pre and θ for backward, like the compiled ops."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pre, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth


class _JumpReLU(_SavesInputs):
    @staticmethod
    def forward(pre, threshold, bandwidth):
        return jumprelu_forward(pre, threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_pre = jumprelu_input_grad(grad, pre, threshold)
        return grad_pre, threshold_grad(pre, threshold, ctx.bandwidth, grad_elem=grad), None


class _Step(_SavesInputs):
    @staticmethod
    def forward(pre, threshold, bandwidth):
        return step_forward(pre, threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_threshold = threshold_grad(pre, threshold, ctx.bandwidth, grad_elem=grad, elem_is_jumprelu=False)
        return None, grad_threshold, None


class _JumpReLUL0(_SavesInputs):
    @staticmethod
    def forward(pre, threshold, bandwidth):
        return jumprelu_forward(pre, threshold), l0_forward(pre, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _SavesInputs.setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # an unused output arrives as None

    @staticmethod
    def backward(ctx, grad_acts, grad_l0):
        pre, threshold = ctx.saved_tensors
        grad_pre = None if grad_acts is None else jumprelu_input_grad(grad_acts, pre, threshold)
        grad_threshold = threshold_grad(pre, threshold, ctx.bandwidth, grad_elem=grad_acts, grad_row=grad_l0)
        return grad_pre, grad_threshold, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    check_inputs("jumprelu", pre, threshold, bandwidth)
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    check_inputs("step", pre, threshold, bandwidth)
    return _Step.apply(pre, threshold, bandwidth)


def jumprelu_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3):
    check_inputs("jumprelu_l0", pre, threshold, bandwidth)
    return _JumpReLUL0.apply(pre, threshold, bandwidth)
