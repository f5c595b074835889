"""The downstream cost of an SAE: splice its reconstruction into the model and see what changes.

At the hooked layer, the activations at kept positions (real text tokens) are replaced by
``reconstruct(x)``; special tokens and padding keep their own. Then the full model runs:

- causal LMs: mean next-token cross-entropy over targets that are kept tokens, clean vs spliced,
  with zero-ablation (zeros at the kept positions) as the reference for "loss recovered";
- encoders: the sentence embedding sentence-transformers uses for MiniLM (last_hidden_state
  mean-pooled over the attention mask) and the per-token last_hidden_state, clean vs spliced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.harvest import HarvestError, LoadedModel, TokenBatch, model_batches, splice

__all__ = ["downstream_eval"]


def _at_kept(keep: torch.Tensor, fn):
    """A splice function that replaces the kept positions of h [b, T, d] by fn(h[keep])."""

    def replace(hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.clone()
        out[keep] = fn(hidden[keep]).to(hidden.dtype)
        return out

    return replace


def _run(loaded: LoadedModel, input_ids, attention_mask, replace=None):
    if replace is None:
        return loaded.model(input_ids=input_ids, attention_mask=attention_mask)
    with splice(loaded, replace):
        return loaded.model(input_ids=input_ids, attention_mask=attention_mask)


def _next_token_ce_sum(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor) -> float:
    """Summed cross-entropy of predicting each kept token from the position before it."""
    targets = keep[:, 1:]
    return float(F.cross_entropy(logits[:, :-1][targets].double(), input_ids[:, 1:][targets], reduction="sum"))


def _causal_lm_eval(loaded: LoadedModel, reconstruct, tokens: TokenBatch, batch_size: int) -> dict:
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    for input_ids, attention_mask, keep in model_batches(loaded, tokens, batch_size):
        runs = {"clean": None, "spliced": _at_kept(keep, reconstruct), "zero": _at_kept(keep, torch.zeros_like)}
        for name, replace in runs.items():
            logits = _run(loaded, input_ids, attention_mask, replace).logits
            sums[name] += _next_token_ce_sum(logits, input_ids, keep)
        count += int(keep[:, 1:].sum())
    if count == 0:
        raise HarvestError("no next-token targets to score: every window holds at most one text token")
    clean, spliced, zero = (sums[k] / count for k in ("clean", "spliced", "zero"))
    return {
        "kind": "causal_lm",
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablation": zero,
        "delta_ce": spliced - clean,
        # Undefined (NaN) when zero-ablation costs nothing.
        "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
    }


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _encoder_eval(loaded: LoadedModel, reconstruct, tokens: TokenBatch, batch_size: int) -> dict:
    sentence_sum = token_sum = 0.0
    n_sentences = n_tokens = 0
    for input_ids, attention_mask, keep in model_batches(loaded, tokens, batch_size):
        clean = _run(loaded, input_ids, attention_mask).last_hidden_state.double()
        spliced = _run(loaded, input_ids, attention_mask, _at_kept(keep, reconstruct)).last_hidden_state.double()
        cos = F.cosine_similarity(_mean_pool(clean, attention_mask), _mean_pool(spliced, attention_mask), dim=-1)
        sentence_sum += float(cos.sum())
        token_sum += float(F.cosine_similarity(clean[keep], spliced[keep], dim=-1).sum())
        n_sentences += input_ids.shape[0]
        n_tokens += int(keep.sum())
    return {
        "kind": "encoder",
        "cosine_similarity": sentence_sum / n_sentences,
        "token_cosine_similarity": token_sum / n_tokens,
    }


def downstream_eval(loaded: LoadedModel, reconstruct, tokens: TokenBatch, max_sequences=64, batch_size=16) -> dict:
    """Score splicing ``reconstruct`` (x_raw [n, d_model] -> x̂_raw [n, d_model]) in at the hooked layer,
    over the first ``max_sequences`` windows of ``tokens``. Returns plain floats (see module docstring):

    causal LM: {"kind": "causal_lm", "ce_clean", "ce_spliced", "ce_zero_ablation", "delta_ce", "ce_loss_recovered"}
    encoder:   {"kind": "encoder", "cosine_similarity", "token_cosine_similarity"}
    """
    if max_sequences <= 0:
        raise HarvestError(f"max_sequences must be positive, got {max_sequences}")
    tokens = tokens.select(slice(0, max_sequences))
    if tokens.num_tokens == 0:
        raise HarvestError("no text tokens to evaluate on")
    evaluate = _causal_lm_eval if loaded.is_causal_lm else _encoder_eval
    with torch.no_grad():
        return evaluate(loaded, reconstruct, tokens, batch_size)
