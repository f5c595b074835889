"""The build and the loading: compiled kernels registered for the expected backends, and the
pure-PyTorch fallback when the extension is forced off or cannot be imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jumprelu_ext

OPS = ["jumprelu", "step", "jumprelu_l0", "jumprelu_backward", "step_backward", "jumprelu_l0_backward"]
REPO = Path(__file__).resolve().parent.parent
FORCE_REFERENCE = os.environ.get("JUMPRELU_EXT_FORCE_REFERENCE", "") not in ("", "0")
EXPECT_CUDA_BUILD = os.environ.get("JUMPRELU_EXT_EXPECT_CUDA_BUILD", "") == "1"


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"jumprelu_ext::{op}", key)


@pytest.mark.skipif(FORCE_REFERENCE, reason="JUMPRELU_EXT_FORCE_REFERENCE is set")
def test_compiled_extension_loaded():
    assert jumprelu_ext.COMPILED is True


@pytest.mark.skipif(not jumprelu_ext.COMPILED, reason="the compiled extension is not loaded")
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert _has_kernel(op, "CPU"), f"jumprelu_ext::{op} has no CPU kernel"


@pytest.mark.skipif(not jumprelu_ext.COMPILED, reason="the compiled extension is not loaded")
@pytest.mark.parametrize("op", ["jumprelu", "step", "jumprelu_l0"])
def test_autograd_and_fake_registered(op):
    assert _has_kernel(op, "Autograd") or _has_kernel(op, "AutogradCPU"), f"jumprelu_ext::{op} has no autograd kernel"
    assert _has_kernel(op, "Meta"), f"jumprelu_ext::{op} has no fake (Meta) kernel"


@pytest.mark.skipif(not EXPECT_CUDA_BUILD, reason="JUMPRELU_EXT_EXPECT_CUDA_BUILD=1 not set (no CUDA toolkit build)")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    assert jumprelu_ext.COMPILED, "a CUDA build was expected but the compiled extension is not loaded"
    assert _has_kernel(op, "CUDA"), f"jumprelu_ext::{op} has no CUDA kernel although a CUDA build was expected"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_present_when_gpu(op):
    """On a GPU machine the extension must have been built with its CUDA kernels."""
    assert jumprelu_ext.COMPILED and _has_kernel(op, "CUDA"), f"jumprelu_ext::{op} has no CUDA kernel"


# The fallback runs in a fresh interpreter: the extension cannot be unloaded from this one.
_FALLBACK_SCRIPT = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if "--break-import" in sys.argv:
        sys.modules["jumprelu_ext._C"] = None  # makes `from . import _C` raise ImportError
    import torch
    import jumprelu_ext
    from jumprelu_ext import ops, reference
pre = torch.tensor([[0.5, 0.375, 0.625, 0.9], [0.2, 0.55, 0.45, -1.0]], requires_grad=True)
theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, 0.25)
(acts.sum() + l0.sum()).backward()
step = jumprelu_ext.step(pre.detach(), theta.detach(), 0.25)
try:
    jumprelu_ext.jumprelu(pre, theta[:3], 0.25)
    error = None
except ValueError as e:
    error = str(e)
try:
    torch.ops.jumprelu_ext.jumprelu.default
    has_torch_op = True
except (AttributeError, RuntimeError):
    has_torch_op = False
print(json.dumps({
    "compiled": jumprelu_ext.COMPILED,
    "uses_reference": ops._jumprelu_l0 is reference.jumprelu_l0,
    "has_torch_op": has_torch_op,
    "acts": acts.tolist(), "l0": l0.tolist(), "step": step.tolist(),
    "grad_pre": pre.grad.tolist(), "grad_theta": theta.grad.tolist(),
    "error": error,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
}))
"""


def _run_fallback(extra_env, *args):
    env = {k: v for k, v in os.environ.items() if k != "JUMPRELU_EXT_FORCE_REFERENCE"}
    env.update(extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_fallback_numbers(out):
    # θ = 0.5, ε = 0.25: window 0.375 < pre < 0.625 (open); H strict.
    assert out["acts"] == [[0.0, 0.0, 0.625, 0.8999999761581421], [0.0, 0.550000011920929, 0.0, 0.0]]
    assert out["l0"] == [2.0, 1.0]
    assert out["step"] == [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    assert out["grad_pre"] == [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    # In the window: (0,0) pre == θ, (1,1) 0.55, (1,2) 0.45: each −(1/ε)(θ·1 + 1) = −6.
    assert out["grad_theta"] == [-6.0, -6.0, -6.0, 0.0]
    assert out["error"] == "jumprelu: threshold has 3 features but pre's last dimension is 4"


@pytest.mark.slow
def test_force_reference_fallback():
    out = _run_fallback({"JUMPRELU_EXT_FORCE_REFERENCE": "1"})
    assert out["compiled"] is False
    assert out["uses_reference"] is True
    assert out["has_torch_op"] is False, "the shared object must not be loaded when the reference is forced"
    assert out["warnings"] == [], "forcing the reference is deliberate: no warning expected"
    _check_fallback_numbers(out)


@pytest.mark.slow
def test_force_reference_zero_means_compiled():
    """JUMPRELU_EXT_FORCE_REFERENCE=0 does not force the fallback."""
    if FORCE_REFERENCE or not jumprelu_ext.COMPILED:
        pytest.skip("the compiled extension is not in use in this environment")
    out = _run_fallback({"JUMPRELU_EXT_FORCE_REFERENCE": "0"})
    assert out["compiled"] is True and out["uses_reference"] is False and out["has_torch_op"] is True
    _check_fallback_numbers(out)  # the same numbers from the compiled kernels


@pytest.mark.slow
def test_fallback_when_extension_cannot_be_imported():
    out = _run_fallback({}, "--break-import")
    assert out["compiled"] is False
    assert out["uses_reference"] is True
    assert len(out["warnings"]) == 1 and "compiled extension could not be loaded" in out["warnings"][0]
    assert "pure-PyTorch reference" in out["warnings"][0]
    _check_fallback_numbers(out)
