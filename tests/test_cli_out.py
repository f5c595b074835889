"""The trainer's --out folder as a careful user meets it (issue 13, items 1, 2, 3 and 8): OS
errors and damaged checkpoints end in one line and exit 2, a run already in --out is not
silently replaced, outputs honour the umask, stale temp files are cleared, and a failed run
leaves no empty folder behind."""

import errno
import json
import os
import stat
import tempfile

import numpy as np
import pytest
from test_train import small_run_flags

from jumprelu_ext.train import loop
from jumprelu_ext.train.errors import run_cli

D_IN = 16


def flags(activations, out, *extra):
    """test_train's small run, shortened to 4 steps."""
    return small_run_flags(activations, out, "--steps", "4", "--sparsity-warmup-steps", "2", *extra)


@pytest.fixture
def activations(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, D_IN)).astype(np.float32) * 3.0 + 1.0
    path = tmp_path / "acts.npy"
    np.save(path, x)
    return path


def cli(argv, capsys):
    """Run the trainer's CLI in this process (as ``python -m jumprelu_ext.train`` does); returns
    (exit status, the stderr lines that start with ``error:``, all of stderr)."""
    capsys.readouterr()
    status = run_cli(loop.main, argv)
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("error:")], err


def assert_one_line_error(result, *fragments):
    status, errors, err = result
    assert status == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ item 1: OS errors, damaged checkpoints


def test_out_naming_a_file_is_a_one_line_error(activations, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert_one_line_error(cli(flags(activations, a_file), capsys), "notes.txt", "not a folder")
    assert a_file.read_text() == "mine\n"
    # A folder below a file: the OS says why.
    assert_one_line_error(cli(flags(activations, a_file / "run"), capsys), "notes.txt")


def test_an_empty_out_is_refused_instead_of_writing_into_the_current_folder(activations, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert_one_line_error(cli(flags(activations, ""), capsys), "--out is empty")
    assert_one_line_error(cli(flags(activations, "  "), capsys), "--out is empty")
    assert list(here.iterdir()) == []


def test_an_unwritable_out_is_reported_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    """A read-only filesystem (simulated: every file created in --out fails with EROFS, as root
    would see it too) is reported first, before the (here missing) activations are even opened."""
    out = tmp_path / "ro"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(out):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out / "x"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    line = assert_one_line_error(cli(flags(tmp_path / "missing.npy", out), capsys), str(out), "Read-only")
    assert "missing.npy" not in line


def test_os_errors_at_the_cli_boundary_are_one_line(capsys):
    def full_disk(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/eval.json")

    assert_one_line_error(cli_with(full_disk, capsys), "runs/x/eval.json", "No space left on device")


def cli_with(main, capsys):
    capsys.readouterr()
    status = run_cli(main, [])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "garbage", "not-a-checkpoint"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(activations, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert loop.main(flags(activations, out, "--steps", "2")) == 0
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "zero-bytes": b"",
            "garbage": bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
            "not-a-checkpoint": (out / "eval.json").read_bytes(),
        }[damage]
    )
    line = assert_one_line_error(cli(flags(activations, out, "--resume"), capsys), str(checkpoint), "delete it")
    assert "weights_only" not in line


# ------------------------------------------------------------------ item 2: a run in --out is not replaced


@pytest.mark.slow
def test_a_run_in_out_is_refused_unless_resume_or_overwrite(activations, tmp_path, capsys):
    out = tmp_path / "run"
    assert loop.main(flags(activations, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    line = assert_one_line_error(cli(flags(activations, out, "--seed", "1"), capsys), str(out), "--resume")
    assert "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # A started run (a checkpoint, no SAE yet) is refused too.
    (out / "sae_weights.safetensors").unlink()
    assert_one_line_error(cli(flags(activations, out, "--seed", "1"), capsys), "checkpoint.pt")

    assert_one_line_error(cli(flags(activations, out, "--resume", "--overwrite"), capsys), "--resume", "--overwrite")
    (out / "sae_weights.safetensors").write_bytes(before["sae_weights.safetensors"])
    (out / "checkpoint.pt").rename(tmp_path / "checkpoint.pt")  # an SAE, no checkpoint: --resume would start over
    assert_one_line_error(cli(flags(activations, out, "--resume"), capsys), "--resume", "--overwrite")
    (tmp_path / "checkpoint.pt").rename(out / "checkpoint.pt")
    assert cli(flags(activations, out, "--resume"), capsys)[0] == 0
    assert cli(flags(activations, out, "--seed", "1", "--overwrite"), capsys)[0] == 0
    assert json.loads((out / "cfg.json").read_text())["jumprelu_ext"]["extra"]["training_config"]["seed"] == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the new run's rows only


# ------------------------------------------------------------------ item 3: file modes, stale temp files


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_honour_the_umask(activations, tmp_path, umask):
    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert loop.main(flags(activations, out)) == 0
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "sae_weights.safetensors", "cfg.json", "eval.json", "metrics.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ("density.png", "curves.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.slow
def test_stale_temp_files_from_a_killed_write_are_removed_at_start(activations, tmp_path):
    out = tmp_path / "run"
    assert loop.main(flags(activations, out, "--steps", "2")) == 0
    stale = [out / ".checkpoint.pt.k3j2h1g0.tmp", out / ".eval.json.abcdefgh.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = out / "notes.txt"
    keep.write_text("mine\n")
    assert loop.main(flags(activations, out, "--resume")) == 0
    assert not any(path.exists() for path in stale)
    assert keep.read_text() == "mine\n"


# ------------------------------------------------------------------ item 8: no empty --out after a failure


def test_a_failed_run_leaves_no_empty_out_behind(tmp_path, capsys):
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((100, D_IN), np.nan, dtype=np.float32))
    out = tmp_path / "new" / "deeper" / "run"
    assert_one_line_error(cli(flags(nan, out, "--batch-size", "8"), capsys), "nan.npy")
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "mine"  # a folder the user made is left alone
    existing.mkdir()
    assert_one_line_error(cli(flags(nan, existing, "--batch-size", "8"), capsys), "NaN")
    assert existing.is_dir()
