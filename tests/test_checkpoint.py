"""Checkpointing (atomic save, full-state round trip, RNG restore) and SAELens-layout export."""

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from jumprelu_ext import JumpReLUSAE
from jumprelu_ext.export import load_sae, save_sae
from jumprelu_ext.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _tiny_state(step=0, value=0.0):
    return {"sae": {"w": torch.full((3,), value)}, "optimizer": {"state": {}, "param_groups": []}, "step": step}


def _train_state(tmp_seed=0):
    torch.manual_seed(tmp_seed)
    sae = JumpReLUSAE(8, 16, bandwidth=0.05, init_threshold=0.05)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.0, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(2):
        x = torch.randn(32, 8)
        loss = sae.loss(x, 0.1).total
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sched.step()
        sae.normalize_decoder()
    return sae, opt, sched


def test_atomic_save_leaves_no_temp_files(tmp_path):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _tiny_state(1))
    save_checkpoint(p, _tiny_state(2))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert load_checkpoint(p)["step"] == 2


def test_crash_during_replace_keeps_old_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _tiny_state(1, 1.0))

    def boom(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(p, _tiny_state(2, 2.0))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # temp file cleaned up
    old = load_checkpoint(p)
    assert old["step"] == 1 and torch.equal(old["sae"]["w"], torch.full((3,), 1.0))


def test_crash_during_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _tiny_state(1))

    def bad_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", bad_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, _tiny_state(2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert load_checkpoint(p)["step"] == 1


def test_full_state_round_trip_and_rng_restore(tmp_path):
    sae, opt, sched = _train_state()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian around
    state = {
        "sae": sae.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 2,
        "rng": capture_rng_state(),
        "data": {"shard": 3, "offset": 4096},
        "config": {"lr": 1e-3, "l0_coefficient": 0.1, "betas": [0.0, 0.999]},
        "input_scale": 0.25,
    }
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, state)

    # Scramble every RNG, then restore from the file loaded with weights_only=True.
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    loaded = load_checkpoint(p, map_location="cpu", weights_only=True)
    restore_rng_state(loaded["rng"])
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert got[3] == expected[3]

    # Model / optimizer / scheduler restore into fresh objects and continue identically.
    sae2 = JumpReLUSAE(8, 16, bandwidth=0.05, init_threshold=0.05)
    opt2 = torch.optim.Adam(sae2.parameters(), lr=1e-3, betas=(0.0, 0.999))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))
    sae2.load_state_dict(loaded["sae"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert loaded["step"] == 2 and loaded["data"] == {"shard": 3, "offset": 4096}
    assert loaded["input_scale"] == 0.25 and loaded["config"]["l0_coefficient"] == 0.1
    assert sched2.get_last_lr() == sched.get_last_lr()
    x = torch.randn(32, 8)
    for model, o, s in ((sae, opt, sched), (sae2, opt2, sched2)):
        loss = model.loss(x, 0.1).total
        o.zero_grad()
        loss.backward()
        o.step()
        s.step()
    for (n, a), (_, b) in zip(sae.named_parameters(), sae2.named_parameters()):
        assert torch.equal(a, b), n


def test_missing_and_corrupt_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _tiny_state(1))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="checkpoint.pt"):
        load_checkpoint(p)
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        load_checkpoint(p)
    torch.save([1, 2, 3], p)
    with pytest.raises(ValueError, match="does not hold a dict"):
        load_checkpoint(p)


def _random_sae(seed, threshold_param="log", apply_b_dec_to_input=False):
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(
        12,
        40,
        bandwidth=0.01,
        init_threshold=0.1,
        threshold_param=threshold_param,
        apply_b_dec_to_input=apply_b_dec_to_input,
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(12, 40, generator=g) * 0.5)
        sae.W_dec.copy_(torch.randn(40, 12, generator=g) * 0.5)
        sae.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(12, generator=g) * 0.3)
        theta = torch.rand(40, generator=g) * 0.5 + 0.05
        if threshold_param == "log":
            sae.log_threshold.copy_(theta.log())
        else:
            sae.threshold.copy_(theta)
    return sae


@pytest.mark.parametrize("threshold_param", ["log", "raw"])
@pytest.mark.parametrize("load_param", ["raw", "log"])
@pytest.mark.parametrize("centred", [False, True], ids=["plain", "b_dec-centred"])
def test_fold_back_saved_sae_on_raw_equals_trained_on_scaled(tmp_path, threshold_param, load_param, centred):
    c = 0.37
    sae = _random_sae(0, threshold_param, apply_b_dec_to_input=centred)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1)) * 3.0
    trained = sae(c * x)
    assert 0 < (trained.acts != 0).float().mean() < 1  # a meaningful mix of on / off features
    save_sae(sae, tmp_path, input_scale=c, extra_cfg={"model_name": "m", "hook_name": "h"})
    loaded = load_sae(tmp_path, threshold_param=load_param)
    out = loaded(x)
    torch.testing.assert_close(out.acts, trained.acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction, trained.reconstruction / c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.l0, trained.l0)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]


def test_export_cfg_and_safetensors_layout(tmp_path):
    sae = _random_sae(2)
    extra = {
        "model_name": "gpt2",
        "hook_name": "blocks.6.hook_resid_post",
        "layer": 6,
        "training": {"lr": 7e-5, "steps": 1000},
        "architecture": "should-not-clash",
    }
    save_sae(sae, tmp_path, input_scale=2.0, extra_cfg=extra)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 40
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    md = cfg["metadata"]
    assert md["model_name"] == "gpt2" and md["hook_name"] == "blocks.6.hook_resid_post" and md["hook_layer"] == 6
    assert md["sae_lens_version"] >= "6"
    ours = cfg["jumprelu_ext"]
    assert ours["input_scale"] == 2.0 and ours["input_scale_folded"] is True
    assert ours["bandwidth"] == 0.01 and ours["extra"]["training"] == {"lr": 7e-5, "steps": 1000}

    shapes = {"W_enc": (12, 40), "W_dec": (40, 12), "b_enc": (40,), "b_dec": (12,), "threshold": (40,)}
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(shapes)
        for k, shape in shapes.items():
            t = f.get_tensor(k)
            assert t.dtype == torch.float32 and tuple(t.shape) == shape and t.is_contiguous(), k
        torch.testing.assert_close(f.get_tensor("threshold"), sae.threshold.detach())
        torch.testing.assert_close(f.get_tensor("W_enc"), sae.W_enc.detach() * 2.0)


def test_save_sae_rejects_bad_scale(tmp_path):
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_scale"):
            save_sae(_random_sae(0), tmp_path, input_scale=bad, extra_cfg={})


def test_load_sae_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
