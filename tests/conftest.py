"""Shared fixtures and helpers for the jumprelu_ext op-library tests.

Conventions used throughout:
- every numeric test is parametrised over DEVICES ("cpu", and "cuda" skipped without a GPU);
- the oracle is ``jumprelu_ext.reference`` evaluated on CPU copies of the inputs, so a CUDA
  kernel is held to the same fp32 semantics as the CPU one;
- random data comes from seeded ``torch.Generator``s on CPU and is then moved to the device;
- tests that compare the compiled kernels with the reference are skipped when the package runs
  on the reference fallback (comparing the reference with itself would be a tautology);
- tests that take seconds (training runs, torchrun, subprocesses, estimator sampling, compile)
  are marked ``slow``: ``make test-fast`` (``pytest -m "not slow"``) leaves them out, ``make test``
  runs everything.
"""

import pytest
import torch

import jumprelu_ext
import jumprelu_ext.ops  # noqa: F401  (registers torch.ops.jumprelu_ext.*: import jumprelu_ext is lazy)
from jumprelu_ext import reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_compiled = pytest.mark.skipif(
    not jumprelu_ext.COMPILED, reason="needs the compiled extension; the package runs on the reference fallback"
)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]

# The implementations an op test runs: the package (the compiled kernels; skipped on the reference
# fallback, where it would be the reference again) and the pure-PyTorch reference.
IMPLS = [
    pytest.param(jumprelu_ext, id="public", marks=requires_compiled),
    pytest.param(reference, id="reference"),
]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (pre dtype, threshold dtype): every dtype with its own θ, plus fp32 θ with lower/higher precision pre.
DTYPE_PAIRS = [
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.float64, torch.float64, id="f64"),
    pytest.param(torch.float16, torch.float16, id="f16"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-f32theta"),
    pytest.param(torch.float16, torch.float32, id="f16-f32theta"),
    pytest.param(torch.float64, torch.float32, id="f64-f32theta"),
]

# θ-gradient tolerance, keyed by θ's dtype. The window decisions are bit-identical to the
# reference (same arithmetic), so the only differences are (a) the order of the fp32 (fp64)
# accumulation, bounded by `acc` times the sum of the absolute contributions, and (b) the
# final rounding into θ's dtype, where two slightly different accumulators can round to
# neighbouring values: `out` ulps relative to the result.
THETA_GRAD_TOL = {
    torch.float32: {"acc": 2e-5, "out": 2 * torch.finfo(torch.float32).eps},
    torch.float64: {"acc": 1e-12, "out": 2 * torch.finfo(torch.float64).eps},
    # fp16/bf16 θ: accumulation is still fp32, but the result is rounded to 11 / 8 bits.
    torch.float16: {"acc": 2e-5, "out": torch.finfo(torch.float16).eps},
    torch.bfloat16: {"acc": 2e-5, "out": torch.finfo(torch.bfloat16).eps},
}

# Tolerances against the SAELens-style baselines (they compute in the input dtype).
BASELINE_TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}

LAYOUTS = ["contiguous", "transposed", "sliced", "offset"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(shape, pre_dtype, theta_dtype, device, seed, bandwidth=0.1, window_frac=0.4, tie_frac=0.1):
    """pre [*shape] and θ [shape[-1]] such that a good share of pre lies inside the window
    |pre − θ| < ε/2 (θ + ε·U(−1, 1)), some entries tie exactly (pre == θ), and the rest spread
    on both sides of θ. θ values are representable in pre's dtype so ties survive mixed precision.
    """
    g = gen(seed)
    features = shape[-1]
    theta = 0.2 + 0.8 * torch.rand(features, generator=g, dtype=torch.float64)
    theta = theta.to(pre_dtype).to(theta_dtype).to(torch.float64)  # representable in both dtypes
    far = 0.3 + 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)
    near = theta + bandwidth * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)
    tie = theta.expand(shape)
    choice = torch.rand(shape, generator=g, dtype=torch.float64)
    pre = torch.where(choice < window_frac, near, far)
    pre = torch.where(choice > 1 - tie_frac, tie, pre)
    if tie_frac > 0 and pre.numel() > 0:
        pre.view(-1)[::13] = tie.reshape(-1)[::13]  # ties guaranteed, whatever the draw
    return pre.to(pre_dtype).to(device), theta.to(theta_dtype).to(device)


