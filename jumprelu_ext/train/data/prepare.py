"""Where the trainer's activations come from: cached files (``--activations``) or a model
streamed over text (``--model``, ``stream.py``), split into a shuffled training stream and a
held-out set."""

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
    open_activations,
    sample_statistics,
    split_holdout,
)
from .source import BatchSource


@dataclass
class TrainingData:
    train: BatchSource  # ShuffledBatches or StreamedBatches: raw (unscaled) batches on the training device
    eval_store: Any  # ActivationStore or TensorStore
    eval_indices: np.ndarray
    d_in: int
    input_scale: float  # c with E‖c·x‖² = 1 over the training rows
    input_mean: torch.Tensor  # the training rows' mean (unscaled, fp64), from the same sample
    model: Any = None  # harvest.LoadedModel, for the downstream evaluation
    eval_tokens: Any = None  # harvest.TokenBatch of the held-out sequences
    metadata: dict = field(default_factory=dict)  # SAELens cfg metadata
    source: str = "the activations"  # where the rows come from, for error messages
    eval_source: str | None = None  # where the held-out rows come from, when not from `source`

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
            epoch = self.train.rows_per_pass
            if epoch is not None and empty_rows >= 2 * epoch:  # two epochs' worth: no row is finite
                raise ActivationError(f"{self.source}: no finite rows among the {epoch} rows to train on (all NaN/Inf)")

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Held-out rows, scaled by the input scale, non-finite rows left out."""
        device, finite_rows = self.train.device, 0
        for start in range(0, self.eval_indices.size, batch_size):
            x = self.eval_store.rows(self.eval_indices[start : start + batch_size]).to(device)
            x = x[torch.isfinite(x).all(dim=1)]
            finite_rows += x.shape[0]
            yield x * self.input_scale
        if self.eval_indices.size and not finite_rows:
            raise ActivationError(
                f"{self.eval_source or self.source}: all {self.eval_indices.size} held-out rows are NaN/Inf: "
                "nothing to evaluate"
            )


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
    train = ShuffledBatches(
        store,
        cfg.batch_size,
        cfg.seed,
        device,
        indices=train_idx,
        shard=layout.data_shard,
        total_rows=cfg.steps * cfg.batch_size,  # nothing is read ahead beyond the last step's batch
    )
    return TrainingData(
        train=train,
        eval_store=eval_store,
        eval_indices=eval_idx,
        d_in=store.d_in,
        **_input_statistics(train, cfg.seed, source),
        metadata={"dataset_path": str(cfg.activations)},
        source=source,
        eval_source=cfg.eval_activations,
    )


def _from_model(cfg, device, layout) -> TrainingData:
    """Streams (docs/trainer.md#streaming-from-a-model): the held-out windows are set aside and
    harvested first; training rows are harvested fill by fill while the SAE trains."""
    from tqdm import tqdm

    from .harvest import HarvestError, load_model, window_spec
    from .stream import StreamedBatches, check_buffer_tokens, heldout_windows
    from .text import iter_texts

    check_buffer_tokens(cfg.buffer_tokens, cfg.batch_size)  # before the text and the model are read
    next(iter_texts(cfg.dataset))  # a bad path or first record fails before the model loads
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # an error after this point stays one line on stderr
    model = load_model(cfg.model, cfg.layer, device=device)
    if model.max_positions is not None and cfg.context_length > model.max_positions:
        raise HarvestError(
            f"--context-length {cfg.context_length} exceeds {cfg.model}'s maximum of {model.max_positions} positions"
        )
    spec = window_spec(model.tokenizer, cfg.context_length, model.is_causal_lm)
    # Whole windows are held out, so no evaluated token has trained neighbours in its context.
    eval_tokens, heldout = heldout_windows(
        model, cfg.dataset, spec, cfg.max_tokens, cfg.eval_fraction, cfg.eval_windows, cfg.seed
    )
    eval_store = TensorStore(_harvest_shared(model, eval_tokens, layout)) if eval_tokens is not None else None
    source = f"the activations of {cfg.model} block {cfg.layer} on {cfg.dataset}"
    train = StreamedBatches(
        model,
        cfg.dataset,
        spec,
        batch_size=cfg.batch_size,
        buffer_tokens=cfg.buffer_tokens,
        seed=cfg.seed,
        device=device,
        layout=layout,
        heldout=heldout,
        max_tokens=cfg.max_tokens,
        harvest_batch_size=cfg.harvest_batch_size,
        log=tqdm.write if layout.is_main else None,
        total_rows=cfg.steps * cfg.batch_size,  # no fill is harvested beyond the last step's
    )
    first = train.current_fill()  # harvested now: the input scale is estimated on it
    if first.whole_pass:
        _check_batch_size(cfg, first.rows.shape[0], source)
    statistics = _input_statistics(train.scale_store(), cfg.seed, source)
    return TrainingData(
        train=train,
        eval_store=eval_store,
        eval_indices=np.arange(eval_store.num_rows if eval_store else 0),
        d_in=model.d_model,
        **statistics,
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


def _input_statistics(rows, seed: int, source: str) -> dict:
    """TrainingData's input_scale and input_mean, from a sample of ``rows`` (a ShuffledBatches or a
    store)."""
    try:
        scale, mean = sample_statistics(rows, seed=seed)
    except ActivationError as e:  # all rows NaN/Inf: say which data
        raise ActivationError(f"{source}: {e}") from e
    return {"input_scale": scale, "input_mean": mean}


def _harvest_shared(model, tokens, layout) -> torch.Tensor:
    """The activations of every window of ``tokens`` in order, each rank harvesting a contiguous
    share of the windows and receiving the others' rows."""
    from .harvest import harvest

    bounds = np.linspace(0, len(tokens), layout.world_size + 1).astype(int)
    share = tokens.select(slice(bounds[layout.rank], bounds[layout.rank + 1]))
    return all_gather_rows(harvest(model, share, progress=layout.is_main), layout)
