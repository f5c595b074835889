"""The background read-ahead both training-row sources use, and their common contract (BatchSource)."""

import threading

import numpy as np
import pytest
import torch

from jumprelu_ext.train.data.activations import ActivationError, ShuffledBatches, TensorStore
from jumprelu_ext.train.data.read_ahead import ReadAhead, run


def test_the_result_is_what_the_work_returned_made_on_a_named_non_daemon_thread():
    seen = []

    def work():
        thread = threading.current_thread()
        seen.append((thread.name, thread.daemon))
        return torch.arange(3)

    ahead = ReadAhead(work, name="jumprelu-ext-test", key=(1, 2))
    assert ahead.key == (1, 2)
    assert torch.equal(ahead.result(), torch.arange(3))
    assert seen == [("jumprelu-ext-test", False)]
    assert torch.equal(run(work), torch.arange(3))
    assert seen[-1] == (threading.current_thread().name, threading.current_thread().daemon)  # the caller's thread


def test_an_error_is_raised_on_the_callers_thread_by_result_and_dropped_by_join():
    error = ActivationError("shard_00001.safetensors: cannot read its rows")

    def work():
        raise error

    ahead = ReadAhead(work, name="jumprelu-ext-test")
    with pytest.raises(ActivationError) as raised:
        ahead.result()
    assert raised.value is error
    ReadAhead(work, name="jumprelu-ext-test").join()  # nothing raised
    assert not [t for t in threading.enumerate() if t.name == "jumprelu-ext-test"]


def test_a_cpu_device_runs_the_work_as_it_is():
    ahead = ReadAhead(
        lambda: {"rows": torch.ones(2), "end": 3}, name="jumprelu-ext-test", cuda_device=torch.device("cpu")
    )
    assert ahead.result()["end"] == 3
    assert run(lambda: 5, cuda_device=torch.device("cpu")) == 5


def test_file_batches_describe_themselves_and_their_pass():
    batches = ShuffledBatches(TensorStore(torch.ones(10, 3)), batch_size=4, indices=np.arange(7), read_ahead=False)
    assert batches.rows_per_pass == 7
    assert batches.describe() == "7 training rows"


def test_a_fill_smaller_than_a_batch_is_refused_in_one_place():
    from jumprelu_ext.train.data.stream import check_buffer_tokens

    check_buffer_tokens(64, 64)
    with pytest.raises(ActivationError, match=r"^--buffer-tokens 32 is smaller than one batch \(--batch-size 64\)$"):
        check_buffer_tokens(32, 64)


def test_a_stream_describes_itself_and_has_no_pass_length_before_a_pass_is_read():
    from jumprelu_ext.train.data.stream import StreamedBatches

    batches = StreamedBatches(None, "text.txt", None, batch_size=4, buffer_tokens=300)  # nothing read yet
    assert batches.rows_per_pass is None
    assert batches.describe() == "streamed in fills of 300 rows"
