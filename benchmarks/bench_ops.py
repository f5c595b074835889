"""Benchmark the fused JumpReLU ops against SAELens-style eager autograd and torch.compile.

For each op (jumprelu_l0, jumprelu, step), dtype and shape, three implementations
(`eager`: baselines.py; `compiled`: torch.compile of jumprelu_ext.reference's math;
`ours`: the extension's kernels) are timed in three modes: `fwd` (no grad), `bwd` (the backward
alone) and `fwd+bwd` (forward, then autograd.grad with given output gradients). Bandwidth is
reported against torch.clone of the same tensor on the same device in the same run.

    python benchmarks/bench_ops.py                      # every available device, default cases
    python benchmarks/bench_ops.py --device cpu --quick # smoke test
    python benchmarks/bench_ops.py --markdown benchmarks/RESULTS.md

Results go to <out>/<date>_<device>.jsonl, one JSON object per line; see benchmarks/RESULTS.md
for the method and the byte-count formulas.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
from baselines import EagerJumpReLU, EagerStep, eager_jumprelu_l0

import jumprelu_ext
from jumprelu_ext import reference as ref

BANDWIDTH = 1e-3  # ε, the paper's default
MODES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("eager", "compiled", "ours")  # baselines first: speed-ups need their times

DEFAULT_CASES = {  # device type -> (shapes, dtypes); the targets refer to these
    "cpu": ([(4096, 16384)], [torch.float32]),
    "cuda": ([(4096, 16384), (4096, 65536)], [torch.float32, torch.bfloat16]),
}
QUICK_SHAPES = [(256, 2048)]
PLANS = {  # CPU calls take 0.1-5 s at the default shape, so a few reps; CUDA calls take ~0.1-10 ms
    "cpu": harness.TimingPlan(warmup=1, min_reps=3, max_reps=10, budget_s=2.0),
    "cuda": harness.TimingPlan(warmup=5, min_reps=10, max_reps=200, budget_s=0.3),
}
QUICK_PLAN = harness.TimingPlan(warmup=1, min_reps=2, max_reps=3, budget_s=0.0)


def _ops():
    return torch.ops.jumprelu_ext


@dataclass(frozen=True)
class OpSpec:
    ours: Callable  # public op: (pre, θ, ε) -> output(s), differentiable
    ours_backward: Callable  # the backward op alone: (grads, pre, θ, ε)
    eager: Callable  # SAELens-style autograd Functions: (pre, θ, ε) -> output(s)
    ref_forward: Callable  # reference math as plain tensor ops (what gets compiled)
    ref_backward: Callable  # (grads, pre, θ, ε) -> (grad_pre or None, grad_θ), plain tensor ops
    bwd_big_tensors: int  # [rows, F] tensors a backward must move: pre, grad (and grad_pre)
    row_output: bool  # also a per-row L0 output (and its gradient)


OPS = {
    "jumprelu_l0": OpSpec(
        ours=jumprelu_ext.jumprelu_l0,
        ours_backward=lambda g, pre, th, eps: _ops().jumprelu_l0_backward(g[0], g[1], pre, th, eps),
        eager=eager_jumprelu_l0,
        ref_forward=lambda pre, th, eps: (ref.jumprelu_forward(pre, th), ref.l0_forward(pre, th)),
        ref_backward=lambda g, pre, th, eps: (
            ref.input_grad(pre, th, eps, grad_acts=g[0]),
            ref.threshold_grad(pre, th, eps, grad_acts=g[0], grad_l0=g[1]),
        ),
        bwd_big_tensors=3,
        row_output=True,
    ),
    "jumprelu": OpSpec(
        ours=jumprelu_ext.jumprelu,
        ours_backward=lambda g, pre, th, eps: _ops().jumprelu_backward(g[0], pre, th, eps),
        eager=EagerJumpReLU.apply,
        ref_forward=lambda pre, th, eps: ref.jumprelu_forward(pre, th),
        ref_backward=lambda g, pre, th, eps: (
            ref.input_grad(pre, th, eps, grad_acts=g[0]),
            ref.threshold_grad(pre, th, eps, grad_acts=g[0]),
        ),
        bwd_big_tensors=3,
        row_output=False,
    ),
    "step": OpSpec(
        ours=jumprelu_ext.step,
        # As autograd calls it: no term of the step reaches pre, so grad_pre is not asked for.
        ours_backward=lambda g, pre, th, eps: _ops().step_backward(g[0], pre, th, eps, False, False, True),
        eager=EagerStep.apply,
        ref_forward=lambda pre, th, eps: ref.step_forward(pre, th),
        ref_backward=lambda g, pre, th, eps: (
            None,
            ref.threshold_grad(pre, th, eps, grad_acts=g[0], step=True),
        ),
        bwd_big_tensors=2,  # no gradient flows to pre
        row_output=False,
    ),
}


def bytes_moved(spec: OpSpec, mode: str, rows: int, features: int, size: int, theta_size: int) -> int:
    """Minimal memory traffic of one call: every tensor read or written once."""
    big = rows * features * size
    row = rows * 4 if spec.row_output else 0  # L0 out (float32), or its gradient in
    fwd = 2 * big + features * theta_size + row  # read pre, θ; write out (and L0)
    bwd = spec.bwd_big_tensors * big + 2 * features * theta_size + row  # + read θ, write grad_θ
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


class _CompiledReference(torch.autograd.Function):
    """Joins a compiled forward and a compiled backward, like a hand-written fused op would."""

    @staticmethod
    def forward(ctx, pre, threshold, forward_fn, backward_fn):
        ctx.save_for_backward(pre, threshold)
        ctx.backward_fn = backward_fn
        return forward_fn(pre, threshold)

    @staticmethod
    def backward(ctx, *grads):
        pre, threshold = ctx.saved_tensors
        return (*ctx.backward_fn(grads, pre, threshold), None, None)


def _no_grad(fn: Callable) -> Callable:
    def run():
        with torch.no_grad():
            return fn()

    return run


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def make_impls(spec: OpSpec, pre, threshold, grads, compile_baseline: bool) -> dict[str, dict[str, Callable]]:
    """impl -> mode -> zero-argument callable that runs that mode once."""
    pre_leaf = pre.detach().requires_grad_()
    th_leaf = threshold.detach().requires_grad_()
    leaves = (pre_leaf, th_leaf)

    def autograd_backward(forward):
        graph = []  # built by the first (warm-up) call, then kept: later calls time the backward alone

        def run():
            if not graph:
                graph.append(_as_tuple(forward(pre_leaf, th_leaf)))
            return torch.autograd.grad(graph[0], leaves, grads, retain_graph=True, allow_unused=True)

        return run

    def modes(forward, backward):
        return {
            "fwd": _no_grad(lambda: forward(pre, threshold)),
            "bwd": backward,
            "fwd+bwd": lambda: torch.autograd.grad(
                _as_tuple(forward(pre_leaf, th_leaf)), leaves, grads, allow_unused=True
            ),
        }

    eager = lambda p, t: spec.eager(p, t, BANDWIDTH)  # noqa: E731
    ours = lambda p, t: spec.ours(p, t, BANDWIDTH)  # noqa: E731
    impls = {
        "eager": modes(eager, autograd_backward(eager)),
        # The backward op called directly, as the compiled baseline's backward function is.
        "ours": modes(ours, _no_grad(lambda: spec.ours_backward(grads, pre, threshold, BANDWIDTH))),
    }
    if compile_baseline:
        # Forward and backward math compiled as two plain functions (fullgraph, static shapes),
        # joined by an autograd.Function: what torch.compile handles best, and how one would
        # hand-write a compiled op without custom kernels.
        fwd_fn = torch.compile(lambda p, t: spec.ref_forward(p, t, BANDWIDTH), fullgraph=True, dynamic=False)
        bwd_fn = torch.compile(lambda g, p, t: spec.ref_backward(g, p, t, BANDWIDTH), fullgraph=True, dynamic=False)
        compiled = lambda p, t: _CompiledReference.apply(p, t, fwd_fn, bwd_fn)  # noqa: E731
        impls["compiled"] = modes(compiled, _no_grad(lambda: bwd_fn(grads, pre, threshold)))
    return {name: impls[name] for name in IMPLS if name in impls}


def make_inputs(spec: OpSpec, shape, dtype, device):
    """pre ~ N(0, 1) in dtype; θ ~ U(0.5, 1.5) in fp32 (what mixed-precision users keep);
    about 16% of the features fire. The kernels are branch-free, so speed does not depend on it."""
    rows, features = shape
    pre = torch.randn(shape, device=device).to(dtype)
    threshold = torch.empty(features, device=device).uniform_(0.5, 1.5)
    grads = (torch.randn_like(pre),)
    if spec.row_output:  # the L0 count (and so its gradient) is float32 whatever pre's dtype
        grads += (torch.randn(rows, device=device, dtype=torch.float32),)
    return pre, threshold, grads


def gbps(num_bytes: int, ms: float | None) -> float | None:
    return None if ms is None else num_bytes / (ms * 1e-3) / 1e9


def ratio(baseline: dict | None, ms: float | None) -> float | None:
    if baseline is None or baseline.get("ms") is None or ms is None:
        return None
    return baseline["ms"] / ms


def run_case(device, op: str, dtype, shape, plan, compile_baseline, clone) -> list[dict]:
    """All impls x modes of one (op, dtype, shape); clone = {"ms", "gb_per_s"} of pre.clone()."""
    spec = OPS[op]
    torch._dynamo.reset()  # fresh compile caches: no recompile limit across cases
    pre, threshold, grads = make_inputs(spec, shape, dtype, device)
    impls = make_impls(spec, pre, threshold, grads, compile_baseline)
    records = []
    for mode in MODES:
        by_impl = {}
        for impl, fns in impls.items():
            record = {
                "op": op,
                "impl": impl,
                "mode": mode,
                "dtype": str(dtype).replace("torch.", ""),
                "threshold_dtype": "float32",
                "shape": list(shape),
            }
            try:
                ms, reps = harness.measure_ms(fns[mode], device, plan)
                num_bytes = bytes_moved(spec, mode, *shape, pre.element_size(), threshold.element_size())
                record.update(ms=ms, reps=reps, bytes=num_bytes, gb_per_s=gbps(num_bytes, ms))
                record["fraction_of_clone"] = record["gb_per_s"] / clone["gb_per_s"]
                if mode == "fwd+bwd":  # eager keeps extra [batch, F] temporaries alive
                    record["peak_mem_mib"] = harness.peak_memory_mib(fns[mode], device)
            except Exception as error:  # report and go on: one broken case must not hide the rest
                record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                print(f"error: {op} {mode} {impl} {record['dtype']} {shape}: {record['error']}", file=sys.stderr)
            by_impl[impl] = record
        for record in by_impl.values():
            record["speedup_vs_eager"] = ratio(by_impl.get("eager"), record.get("ms"))
            record["speedup_vs_compiled"] = ratio(by_impl.get("compiled"), record.get("ms"))
        records += by_impl.values()
    return records


def run_interleaved(device, dtype, shape, runs: int, calls: int) -> list[dict]:
    """jumprelu_l0 fwd+bwd of ours and of the eager pair called alternately, as a training step
    interleaves the op with other large allocations (a back-to-back loop would find its freed
    memory still mapped). One record per run: medians over `calls` calls of each, and the ratio."""
    spec = OPS["jumprelu_l0"]
    pre, threshold, grads = make_inputs(spec, shape, dtype, device)
    impls = make_impls(spec, pre, threshold, grads, compile_baseline=False)
    eager, ours = impls["eager"]["fwd+bwd"], impls["ours"]["fwd+bwd"]
    eager(), ours()  # warm-up
    records = []
    for run in range(runs):
        times = {"eager": [], "ours": []}
        for _ in range(calls):
            for impl, fn in (("eager", eager), ("ours", ours)):
                times[impl] += harness.time_once_ms(fn, device)
        eager_ms, ours_ms = statistics.median(times["eager"]), statistics.median(times["ours"])
        records.append(
            {
                "op": "jumprelu_l0",
                "impl": "ours",
                "mode": "fwd+bwd interleaved",
                "dtype": str(dtype).replace("torch.", ""),
                "threshold_dtype": "float32",
                "shape": list(shape),
                "run": run,
                "ms": ours_ms,
                "max_ms": max(times["ours"]),
                "eager_ms": eager_ms,
                "reps": calls,
                "speedup_vs_eager": eager_ms / ours_ms,
            }
        )
    return records


def interleaved_summary(records: list[dict]) -> dict:
    """Medians over the runs (ratio, times), the slowest call of ours, and the ratio's spread."""
    ratios = sorted(r["speedup_vs_eager"] for r in records)
    return {
        **records[0],
        "run": "median",
        "speedup_vs_eager": statistics.median(ratios),
        "ms": statistics.median(r["ms"] for r in records),
        "eager_ms": statistics.median(r["eager_ms"] for r in records),
        "max_ms": max(r["max_ms"] for r in records),
        "spread": f"{ratios[0]:.1f}-{ratios[-1]:.1f}x over {len(ratios)} runs",
    }


