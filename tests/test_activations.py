"""Tests for jumprelu_ext.train.data.activations: reading shards, batching, resume, holdout, input scale."""

import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jumprelu_ext.train.data.activations import (
    ActivationError,
    ShuffledBatches,
    estimate_scale,
    open_activations,
    split_holdout,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def distinct_rows(n, d, start=0, dtype=np.float32):
    """Row i is [start+i, start+i, ...]: any row identifies its own index."""
    return np.repeat(np.arange(start, start + n, dtype=dtype)[:, None], d, axis=1)


def row_ids(batch):
    return batch[:, 0].cpu().numpy().astype(np.int64)


@pytest.fixture
def mixed_folder(tmp_path):
    """Three shards, npy and safetensors mixed, 10 + 7 + 5 rows of width 4."""
    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "a.npy", distinct_rows(10, 4, 0))
    save_file({"activations": distinct_rows(7, 4, 10), "other": np.zeros(3, np.float32)}, str(folder / "b.safetensors"))
    np.save(folder / "c.npy", distinct_rows(5, 4, 17))
    (folder / "notes.txt").write_text("ignored")
    return folder


# ---------- reading ----------


def test_read_npy(tmp_path):
    data = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float16)
    np.save(tmp_path / "x.npy", data)
    store = open_activations(tmp_path / "x.npy")
    assert (store.num_rows, store.d_in) == (20, 3)
    got = store.rows(np.array([5, 0, 19]))
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), data[[5, 0, 19]].astype(np.float32))


def test_read_safetensors_single_tensor(tmp_path):
    data = np.random.default_rng(1).standard_normal((12, 5))
    save_file({"whatever": data}, str(tmp_path / "x.safetensors"))
    store = open_activations(tmp_path / "x.safetensors")
    assert (store.num_rows, store.d_in) == (12, 5)
    np.testing.assert_array_equal(store.rows(np.array([11, 3, 4])).numpy(), data[[11, 3, 4]].astype(np.float32))


