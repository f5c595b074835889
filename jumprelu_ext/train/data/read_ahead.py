"""Work done ahead on a background thread while the caller trains: the next batch's rows read from
the activation files (``ShuffledBatches``) or the next fill harvested from a model
(``StreamedBatches``). Both readers use ``ReadAhead``, and ``run`` does the same work on the
caller's thread when nothing was read ahead for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

__all__ = ["ReadAhead", "run"]

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """``work()`` run on a thread named ``name``. ``result()`` waits for it and returns what it
    returned, or raises on the caller's thread whatever it raised (an ``ActivationError`` naming
    the shard, say); ``join()`` only waits, dropping either. ``key`` is what the work was started
    for: the caller checks it against what it needs now before taking the result.

    The thread is not a daemon: a run that stops early (SIGTERM, an error) exits after the work in
    progress instead of finalising the interpreter under it (under a forward pass that can abort
    the process).

    With ``cuda_device`` a CUDA device the work runs on a CUDA stream of its own (a model's forward
    then overlaps the caller's training step); ``result()`` makes the caller's current stream wait
    for it and marks the result's tensors as used on that stream (see ``run``).
    """

    def __init__(
        self,
        work: Callable[[], T],
        *,
        name: str,
        key: Any = None,
        cuda_device: torch.device | None = None,
    ):
        self.key = key
        self._cuda_device = cuda_device
        self._box: dict = {}

        def target():
            try:
                self._box["made"] = _run(work, cuda_device)
            except BaseException as e:  # handed to the caller's thread
                self._box["error"] = e

        self._thread = threading.Thread(target=target, name=name)
        self._thread.start()

    def join(self) -> None:
        """Wait for the work; what it returned or raised is dropped."""
        self._thread.join()

    def result(self) -> T:
        """Wait for the work: what it returned, or its exception raised here."""
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        made, event = self._box["made"]
        return _hand_over(made, event, self._cuda_device)


def run(work: Callable[[], T], *, cuda_device: torch.device | None = None) -> T:
    """``work()`` on the caller's thread, handled as ``ReadAhead`` handles it (on a CUDA stream of
    its own when ``cuda_device`` is a CUDA device), for the work that was not done ahead."""
    made, event = _run(work, cuda_device)
    return _hand_over(made, event, cuda_device)


def _on_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _run(work: Callable[[], T], cuda_device) -> tuple[T, Any]:
    """(what ``work()`` returns, the CUDA event after its kernels or None)."""
    if not _on_cuda(cuda_device):
        return work(), None
    stream = torch.cuda.Stream(cuda_device)
    with torch.cuda.stream(stream):
        made = work()
        event = torch.cuda.Event()
        event.record(stream)
    return made, event


def _hand_over(made: T, event, cuda_device) -> T:
    """``made`` for use on the caller's current CUDA stream: that stream waits for the work's
    kernels, and the allocator is told that the tensors in ``made`` (it, or the tensors among its
    items or dict values) are used on it."""
    if event is not None:
        current = torch.cuda.current_stream(cuda_device)
        current.wait_event(event)
        for tensor in _tensors(made):
            tensor.record_stream(current)
    return made


def _tensors(made) -> list[torch.Tensor]:
    if isinstance(made, torch.Tensor):
        return [made]
    items = made.values() if isinstance(made, dict) else made if isinstance(made, (tuple, list)) else ()
    return [item for item in items if isinstance(item, torch.Tensor)]
