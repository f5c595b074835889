"""SAELens loads what the trainer writes (SAE.load_from_disk) and computes the same features.

sae-lens is heavy (transformer-lens, datasets, ...), so it is not a test dependency: this test runs
where it is installed (`pip install sae-lens`) and skips elsewhere.
"""

import numpy as np
import pytest
import torch

from jumprelu_ext.export import load_sae
from jumprelu_ext.train import loop as train

sae_lens = pytest.importorskip("sae_lens")


def test_sae_lens_loads_the_trained_sae(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2000, 16)) * 3.0 + 1.0).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    flags = [
        "--activations",
        str(tmp_path / "x.npy"),
        "--out",
        str(out),
        "--d-sae",
        "64",
        "--batch-size",
        "128",
        "--steps",
        "20",
        "--threshold-lr",
        "1e-2",
        "--init-threshold",
        "0.05",
        "--device",
        "cpu",
    ]
    assert train.main(flags) == 0

    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    ours = load_sae(out)
    raw = torch.from_numpy(x)
    with torch.no_grad():
        their_acts = theirs.encode(raw)
        mine = ours(raw)
        assert torch.equal(their_acts != 0, mine.acts != 0)
        torch.testing.assert_close(their_acts, mine.acts, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(their_acts), mine.reconstruction, rtol=1e-5, atol=1e-5)