def test_read_safetensors_bf16(tmp_path):
    from safetensors.torch import save_file as save_torch

    data = torch.randn(6, 4).to(torch.bfloat16)
    save_torch({"activations": data}, str(tmp_path / "x.safetensors"))
    store = open_activations(tmp_path / "x.safetensors")
    torch.testing.assert_close(store.rows(np.arange(6)), data.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_read_safetensors_rows_after_another_tensor(tmp_path, dtype):
    # "aaa" is stored first, so the rows start at a non-zero offset into the data section.
    data = np.random.default_rng(2).standard_normal((40, 5)).astype(dtype)
    save_file({"aaa": np.ones(7, np.float64), "activations": data}, str(tmp_path / "x.safetensors"))
    store = open_activations(tmp_path / "x.safetensors")
    header = 8 + int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert store.shards[0]._data_offset == header + 7 * 8  # after the 7 float64s of "aaa"
    idx = np.array([39, 0, 17, 18, 5])
    np.testing.assert_array_equal(store.rows(idx).numpy(), data[idx].astype(np.float32))


def test_folder_gathers_across_shards_in_requested_order(mixed_folder):
    store = open_activations(mixed_folder, expected_d_in=4)
    assert (store.num_rows, store.d_in, len(store.shards)) == (22, 4, 3)
    idx = np.array([21, 9, 10, 0, 16, 17, 3, 9])  # crosses every boundary, unsorted, with a repeat
    got = store.rows(idx)
    np.testing.assert_array_equal(got.numpy(), distinct_rows(22, 4)[idx])
    np.testing.assert_array_equal(store.rows(np.arange(22)).numpy(), distinct_rows(22, 4))
    assert store.rows(np.array([], dtype=np.int64)).shape == (0, 4)


def test_rows_out_of_range(mixed_folder):
    store = open_activations(mixed_folder)
    with pytest.raises(ActivationError, match="out of range"):
        store.rows(np.array([22]))


# ---------- errors ----------


def test_missing_path(tmp_path):
    with pytest.raises(ActivationError, match=r"nope\.npy.*no such file"):
        open_activations(tmp_path / "nope.npy")


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ActivationError, match="no .npy or .safetensors"):
        open_activations(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(ActivationError, match=r"e\.npy: file is empty"):
        open_activations(tmp_path / "e.npy")


def test_garbage_file(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ActivationError, match=r"g\.safetensors: cannot read"):
        open_activations(tmp_path / "g.safetensors")


def test_zero_rows(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(ActivationError, match=r"z\.npy: has zero rows"):
        open_activations(tmp_path / "z.npy")


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_not_2d(tmp_path, shape):
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    save_file({"t": np.zeros(shape, np.float32)}, str(tmp_path / "bad.safetensors"))
    for name in ("bad.npy", "bad.safetensors"):
        with pytest.raises(ActivationError, match=rf"{name.replace('.', '[.]')}: expected a 2-D"):
            open_activations(tmp_path / name)


def test_several_tensors_without_activations(tmp_path):
    save_file({"a": np.zeros((2, 2), np.float32), "b": np.zeros((2, 2), np.float32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ActivationError, match="none is named 'activations'"):
        open_activations(tmp_path / "m.safetensors")


def test_mismatched_d_in(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ActivationError, match=r"b\.npy: d_in 5 does not match a\.npy \(d_in 4\)"):
        open_activations(tmp_path)


def test_mismatched_dtype(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))
    save_file({"activations": np.zeros((3, 4), np.float16)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ActivationError, match=r"b\.safetensors: dtype float16 does not match a\.npy"):
        open_activations(tmp_path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"1234")
    with pytest.raises(ActivationError, match=r"x\.pt: unsupported extension '\.pt'"):
        open_activations(tmp_path / "x.pt")


def test_unsupported_dtype(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(ActivationError, match=r"i\.npy: unsupported dtype int32"):
        open_activations(tmp_path / "i.npy")


def test_expected_d_in(mixed_folder):
    with pytest.raises(ActivationError, match="d_in is 4 but the SAE expects 8"):
        open_activations(mixed_folder, expected_d_in=8)


# ---------- batches ----------


@pytest.mark.parametrize("device", DEVICES)
def test_batches_cover_each_row_once_per_epoch(mixed_folder, device):
    store = open_activations(mixed_folder)
    it = ShuffledBatches(store, batch_size=11, seed=3, device=device)  # 22 rows = 2 batches per epoch
    for _ in range(3):
        a, b = next(it), next(it)
        for batch in (a, b):
            assert batch.shape == (11, 4) and batch.dtype == torch.float32
            assert batch.device.type == device
        assert sorted(np.concatenate([row_ids(a), row_ids(b)])) == list(range(22))
    assert it.epoch == 3 and it.position == 0 and it.dropped_rows == 0


def test_epochs_differ_and_batches_span_epochs(mixed_folder):
    store = open_activations(mixed_folder)
    it = ShuffledBatches(store, batch_size=8, seed=0)
    ids = np.concatenate([row_ids(next(it)) for _ in range(11)])  # 88 rows = 4 epochs
    epochs = ids.reshape(4, 22)
    for e in epochs:
        assert sorted(e) == list(range(22))
    assert not np.array_equal(epochs[0], epochs[1])


def test_nonfinite_rows_dropped_and_counted(tmp_path):
    data = distinct_rows(30, 3)
    bad = [2, 7, 15, 29]
    data[2, 1], data[7, 0], data[15, 2], data[29, :] = np.nan, np.inf, -np.inf, np.nan
    np.save(tmp_path / "x.npy", data)
    it = ShuffledBatches(open_activations(tmp_path / "x.npy"), batch_size=15, seed=1)
    seen = []
    for _ in range(4):  # 60 positions = two epochs of 30
        batch = next(it)
        assert torch.isfinite(batch).all()
        seen.extend(row_ids(batch))
    # Each batch shrank by the bad rows it met; no refill from later positions.
    assert sorted(seen) == sorted([i for i in range(30) if i not in bad] * 2)
    assert it.dropped_rows == 2 * len(bad)


def test_all_nonfinite_gives_empty_batches(tmp_path):
    np.save(tmp_path / "x.npy", np.full((5, 2), np.nan, np.float32))
    it = ShuffledBatches(open_activations(tmp_path / "x.npy"), batch_size=4)
    assert next(it).shape == (0, 2) and it.dropped_rows == 4


def test_fp64_overflow_to_fp32_is_dropped(tmp_path):
    data = distinct_rows(4, 2, dtype=np.float64)
    data[1, 0] = 1e300  # finite in fp64, inf once read as fp32
    np.save(tmp_path / "x.npy", data)
    it = ShuffledBatches(open_activations(tmp_path / "x.npy"), batch_size=4)
    assert sorted(row_ids(next(it))) == [0, 2, 3] and it.dropped_rows == 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_make_up_the_single_process_batch(tmp_path, world_size):
    data = distinct_rows(50, 3)
    data[[4, 17]] = np.nan
    np.save(tmp_path / "x.npy", data)
    store = open_activations(tmp_path / "x.npy")
    single = ShuffledBatches(store, batch_size=16, seed=3)
    ranks = [ShuffledBatches(store, batch_size=16, seed=3, shard=(r, world_size)) for r in range(world_size)]
    for _ in range(8):  # spans epoch ends
        assert torch.equal(torch.cat([next(it) for it in ranks]), next(single))
    assert sum(it.dropped_rows for it in ranks) == single.dropped_rows


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_resume_is_exact(tmp_path, k):
    data = np.random.default_rng(7).standard_normal((50, 6)).astype(np.float32)
    data[[3, 20, 41]] = np.nan
    np.save(tmp_path / "x.npy", data)
    store = open_activations(tmp_path / "x.npy")
    it = ShuffledBatches(store, batch_size=16, seed=11)
    for _ in range(k):
        next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(6)]

    fresh = ShuffledBatches(open_activations(tmp_path / "x.npy"), batch_size=16, seed=11)
    fresh.load_state_dict(dict(state))
    for want in expected:
        got = next(fresh)
        assert torch.equal(got, want)
    assert fresh.state_dict() == it.state_dict()


def test_load_state_from_other_stream_refused(mixed_folder):
    store = open_activations(mixed_folder)
    state = ShuffledBatches(store, batch_size=4, seed=1).state_dict()
    with pytest.raises(ActivationError, match="seed 1"):
        ShuffledBatches(store, batch_size=4, seed=2).load_state_dict(state)


def test_bad_arguments(mixed_folder):
    store = open_activations(mixed_folder)
    with pytest.raises(ActivationError, match="batch_size"):
        ShuffledBatches(store, batch_size=0)
    with pytest.raises(ActivationError, match="out of range"):
        ShuffledBatches(store, batch_size=2, indices=np.array([0, 22]))


# ---------- holdout ----------


def test_holdout_disjoint_covering_and_restricts_batches(mixed_folder):
    store = open_activations(mixed_folder)
    train, held = split_holdout(store, 0.25, seed=5)
    assert len(held) == round(22 * 0.25)
    assert not set(train) & set(held)
    assert sorted(np.concatenate([train, held])) == list(range(22))
    np.testing.assert_array_equal(split_holdout(store, 0.25, seed=5)[1], held)  # deterministic

    it = ShuffledBatches(store, batch_size=len(train), seed=0, indices=train)
    assert sorted(row_ids(next(it))) == sorted(train)
    with pytest.raises(ActivationError, match="fraction"):
        split_holdout(store, 1.0, seed=0)


# ---------- input scale ----------


def test_estimate_scale(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((4000, 16)) * 7.0).astype(np.float32)  # E‖x‖² = 16·49
    data[[5, 100]] = np.inf  # must be ignored
    np.save(tmp_path / "x.npy", data)
    store = open_activations(tmp_path / "x.npy")
    c = estimate_scale(store, num_rows=2000, seed=0)
    assert c == pytest.approx(1 / 28.0, rel=0.05)
    finite = data[np.isfinite(data).all(axis=1)]
    assert float(((c * finite.astype(np.float64)) ** 2).sum(axis=1).mean()) == pytest.approx(1.0, rel=0.05)
    # From a ShuffledBatches: uses its subset and does not advance it.
    it = ShuffledBatches(store, batch_size=64, seed=0)
    before = it.state_dict()
    assert estimate_scale(it, num_rows=10_000) == pytest.approx(1 / 28.0, rel=0.05)
    assert it.state_dict() == before


def test_estimate_scale_zero_data(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((10, 3), np.float32))
    with pytest.raises(ActivationError, match="mean"):
        estimate_scale(open_activations(tmp_path / "z.npy"))


# ---------- reading ahead ----------

READ_AHEAD_THREAD = "jumprelu-ext-read-ahead"


def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name == READ_AHEAD_THREAD]


@pytest.fixture
def safetensors_folder(tmp_path):
    """Two safetensors shards, 12 + 9 rows of width 3, what python -m jumprelu_ext.harvest writes."""
    folder = tmp_path / "shards"
    folder.mkdir()
    save_file({"activations": distinct_rows(12, 3, 0)}, str(folder / "shard_00000.safetensors"))
    save_file({"activations": distinct_rows(9, 3, 12)}, str(folder / "shard_00001.safetensors"))
    return folder


def test_read_ahead_gives_the_same_batches_and_resumes_exactly(mixed_folder):
    store = open_activations(mixed_folder)
    plain = ShuffledBatches(store, batch_size=5, seed=4, read_ahead=False)
    ahead = ShuffledBatches(store, batch_size=5, seed=4)
    for _ in range(13):  # 65 positions: crosses two epoch ends of 22 rows
        assert torch.equal(next(ahead), next(plain))
        assert ahead.state_dict() == plain.state_dict()  # what was read ahead is not counted as served
    state = plain.state_dict()
    expected = [next(plain) for _ in range(4)]
    ahead.load_state_dict(state)  # drops the batch it read ahead for the old position
    next(ahead)
    ahead.load_state_dict(state)
    assert all(torch.equal(next(ahead), want) for want in expected)
    ahead.close()
    assert not read_ahead_threads()


def test_read_ahead_stops_at_total_rows_and_close_leaves_no_thread(safetensors_folder):
    store = open_activations(safetensors_folder)
    it = ShuffledBatches(store, batch_size=4, seed=0, total_rows=3 * 4)
    for _ in range(3):
        next(it)
    assert it._pending is None and not read_ahead_threads()  # the run's last batch: nothing read past it
    endless = ShuffledBatches(store, batch_size=4, seed=0)
    next(endless)
    assert endless._pending is not None
    endless.close()
    assert endless._pending is None and not read_ahead_threads()


def test_a_shard_damaged_during_the_run_is_named_from_the_read_ahead_thread(safetensors_folder):
    store = open_activations(safetensors_folder)
    damaged = safetensors_folder / "shard_00001.safetensors"
    readers = []

    class DamagedAfterFirstRead:
        """The store, with the second shard truncated just before the second read."""

        num_rows = store.num_rows

        def rows(self, indices):
            readers.append(threading.current_thread().name)
            if len(readers) == 2:
                damaged.write_bytes(damaged.read_bytes()[:-20])
            return store.rows(indices)

    it = ShuffledBatches(DamagedAfterFirstRead(), batch_size=16, seed=0)  # 16 of 21 rows: both shards
    next(it)
    with pytest.raises(ActivationError, match=r"shard_00001\.safetensors: cannot read its rows") as error:
        next(it)
    assert readers == ["MainThread", READ_AHEAD_THREAD]
    assert "\n" not in str(error.value)
    assert not read_ahead_threads()
