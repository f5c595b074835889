"""Bad input raises a clear error naming the problem.

Public functions (Python checks in _checks.py): TypeError / ValueError. Direct torch.ops calls
(C++ checks in csrc/ops.h): RuntimeError. Both matched on the message text, for the three
forward ops and (through torch.ops) the three backward ops, plus wrong gradient shapes, dtypes
and devices passed to the backward ops.
"""

import re

import pytest
import torch
from conftest import IMPLS, requires_compiled, requires_cuda

import jumprelu_ext

FORWARD_OPS = ["jumprelu", "step", "jumprelu_l0"]
ALL_OPS = FORWARD_OPS + ["jumprelu_backward", "step_backward", "jumprelu_l0_backward"]
F32 = torch.float32


def _pre(shape=(4, 3), dtype=F32, device="cpu"):
    return (
        torch.full(shape, 0.3, dtype=dtype, device=device)
        if dtype.is_floating_point or dtype.is_complex
        else torch.ones(shape, dtype=dtype, device=device)
    )


def _theta(n=3, dtype=F32, device="cpu", dim1=True):
    return (
        torch.full((n,), 0.5, dtype=dtype, device=device)
        if dtype.is_floating_point
        else torch.ones(n, dtype=dtype, device=device)
    )


# (id, pre, threshold, bandwidth, Python exception type, message regex)
BAD_INPUTS = [
    (
        "features-mismatch",
        lambda: _pre((4, 3)),
        lambda: _theta(4),
        0.1,
        ValueError,
        r"threshold has 4 features but pre's last dimension is 3",
    ),
    (
        "features-mismatch-1d",
        lambda: _pre((5,)),
        lambda: _theta(3),
        0.1,
        ValueError,
        r"threshold has 3 features but pre's last dimension is 5",
    ),
    (
        "theta-2d",
        lambda: _pre((4, 3)),
        lambda: torch.full((1, 3), 0.5),
        0.1,
        ValueError,
        r"threshold must be 1-D \[features\], got shape \[1, 3\]",
    ),
    (
        "theta-0d",
        lambda: _pre((4, 3)),
        lambda: torch.tensor(0.5),
        0.1,
        ValueError,
        r"threshold must be 1-D \[features\], got shape \[\]",
    ),
    (
        "pre-0d",
        lambda: torch.tensor(0.3),
        lambda: _theta(1),
        0.1,
        ValueError,
        r"pre must have shape \[\.\.\., features\], got a 0-d tensor",
    ),
    (
        "pre-int32",
        lambda: _pre(dtype=torch.int32),
        lambda: _theta(),
        0.1,
        TypeError,
        r"pre must be float32, float64, float16 or bfloat16, got (torch\.int32|Int)\b",
    ),
    (
        "pre-int64",
        lambda: _pre(dtype=torch.int64),
        lambda: _theta(),
        0.1,
        TypeError,
        r"pre must be float32, float64, float16 or bfloat16, got (torch\.int64|Long)\b",
    ),
    (
        "pre-bool",
        lambda: _pre(dtype=torch.bool),
        lambda: _theta(),
        0.1,
        TypeError,
        r"pre must be float32, float64, float16 or bfloat16, got (torch\.bool|Bool)\b",
    ),
    (
        "pre-complex",
        lambda: _pre(dtype=torch.complex64),
        lambda: _theta(),
        0.1,
        TypeError,
        r"pre must be float32, float64, float16 or bfloat16, got (torch\.complex64|ComplexFloat)\b",
    ),
    (
        "pre-float8",
        lambda: _pre(dtype=F32).to(torch.float8_e4m3fn),
        lambda: _theta(),
        0.1,
        TypeError,
        r"pre must be float32, float64, float16 or bfloat16, got (torch\.float8_e4m3fn|Float8_e4m3fn)\b",
    ),
    (
        "theta-int",
        lambda: _pre(),
        lambda: _theta(dtype=torch.int64),
        0.1,
        TypeError,
        r"threshold must be float32 or pre's dtype \(.*(Float|float32).*\), got .*(Long|int64)",
    ),
    (
        "theta-f64-with-f32-pre",
        lambda: _pre(),
        lambda: _theta(dtype=torch.float64),
        0.1,
        TypeError,
        r"threshold must be float32 or pre's dtype .*, got .*(Double|float64)",
    ),
    (
        "theta-f16-with-bf16-pre",
        lambda: _pre(dtype=torch.bfloat16),
        lambda: _theta(dtype=torch.float16),
        0.1,
        TypeError,
        r"threshold must be float32 or pre's dtype \(.*(BFloat16|bfloat16).*\), got .*(Half|float16)",
    ),
    (
        "theta-bf16-with-f32-pre",
        lambda: _pre(),
        lambda: _theta(dtype=torch.bfloat16),
        0.1,
        TypeError,
        r"threshold must be float32 or pre's dtype .*, got .*(BFloat16|bfloat16)",
    ),
    (
        "bandwidth-zero",
        lambda: _pre(),
        lambda: _theta(),
        0.0,
        ValueError,
        r"bandwidth must be positive and finite, got 0",
    ),
    (
        "bandwidth-negative",
        lambda: _pre(),
        lambda: _theta(),
        -0.1,
        ValueError,
        r"bandwidth must be positive and finite, got -0\.1",
    ),
    (
        "bandwidth-nan",
        lambda: _pre(),
        lambda: _theta(),
        float("nan"),
        ValueError,
        r"bandwidth must be positive and finite, got nan",
    ),
    (
        "bandwidth-inf",
        lambda: _pre(),
        lambda: _theta(),
        float("inf"),
        ValueError,
        r"bandwidth must be positive and finite, got inf",
    ),
    (
        "bandwidth-neg-inf",
        lambda: _pre(),
        lambda: _theta(),
        float("-inf"),
        ValueError,
        r"bandwidth must be positive and finite, got -inf",
    ),
]
BAD_IDS = [case[0] for case in BAD_INPUTS]