def rand_like_grad(shape, dtype, device, seed):
    g = gen(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor with x's values and shape, laid out contiguous, transposed, as a strided slice,
    or contiguous but starting one element into its storage (a data pointer that is not
    16-byte aligned: kernels with vector loads must fall back to scalar accesses)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "offset":
        storage = torch.full((x.numel() + 1,), float("nan"), dtype=x.dtype, device=x.device)
        storage[1:] = x.reshape(-1)
        out = storage[1:].view(x.shape)
        assert out.is_contiguous() and out.storage_offset() == 1 and torch.equal(out, x)
        return out
    if layout == "transposed":
        if x.dim() < 2:
            pytest.skip("transposing needs at least 2 dims")
        out = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "sliced":
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), float("nan"), dtype=x.dtype, device=x.device)
        big[..., 1::2] = x
        out = big[..., 1::2]
    else:
        raise ValueError(layout)
    assert torch.equal(out, x) and (out.numel() <= 1 or not out.is_contiguous())
    return out


def count_in_window(pre, theta, bandwidth):
    x = pre.double().cpu()
    t = theta.double().cpu()
    return int(((x - t).abs() < bandwidth / 2).sum())


def cpu(x):
    return None if x is None else x.detach().cpu()


def assert_exact(got, expected, what=""):
    got, expected = cpu(got), cpu(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_theta_grad_close(got, expected, abs_scale, theta_dtype, what="grad_threshold", rounded_terms=None):
    """got/expected: θ-gradients; abs_scale: the same sum taken over absolute contributions.
    rounded_terms: magnitude of partial results that `expected` rounded into θ's dtype before
    adding them up (when it is a sum of separately computed gradients)."""
    got, expected, abs_scale = cpu(got), cpu(expected), cpu(abs_scale)
    assert got.dtype == theta_dtype, f"{what}: dtype {got.dtype} != θ's dtype {theta_dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    tol = THETA_GRAD_TOL[theta_dtype]
    g, e, s = got.double(), expected.double(), abs_scale.double().abs()
    allowed = tol["acc"] * s + tol["out"] * e.abs()
    if rounded_terms is not None:
        allowed = allowed + tol["out"] * cpu(rounded_terms).double().abs()
    bad = (g - e).abs() > allowed
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} mismatches; first at {bad.nonzero()[0].tolist()}: "
        f"got {g[bad][0].item()!r}, expected {e[bad][0].item()!r}, allowed {allowed[bad][0].item()!r}"
    )


def reference_theta_grad(pre, theta, bandwidth, grad_acts=None, step=False, grad_l0=None):
    """(reference θ-gradient, same sum over |contributions|), both evaluated on CPU."""
    pre, theta, grad_acts, grad_l0 = cpu(pre), cpu(theta), cpu(grad_acts), cpu(grad_l0)
    value = reference.threshold_grad(pre, theta, bandwidth, grad_acts, step, grad_l0)
    # θ > 0 in all tests, so |c·g| = c·|g|; the scale is computed in fp64 (never rounded to θ's dtype).
    scale = reference.threshold_grad(
        pre.double(),
        theta.double(),
        bandwidth,
        None if grad_acts is None else grad_acts.double().abs(),
        step,
        None if grad_l0 is None else grad_l0.double().abs(),
    )
    return value, scale


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad with None-as-zero for inputs that got no gradient."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    res = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(i) if r is None else r for r, i in zip(res, inputs)]


# ---------------------------------------------------------------------------- command lines


@pytest.fixture
def help_entries(monkeypatch):
    """A function: argparse parser -> {flag: its whole --help entry on one line}. An entry starts at
    a line whose first token is a flag and runs to the next such line (argparse may put a long
    flag's help on the following line); COLUMNS is wide, so no help string is wrapped."""
    monkeypatch.setenv("COLUMNS", "1000")

    def entries(parser) -> dict[str, str]:
        out, current = {}, None
        for line in parser.format_help().splitlines():
            first = line.split()[0].rstrip(",") if line.strip() else ""
            if first.startswith("--"):
                current = first
                out[current] = []
            if current is not None:
                out[current].append(line)
        return {flag: " ".join(" ".join(lines).split()) for flag, lines in out.items()}

    return entries


# ---------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory):
    """The tiny GPT-2 of ``_tiny_models.save_tiny_gpt2`` (2 blocks, width 32), built once; tests
    only read it."""
    pytest.importorskip("transformers")
    from _tiny_models import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def tiny(tiny_gpt2_folder, tmp_path_factory):
    """(the tiny GPT-2's folder, a text of 120 random documents of its words: no two windows alike)."""
    import numpy as np
    from _tiny_models import WORDS

    rng = np.random.default_rng(0)
    text = tmp_path_factory.mktemp("stream") / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) for _ in range(120)))
    return tiny_gpt2_folder, text
