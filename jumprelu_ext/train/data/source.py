"""What the training loop and its checkpoints need of the training rows' source: the one contract
that the cached files (``activations.ShuffledBatches``) and the stream from a model
(``stream.StreamedBatches``) both keep, so the loop does not know which one it reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

__all__ = ["BatchSource"]


class BatchSource(Protocol):
    """Endless, exactly resumable fp32 training batches on ``device``.

    ``next()`` is this rank's share of the next global batch of ``batch_size`` rows, less the rows
    with NaN/Inf (so possibly empty); ``dropped_rows`` counts those. ``state_dict()`` is the
    position in the stream (small, ``torch.load(weights_only=True)``-compatible) that the
    checkpoint saves and ``load_state_dict`` returns to, or refuses with an ``ActivationError``
    when it is another stream's. ``close()`` waits for the work being done ahead in the
    background.
    """

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def __next__(self) -> torch.Tensor: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dropped_rows(self) -> int: ...

    @property
    def rows_per_pass(self) -> int | None:
        """Rows in one pass over the training data (None for a stream not yet read to its end)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> str:
        """For the start-up line: the rows there are to train on."""
        ...