@pytest.mark.parametrize("op", FORWARD_OPS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=BAD_IDS)
def test_public_function_rejects(op, case):
    _, make_pre, make_theta, bandwidth, exc, message = case
    with pytest.raises(exc, match=rf"^{op}: {message}"):
        getattr(jumprelu_ext, op)(make_pre(), make_theta(), bandwidth)


def _call_op(op, pre, theta, bandwidth):
    ops = torch.ops.jumprelu_ext
    if op in FORWARD_OPS:
        return getattr(ops, op)(pre, theta, bandwidth)
    grad = torch.zeros(pre.shape, dtype=pre.dtype, device=pre.device)
    if op == "jumprelu_l0_backward":
        return ops.jumprelu_l0_backward(grad, None, pre, theta, bandwidth)
    return getattr(ops, op)(grad, pre, theta, bandwidth)


@requires_compiled
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=BAD_IDS)
def test_torch_op_rejects(op, case):
    _, make_pre, make_theta, bandwidth, _, message = case
    with pytest.raises(RuntimeError, match=rf"{op}: {message}"):
        _call_op(op, make_pre(), make_theta(), bandwidth)


@pytest.mark.parametrize("op", FORWARD_OPS)
@pytest.mark.parametrize(
    "bandwidth,message",
    [
        (True, r"bandwidth must be a Python number, got bool"),
        ("0.1", r"bandwidth must be a Python number, got str"),
        (None, r"bandwidth must be a Python number, got NoneType"),
        (torch.tensor(0.1), r"bandwidth must be a Python number, got Tensor"),
    ],
    ids=["bool", "str", "None", "tensor"],
)
def test_public_function_rejects_bandwidth_type(op, bandwidth, message):
    with pytest.raises(TypeError, match=rf"^{op}: {message}"):
        getattr(jumprelu_ext, op)(_pre(), _theta(), bandwidth)


