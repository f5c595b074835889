"""Pure-PyTorch JumpReLU ops with exactly the semantics of the compiled kernels (docs/ops.md).

H(u) = 1 iff u > 0; K(u) = 1 iff -1/2 < u < 1/2. Arithmetic in fp32 (fp64 for fp64);
outputs in pre's dtype, the L0 count in float32, the threshold gradient in the threshold's
dtype; ``fire_counts`` (int64 [F]) gains each feature's rows with a non-zero output. Tests
compare the kernels against this module, and the package falls back to it when the compiled
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


def _bandwidth(x, bandwidth):
    # Divide by a tensor on the same device: a Python-scalar divisor may become a
    # multiply by its reciprocal, which rounds differently at the window's edges.
    return torch.full((), bandwidth, dtype=x.dtype, device=x.device)


def window(pre, threshold, bandwidth):
    """K((pre-θ)/ε) as a bool tensor: -1/2 < (pre-θ)/ε < 1/2, in the compute dtype."""
    x, t = _upcast(pre, threshold)
    u = (x - t) / _bandwidth(x, bandwidth)
    return (u > -0.5) & (u < 0.5)


def threshold_terms(pre, threshold, bandwidth, grad_acts=None, step=False, grad_l0=None):
    """Each element's K((pre-θ)/ε) · (c·grad_acts + grad_l0), c = θ (JumpReLU) or 1 (step), in the
    compute dtype. A missing gradient adds no term (so a non-finite θ meets no 0·θ)."""
    x, t = _upcast(pre, threshold)
    in_window = window(pre, threshold, bandwidth).to(x.dtype)
    weight = torch.zeros_like(x)
    if grad_acts is not None:
        weight = weight + (1.0 if step else t) * grad_acts.to(x.dtype)
    if grad_l0 is not None:
        weight = weight + grad_l0.to(x.dtype).unsqueeze(-1)
    return in_window * weight


def threshold_grad(pre, threshold, bandwidth, grad_acts=None, step=False, grad_l0=None):
    """-(1/ε) Σ_rows K((pre-θ)/ε) · (c·grad_acts + grad_l0), c = θ (JumpReLU) or 1 (step)."""
    terms = threshold_terms(pre, threshold, bandwidth, grad_acts, step, grad_l0)
    return (-sum_leading_dims(terms) / _bandwidth(terms, bandwidth)).to(threshold.dtype)


def input_grad(pre, threshold, bandwidth, grad_acts=None, step=False, grad_l0=None, ste_to_input=False):
    """H(pre-θ)·grad_acts (JumpReLU only), plus with ste_to_input each element's θ term negated:
    K((pre-θ)/ε) · (c·grad_acts + grad_l0) / ε. None where no term reaches pre."""
    x, t = _upcast(pre, threshold)
    grad = None
    if grad_acts is not None and not step:
        grad = grad_acts.to(x.dtype) * _heaviside(x, t)
    if ste_to_input and (grad_acts is not None or grad_l0 is not None):
        terms = threshold_terms(pre, threshold, bandwidth, grad_acts, step, grad_l0)
        ste = terms / _bandwidth(terms, bandwidth)
        grad = ste if grad is None else grad + ste
    return None if grad is None else grad.to(pre.dtype)


def jumprelu_forward(pre, threshold):
    x, t = _upcast(pre, threshold)
    return (x * _heaviside(x, t)).to(pre.dtype)


def step_forward(pre, threshold):
    x, t = _upcast(pre, threshold)
    return _heaviside(x, t).to(pre.dtype)


def fire_counts_of(out):
    """Per feature, the rows where the op's output is non-zero (int64 [F]): what the ops add to
    ``fire_counts``. NaN != 0, so a NaN output counts; -0.0 == 0 does not."""
    return sum_leading_dims((out.detach() != 0).to(torch.int64))


def _add_fire_counts(fire_counts, out):
    if fire_counts is not None:
        fire_counts += fire_counts_of(out)


def l0_forward(pre, threshold):
    """float32 whatever pre's dtype: counts are exact up to 2^24."""
    x, t = _upcast(pre, threshold)
    return (x > t).sum(-1, dtype=torch.float32)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on a gradient; differentiating it again raises an error naming the op."""

    @staticmethod
    def forward(ctx, grad, op):
        ctx.op = op
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(double_backward_message(ctx.op))


def double_backward_message(op: str) -> str:
    return (
        f"jumprelu_ext::{op}: double backward is not supported (its gradients are straight-through "
        "estimates, not derivatives that can be differentiated again); see docs/ops.md#double-backward"
    )


def _guard(grad, op):
    """With create_graph=True the returned gradients are on a graph: make a second backward fail loudly."""
    if grad is None or not (torch.is_grad_enabled() and grad.requires_grad):
        return grad
    return _RefuseDoubleBackward.apply(grad, op)


class _SavesInputs(torch.autograd.Function):
    """Saves only pre and θ for backward, like the compiled ops."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pre, threshold, bandwidth, ste_to_input = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input

    @classmethod
    def _grads(cls, ctx, op, grad_acts, step, grad_l0):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_pre = input_grad(pre, threshold, ctx.bandwidth, grad_acts, step, grad_l0, ctx.ste_to_input)
        if ctx.needs_input_grad[1] and (grad_acts is not None or grad_l0 is not None):
            grad_threshold = threshold_grad(pre, threshold, ctx.bandwidth, grad_acts, step, grad_l0)
        return _guard(grad_pre, op), _guard(grad_threshold, op), None, None


class _JumpReLU(_SavesInputs):
    @staticmethod
    def forward(pre, threshold, bandwidth, ste_to_input):
        return jumprelu_forward(pre, threshold)

    @staticmethod
    def backward(ctx, grad):
        return _JumpReLU._grads(ctx, "jumprelu", grad, False, None)


class _Step(_SavesInputs):
    @staticmethod
    def forward(pre, threshold, bandwidth, ste_to_input):
        return step_forward(pre, threshold)

    @staticmethod
    def backward(ctx, grad):
        return _Step._grads(ctx, "step", grad, True, None)


class _JumpReLUL0(_SavesInputs):
    @staticmethod
    def forward(pre, threshold, bandwidth, ste_to_input):
        return jumprelu_forward(pre, threshold), l0_forward(pre, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _SavesInputs.setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # an unused output arrives as None

    @staticmethod
    def backward(ctx, grad_acts, grad_l0):
        return _JumpReLUL0._grads(ctx, "jumprelu_l0", grad_acts, False, grad_l0)


def jumprelu(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
):
    check_inputs("jumprelu", pre, threshold, bandwidth, ste_to_input, fire_counts)
    acts = _JumpReLU.apply(pre, threshold, bandwidth, ste_to_input)
    _add_fire_counts(fire_counts, acts)
    return acts


def step(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
):
    check_inputs("step", pre, threshold, bandwidth, ste_to_input, fire_counts)
    out = _Step.apply(pre, threshold, bandwidth, ste_to_input)
    _add_fire_counts(fire_counts, out)
    return out


def jumprelu_l0(
    pre: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float = 1e-3,
    ste_to_input: bool = False,
    fire_counts: torch.Tensor | None = None,
):
    check_inputs("jumprelu_l0", pre, threshold, bandwidth, ste_to_input, fire_counts)
    acts, l0 = _JumpReLUL0.apply(pre, threshold, bandwidth, ste_to_input)
    _add_fire_counts(fire_counts, acts)
    return acts, l0
