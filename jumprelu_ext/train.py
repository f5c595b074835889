"""Train a JumpReLU sparse autoencoder: ``python -m jumprelu_ext.train --help``.

Reads top to bottom: configuration, data, SAE and optimiser, resume, the training loop,
evaluation and the report. The recipe is Rajamanoharan et al. 2024 (GUIDE.md §1).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import parse_args
from .data import prepare_data
from .errors import UserError, run_cli
from .export import save_sae
from .interrupt import StopRequest
from .metrics import FiringTracker, evaluate
from .plots import plot_curves, plot_density
from .run_log import RunLog
from .sae import JumpReLUSAE
from .schedules import l0_coefficient_at, lr_factor

# A checkpoint resumes only a run with the same model, data stream and schedule shape.
RESUME_MUST_MATCH = (
    "activations", "model", "layer", "dataset", "context_length", "max_tokens", "d_sae", "expansion_factor",
    "batch_size", "seed", "threshold_param", "eval_fraction",
)  # fmt: skip


def main(argv=None) -> int:
    # ---------------------------------------------------------------- configuration
    cfg = parse_args(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
    torch.manual_seed(cfg.seed)

    # ---------------------------------------------------------------- data
    data = prepare_data(cfg, device)
    d_sae = cfg.d_sae or data.d_in * cfg.expansion_factor
    print(f"training on {data.d_in}-dim activations ({data.train.indices.size} training rows, "
          f"{data.eval_indices.size} held out), input scale {data.input_scale:.4g}, d_sae {d_sae}")  # fmt: skip

    # ---------------------------------------------------------------- SAE and optimiser
    sae = JumpReLUSAE(data.d_in, d_sae, cfg.bandwidth, cfg.init_threshold, cfg.threshold_param, device=device)
    theta = sae.log_threshold if cfg.threshold_param == "log" else sae.get_parameter("threshold")
    weights = [p for p in sae.parameters() if p is not theta]
    optimizer = torch.optim.Adam(
        [{"params": weights}, {"params": [theta], "lr": cfg.threshold_lr or cfg.lr}],
        lr=cfg.lr, betas=(0.0, 0.999), eps=1e-8,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.lr_warmup_steps, cfg.steps, cfg.lr_decay)
    )
    firing = FiringTracker.for_sae(sae)  # features fired since the last log line
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    # ---------------------------------------------------------------- resume
    step = 0
    checkpoint_path = out / CHECKPOINT_NAME
    if cfg.resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        check_resumable(state["config"], cfg)
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.train.load_state_dict(state["data"])
        data.input_scale = state["input_scale"]
        restore_rng_state(state["rng"])
        step = state["step"]
        print(f"resumed from {checkpoint_path} at step {step}")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {out}, starting at step 0")
    run_log = RunLog(out, cfg, resume_step=step)

    def checkpoint():
        save_checkpoint(checkpoint_path, {
            "sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "data": data.train.state_dict(), "input_scale": data.input_scale,
            "rng": capture_rng_state(), "config": cfg.to_dict(),
        })  # fmt: skip

    # ---------------------------------------------------------------- training loop
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    with StopRequest() as stop:
        while step < cfg.steps and not stop:
            x = next(data.train) * data.input_scale
            l0_coefficient = l0_coefficient_at(step, cfg.l0_coefficient, cfg.sparsity_warmup_steps)
            with autocast:
                loss = sae.loss(x, l0_coefficient, cfg.sparsity_loss, cfg.tanh_scale, cfg.pre_act_loss_coefficient)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            sae.remove_parallel_decoder_grad()  # keep decoder rows on the unit sphere ...
            optimizer.step()
            scheduler.step()
            sae.normalize_decoder()  # ... and undo the step's drift off it
            firing.update(loss.output.acts)
            step += 1
            window_steps += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                seconds = time.perf_counter() - window_start
                row = log_row(step, x, loss, l0_coefficient, scheduler, sae, firing, data, window_steps / seconds)
                run_log.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}",
                                tok_s=f"{row['tokens_per_s']:.0f}")  # fmt: skip
                firing.reset()
                window_start, window_steps = time.perf_counter(), 0
            if step == cfg.steps or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint()
    bar.close()
    run_log.close()
    if stop:
        print(f"stopped by signal {stop.signal_number} at step {step}; checkpoint in {checkpoint_path}, "
              f"continue with --resume", file=sys.stderr)  # fmt: skip
        return 128 + stop.signal_number

    # ---------------------------------------------------------------- evaluation and report
    results = evaluate(sae, data.eval_batches(cfg.batch_size), data.input_scale)
    firing_rates = results.pop("firing_rates")
    if data.model is not None:
        from .downstream import downstream_eval

        def reconstruct(x_raw):
            return sae(x_raw * data.input_scale).reconstruction / data.input_scale

        results["downstream"] = downstream_eval(data.model, reconstruct, data.eval_tokens)
    results["steps"] = step
    save_sae(sae, out, data.input_scale, {**data.metadata, "training_config": cfg.to_dict()})
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_density(firing_rates, out / "density.png")
    plot_curves(run_log.rows, out / "curves.png")
    print(summary(results, out))
    return 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available on this machine")
    return device


def check_resumable(saved: dict, cfg) -> None:
    current = cfg.to_dict()
    for name in RESUME_MUST_MATCH:
        if saved.get(name) != current[name]:
            flag = cfg.flag(name)
            raise UserError(f"--resume: the checkpoint in {cfg.out} was made with {flag} {saved.get(name)}, "
                            f"this run has {flag} {current[name]}")  # fmt: skip


@torch.no_grad()
def log_row(step, x, loss, l0_coefficient, scheduler, sae, firing, data, steps_per_s) -> dict:
    mse = loss.mse.item()
    if not torch.isfinite(loss.total):
        raise UserError(f"the loss became {loss.total.item()} at step {step}: lower --lr / --threshold-lr")
    variance = (x.float() - x.float().mean(0)).pow(2).sum(-1).mean().item()
    return {
        "step": step,
        "tokens": step * x.shape[0],
        "loss": loss.total.item(),
        "mse": mse,
        "l0": loss.l0.item(),
        "fvu": mse / variance if variance > 0 else float("nan"),
        "l0_coefficient": l0_coefficient,
        "lr": scheduler.get_last_lr()[0],
        "threshold_mean": sae.threshold.mean().item(),
        "dead_fraction": firing.dead_fraction(),
        "dense_fraction": firing.dense_fraction(),
        "dropped_rows": data.train.dropped_rows,
        "tokens_per_s": steps_per_s * x.shape[0],
    }


def summary(results: dict, out: Path) -> str:
    lines = [f"evaluation on {results['tokens']} held-out tokens:"]
    for key in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction"):
        lines.append(f"  {key:16s} {results[key]:.4g}")
    for key, value in results.get("downstream", {}).items():
        lines.append(f"  downstream.{key:6s} {value:.4g}" if isinstance(value, float) else f"  downstream.{key} {value}")
    lines.append(f"SAE (SAELens layout) and report in {out}/: cfg.json, sae_weights.safetensors, eval.json, "
                 "metrics.jsonl, density.png, curves.png")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main))
