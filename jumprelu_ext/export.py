"""Export a trained JumpReLU SAE in SAELens's on-disk layout, with the input scale folded in.

Layout (what ``sae_lens.SAE.load_from_disk(dir)`` reads in SAELens 6.x):

    dir/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
                                  b_dec [d_in], threshold [d_sae]   (float32, contiguous)
    dir/cfg.json                  {"architecture": "jumprelu", "d_in", "d_sae", "dtype",
                                   "device", "apply_b_dec_to_input", "normalize_activations",
                                   "reshape_activations", "metadata": {...}, "jumprelu_ext": {...}}

SAELens keeps only the config fields its dataclass knows (``filter_valid_dataclass_fields``),
so our own information lives under the non-clashing top-level key ``jumprelu_ext``; the
standard metadata fields (model_name, hook_name, hook_layer, ...) go under ``metadata``.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from .files import atomic_write_bytes
from .sae import JumpReLUSAE

SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SAE_CFG_FILENAME = "cfg.json"
# Written into metadata.sae_lens_version: SAELens treats configs without a version >= 6.0.0 as
# pre-6 and rewrites them (handle_pre_6_0_config); ours is in the 6.x format.
SAELENS_CFG_FORMAT_VERSION = "6.0.0"

# SAEMetadata fields in SAELens 6.x (sae_lens/saes/sae.py); these keys of extra_cfg are copied
# into cfg["metadata"] so SAELens (and tools reading its cfg, e.g. hooks) see them.
_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_layer",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
)

__all__ = ["SAE_CFG_FILENAME", "SAE_WEIGHTS_FILENAME", "folded_weights", "load_sae", "save_sae"]


def _check_scale(input_scale) -> float:
    c = float(input_scale)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"save_sae: input_scale must be a positive finite number, got {input_scale!r}")
    return c


@torch.no_grad()
def folded_weights(sae: JumpReLUSAE, input_scale: float) -> dict:
    """The SAE's weights with the input scale c folded in, as fp32 contiguous CPU tensors.

    Derivation. The SAE was trained on scaled inputs u = c·x:
        pre(u) = u W_enc + b_enc,   f = JumpReLU_θ(pre),   û = f W_dec + b_dec,
    and its reconstruction of the raw input is x̂ = û / c. Substituting u = c·x:
        pre = x (c·W_enc) + b_enc                      → W_enc' = c·W_enc, b_enc' = b_enc
    so the pre-activations, hence θ' = θ and the feature activations f, are unchanged; and
        x̂ = û / c = f (W_dec / c) + b_dec / c          → W_dec' = W_dec / c, b_dec' = b_dec / c.
    The saved SAE applied to raw x therefore gives the same acts as the trained SAE on c·x and
    the reconstruction divided by c. (Same as SAELens's fold_activation_norm_scaling_factor.)
    An SAE that encodes u − b_dec (``apply_b_dec_to_input``) is first written in the plain form:
        pre = (u − b_dec) W_enc + b_enc = u W_enc + (b_enc − b_dec W_enc)   → b_enc ← b_enc − b_dec W_enc,
    so every saved SAE encodes x directly (cfg ``apply_b_dec_to_input: false``).
    """
    c = _check_scale(input_scale)
    w_enc = sae.W_enc.detach().float().cpu()
    b_enc = sae.b_enc.detach().float().cpu()
    b_dec = sae.b_dec.detach().float().cpu()
    if sae.apply_b_dec_to_input:
        # The dot product over d_in in fp64, rounded to fp32 once: the folded bias stays within one
        # fp32 rounding of the exact b_enc − b_dec·W_enc, so the saved SAE fires on the same rows.
        b_enc = b_enc - b_dec.double() @ w_enc.double()
    return {
        "W_enc": (w_enc * c).contiguous(),
        "W_dec": (sae.W_dec.detach().float().cpu() / c).contiguous(),
        "b_enc": b_enc.float().contiguous(),
        "b_dec": (b_dec / c).contiguous(),
        "threshold": sae.threshold.detach().float().cpu().contiguous(),
    }


def _build_cfg(sae: JumpReLUSAE, input_scale: float, extra_cfg: dict) -> dict:
    extra_cfg = dict(extra_cfg or {})
    metadata = {k: extra_cfg[k] for k in _METADATA_KEYS if k in extra_cfg}
    # 'layer' is a common alias for hook_layer.
    if "hook_layer" not in metadata and "layer" in extra_cfg:
        metadata["hook_layer"] = extra_cfg["layer"]
    metadata["sae_lens_version"] = SAELENS_CFG_FORMAT_VERSION
    metadata["sae_lens_training_version"] = None
    return {
        # SAELens 6.x SAEConfig / JumpReLUSAEConfig fields
        "architecture": "jumprelu",
        "d_in": int(sae.d_in),
        "d_sae": int(sae.d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # folded into b_enc by folded_weights
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": metadata,
        # ours; ignored by SAELens
        "jumprelu_ext": {
            "format_version": 1,
            "input_scale": float(input_scale),
            "input_scale_folded": True,
            "bandwidth": float(sae.bandwidth),
            "threshold_param": sae.threshold_param,
            "extra": extra_cfg,
        },
    }


def save_sae(sae: JumpReLUSAE, out_dir, input_scale: float, extra_cfg: dict | None = None) -> tuple[Path, Path]:
    """Save ``sae`` (trained on inputs scaled by ``input_scale``) for use on RAW activations.

    Writes ``sae_weights.safetensors`` (see ``folded_weights`` for the fold-back and its
    derivation) and ``cfg.json`` into ``out_dir``, each atomically (temp file + fsync +
    os.replace). ``extra_cfg`` (model name, hook, layer, training config, ...) must be
    JSON-serialisable (non-serialisable leaves are written with ``str``); its standard SAELens
    metadata keys are copied to ``cfg["metadata"]`` and all of it is kept under
    ``cfg["jumprelu_ext"]["extra"]``. Returns (weights_path, cfg_path).
    """
    c = _check_scale(input_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = folded_weights(sae, c)
    cfg = _build_cfg(sae, c, extra_cfg)
    cfg_bytes = (json.dumps(cfg, indent=2, default=str) + "\n").encode("utf-8")
    weights_path = atomic_write_bytes(out_dir / SAE_WEIGHTS_FILENAME, safetensors_save(tensors))
    cfg_path = atomic_write_bytes(out_dir / SAE_CFG_FILENAME, cfg_bytes)
    return weights_path, cfg_path


def load_sae(out_dir, device=None, threshold_param: str = "raw") -> JumpReLUSAE:
    """Read a directory written by ``save_sae`` (or any SAELens JumpReLU SAE directory) back into
    our ``JumpReLUSAE``, in fp32, taking RAW activations (the scale is already folded in).

    θ is loaded as the raw ``threshold`` parameter by default (exactly the saved values, no
    exp/log round trip); ``threshold_param="log"`` stores log θ instead, e.g. to fine-tune.
    The bandwidth comes from ``cfg["jumprelu_ext"]["bandwidth"]`` (default 1e-3).
    """
    out_dir = Path(out_dir)
    cfg_path, weights_path = out_dir / SAE_CFG_FILENAME, out_dir / SAE_WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_sae: {p} not found")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"load_sae: {cfg_path} is not valid JSON: {e}") from e
    if cfg.get("architecture") != "jumprelu":
        raise ValueError(f"load_sae: {cfg_path} has architecture {cfg.get('architecture')!r}, expected 'jumprelu'")
    if cfg.get("apply_b_dec_to_input") or cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"load_sae: {cfg_path} needs apply_b_dec_to_input=False and normalize_activations='none' "
            "(JumpReLUSAE has no input preprocessing)"
        )
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:
        raise ValueError(f"load_sae: {weights_path} is corrupt or unreadable: {e}") from e
    expected = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if set(tensors) != expected:
        raise ValueError(f"load_sae: {weights_path} has keys {sorted(tensors)}, expected {sorted(expected)}")

    ours = cfg.get("jumprelu_ext", {})
    sae = JumpReLUSAE(
        int(cfg["d_in"]),
        int(cfg["d_sae"]),
        bandwidth=float(ours.get("bandwidth", 1e-3)),
        threshold_param=threshold_param,
        dtype=torch.float32,
    )
    state = {k: tensors[k].float() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    theta = tensors["threshold"].float()
    if threshold_param == "log":
        state["log_threshold"] = theta.log()
    else:
        state["threshold"] = theta
    sae.load_state_dict(state)
    if device is not None:
        sae = sae.to(device)
    return sae