# Peak extra CPU memory of one backward, in a fresh process with the output cache off (so every
# allocation is new memory): VmHWM is reset before the backward and read after it.
_GRAD_MEMORY_SCRIPT = """
import sys, torch, jumprelu_ext
rows, features, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
pre = torch.randn(rows, features, requires_grad=case.startswith("l0"))
theta = torch.rand(features, requires_grad=True)
g_l0 = torch.randn(rows)
acts, l0 = jumprelu_ext.jumprelu_l0(pre, theta, 1e-3)
g = torch.randn_like(acts) if case.startswith("frozen") else None
outputs, grads = ([l0], [g_l0]) if g is None else ([acts, l0], [g, g_l0])
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
if case.endswith("old"):  # what autograd asked for before: every gradient, grad_pre included
    torch.ops.jumprelu_ext.jumprelu_l0_backward(g, g_l0, pre.detach(), theta.detach(), 1e-3)
else:
    torch.autograd.backward(outputs, grads)
print((status("VmHWM") - before) / 1024)
"""

GRAD_MEMORY_CASES = {
    "l0-old": "only l0 used; before: a zeroed grad_pre",
    "l0-new": "only l0 used; now: pre.grad is None",
    "frozen-old": "pre needs no grad (acts and l0 used); before: grad_pre computed",
    "frozen-new": "pre needs no grad; now: only the θ gradient",
}


