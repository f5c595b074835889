"""The trainer recovers known features from synthetic superposition data.

48 ground-truth unit directions in 24 dimensions (twice as many features as dimensions, so
they overlap); each sample switches each feature on with probability 0.04 at a magnitude in
[1, 2]. A JumpReLU SAE trained by ``python -m jumprelu_ext.train`` on these activations must
have, for every true feature on average, a decoder row with cosine similarity ≥ 0.9.
"""

import numpy as np
import pytest

from jumprelu_ext.export import load_sae
from jumprelu_ext.train import loop as train

pytestmark = pytest.mark.slow  # a training run of hundreds of steps

D_IN, N_TRUE, N_SAMPLES = 24, 48, 40_000


def superposition_data(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(N_TRUE, D_IN))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    active = rng.random((N_SAMPLES, N_TRUE)) < 0.04
    magnitudes = rng.uniform(1.0, 2.0, size=(N_SAMPLES, N_TRUE))
    return features, ((active * magnitudes) @ features).astype(np.float32)


def test_sae_recovers_ground_truth_features(tmp_path):
    features, x = superposition_data()
    np.save(tmp_path / "x.npy", x)
    flags = [
        "--activations",
        str(tmp_path / "x.npy"),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--d-sae",
        "96",
        "--batch-size",
        "256",
        "--steps",
        "1500",
        "--lr",
        "3e-3",
        "--lr-warmup-steps",
        "50",
        "--l0-coefficient",
        "3e-2",
        "--sparsity-warmup-steps",
        "300",
        "--threshold-lr",
        "1e-2",
        "--init-threshold",
        "0.1",
        "--bandwidth",
        "0.05",
        "--log-every",
        "250",
    ]
    assert train.main(flags) == 0

    decoder = load_sae(tmp_path / "run").W_dec.detach().double().numpy()
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    best_cosine = (features @ decoder.T).max(axis=1)
    assert best_cosine.mean() >= 0.9, best_cosine
