"""Fake kernels and autograd for the sparse step's ops (torch.ops.jumprelu_ext.sparse_*;
contract in docs/ops.md#the-sparse-step).

``sparse_encode`` returns as many entries as the batch has in its support, a size known only
when the kernel has run: its fake kernel makes it a new dynamic size, so torch.compile traces
through. Its backward saves x, W_enc, θ and the row-compressed support, never a [rows, F] tensor.
"""

import torch
from torch._library.autograd import Info, make_autograd_impl

from ._checks import compute_dtype
from ._registrations import _no_context, _refuse_double_backward
from .sparse import check_encoder_inputs

ops = torch.ops.jumprelu_ext


@torch.library.register_fake("jumprelu_ext::sparse_encode")
@torch.library.register_fake("jumprelu_ext::sparse_encode.counted")
def _sparse_encode_fake(x, W_enc, b_enc, threshold, bandwidth, ste_to_input=False, chunk_rows=0, fire_counts=None):
    check_encoder_inputs(x, W_enc, b_enc, threshold, bandwidth, ste_to_input, fire_counts)
    nnz = torch.library.get_ctx().new_dynamic_size()
    rows = x.shape[0]
    return (
        x.new_empty(rows + 1, dtype=torch.int64),
        x.new_empty(nnz, dtype=torch.int64),
        x.new_empty(nnz, dtype=compute_dtype(x)),
        x.new_empty(nnz, dtype=torch.uint8),
        x.new_empty(rows, dtype=torch.float32),
    )


@torch.library.register_fake("jumprelu_ext::sparse_encode_backward")
def _sparse_encode_backward_fake(
    grad_values,
    grad_l0,
    x,
    W_enc,
    threshold,
    offsets,
    indices,
    flags,
    bandwidth,
    ste_to_input,
    needs_x,
    needs_W_enc,
    needs_b_enc,
    needs_threshold,
):
    return (
        x.new_empty(x.shape if needs_x else (0,)),
        W_enc.new_empty(W_enc.shape if needs_W_enc else (0,)),
        x.new_empty((W_enc.shape[1],) if needs_b_enc else (0,)),
        threshold.new_empty(threshold.shape if needs_threshold else (0,)),
    )


@torch.library.register_fake("jumprelu_ext::sparse_decode")
def _sparse_decode_fake(offsets, indices, values, W_dec):
    return values.new_empty(offsets.shape[0] - 1, W_dec.shape[1])


@torch.library.register_fake("jumprelu_ext::sparse_decode_backward")
def _sparse_decode_backward_fake(grad_out, offsets, indices, values, W_dec, needs_values=True, needs_W_dec=True):
    return values.new_empty(values.shape if needs_values else (0,)), W_dec.new_empty(
        W_dec.shape if needs_W_dec else (0,)
    )


def _encode_setup(ctx, inputs, output):
    x, W_enc, _b_enc, threshold, bandwidth, ste_to_input = inputs[:6]  # .counted adds fire_counts
    offsets, indices, _values, flags, _l0 = output
    ctx.save_for_backward(x, W_enc, threshold, offsets, indices, flags)
    ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
    ctx.set_materialize_grads(False)  # an unused values or l0 arrives as None


def _encode_backward(ctx, _offsets, _indices, grad_values, _flags, grad_l0):
    x, W_enc, threshold, offsets, indices, flags = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if grad_values is None and grad_l0 is None:
        return (None,) * len(ctx.needs_input_grad)
    grads = ops.sparse_encode_backward(
        grad_values, grad_l0, x, W_enc, threshold, offsets, indices, flags, ctx.bandwidth, ctx.ste_to_input, *needs
    )
    grads = tuple(g if need else None for g, need in zip(grads, needs))
    return *grads, *(None,) * (len(ctx.needs_input_grad) - 4)


def _decode_setup(ctx, inputs, output):
    offsets, indices, values, W_dec = inputs
    ctx.save_for_backward(offsets, indices, values, W_dec)


def _decode_backward(ctx, grad_out):
    offsets, indices, values, W_dec = ctx.saved_tensors
    needs_values, needs_W_dec = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_values, grad_W_dec = ops.sparse_decode_backward(
        grad_out, offsets, indices, values, W_dec, needs_values, needs_W_dec
    )
    return None, None, (grad_values if needs_values else None), (grad_W_dec if needs_W_dec else None)


torch.library.register_autograd("jumprelu_ext::sparse_encode", _encode_backward, setup_context=_encode_setup)
torch.library.register_autograd("jumprelu_ext::sparse_decode", _decode_backward, setup_context=_decode_setup)
# The .counted overload mutates fire_counts, which register_autograd refuses: install the kernel it
# would build (as for the dense ops' overloads, _registrations.py).
_counted_lib = torch.library.Library("jumprelu_ext", "IMPL")
_counted_lib.impl(
    "sparse_encode.counted",
    make_autograd_impl(ops.sparse_encode.counted, Info(_encode_backward, _encode_setup)),
    "Autograd",
    with_keyset=True,
)


for _op in ("sparse_encode", "sparse_decode"):
    torch.library.register_autograd(
        f"jumprelu_ext::{_op}_backward", _refuse_double_backward(_op), setup_context=_no_context
    )
