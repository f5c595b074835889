"""Fake kernels and autograd for torch.ops.jumprelu_ext.* (the compiled ops; contract in docs/ops.md).

The backward kernels are ops of their own, so torch.compile(fullgraph=True) traces forward and
backward. Only pre and θ are saved for backward: no [batch, F] masks. Backward asks the kernels
only for the gradients autograd needs (ctx.needs_input_grad); an output not asked for comes back
as an empty tensor and becomes None here. Differentiating a gradient again raises an error.

The ``.counted`` overloads of the forward ops also add to ``fire_counts`` (schema ``Tensor(a!)``,
docs/ops.md#fire-counts). Their fake kernels return only the new outputs; torch.compile
functionalises the in-place add.
"""

import torch
from torch._library.autograd import Info, make_autograd_impl

from ._checks import check_inputs
from .reference import double_backward_message

ops = torch.ops.jumprelu_ext


@torch.library.register_fake("jumprelu_ext::jumprelu")
@torch.library.register_fake("jumprelu_ext::jumprelu.counted")
def _jumprelu_fake(pre, threshold, bandwidth, ste_to_input=False, fire_counts=None):
    check_inputs("jumprelu", pre, threshold, bandwidth, ste_to_input, fire_counts)
    return pre.new_empty(pre.shape)


@torch.library.register_fake("jumprelu_ext::step")
@torch.library.register_fake("jumprelu_ext::step.counted")
def _step_fake(pre, threshold, bandwidth, ste_to_input=False, fire_counts=None):
    check_inputs("step", pre, threshold, bandwidth, ste_to_input, fire_counts)
    return pre.new_empty(pre.shape)


@torch.library.register_fake("jumprelu_ext::jumprelu_l0")
@torch.library.register_fake("jumprelu_ext::jumprelu_l0.counted")
def _jumprelu_l0_fake(pre, threshold, bandwidth, ste_to_input=False, fire_counts=None):
    check_inputs("jumprelu_l0", pre, threshold, bandwidth, ste_to_input, fire_counts)
    return pre.new_empty(pre.shape), pre.new_empty(pre.shape[:-1], dtype=torch.float32)


def _backward_fake(pre, threshold, needs_grad_pre, needs_grad_threshold):
    grad_pre = pre.new_empty(pre.shape if needs_grad_pre else (0,))
    grad_threshold = threshold.new_empty(threshold.shape if needs_grad_threshold else (0,))
    return grad_pre, grad_threshold


@torch.library.register_fake("jumprelu_ext::jumprelu_backward")
def _jumprelu_backward_fake(
    grad_acts, pre, threshold, bandwidth, ste_to_input=False, needs_grad_pre=True, needs_grad_threshold=True
):
    return _backward_fake(pre, threshold, needs_grad_pre, needs_grad_threshold)


@torch.library.register_fake("jumprelu_ext::step_backward")
def _step_backward_fake(
    grad_step, pre, threshold, bandwidth, ste_to_input=False, needs_grad_pre=True, needs_grad_threshold=True
):
    return _backward_fake(pre, threshold, needs_grad_pre, needs_grad_threshold)


@torch.library.register_fake("jumprelu_ext::jumprelu_l0_backward")
def _jumprelu_l0_backward_fake(
    grad_acts, grad_l0, pre, threshold, bandwidth, ste_to_input=False, needs_grad_pre=True, needs_grad_threshold=True
):
    return _backward_fake(pre, threshold, needs_grad_pre, needs_grad_threshold)


def _save_inputs(ctx, inputs, output):
    pre, threshold, bandwidth, ste_to_input = inputs[:4]  # a .counted overload adds fire_counts
    ctx.save_for_backward(pre, threshold)
    ctx.bandwidth = bandwidth
    ctx.ste_to_input = ste_to_input


def _save_inputs_keep_missing_grads(ctx, inputs, output):
    _save_inputs(ctx, inputs, output)
    # An unused output (acts or l0) then arrives as None instead of a zero tensor.
    ctx.set_materialize_grads(False)


def _backward(ctx, backward_op, grads, pre_gets_terms):
    """Calls backward_op(*grads, pre, θ, ε, ste_to_input, needs_grad_pre, needs_grad_threshold)."""
    pre, threshold = ctx.saved_tensors
    needs_pre = ctx.needs_input_grad[0] and pre_gets_terms
    needs_threshold = ctx.needs_input_grad[1]
    grad_pre, grad_threshold = backward_op(
        *grads, pre, threshold, ctx.bandwidth, ctx.ste_to_input, needs_pre, needs_threshold
    )
    # None for ε, ste_to_input and (in a .counted overload) fire_counts.
    no_grads = (None,) * (len(ctx.needs_input_grad) - 2)
    return (grad_pre if needs_pre else None), (grad_threshold if needs_threshold else None), *no_grads


def _jumprelu_backward(ctx, grad_acts):
    return _backward(ctx, ops.jumprelu_backward, (grad_acts,), True)


def _step_backward(ctx, grad_step):
    # Without ste_to_input no term of the step reaches pre.
    return _backward(ctx, ops.step_backward, (grad_step,), ctx.ste_to_input)


def _jumprelu_l0_backward(ctx, grad_acts, grad_l0):
    pre_gets_terms = grad_acts is not None or ctx.ste_to_input
    return _backward(ctx, ops.jumprelu_l0_backward, (grad_acts, grad_l0), pre_gets_terms)


torch.library.register_autograd("jumprelu_ext::jumprelu", _jumprelu_backward, setup_context=_save_inputs)
torch.library.register_autograd("jumprelu_ext::step", _step_backward, setup_context=_save_inputs)
torch.library.register_autograd(
    "jumprelu_ext::jumprelu_l0", _jumprelu_l0_backward, setup_context=_save_inputs_keep_missing_grads
)

# torch.library.register_autograd refuses any op with a mutable argument, although fire_counts is
# an integer buffer outside the graph (it never has a gradient). For the .counted overloads,
# install the Autograd kernel register_autograd itself would build (make_autograd_impl).
_counted_lib = torch.library.Library("jumprelu_ext", "IMPL")
for _op, _backward_fn, _setup in (
    ("jumprelu", _jumprelu_backward, _save_inputs),
    ("step", _step_backward, _save_inputs),
    ("jumprelu_l0", _jumprelu_l0_backward, _save_inputs_keep_missing_grads),
):
    _kernel = make_autograd_impl(getattr(ops, _op).counted, Info(_backward_fn, _setup))
    _counted_lib.impl(f"{_op}.counted", _kernel, "Autograd", with_keyset=True)


def _refuse_double_backward(op):
    def backward(ctx, *grads):
        raise RuntimeError(double_backward_message(op))

    return backward


def _no_context(ctx, inputs, output):
    pass


# The backward ops are differentiable only in the sense that autograd records them under
# create_graph=True; a second backward through them then stops with a clear error instead of
# silently giving zeros.
for _op in ("jumprelu", "step", "jumprelu_l0"):
    torch.library.register_autograd(
        f"jumprelu_ext::{_op}_backward", _refuse_double_backward(_op), setup_context=_no_context
    )