@pytest.mark.parametrize("op", FORWARD_OPS)
@pytest.mark.parametrize("value", [1, "yes", None, torch.tensor(True)], ids=["int", "str", "None", "tensor"])
def test_public_function_rejects_ste_to_input_type(op, value):
    with pytest.raises(TypeError, match=rf"^{op}: ste_to_input must be a bool, got {type(value).__name__}"):
        getattr(jumprelu_ext, op)(_pre(), _theta(), 0.1, value)


@pytest.mark.parametrize("op", FORWARD_OPS)
@pytest.mark.parametrize("which", ["pre", "threshold"])
def test_public_function_rejects_non_tensors(op, which):
    pre = [[0.3, 0.3, 0.3]] if which == "pre" else _pre()
    theta = [0.5, 0.5, 0.5] if which == "threshold" else _theta()
    with pytest.raises(TypeError, match=rf"^{op}: pre and threshold must be tensors"):
        getattr(jumprelu_ext, op)(pre, theta, 0.1)


@pytest.mark.parametrize("op", FORWARD_OPS)
def test_public_function_rejects_other_device(op):
    """The meta device stands in for a second device on machines without a GPU."""
    with pytest.raises(ValueError, match=rf"^{op}: pre is on cpu but threshold is on meta"):
        getattr(jumprelu_ext, op)(_pre(), _theta(device="meta"), 0.1)


@requires_cuda
@pytest.mark.parametrize("op", FORWARD_OPS)
@pytest.mark.parametrize("pre_device,theta_device", [("cpu", "cuda"), ("cuda", "cpu")])
def test_public_function_rejects_cpu_cuda_mix(op, pre_device, theta_device):
    with pytest.raises(ValueError, match=rf"^{op}: pre is on {pre_device}(:0)? but threshold is on {theta_device}"):
        getattr(jumprelu_ext, op)(_pre(device=pre_device), _theta(device=theta_device), 0.1)


@requires_compiled
@requires_cuda
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("pre_device,theta_device", [("cpu", "cuda"), ("cuda", "cpu")])
def test_torch_op_rejects_cpu_cuda_mix(op, pre_device, theta_device):
    with pytest.raises(RuntimeError, match=rf"{op}: pre is on {pre_device}(:0)? but threshold is on {theta_device}"):
        _call_op(op, _pre(device=pre_device), _theta(device=theta_device), 0.1)


# ---------------------------------------------------------------------------------------------
# Incoming gradients passed to the backward ops directly.


def _grad_cases():
    ops = torch.ops.jumprelu_ext
    pre, theta = _pre((4, 3)), _theta(3)
    good = torch.ones(4, 3)
    good_l0 = torch.ones(4)
    cases = []
    for name, bad, message in [
        ("shape", torch.ones(4, 4), r"the output gradient must have shape \[4, 3\], got \[4, 4\]"),
        ("shape-flat", torch.ones(12), r"the output gradient must have shape \[4, 3\], got \[12\]"),
        (
            "dtype",
            torch.ones(4, 3, dtype=torch.float64),
            r"the output gradient must have pre's dtype \(Float\), got Double",
        ),
        (
            "dtype-int",
            torch.ones(4, 3, dtype=torch.int64),
            r"the output gradient must have pre's dtype \(Float\), got Long",
        ),
    ]:
        cases.append(
            (
                f"jumprelu_backward-{name}",
                lambda bad=bad: ops.jumprelu_backward(bad, pre, theta, 0.1),
                "jumprelu_backward",
                message,
            )
        )
        cases.append(
            (
                f"step_backward-{name}",
                lambda bad=bad: ops.step_backward(bad, pre, theta, 0.1)[1],
                "step_backward",
                message,
            )
        )
        cases.append(
            (
                f"jumprelu_l0_backward-acts-{name}",
                lambda bad=bad: ops.jumprelu_l0_backward(bad, good_l0, pre, theta, 0.1),
                "jumprelu_l0_backward",
                message,
            )
        )
    for name, bad, message in [
        ("shape", torch.ones(3), r"the l0 gradient must have shape \[4\], got \[3\]"),
        ("shape-keepdim", torch.ones(4, 1), r"the l0 gradient must have shape \[4\], got \[4, 1\]"),
        ("shape-0d", torch.tensor(1.0), r"the l0 gradient must have shape \[4\], got \[\]"),
        ("dtype", torch.ones(4, dtype=torch.bfloat16), r"the l0 gradient must have l0's dtype \(Float\), got BFloat16"),
    ]:
        for acts_grad in (good, None):
            tag = "with-acts" if acts_grad is not None else "no-acts"
            cases.append(
                (
                    f"jumprelu_l0_backward-l0-{name}-{tag}",
                    lambda bad=bad, acts_grad=acts_grad: ops.jumprelu_l0_backward(acts_grad, bad, pre, theta, 0.1),
                    "jumprelu_l0_backward",
                    message,
                )
            )
    # A 1-D pre has a 0-d l0.
    pre1, theta1 = _pre((3,)), _theta(3)
    cases.append(
        (
            "jumprelu_l0_backward-l0-shape-1d-pre",
            lambda: ops.jumprelu_l0_backward(None, torch.ones(1), pre1, theta1, 0.1),
            "jumprelu_l0_backward",
            r"the l0 gradient must have shape \[\], got \[1\]",
        )
    )
    return cases


