"""Train a JumpReLU sparse autoencoder: ``python -m jumprelu_ext.train --help``.

Reads top to bottom: configuration, data, the SAEs and their optimisers, resume, the training
loop, evaluation and the report. A run trains one SAE, or with a list of values for
``--l0-coefficient`` / ``--target-l0`` one per value on the same batches (a sweep; member.py).
The recipe and its deviations: docs/method.md#the-training-recipe; the design: docs/trainer.md.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..export import save_sae
from ..files import atomic_write_bytes
from . import distributed, sharding
from .checkpoint import CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import EMBEDDED_DEFAULT, parse_args
from .data.prepare import prepare_data
from .errors import UserError
from .interrupt import StopRequest
from .member import Member, build_members, pack_states, unpack_states
from .outdir import output_folder
from .report.metrics import evaluate
from .report.plots import plot_curves, plot_density, plot_frontier
from .report.run_log import check_logging_extras
from .report.sweep import SUMMARY_NAME, sweep_summary, sweep_table
from .step import StepResult, take_step

DENSE_RATE = 0.1  # a feature firing on more than this fraction of tokens counts as dense

# A checkpoint resumes only a run with the same model, data stream and schedule shape.
RESUME_MUST_MATCH = (
    "activations",
    "model",
    "layer",
    "dataset",
    "context_length",
    "max_tokens",
    "d_sae",
    "expansion_factor",
    "batch_size",
    "seed",
    "threshold_param",
    "eval_fraction",
    "eval_activations",
    "target_l0",
    "apply_b_dec_to_input",
    "adam_beta1",  # a resumed Adam keeps its checkpoint's betas: a change would be silently ignored
    "adam_beta2",
)
# What checkpoints written before an option existed were trained with.
BEFORE_THE_OPTION = {"apply_b_dec_to_input": False, "adam_beta1": 0.0, "adam_beta2": 0.999}


def main(argv=None) -> int:
    cfg = parse_args(argv)
    # Under torchrun: join the process group (one rank per process); alone: a world of one.
    layout, device = distributed.init(cfg.device, cfg.shard_features)
    try:
        # --out is checked (and created) before any data is read; a failed run leaves no empty folder.
        with output_folder(cfg, layout.is_main):
            status = train(cfg, layout, device)
        distributed.finish(layout)
        return status
    finally:
        distributed.shutdown()


def train(cfg, layout, device) -> int:
    # ---------------------------------------------------------------- configuration
    out = Path(cfg.out)  # checked and created by output_folder
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
    torch.manual_seed(cfg.seed)
    say = print if layout.is_main else _quiet
    if layout.is_main:
        check_logging_extras(cfg)

    # ---------------------------------------------------------------- checkpoint (before any data is read)
    checkpoint_path = out / CHECKPOINT_NAME
    state = load_checkpoint(checkpoint_path) if cfg.resume and checkpoint_path.is_file() else None
    if state is not None:
        check_resumable(state["config"], cfg, state["step"])
    cfg = cfg.with_warmups(state["config"] if state else None)  # what this run trains with and records
    for line in cfg.long_warmups():
        say(f"warning: {line}", file=sys.stderr)

    # ---------------------------------------------------------------- data
    data = prepare_data(cfg, device, layout)
    d_sae = cfg.d_sae or data.d_in * cfg.expansion_factor
    for _, member_cfg in cfg.members():  # an L0 target the SAE cannot reach, now that its width is known
        member_cfg.check_target_l0(d_sae)
    ranks = f", {layout.world_size} ranks, {layout.description}" if layout.world_size > 1 else ""
    say(
        f"training on {data.d_in}-dim activations ({data.train.describe()}, "
        f"{data.eval_indices.size} held out), input scale {data.input_scale:.4g}, d_sae {d_sae}{ranks}"
    )

    # ---------------------------------------------------------------- SAEs and optimisers
    # One SAE, or one per value of a sweep: each with its optimiser, λ, firing tracker and folder.
    members = build_members(cfg, data.d_in, d_sae, layout, device, data.input_mean * data.input_scale)
    if cfg.swept:
        say(f"a sweep of {len(members)} SAEs on the same batches: {', '.join(m.name for m in members)}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    # ---------------------------------------------------------------- resume
    step = 0
    if state is not None:  # memory-mapped on the CPU: a shard reads its part
        for member, member_state in zip(members, unpack_states(state, members, out)):
            member.load_state_dict(member_state, layout, d_sae)
        data.train.load_state_dict(state["data"])
        data.input_scale = state["input_scale"]
        restore_rng_state(state["rng"])
        step = state["step"]
        done = ": the run is done, so it is only evaluated again" if step == cfg.steps else ""
        say(f"resumed from {checkpoint_path} at step {step}{done}")
    elif cfg.resume:
        say(f"--resume: no checkpoint in {out}, starting at step 0")
    for member in members:
        member.open_log(step, layout)

    def checkpoint():
        # Every SAE of the run in one file, so all resume at the same step; always the whole SAE in
        # the single-process format: resumable at any world size.
        states = [member.state_dict(layout) for member in members]
        if layout.is_main:
            save_checkpoint(
                checkpoint_path,
                {
                    **pack_states(members, states),
                    "step": step,
                    "data": data.train.state_dict(),
                    "input_scale": data.input_scale,
                    "rng": capture_rng_state(),
                    "config": cfg.to_dict(),
                },
            )

    # ---------------------------------------------------------------- training loop
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not layout.is_main)
    window_start, window_steps = time.perf_counter(), 0
    run_start, first_step = time.perf_counter(), step
    stopping = False
    with StopRequest() as stop:
        while step < cfg.steps and not stopping:
            x, rows = data.next_batch(layout)  # this rank's rows; `rows` counts the global batch
            for member in members:  # every SAE takes its step on the same batch
                member.last = take_step(member, x, rows, step, autocast, layout)
            step += 1
            window_steps += 1
            bar.update(1)
            stopping = distributed.agree(bool(stop), layout, device)  # all ranks stop at the same step

            if step % cfg.log_every == 0 or step == cfg.steps:
                seconds = time.perf_counter() - window_start
                logged = []
                for member in members:
                    window = LogWindow(step, x, rows, member.last, window_steps / seconds)
                    logged.append(log_row(window, member, data, layout))
                    if member.run_log:
                        member.run_log.log(logged[-1])
                    member.firing.reset()
                bar.set_postfix(**progress(logged))
                window_start, window_steps = time.perf_counter(), 0
            if step == cfg.steps or stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint()
    bar.close()
    run_seconds = time.perf_counter() - run_start
    data.train.close()  # join the producer / read-ahead thread: nothing reads past the loop
    for member in members:
        if member.run_log:
            member.run_log.close()
    if stopping:
        signal_number = stop.signal_number or signal.SIGTERM  # this rank may have been told by another
        say(
            f"stopped by signal {signal_number} at step {step}; checkpoint in {checkpoint_path}, continue with --resume",
            file=sys.stderr,
        )
        return 128 + signal_number

    # ---------------------------------------------------------------- evaluation and report
    # Data-parallel ranks hold identical SAEs: rank 0 evaluates. Sharded ranks evaluate together.
    if not (layout.is_main or layout.sharded):
        return 0
    if data.eval_indices.size == 0:
        say("no held-out activations (--eval-fraction 0): nothing evaluated")
    throughput = (step - first_step) * data.train.batch_size / run_seconds
    reports = [report(member, data, step, throughput, layout, device, d_sae) for member in members]
    if not layout.is_main or reports[0] is None:
        return 0
    for member, results in zip(members, reports):
        if results["l0"] > DENSE_RATE * d_sae:  # the average feature is dense: a failed SAE, whatever its FVU
            say(f"warning: {not_sparse(member.name, results, d_sae)}", file=sys.stderr)
    if not cfg.swept:
        say(summary(reports[0], out))
        return 0
    rows = sweep_summary(members, reports, cfg.swept)
    atomic_write_bytes(out / SUMMARY_NAME, (json.dumps(rows, indent=2) + "\n").encode())
    plot_frontier(rows, out / "frontier.png", swept=cfg.swept, tokens=reports[0]["tokens"])
    say(sweep_table(rows, out))
    return 0


def report(member: Member, data, step: int, throughput: float, layout, device, d_sae: int) -> dict | None:
    """Evaluate one SAE on the held-out rows and write it and its report into its folder; returns
    the results on rank 0 (None without a held-out set, and on the other ranks)."""
    sae, out = member.sae, member.out
    evaluated = data.eval_indices.size > 0
    if evaluated:
        results = evaluate(sae, data.eval_batches(member.cfg.batch_size), data.input_scale)
        firing_rates = sharding.gather_features(results.pop("firing_rates"), layout, device)
        if data.model is not None and data.eval_tokens is not None:
            from .report.downstream import downstream_eval

            def reconstruct(x_raw):
                return sae(x_raw * data.input_scale).reconstruction / data.input_scale

            results["downstream"] = downstream_eval(data.model, reconstruct, data.eval_tokens)
        results["steps"] = step
        # Throughput of this invocation's whole loop (data, steps, logging, checkpoints), not a window.
        results["train_tokens_per_s"] = throughput
    whole_sae = sharding.whole_sae(sae, layout, d_sae)
    if not layout.is_main:
        return None
    save_sae(whole_sae, out, data.input_scale, {**data.metadata, "training_config": member.cfg.to_dict()})
    run_log = member.run_log
    plot_curves(run_log.rows, out / "curves.png", **curve_marks(member.cfg))
    if not evaluated:
        return None
    results["dead_fraction"] = (firing_rates == 0).double().mean().item()  # over all features
    results["dense_fraction"] = (firing_rates > DENSE_RATE).double().mean().item()
    # Rows skipped for NaN/Inf: in the training stream (the last logged row's count, summed over
    # ranks; a row counts each epoch it is met) and among the held-out rows.
    results["dropped_rows"] = run_log.rows[-1]["dropped_rows"] if run_log.rows else data.train.dropped_rows
    results["held_out_dropped_rows"] = int(data.eval_indices.size) - results["tokens"]
    atomic_write_bytes(out / "eval.json", (json.dumps(results, indent=2) + "\n").encode())
    plot_density(firing_rates, out / "density.png", tokens=results["tokens"], dense_rate=DENSE_RATE)
    return results


def not_sparse(name: str | None, results: dict, d_sae: int) -> str:
    """Why a trained SAE is no use, and what helps."""
    preset = EMBEDDED_DEFAULT
    which = f"{name}: " if name else ""
    return (
        f"{which}the SAE is not sparse: held-out L0 {results['l0']:.0f} of its {d_sae} features, "
        f"{results['dense_fraction']:.0%} of them dense. A longer run, a larger --l0-coefficient or a larger "
        "--lr / --threshold-lr helps (log theta moves by about lr a step, docs/method.md#the-adam-rate-limit; "
        f"the embedded preset trains in {preset['steps']} steps with --lr {preset['lr']:g} "
        f"--threshold-lr {preset['threshold_lr']:g})"
    )


def _quiet(*args, **kwargs):
    pass


def check_resumable(saved: dict, cfg, step: int | None = None) -> None:
    """Refuse a checkpoint (its config ``saved``, taken at ``step``) that this run cannot continue."""
    current = cfg.to_dict()
    for name in RESUME_MUST_MATCH:
        was = saved.get(name, BEFORE_THE_OPTION.get(name))
        if was != current[name]:
            flag = cfg.flag(name)
            raise UserError(
                f"--resume: the checkpoint in {cfg.out} was made with {flag} {was}, this run has {flag} {current[name]}"
            )
    if step is not None and step > cfg.steps:  # it cannot be undone; its report would say --steps
        raise UserError(
            f"--resume: the checkpoint in {cfg.out} is at step {step}, past --steps {cfg.steps}: "
            f"give --steps {step} or more (--steps {step} evaluates it again)"
        )


@dataclass
class LogWindow:
    """The last step of a logging window: what one SAE's metrics row is computed from."""

    step: int
    x: torch.Tensor  # this rank's rows of the step's batch
    rows: int  # rows in the global batch
    result: StepResult  # the SAE's last step on them
    steps_per_s: float  # over the window


