"""Where the trainer's activations come from: cached files (``--activations``) or a model
harvested at start-up (``--model``), split into a shuffled training stream and a held-out set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..distributed import all_gather_rows, sum_
from .activations import (
    ActivationError,
    ShuffledBatches,
    TensorStore,
    estimate_scale,
    open_activations,
    split_holdout,
)


@dataclass
class TrainingData:
    train: ShuffledBatches  # raw (unscaled) batches on the training device
    eval_store: Any  # ActivationStore or TensorStore
    eval_indices: np.ndarray
    d_in: int
    input_scale: float  # c with E‖c·x‖² = 1 over the training rows
    model: Any = None  # harvest.LoadedModel, for the downstream evaluation
    eval_tokens: Any = None  # harvest.TokenBatch of the held-out sequences
    metadata: dict = field(default_factory=dict)  # SAELens cfg metadata
    source: str = "the activations"  # where the rows come from, for error messages

    def next_batch(self, layout) -> tuple[torch.Tensor, int]:
        """This rank's rows of the next global batch that has any finite row, scaled by the input
        scale, and the global number of rows (what the loss means are taken over)."""
        empty_rows = 0
        while True:
            x = next(self.train)
            rows = x.shape[0]
            if layout.data_parallel:
                rows = int(sum_(torch.tensor([rows], device=x.device), layout).item())
            if rows:
                return x * self.input_scale, rows
            empty_rows += self.train.batch_size
            if empty_rows >= 2 * self.train.indices.size:  # two epochs' worth: no row is finite
                raise ActivationError(
                    f"{self.source}: no finite rows among the {self.train.indices.size} rows to train on (all NaN/Inf)"
                )

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Held-out rows, scaled by the input scale, non-finite rows left out."""
        device = self.train.device
        for start in range(0, self.eval_indices.size, batch_size):
            x = self.eval_store.rows(self.eval_indices[start : start + batch_size]).to(device)
            yield x[torch.isfinite(x).all(dim=1)] * self.input_scale


def prepare_data(cfg, device: torch.device, layout) -> TrainingData:
    """Every rank gets the same held-out set and walks the same training stream, reading its
    ``layout.data_shard`` of each batch. Under torchrun with ``--model`` each rank harvests a
    share of the windows and the ranks exchange their rows."""
    if cfg.activations is not None:
        return _from_files(cfg, device, layout)
    return _from_model(cfg, device, layout)


def _from_files(cfg, device, layout) -> TrainingData:
    store = open_activations(cfg.activations)
    if cfg.eval_activations is not None:  # a held-out file of its own: train on every row
        eval_store = open_activations(cfg.eval_activations, expected_d_in=store.d_in)
        train_idx, eval_idx = np.arange(store.num_rows), np.arange(eval_store.num_rows)
    else:
        eval_store = store
        train_idx, eval_idx = split_holdout(store, cfg.eval_fraction, cfg.seed)
    source = str(cfg.activations)
    _check_batch_size(cfg, train_idx.size, source)
    train = ShuffledBatches(store, cfg.batch_size, cfg.seed, device, indices=train_idx, shard=layout.data_shard)
    return TrainingData(
        train=train,
        eval_store=eval_store,
        eval_indices=eval_idx,
        d_in=store.d_in,
        input_scale=_input_scale(train, cfg.seed, source),
        metadata={"dataset_path": str(cfg.activations)},
        source=source,
    )


def _from_model(cfg, device, layout) -> TrainingData:
    from .harvest import load_model, tokenize
    from .text import iter_texts

    model = load_model(cfg.model, cfg.layer, device=device)
    tokens = tokenize(model.tokenizer, iter_texts(cfg.dataset), cfg.context_length, model.is_causal_lm, cfg.max_tokens)
    # Hold out whole sequences, so no evaluated token has trained neighbours in its context.
    train_seq, eval_seq = split_holdout(tokens.input_ids.shape[0], cfg.eval_fraction, cfg.seed)
    train_store = TensorStore(_harvest_shared(model, tokens.select(train_seq), layout))
    eval_tokens = tokens.select(eval_seq) if eval_seq.size else None
    eval_store = TensorStore(_harvest_shared(model, eval_tokens, layout)) if eval_seq.size else None
    source = f"the activations of {cfg.model} block {cfg.layer} on {cfg.dataset}"
    _check_batch_size(cfg, train_store.num_rows, source)
    train = ShuffledBatches(train_store, cfg.batch_size, cfg.seed, device, shard=layout.data_shard)
    return TrainingData(
        train=train,
        eval_store=eval_store,
        eval_indices=np.arange(eval_store.num_rows if eval_store else 0),
        d_in=train_store.d_in,
        input_scale=_input_scale(train, cfg.seed, source),
        source=source,
        model=model,
        eval_tokens=eval_tokens,
        metadata={
            "model_name": cfg.model,
            "hook_name": model.hook_name,
            "hook_layer": cfg.layer,
            "dataset_path": cfg.dataset,
            "context_size": cfg.context_length,
            "exclude_special_tokens": True,
        },
    )


def _check_batch_size(cfg, train_rows: int, source: str) -> None:
    """A batch of more rows than there are to train on would repeat rows within one step."""
    if cfg.batch_size > train_rows:
        raise ActivationError(
            f"--batch-size {cfg.batch_size} is larger than the {train_rows} training rows of {source}: "
            "lower --batch-size or give more data"
        )


def _input_scale(train: ShuffledBatches, seed: int, source: str) -> float:
    try:
        return estimate_scale(train, seed=seed)
    except ActivationError as e:  # all rows NaN/Inf: say which data
        raise ActivationError(f"{source}: {e}") from e


def _harvest_shared(model, tokens, layout) -> torch.Tensor:
    """The activations of every window of ``tokens`` in order, each rank harvesting a contiguous
    share of the windows and receiving the others' rows."""
    from .harvest import harvest

    bounds = np.linspace(0, len(tokens), layout.world_size + 1).astype(int)
    share = tokens.select(slice(bounds[layout.rank], bounds[layout.rank + 1]))
    return all_gather_rows(harvest(model, share, progress=layout.is_main), layout)
