"""Fake kernels and autograd for torch.ops.jumprelu_ext.* (the compiled ops).

The backward kernels are ops of their own, so torch.compile(fullgraph=True) traces
forward and backward. Only pre and θ are saved for backward: no [batch, F] masks.
"""

import torch

from ._checks import check_inputs

ops = torch.ops.jumprelu_ext


@torch.library.register_fake("jumprelu_ext::jumprelu")
def _jumprelu_fake(pre, threshold, bandwidth):
    check_inputs("jumprelu", pre, threshold, bandwidth)
    return pre.new_empty(pre.shape)


@torch.library.register_fake("jumprelu_ext::step")
def _step_fake(pre, threshold, bandwidth):
    check_inputs("step", pre, threshold, bandwidth)
    return pre.new_empty(pre.shape)


@torch.library.register_fake("jumprelu_ext::jumprelu_l0")
def _jumprelu_l0_fake(pre, threshold, bandwidth):
    check_inputs("jumprelu_l0", pre, threshold, bandwidth)
    return pre.new_empty(pre.shape), pre.new_empty(pre.shape[:-1])


@torch.library.register_fake("jumprelu_ext::jumprelu_backward")
def _jumprelu_backward_fake(grad_acts, pre, threshold, bandwidth):
    return pre.new_empty(pre.shape), threshold.new_empty(threshold.shape)


@torch.library.register_fake("jumprelu_ext::step_backward")
def _step_backward_fake(grad_step, pre, threshold, bandwidth):
    return threshold.new_empty(threshold.shape)


@torch.library.register_fake("jumprelu_ext::jumprelu_l0_backward")
def _jumprelu_l0_backward_fake(grad_acts, grad_l0, pre, threshold, bandwidth):
    return pre.new_empty(pre.shape), threshold.new_empty(threshold.shape)


def _save_inputs(ctx, inputs, output):
    pre, threshold, bandwidth = inputs
    ctx.save_for_backward(pre, threshold)
    ctx.bandwidth = bandwidth


def _save_inputs_keep_missing_grads(ctx, inputs, output):
    _save_inputs(ctx, inputs, output)
    # An unused output (acts or l0) then arrives as None instead of a zero tensor.
    ctx.set_materialize_grads(False)


def _jumprelu_backward(ctx, grad_acts):
    pre, threshold = ctx.saved_tensors
    grad_pre, grad_threshold = ops.jumprelu_backward(grad_acts, pre, threshold, ctx.bandwidth)
    return grad_pre, grad_threshold, None


def _step_backward(ctx, grad_step):
    pre, threshold = ctx.saved_tensors
    return None, ops.step_backward(grad_step, pre, threshold, ctx.bandwidth), None


def _jumprelu_l0_backward(ctx, grad_acts, grad_l0):
    pre, threshold = ctx.saved_tensors
    grad_pre, grad_threshold = ops.jumprelu_l0_backward(grad_acts, grad_l0, pre, threshold, ctx.bandwidth)
    return grad_pre, grad_threshold, None


torch.library.register_autograd("jumprelu_ext::jumprelu", _jumprelu_backward, setup_context=_save_inputs)
torch.library.register_autograd("jumprelu_ext::step", _step_backward, setup_context=_save_inputs)
torch.library.register_autograd(
    "jumprelu_ext::jumprelu_l0", _jumprelu_l0_backward, setup_context=_save_inputs_keep_missing_grads
)
