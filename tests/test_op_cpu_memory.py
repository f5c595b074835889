"""Large CPU outputs come from a cache of already faulted-in buffers (csrc/cpu/output_cache.cpp,
docs/ops.md#cpu-memory): reused across calls, ordinary resizable tensors, and switched off by
JUMPRELU_EXT_CPU_CACHE_MIB=0."""

import os
import resource
import subprocess
import sys

import pytest
import torch
from conftest import requires_compiled

import jumprelu_ext

pytestmark = requires_compiled

SHAPE = (512, 4096)  # 8 MiB in fp32: the smallest size the cache takes


def _inputs():
    g = torch.Generator().manual_seed(950)
    return torch.randn(SHAPE, generator=g), torch.rand(SHAPE[1], generator=g)


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_outputs_are_reused():
    """The second call writes into the first call's freed buffer: no new pages to fault in
    (8 MiB of fresh 4 KiB pages would be 2,048 faults)."""
    pre, theta = _inputs()
    first = jumprelu_ext.jumprelu(pre, theta, 0.1)
    ptr, expected = first.data_ptr(), first.clone()
    del first
    before = _minor_faults()
    again = jumprelu_ext.jumprelu(pre, theta, 0.1)
    assert _minor_faults() - before < 200
    assert again.data_ptr() == ptr
    assert torch.equal(again, expected)


def test_outputs_are_ordinary_tensors():
    pre, theta = _inputs()
    acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, 0.1)
    kept = acts.clone()
    acts.resize_(2 * SHAPE[0], SHAPE[1])  # the storage grows like any CPU tensor's
    assert torch.equal(acts[: SHAPE[0]], kept)
    acts.add_(1.0)
    assert l0.dtype == torch.float32 and l0.shape == SHAPE[:1]


@pytest.mark.slow
def test_cache_can_be_switched_off():
    code = (
        "import resource, torch, jumprelu_ext\n"
        f"pre, theta = torch.randn{SHAPE}, torch.rand({SHAPE[1]})\n"
        "a = jumprelu_ext.jumprelu(pre, theta, 0.1); del a\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "b = jumprelu_ext.jumprelu(pre, theta, 0.1)\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "print(torch.equal(b, (pre * (pre > theta))), faults > 1000)\n"
    )
    env = {**os.environ, "JUMPRELU_EXT_CPU_CACHE_MIB": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True True"  # right values, from freshly faulted-in pages