@torch.no_grad()
def log_row(window: LogWindow, member: Member, data, layout) -> dict:
    """The logged metrics of the window's global batch (collectives: every rank calls this)."""
    x, rows = window.x.double(), window.rows
    dropped = torch.tensor([float(data.train.dropped_rows)], device=x.device, dtype=x.dtype)
    result = window.result
    terms = torch.stack([result.loss.double(), result.mse.double(), result.l0.double(), x.pow(2).sum()])
    stats = torch.cat([terms, x.sum(0), dropped])
    if layout.data_parallel:  # each rank's loss terms are its share of the global means: sum them
        distributed.sum_(stats, layout)
    total, mse, l0, sum_squares, *rest = stats.tolist()
    *sum_x, dropped_rows = rest
    if not math.isfinite(total):
        which = f"{member.name}: " if member.name else ""  # the SAE of a sweep whose loss it is
        raise UserError(f"{which}the loss became {total} at step {window.step}: lower --lr / --threshold-lr")
    variance = sum_squares / rows - sum(v * v for v in sum_x) / rows**2  # of the batch, summed over d_in
    dead, dense = distributed.firing_fractions(member.firing, layout, DENSE_RATE)
    return {
        "step": window.step,
        "tokens": window.step * data.train.batch_size,
        "loss": total,
        "mse": mse,
        "l0": l0,
        "fvu": mse / variance if variance > 0 else float("nan"),
        "l0_coefficient": result.l0_coefficient,
        "lr": member.scheduler.get_last_lr()[0],
        "grad_norm": result.grad_norm,
        "step_kind": result.path,  # the last step's: dense or sparse (--step)
        "threshold_mean": distributed.feature_mean(member.sae.threshold, layout),
        "dead_fraction": dead,
        "dense_fraction": dense,
        "dropped_rows": int(dropped_rows),
        "tokens_per_s": window.steps_per_s * data.train.batch_size,
        "peak_memory_mib": peak_memory_mib(x.device),
    }