GRAD_CASES = _grad_cases() if jumprelu_ext.COMPILED else []


@requires_compiled
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_backward_op_rejects_bad_gradient(case):
    _, call, op, message = case
    with pytest.raises(RuntimeError, match=rf"{op}: {message}"):
        call()


@requires_compiled
@requires_cuda
def test_backward_op_rejects_gradient_on_other_device():
    ops = torch.ops.jumprelu_ext
    pre, theta = _pre(device="cuda"), _theta(device="cuda")
    with pytest.raises(RuntimeError, match=r"jumprelu_backward: the output gradient is on cpu but pre is on cuda"):
        ops.jumprelu_backward(torch.ones(4, 3), pre, theta, 0.1)
    with pytest.raises(RuntimeError, match=r"jumprelu_l0_backward: the l0 gradient is on cpu but pre is on cuda"):
        ops.jumprelu_l0_backward(None, torch.ones(4), pre, theta, 0.1)


def test_messages_are_the_same_in_python_and_cpp():
    """_checks.py promises the C++ checks use the same messages: spot-check one per kind."""
    if not jumprelu_ext.COMPILED:
        pytest.skip("needs the compiled ops")
    for _, make_pre, make_theta, bandwidth, exc, _ in BAD_INPUTS:
        pre, theta = make_pre(), make_theta()
        with pytest.raises(exc) as py_err:
            jumprelu_ext.jumprelu(pre, theta, bandwidth)
        with pytest.raises(RuntimeError) as cpp_err:
            torch.ops.jumprelu_ext.jumprelu(pre, theta, bandwidth)
        py_msg = str(py_err.value)
        # The dtype spelling differs (torch.float64 vs Double); compare up to the first dtype.
        stem = re.split(r"got|\(", py_msg)[0]
        assert stem in str(cpp_err.value), (py_msg, str(cpp_err.value))


# ---------------------------------------------------------------------------------------------
# A bandwidth that passes "positive and finite" as a Python float (double) but is not so in the
# fp32 compute dtype: it must be rejected clearly, or work (finite θ-gradient); never NaN/crash
# later in backward.


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bandwidth", [1e-50, 1e39], ids=["underflows-fp32", "overflows-fp32"])
@pytest.mark.parametrize("pre_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bandwidth_outside_fp32_range(device, impl, bandwidth, pre_dtype):
    pre = torch.tensor([[0.5, 0.2, 0.9]], dtype=pre_dtype, device=device)
    theta = torch.full((3,), 0.5, device=device, requires_grad=True)
    try:
        acts = impl.jumprelu(pre, theta, bandwidth)
    except ValueError as error:
        assert "bandwidth" in str(error)
        return
    (grad_theta,) = torch.autograd.grad(acts.sum(), theta)
    assert torch.isfinite(grad_theta).all(), (
        f"bandwidth={bandwidth} was accepted but the θ-gradient is {grad_theta.tolist()}"
    )
