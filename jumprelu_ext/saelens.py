"""SAELens plugin: a JumpReLU training architecture, ``"jumprelu_ext"``, that runs on our ops.

``import jumprelu_ext.saelens`` registers it with SAELens (``sae_lens.register_sae_training_class``;
SAELens has no plugin entry points, so the import is what registers it). Then any SAELens
training entry point takes it::

    import jumprelu_ext.saelens  # registers "jumprelu_ext"
    from jumprelu_ext.saelens import JumpReLUExtTrainingSAEConfig
    cfg = LanguageModelSAERunnerConfig(sae=JumpReLUExtTrainingSAEConfig(d_in=768, d_sae=16384), ...)
    LanguageModelSAETrainingRunner(cfg).run()

``JumpReLUExtTrainingSAE`` is SAELens's ``JumpReLUTrainingSAE`` (same parameters, initialisation,
options, losses and gradients; docs/saelens.md) with its training step replaced:

- **dense step**: the fused ``jumprelu_l0`` op gives the activations and the per-row L0 in one
  pass, and its backward both θ terms in one pass, where SAELens runs ``JumpReLU.apply`` and a
  separate ``Step.apply`` (each with a rectangle-kernel backward of several [batch, F] passes);
- **sparse step** (``jumprelu_ext_step``: "auto", the default, takes it once the support is below
  1.5% of [batch, F]; docs/ops.md#the-sparse-step): ``sparse_encode`` / ``sparse_decode``, after
  which the work follows the active features, not the dictionary's width. The trainer gets the
  activations as a COO tensor of the active entries (SAELens's own sparse form, as its TopK SAE),
  so its firing statistics cost O(active entries) too.

What it saves is a stock SAELens JumpReLU SAE: ``save_inference_model`` (the runner's final
save) writes architecture ``"jumprelu"``, which ``SAE.load_from_disk`` reads without this package.
Training checkpoints (``save_model``) say ``"jumprelu_ext"``, like any registered architecture's.

Anything the ops cannot serve runs SAELens's own code, said once in the log (logger
``jumprelu_ext.saelens``): a SAELens whose JumpReLU training code differs from the code this
module was verified against (``SAELENS_FINGERPRINTS``), a device other than CPU or CUDA, a
bandwidth the ops refuse. The sparse step additionally needs 2-D batches and no hooks on
``hook_sae_acts_pre`` / ``hook_sae_acts_post`` (it never forms those tensors); otherwise the step is
dense.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import logging
import textwrap
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens import __version__ as SAELENS_VERSION
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes import jumprelu_sae as _sl_jumprelu
from sae_lens.saes import sae as _sl_sae
from sae_lens.saes.jumprelu_sae import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    calculate_pre_act_loss,
)
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from ._checks import check_inputs
from .ops import jumprelu, jumprelu_l0, step
from .sparse import ACTIVE, SparseActs, sparse_decode, sparse_encode, support_density
from .step_policy import STEPS, StepPolicy

__all__ = [
    "ARCHITECTURE",
    "SAELENS_TESTED",
    "JumpReLUExtTrainingSAE",
    "JumpReLUExtTrainingSAEConfig",
    "saelens_code_changed",
]

ARCHITECTURE = "jumprelu_ext"
# The SAELens release series this module is tested against (CI installs it; pyproject's extra).
SAELENS_TESTED = "6.54"

logger = logging.getLogger(__name__)
_said: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        logger.warning("jumprelu_ext.saelens: %s", message)


# --- what this module re-implements, fingerprinted ----------------------------------------------
#
# The accelerated step restates SAELens's JumpReLU training math. A SAELens release that changes
# any of the code below could change that math, so each piece's syntax tree (comments, docstrings
# and layout ignored) is hashed and compared with the hashes of the release this module was
# verified against. Any difference: SAELens's own code runs (said once), never a stale restatement.
# After re-verifying against a new release (tests/test_saelens_equivalence.py), update the hashes
# with `python -m jumprelu_ext.saelens --fingerprints`.

_FINGERPRINTED = {
    "jumprelu_sae.rectangle": lambda: _sl_jumprelu.rectangle,
    "jumprelu_sae.Step": lambda: _sl_jumprelu.Step,
    "jumprelu_sae.JumpReLU": lambda: _sl_jumprelu.JumpReLU,
    "jumprelu_sae.JumpReLUTrainingSAEConfig": lambda: _sl_jumprelu.JumpReLUTrainingSAEConfig,
    "jumprelu_sae.JumpReLUTrainingSAE.__init__": lambda: _sl_jumprelu.JumpReLUTrainingSAE.__init__,
    "jumprelu_sae.JumpReLUTrainingSAE.training_forward_pass": (
        lambda: _sl_jumprelu.JumpReLUTrainingSAE.training_forward_pass
    ),
    "jumprelu_sae.JumpReLUTrainingSAE.encode_with_hidden_pre": (
        lambda: _sl_jumprelu.JumpReLUTrainingSAE.encode_with_hidden_pre
    ),
    "jumprelu_sae.JumpReLUTrainingSAE.calculate_aux_loss": lambda: _sl_jumprelu.JumpReLUTrainingSAE.calculate_aux_loss,
    "jumprelu_sae.calculate_pre_act_loss": lambda: _sl_jumprelu.calculate_pre_act_loss,
    "sae.TrainingSAE.training_forward_pass": lambda: _sl_sae.TrainingSAE.training_forward_pass,
    "sae.TrainingSAE.decode": lambda: _sl_sae.TrainingSAE.decode,
    "sae.SAE.process_sae_in": lambda: _sl_sae.SAE.process_sae_in,
    "sae.mse_loss": lambda: _sl_sae.mse_loss,
}

# sae-lens 6.54.12. Checked: 6.54.0 and 6.53.1 give the same (accelerated); 6.48.0 and 6.40.0
# differ (they predate jumprelu_ste_to_input): there SAELens's own code runs.
SAELENS_FINGERPRINTS = {
    "jumprelu_sae.rectangle": "cd3faa26a402fa42",
    "jumprelu_sae.Step": "b5453592a4f26016",
    "jumprelu_sae.JumpReLU": "4b71c3780d28439b",
    "jumprelu_sae.JumpReLUTrainingSAEConfig": "e738c863a9f96714",
    "jumprelu_sae.JumpReLUTrainingSAE.__init__": "e267a8aa1dc4db8c",
    "jumprelu_sae.JumpReLUTrainingSAE.training_forward_pass": "fde618dc2bcafc1a",
    "jumprelu_sae.JumpReLUTrainingSAE.encode_with_hidden_pre": "292e01a58fe3d085",
    "jumprelu_sae.JumpReLUTrainingSAE.calculate_aux_loss": "ad2eb67ed229585e",
    "jumprelu_sae.calculate_pre_act_loss": "de97ddb9a8dd0e31",
    "sae.TrainingSAE.training_forward_pass": "dc97d55ac7426195",
    "sae.TrainingSAE.decode": "c75600c2dcd5dda0",
    "sae.SAE.process_sae_in": "2205fd39ab008fa5",
    "sae.mse_loss": "7f1ce21b18ebedd2",
}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


# Fields some Python versions add to the tree (3.12: type_params) or only fill from comments.
_UNHASHED_FIELDS = {"type_params", "type_comment", "kind"}


def _canonical(node: Any) -> Any:
    if isinstance(node, ast.AST):
        return (
            type(node).__name__,
            tuple(
                (name, _canonical(getattr(node, name, None))) for name in node._fields if name not in _UNHASHED_FIELDS
            ),
        )
    if isinstance(node, list):
        return tuple(_canonical(item) for item in node)
    return repr(node)


def fingerprint(obj: Any) -> str:
    """A hash of obj's source as a syntax tree, without docstrings (comments and layout vanish
    in the parse, and the fields that differ between Python versions are left out): it changes
    when the code does, not when its formatting does."""
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return "no-source"
    tree = _strip_docstrings(ast.parse(source))
    return hashlib.sha256(repr(_canonical(tree)).encode()).hexdigest()[:16]


def current_fingerprints() -> dict[str, str]:
    return {name: fingerprint(get()) for name, get in _FINGERPRINTED.items()}


def saelens_code_changed() -> list[str]:
    """The fingerprinted pieces of the installed SAELens that differ from the verified release
    (empty: the accelerated step computes what SAELens's code computes)."""
    now = current_fingerprints()
    return [name for name, digest in SAELENS_FINGERPRINTS.items() if now.get(name) != digest]


_CHANGED = saelens_code_changed()
if _CHANGED:
    _say_once(
        "fingerprint",
        f"sae-lens {SAELENS_VERSION} changed JumpReLU training code this plugin restates "
        f"({', '.join(_CHANGED)}); architecture {ARCHITECTURE!r} runs SAELens's own code until "
        f"jumprelu_ext is verified against it (tested: sae-lens {SAELENS_TESTED}.x)",
    )
elif not SAELENS_VERSION.startswith(SAELENS_TESTED + "."):
    logger.info(
        "jumprelu_ext.saelens: sae-lens %s is not the tested %s.x, but the JumpReLU training code "
        "this plugin restates is unchanged: accelerated",
        SAELENS_VERSION,
        SAELENS_TESTED,
    )


# --- the config ---------------------------------------------------------------------------------


@dataclass
class JumpReLUExtTrainingSAEConfig(JumpReLUTrainingSAEConfig):
    """SAELens's ``JumpReLUTrainingSAEConfig``, every field with its meaning, plus:

    jumprelu_ext_step: "auto" (default): the dense fused step until the support (active or in θ's
        window) is below 1.5% of [batch, F], then the sparse step (back to dense above 2.5%);
        "sparse" / "dense": always that step (docs/ops.md#when-the-sparse-step-pays).
    """

    jumprelu_ext_step: Literal["auto", "sparse", "dense"] = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.jumprelu_ext_step not in STEPS:
            raise ValueError(f"jumprelu_ext_step must be one of {STEPS}, got {self.jumprelu_ext_step!r}")

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def get_inference_config_class(self) -> type[SAEConfig]:
        # Inference is SAELens's JumpReLU: the saved SAE is a stock one (architecture "jumprelu").
        return JumpReLUSAEConfig


# --- the training SAE ---------------------------------------------------------------------------


class JumpReLUExtTrainingSAE(JumpReLUTrainingSAE):
    """SAELens's ``JumpReLUTrainingSAE`` whose training step runs on jumprelu_ext's ops."""

    cfg: JumpReLUExtTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: JumpReLUTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.step_policy = StepPolicy(getattr(cfg, "jumprelu_ext_step", "auto"))
        self._saelens_code = False  # True while SAELens's own step runs (our overrides defer)

    # Why the ops cannot take this call (None: they can). Said once per reason.
    def _cannot_serve(self, x: torch.Tensor) -> str | None:
        if _CHANGED:
            return "fingerprint"
        if x.device.type not in ("cpu", "cuda"):
            return f"device {x.device.type}: the ops have CPU and CUDA kernels"
        try:
            # The ops compute in fp32 (fp64 for fp64), so this is the range they accept.
            pre = torch.empty((0, 1), dtype=self.dtype, device=x.device)
            check_inputs(ARCHITECTURE, pre, pre.new_empty(1), self.bandwidth)
        except (TypeError, ValueError) as error:
            return f"jumprelu_bandwidth {self.bandwidth!r}: {error}"
        return None

    def _serve(self, x: torch.Tensor) -> bool:
        if self._saelens_code:
            return False
        reason = self._cannot_serve(x)
        if reason is None:
            return True
        if reason != "fingerprint":  # that one was said at import
            _say_once(reason, f"{reason}; running SAELens's own JumpReLU code")
        return False

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As SAELens's, with the fused ``jumprelu`` op (inference and evaluation go through here)."""
        if not self._serve(x):
            return super().encode_with_hidden_pre(x)
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = jumprelu(hidden_pre, self.threshold.to(hidden_pre.dtype), self.bandwidth, self.cfg.jumprelu_ste_to_input)
        return self.hook_sae_acts_post(acts), hidden_pre

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self._serve(step_input.sae_in):
            self._saelens_code = True
            try:
                return super().training_forward_pass(step_input)
            finally:
                self._saelens_code = False
        if self.cfg.jumprelu_sparsity_loss_mode not in ("step", "tanh", "quadratic"):
            return super().training_forward_pass(step_input)  # SAELens's error for it
        # As SAELens: θ stays non-negative by projection, not by a clamp in the graph.
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)
        why_dense = self._why_dense(step_input.sae_in)
        path = "dense" if why_dense else self.step_policy.choose(needs_every_entry=False)
        if why_dense and self.step_policy.mode == "sparse":
            _say_once(f"dense:{why_dense}", f"jumprelu_ext_step 'sparse': {why_dense}, so this step is dense")
        if path == "sparse":
            out, density = self._sparse_step(step_input)
        else:
            out, density = self._dense_step(step_input, measure=self.step_policy.wants_density(path))
        if not why_dense:
            self.step_policy.observe(path, density)
        out.metrics["jumprelu_ext/sparse_step"] = float(path == "sparse")
        if density is not None:
            out.metrics["jumprelu_ext/support_density"] = density
        return out

    def _why_dense(self, x: torch.Tensor) -> str | None:
        """Why the sparse step cannot serve this batch (None: it can)."""
        if x.dim() != 2:
            return f"the batch is {x.dim()}-D (the sparse step takes [batch, d_in])"
        if self.dtype == torch.float64:
            return "dtype float64 (the sparse step's L0 gradient is float32)"
        hooked = [name for name in ("hook_sae_acts_pre", "hook_sae_acts_post") if _has_hooks(getattr(self, name))]
        if hooked:
            return f"{' and '.join(hooked)} have hooks (the sparse step never forms those tensors)"
        return None

    # The dense step: SAELens's step with JumpReLU.apply + Step.apply fused into one op.
    def _dense_step(self, step_input: TrainStepInput, measure: bool) -> tuple[TrainStepOutput, float | None]:
        cfg = self.cfg
        sae_in = self.process_sae_in(step_input.sae_in)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        threshold = self.threshold.to(hidden_pre.dtype)
        l0 = None
        if cfg.jumprelu_sparsity_loss_mode == "tanh":
            acts = jumprelu(hidden_pre, threshold, self.bandwidth, cfg.jumprelu_ste_to_input)
        elif hidden_pre.dtype == torch.float64:
            # The fused op's L0 and its gradient are float32 (docs/ops.md#l0-dtype), which would
            # round the L0 gradient of a float64 SAE: the unfused pair, in float64 throughout.
            acts = jumprelu(hidden_pre, threshold, self.bandwidth, cfg.jumprelu_ste_to_input)
            l0 = step(hidden_pre, threshold, self.bandwidth, cfg.jumprelu_ste_to_input).sum(dim=-1)
        else:
            acts, l0 = jumprelu_l0(hidden_pre, threshold, self.bandwidth, cfg.jumprelu_ste_to_input)
            l0 = l0.to(hidden_pre.dtype)  # SAELens sums the step in hidden_pre's dtype
        feature_acts = self.hook_sae_acts_post(acts)
        sae_out = self.decode(feature_acts)

        def per_item_tanh(W_dec_norm):
            return torch.tanh(cfg.jumprelu_tanh_scale * feature_acts * W_dec_norm).sum(dim=-1)

        def pre_act_loss(W_dec_norm):
            return calculate_pre_act_loss(
                cfg.pre_act_loss_coefficient, threshold, hidden_pre, step_input.dead_neuron_mask, W_dec_norm
            )

        out = self._output(step_input, sae_out, feature_acts, hidden_pre, l0, per_item_tanh, pre_act_loss)
        density = support_density(hidden_pre, threshold, self.bandwidth) if measure else None
        return out, density

    # The sparse step: the encoder's product, then work over the support only.
    def _sparse_step(self, step_input: TrainStepInput) -> tuple[TrainStepOutput, float]:
        cfg = self.cfg
        sae_in = self.process_sae_in(step_input.sae_in)
        rows, features = sae_in.shape[0], cfg.d_sae
        # The dtypes the dense step's products would have here (autocast included), from empty
        # stand-ins: x @ W_enc, then + b_enc (hidden_pre), then acts @ W_dec.
        mm_dtype = (sae_in[:0] @ self.W_enc[:, :0]).dtype
        pre_dtype = (sae_in[:0] @ self.W_enc[:, :0] + self.b_enc[:0]).dtype
        dec_dtype = (sae_in.new_empty((0, features), dtype=pre_dtype) @ self.W_dec).dtype
        threshold = self.threshold.to(pre_dtype)
        if threshold.dtype not in (torch.float32, mm_dtype):
            threshold = self.threshold  # fp32 θ with low-precision products: the ops' mixed mode
        acts = sparse_encode(
            sae_in.to(mm_dtype),
            self.W_enc.to(mm_dtype),
            self.b_enc.to(mm_dtype),
            threshold,
            self.bandwidth,
            cfg.jumprelu_ste_to_input,
        )
        l0 = acts.l0.to(pre_dtype)
        sae_out = sparse_decode(acts, self.W_dec).to(dec_dtype) + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        sae_out = self.reshape_fn_out(sae_out, self.d_head)

        def per_item_tanh(W_dec_norm):
            values = acts.values.to(pre_dtype)  # window-only entries are 0 here, as in the dense acts
            per_entry = torch.tanh(cfg.jumprelu_tanh_scale * values * W_dec_norm[acts.indices])
            return acts.row_sums(per_entry.float()).to(per_entry.dtype)

        def pre_act_loss(W_dec_norm):
            # SAELens's Σ_i ReLU(θ_i − pre_i)·dead_i·‖W_dec,i‖ has non-zero terms only at dead
            # features, so pre is formed for those columns alone.
            mask = step_input.dead_neuron_mask
            if mask is None or not mask.any():
                return torch.zeros((), dtype=pre_dtype, device=sae_in.device)
            dead = mask.nonzero().squeeze(1)
            hidden_pre = sae_in @ self.W_enc[:, dead] + self.b_enc[dead]
            per_item = ((threshold.to(pre_dtype)[dead] - hidden_pre).relu() * W_dec_norm[dead]).sum(dim=-1)
            return cfg.pre_act_loss_coefficient * per_item.mean()

        feature_acts = _active_coo(acts, rows, features, pre_dtype)
        hidden_pre = sae_in.new_empty((0, features), dtype=pre_dtype)  # never formed (docs/saelens.md)
        out = self._output(step_input, sae_out, feature_acts, hidden_pre, l0, per_item_tanh, pre_act_loss)
        return out, acts.density(features)

    def _output(self, step_input, sae_out, feature_acts, hidden_pre, l0, per_item_tanh, pre_act_loss):
        """The losses as SAELens's training_forward_pass and calculate_aux_loss form them, in
        their order (total = mse + l0_loss [+ pre_act_loss])."""
        cfg = self.cfg
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        W_dec_norm = None
        if cfg.jumprelu_sparsity_loss_mode == "tanh" or cfg.pre_act_loss_coefficient is not None:
            W_dec_norm = self.W_dec.norm(dim=1)
        coefficient = step_input.coefficients["l0"]
        if cfg.jumprelu_sparsity_loss_mode == "tanh":
            per_item_l0_loss = per_item_tanh(W_dec_norm)
        elif cfg.jumprelu_sparsity_loss_mode == "quadratic":
            target_l0 = cfg.target_l0
            if target_l0 is None:
                raise ValueError("cfg.target_l0 must be set for quadratic sparsity loss mode.")
            per_item_l0_loss = 2 / target_l0 * (l0 - target_l0) ** 2
        else:
            per_item_l0_loss = l0
        losses = {"mse_loss": mse_loss, "l0_loss": (coefficient * per_item_l0_loss).mean()}
        if cfg.pre_act_loss_coefficient is not None:
            losses["pre_act_loss"] = pre_act_loss(W_dec_norm)
        total = mse_loss
        for name, value in losses.items():
            if name != "mse_loss":
                total = total + value
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=total,
            losses=losses,
        )


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(
        getattr(module, hooks, None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


@torch.compiler.disable  # torch.compile cannot trace sparse_coo_tensor: run it eagerly (compile_sae)
def _active_coo(acts: SparseActs, rows: int, features: int, dtype: torch.dtype) -> torch.Tensor:
    """The active entries (and NaN ones, which count as firing in the dense acts) as a coalesced
    COO tensor [rows, features]: what SAELens's trainer counts firing statistics from."""
    with torch.no_grad():
        values = acts.values.detach()
        keep = ((acts.flags & ACTIVE) != 0) | values.isnan()
        indices = torch.stack((acts.entry_rows()[keep], acts.indices[keep]))
        return torch.sparse_coo_tensor(
            indices, values[keep].to(dtype), (rows, features), is_coalesced=True, check_invariants=False
        )


# --- registration -------------------------------------------------------------------------------


def _register() -> None:
    """Register the training class, and SAELens's inference JumpReLU under the same name (so that
    ``SAE.load_from_disk`` reads a training checkpoint as the stock SAE it is). A re-imported
    module replaces its own earlier registration; another class under the name is an error."""
    for registry, register, entry in (
        (
            SAE_TRAINING_CLASS_REGISTRY,
            register_sae_training_class,
            (JumpReLUExtTrainingSAE, JumpReLUExtTrainingSAEConfig),
        ),
        (SAE_CLASS_REGISTRY, register_sae_class, (JumpReLUSAE, JumpReLUSAEConfig)),
    ):
        existing = registry.get(ARCHITECTURE)
        if existing is None:
            register(ARCHITECTURE, *entry)
        elif [_qualified(c) for c in existing] == [_qualified(c) for c in entry]:
            registry[ARCHITECTURE] = entry
        else:
            raise ValueError(
                f"SAELens architecture {ARCHITECTURE!r} is already registered to {_qualified(existing[0])}"
            )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_register()


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["--fingerprints"]:
        print(json.dumps(current_fingerprints(), indent=4))
    else:
        print("usage: python -m jumprelu_ext.saelens --fingerprints")