def grad_memory(shape) -> list[dict]:
    import os
    import subprocess

    env = {**os.environ, "JUMPRELU_EXT_CPU_CACHE_MIB": "0"}
    records = []
    for case, what in GRAD_MEMORY_CASES.items():
        out = subprocess.run(
            [sys.executable, "-c", _GRAD_MEMORY_SCRIPT, *map(str, shape), case],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        records.append({"case": case, "what": what, "shape": list(shape), "peak_mib": float(out.stdout.split()[-1])})
        print(f"{case:11s} {what:62s} peak extra {records[-1]['peak_mib']:8.1f} MiB", flush=True)
    return records


def measure_clone(device, dtype, shape, plan) -> dict:
    pre = torch.randn(shape, device=device).to(dtype)
    ms, reps = harness.measure_ms(pre.clone, device, plan)
    num_bytes = 2 * pre.numel() * pre.element_size()  # read + write
    return {
        "op": "clone",
        "impl": "torch.clone",
        "mode": "-",
        "dtype": str(dtype).replace("torch.", ""),
        "shape": list(shape),
        "ms": ms,
        "reps": reps,
        "bytes": num_bytes,
        "gb_per_s": gbps(num_bytes, ms),
        "fraction_of_clone": 1.0,
    }


# --- reporting ---

COLUMNS: list[harness.Column] = [
    ("op", "op", 11, ""),
    ("dtype", "dtype", 8, ""),
    ("shape_str", "shape", 10, ""),
    ("mode", "mode", 7, ""),
    ("impl", "impl", 11, ""),
    ("ms", "ms", 9, ".3f"),
    ("gb_per_s", "GB/s", 7, ".1f"),
    ("fraction_of_clone", "of clone", 8, ".2f"),
    ("speedup_vs_eager", "vs eager", 8, ".2f"),
    ("speedup_vs_compiled", "vs compiled", 11, ".2f"),
    ("peak_mem_mib", "peak MiB", 8, ".0f"),
    ("reps", "reps", 4, ""),
]


INTERLEAVED_COLUMNS: list[harness.Column] = [
    ("dtype", "dtype", 8, ""),
    ("shape_str", "shape", 10, ""),
    ("run", "run", 6, ""),
    ("eager_ms", "eager ms", 9, ".1f"),
    ("ms", "ours ms", 8, ".1f"),
    ("max_ms", "ours max ms", 11, ".1f"),
    ("speedup_vs_eager", "vs eager", 8, ".2f"),
    ("spread", "spread", 22, ""),
]


def table(records: list[dict], header: bool = True) -> list[str]:
    rows = [{**r, "shape_str": "x".join(map(str, r["shape"]))} for r in records]
    return harness.table_lines(COLUMNS, rows, header)


@dataclass(frozen=True)
class Target:
    ops: tuple[str, ...]
    modes: tuple[str, ...]
    key: str
    minimum: float


TARGETS = {  # checked on `ours` at the device's default cases only
    "cpu": [
        Target(("jumprelu_l0",), ("fwd+bwd",), "speedup_vs_eager", 10.0),
        # The setting users get: the median of the interleaved runs.
        Target(("jumprelu_l0",), ("fwd+bwd interleaved",), "speedup_vs_eager", 15.0),
    ],
    "cuda": [
        Target(tuple(OPS), ("fwd", "bwd"), "fraction_of_clone", 0.85),
        Target(("jumprelu_l0",), ("fwd+bwd",), "speedup_vs_eager", 6.0),
        Target(("jumprelu_l0",), ("fwd+bwd",), "speedup_vs_compiled", 1.5),
    ],
}


def check_targets(device_type: str, records: list[dict]) -> list[str]:
    shapes, dtypes = DEFAULT_CASES[device_type]
    default_cases = {(tuple(s), str(d).replace("torch.", "")) for s in shapes for d in dtypes}
    lines = []
    for target in TARGETS[device_type]:
        for r in records:
            if (
                r["impl"] == "ours"
                and r["op"] in target.ops
                and r["mode"] in target.modes
                and r.get("run", "median") == "median"
                and (tuple(r["shape"]), r["dtype"]) in default_cases
            ):
                value = r.get(target.key)
                verdict = "n/a" if value is None else ("met" if value >= target.minimum else "NOT MET")
                shown = "-" if value is None else f"{value:.2f}"
                shape = "x".join(map(str, r["shape"]))
                lines.append(
                    f"- {r['op']} {r['mode']} {r['dtype']} {shape}: "
                    f"{target.key} = {shown} (target >= {target.minimum:g}): {verdict}"
                )
    return lines


def markdown_section(env: dict, command: str, records: list[dict], target_lines: list[str]) -> str:
    title = "CPU" if env["device"] == "cpu" else "CUDA"
    lines = [
        f"### {title}: {env['device_name']}",
        "",
        f"- torch {env['torch_version']}, {env['threads']} threads ({env['cpus']} CPUs), {env['date']}, "
        f"git {env['git']}, extension built {env['extension_built']}",
        f"- command: `{command}`",
        "",
        *table([r for r in records if "run" not in r]),
        "",
    ]
    interleaved = [r for r in records if "run" in r]
    if interleaved:
        lines += [
            "Interleaved with the eager pair (`jumprelu_l0` fwd+bwd, one call of each in turn):",
            "",
            *harness.table_lines(
                INTERLEAVED_COLUMNS, [{**r, "shape_str": "x".join(map(str, r["shape"]))} for r in interleaved]
            ),
            "",
        ]
    lines += ["Targets:", "", *target_lines] if target_lines else ["No target applies to these cases."]
    errors = [f"- {r['op']} {r['mode']} {r['impl']} {r['dtype']}: {r['error']}" for r in records if "error" in r]
    if errors:
        lines += ["", "Errors (rows without numbers):", "", *errors]
    return "\n".join(lines)


def extension_built() -> str | None:
    """When the loaded kernels were compiled: a stale build explains many surprises."""
    module = sys.modules.get("jumprelu_ext._C")
    if module is None or not getattr(module, "__file__", None):
        return None
    mtime = datetime.datetime.fromtimestamp(Path(module.__file__).stat().st_mtime).astimezone()
    return mtime.isoformat(timespec="seconds")


def run_device(device: torch.device, args) -> tuple[list[dict], dict, Path]:
    """Every case on one device; each case's records are appended to the JSON lines file as
    soon as it is done, so an interrupted run keeps what it measured."""
    env = {**harness.environment(device), "extension_built": extension_built()}
    default_shapes, default_dtypes = DEFAULT_CASES[device.type]
    shapes = args.shapes or (QUICK_SHAPES if args.quick else default_shapes)
    dtypes = args.dtypes or default_dtypes
    plan = QUICK_PLAN if args.quick else PLANS[device.type]
    out = args.out / f"{datetime.datetime.now():%Y%m%d-%H%M%S}_{device.type}.jsonl"
    print(
        f"\n# {env['device']}: {env['device_name']} | torch {env['torch_version']} | "
        f"{env['threads']} threads | {env['date']} | git {env['git']} | _C built {env['extension_built']}"
    )
    print("\n".join(table([], header=True)), flush=True)
    records = []
    for dtype in dtypes:
        for shape in shapes:
            clone = measure_clone(device, dtype, shape, plan)
            case_records = [clone]
            for op in args.ops:
                case_records += run_case(device, op, dtype, shape, plan, not args.no_compile, clone)
            if device.type == "cpu" and args.interleaved_runs and "jumprelu_l0" in args.ops:
                runs = run_interleaved(device, dtype, shape, args.interleaved_runs, calls=3 if args.quick else 4)
                case_records += [*runs, interleaved_summary(runs)]
            for r in case_records:
                r.update(
                    {
                        k: env[k]
                        for k in ("device", "device_name", "torch_version", "threads", "date", "git", "extension_built")
                    }
                )
            harness.write_jsonl(out, case_records)
            print("\n".join(table([r for r in case_records if "run" not in r], header=False)), flush=True)
            interleaved = [r for r in case_records if "run" in r]
            if interleaved:
                rows = [{**r, "shape_str": "x".join(map(str, r["shape"]))} for r in interleaved]
                print("\n".join(harness.table_lines(INTERLEAVED_COLUMNS, rows)), flush=True)
            records += case_records
    return records, env, out


def parse_args(argv=None):
    def shapes(text):
        return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]

    def dtypes(text):
        out = [getattr(torch, name.strip()) for name in text.split(",")]
        if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in out):
            raise argparse.ArgumentTypeError(f"not floating dtypes: {text}")
        return out

    def ops(text):
        out = [name.strip() for name in text.split(",")]
        if unknown := [n for n in out if n not in OPS]:
            raise argparse.ArgumentTypeError(f"unknown ops {unknown}; choose from {list(OPS)}")
        return out

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cpu", "cuda", "all"), default="all", help="all = CUDA when available, then CPU (default)"
    )
    p.add_argument("--shapes", type=shapes, help="e.g. 4096x16384,4096x65536 (default: per device)")
    p.add_argument(
        "--dtypes",
        type=dtypes,
        help="pre's dtypes, e.g. float32,bfloat16; θ stays float32 (default: float32 on CPU, float32,bfloat16 on CUDA)",
    )
    p.add_argument("--ops", type=ops, default=list(OPS), help="default: " + ",".join(OPS))
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder for the JSON lines file of this run (default: benchmarks/results)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--quick", action="store_true", help="small shapes, few reps: a smoke test")
    p.add_argument(
        "--interleaved-runs",
        type=int,
        default=5,
        help="CPU: runs of jumprelu_l0 fwd+bwd interleaved with the eager pair (0: skip; default 5)",
    )
    p.add_argument("--markdown", type=Path, help="rewrite this device's section of this Markdown file")
    p.add_argument(
        "--grad-memory",
        type=shapes,
        metavar="SHAPE",
        help="only measure the CPU memory a backward allocates, old vs new, e.g. 4096x65536",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.grad_memory:
        for shape in args.grad_memory:
            grad_memory(shape)
        return 0
    if not jumprelu_ext.COMPILED:
        print(
            "jumprelu_ext's compiled extension is not loaded; build it first (pip install --no-build-isolation -e .)",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    # CUDA first: on a GPU machine its numbers are the ones that matter most.
    devices = ["cuda", "cpu"] if args.device == "all" else [args.device]
    devices = [torch.device(d) for d in devices if d == "cpu" or torch.cuda.is_available()]
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["bench_ops.py", *argv]))
    torch.manual_seed(0)
    failed = False
    for device in devices:
        records, env, out = run_device(device, args)
        target_lines = check_targets(device.type, records)
        print("\n".join(["", *target_lines, f"results: {out}"]))
        if args.markdown:
            section = "bench:cuda" if device.type == "cuda" else f"bench:cpu-{env['threads']}-threads"
            harness.replace_section(args.markdown, section, markdown_section(env, command, records, target_lines))
            print(f"table: {args.markdown} ({section})")
        failed |= any("error" in r for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
