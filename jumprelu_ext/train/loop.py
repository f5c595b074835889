"""Train a JumpReLU sparse autoencoder: ``python -m jumprelu_ext.train --help``.

Reads top to bottom: configuration, data, SAE and optimiser, resume, the training loop,
evaluation and the report. The recipe and its deviations: docs/method.md#the-training-recipe;
the design: docs/trainer.md.
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
from ..sae import SAELoss
from . import distributed, sharding
from .checkpoint import CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import parse_args
from .data.prepare import prepare_data
from .errors import UserError
from .interrupt import StopRequest
from .optimizer import build_optimizer, clip_grad_norm_, keep_threshold_nonnegative
from .outdir import output_folder
from .report.metrics import FiringTracker, evaluate
from .report.plots import plot_curves, plot_density
from .report.run_log import RunLog, check_logging_extras
from .sparsity import sparsity_coefficient

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
)


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

    # ---------------------------------------------------------------- data
    data = prepare_data(cfg, device, layout)
    d_sae = cfg.d_sae or data.d_in * cfg.expansion_factor
    ranks = f", {layout.world_size} ranks, {layout.description}" if layout.world_size > 1 else ""
    say(
        f"training on {data.d_in}-dim activations ({data.describe_training_rows()}, "
        f"{data.eval_indices.size} held out), input scale {data.input_scale:.4g}, d_sae {d_sae}{ranks}"
    )

    # ---------------------------------------------------------------- SAE and optimiser
    sae = sharding.build_sae(
        data.d_in,
        d_sae,
        layout,
        device,
        bandwidth=cfg.bandwidth,
        init_threshold=cfg.init_threshold,
        threshold_param=cfg.threshold_param,
        ste_to_input=cfg.ste_to_input,
        encoder_init_scale=cfg.encoder_init_scale,
    )
    optimizer, scheduler = build_optimizer(sae, cfg)
    coefficient = sparsity_coefficient(cfg)  # λ: warmed up to a fixed value, or steered to --target-l0
    firing = FiringTracker.for_sae(sae)  # features fired since the last log line
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    # ---------------------------------------------------------------- resume
    step = 0
    checkpoint_path = out / CHECKPOINT_NAME
    if cfg.resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)  # memory-mapped on the CPU: a shard reads its part
        check_resumable(state["config"], cfg)
        sae_state, optimizer_state = sharding.shard_states(
            state["sae"], state["optimizer"], sae, optimizer, layout, d_sae
        )
        sae.load_state_dict(sae_state)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        coefficient.load_state_dict(state.get("sparsity", {}))
        data.train.load_state_dict(state["data"])
        data.input_scale = state["input_scale"]
        restore_rng_state(state["rng"])
        step = state["step"]
        say(f"resumed from {checkpoint_path} at step {step}")
    elif cfg.resume:
        say(f"--resume: no checkpoint in {out}, starting at step 0")
    run_log = RunLog(out, cfg, resume_step=step) if layout.is_main else None

    def checkpoint():
        # Always the whole SAE in the single-process format: resumable at any world size.
        sae_state, optimizer_state = sharding.gather_states(sae, optimizer, layout)
        if layout.is_main:
            save_checkpoint(
                checkpoint_path,
                {
                    "sae": sae_state,
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "sparsity": coefficient.state_dict(),
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
            l0_coefficient = coefficient.at(step)
            with autocast:
                loss = sae.loss(
                    x,
                    l0_coefficient,
                    sparsity_loss=cfg.sparsity_loss,
                    tanh_scale=cfg.tanh_scale,
                    pre_act_loss_coefficient=cfg.pre_act_loss_coefficient,
                    num_rows=rows,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            distributed.all_reduce_gradients(sae.parameters(), layout)  # data parallel: the global gradient
            sae.remove_parallel_decoder_grad()  # keep decoder rows on the unit sphere ...
            grad_norm = clip_grad_norm_(sae, cfg.max_grad_norm, layout)
            optimizer.step()
            scheduler.step()
            sae.normalize_decoder()  # ... and undo the step's drift off it
            keep_threshold_nonnegative(sae)
            if cfg.target_l0 is not None:
                coefficient.observe(distributed.global_mean(loss.l0, layout))
            firing.update(loss.output.acts)
            step += 1
            window_steps += 1
            bar.update(1)
            stopping = distributed.agree(bool(stop), layout, device)  # all ranks stop at the same step

            if step % cfg.log_every == 0 or step == cfg.steps:
                seconds = time.perf_counter() - window_start
                window = LogWindow(step, x, rows, loss, l0_coefficient, grad_norm, window_steps / seconds)
                row = log_row(window, sae, firing, scheduler, data, layout)
                if run_log:
                    run_log.log(row)
                bar.set_postfix(
                    loss=f"{row['loss']:.4g}",
                    l0=f"{row['l0']:.1f}",
                    fvu=f"{row['fvu']:.3f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                )
                firing.reset()
                window_start, window_steps = time.perf_counter(), 0
            if step == cfg.steps or stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint()
    bar.close()
    run_seconds = time.perf_counter() - run_start
    if run_log:
        run_log.close()
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
    evaluated = data.eval_indices.size > 0
    if evaluated:
        results = evaluate(sae, data.eval_batches(cfg.batch_size), data.input_scale)
        firing_rates = sharding.gather_features(results.pop("firing_rates"), layout, device)
        if data.model is not None and data.eval_tokens is not None:
            from .report.downstream import downstream_eval

            def reconstruct(x_raw):
                return sae(x_raw * data.input_scale).reconstruction / data.input_scale

            results["downstream"] = downstream_eval(data.model, reconstruct, data.eval_tokens)
        results["steps"] = step
        # Throughput of this invocation's whole loop (data, steps, logging, checkpoints), not a window.
        results["train_tokens_per_s"] = (step - first_step) * data.train.batch_size / run_seconds
    else:
        say("no held-out activations (--eval-fraction 0): nothing evaluated")
    whole_sae = sharding.whole_sae(sae, layout, d_sae)
    if not layout.is_main:
        return 0
    save_sae(whole_sae, out, data.input_scale, {**data.metadata, "training_config": cfg.to_dict()})
    plot_curves(run_log.rows, out / "curves.png", **curve_marks(cfg))
    if not evaluated:
        return 0
    results["dead_fraction"] = (firing_rates == 0).double().mean().item()  # over all features
    results["dense_fraction"] = (firing_rates > DENSE_RATE).double().mean().item()
    # Rows skipped for NaN/Inf: in the training stream (the last logged row's count, summed over
    # ranks; a row counts each epoch it is met) and among the held-out rows.
    results["dropped_rows"] = run_log.rows[-1]["dropped_rows"] if run_log.rows else data.train.dropped_rows
    results["held_out_dropped_rows"] = int(data.eval_indices.size) - results["tokens"]
    atomic_write_bytes(out / "eval.json", (json.dumps(results, indent=2) + "\n").encode())
    plot_density(firing_rates, out / "density.png", tokens=results["tokens"], dense_rate=DENSE_RATE)
    say(summary(results, out))
    return 0


def _quiet(*args, **kwargs):
    pass


def check_resumable(saved: dict, cfg) -> None:
    current = cfg.to_dict()
    for name in RESUME_MUST_MATCH:
        if saved.get(name) != current[name]:
            flag = cfg.flag(name)
            raise UserError(
                f"--resume: the checkpoint in {cfg.out} was made with {flag} {saved.get(name)}, "
                f"this run has {flag} {current[name]}"
            )


@dataclass
class LogWindow:
    """The last step of a logging window: what its metrics row is computed from."""

    step: int
    x: torch.Tensor  # this rank's rows of the step's batch
    rows: int  # rows in the global batch
    loss: SAELoss
    l0_coefficient: float
    grad_norm: float  # global, before clipping
    steps_per_s: float  # over the window


@torch.no_grad()
def log_row(window: LogWindow, sae, firing, scheduler, data, layout) -> dict:
    """The logged metrics of the window's global batch (collectives: every rank calls this)."""
    x, loss, rows = window.x.double(), window.loss, window.rows
    dropped = torch.tensor([float(data.train.dropped_rows)], device=x.device, dtype=x.dtype)
    terms = torch.stack([loss.total.double(), loss.mse.double(), loss.l0.double(), x.pow(2).sum()])
    stats = torch.cat([terms, x.sum(0), dropped])
    if layout.data_parallel:  # each rank's loss terms are its share of the global means: sum them
        distributed.sum_(stats, layout)
    total, mse, l0, sum_squares, *rest = stats.tolist()
    *sum_x, dropped_rows = rest
    if not math.isfinite(total):
        raise UserError(f"the loss became {total} at step {window.step}: lower --lr / --threshold-lr")
    variance = sum_squares / rows - sum(v * v for v in sum_x) / rows**2  # of the batch, summed over d_in
    dead, dense = distributed.firing_fractions(firing, layout, DENSE_RATE)
    return {
        "step": window.step,
        "tokens": window.step * data.train.batch_size,
        "loss": total,
        "mse": mse,
        "l0": l0,
        "fvu": mse / variance if variance > 0 else float("nan"),
        "l0_coefficient": window.l0_coefficient,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": window.grad_norm,
        "threshold_mean": distributed.feature_mean(sae.threshold, layout),
        "dead_fraction": dead,
        "dense_fraction": dense,
        "dropped_rows": int(dropped_rows),
        "tokens_per_s": window.steps_per_s * data.train.batch_size,
        "peak_memory_mib": peak_memory_mib(x.device),
    }


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