def progress(logged: list[dict]) -> dict:
    """The progress bar's postfix: the last log row's numbers, one per SAE (``a/b/c``) in a sweep."""
    formats = {"loss": ".4g", "l0": ".1f", "fvu": ".3f"}
    postfix = {key: "/".join(f"{row[key]:{spec}}" for row in logged) for key, spec in formats.items()}
    return {**postfix, "tok_s": f"{logged[0]['tokens_per_s']:.0f}"}


def peak_memory_mib(device) -> float:
    """This rank's peak memory so far: CUDA allocations on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def curve_marks(cfg) -> dict:
    """What curves.png marks besides the logged rows: the clipping norm, the L0 target."""
    return {"max_grad_norm": cfg.max_grad_norm or None, "target_l0": cfg.target_l0}


def summary(results: dict, out: Path) -> str:
    """The printed evaluation: one aligned ``name value`` line per metric, then where the files are."""
    entries = [(key, results[key]) for key in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction")]
    for key in ("dropped_rows", "held_out_dropped_rows"):  # NaN/Inf rows: shown when there were any
        if results.get(key):
            entries.append((key, results[key]))
    entries += [(f"downstream.{key}", value) for key, value in results.get("downstream", {}).items()]
    width = max(len(key) for key, _ in entries)
    lines = [f"evaluation on {results['tokens']} held-out tokens:"]
    for key, value in entries:
        lines.append(f"  {key:{width}s}  {value:.4g}" if isinstance(value, float) else f"  {key:{width}s}  {value}")
    lines.append(
        f"SAE (SAELens layout) and report in {out}/: cfg.json, sae_weights.safetensors, eval.json, "
        "metrics.jsonl, density.png, curves.png"
    )
    return "\n".join(lines)
