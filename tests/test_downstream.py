"""Downstream cost of splicing a reconstruction in: LM loss for causal LMs, embedding cosine for encoders."""

import json
import math

import pytest
import torch

# transformers is a dependency here and in CI; the bare GPU machine may lack it.
pytest.importorskip("transformers")

from _tiny_models import CORPUS, save_tiny_bert

from jumprelu_ext.sae import JumpReLUSAE
from jumprelu_ext.train.data.harvest import HarvestError, load_model, tokenize
from jumprelu_ext.train.report.downstream import downstream_eval

CAUSAL_KEYS = {"kind", "ce_clean", "ce_spliced", "ce_zero_ablation", "delta_ce", "ce_loss_recovered"}


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_folder):
    return load_model(str(tiny_gpt2_folder), layer=0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return load_model(str(save_tiny_bert(tmp_path_factory.mktemp("bert"))), layer=0)


def windows(loaded):
    return tokenize(loaded.tokenizer, CORPUS, 16, loaded.is_causal_lm)


def assert_plain_floats(result):
    json.dumps(result)
    assert all(type(v) is float for k, v in result.items() if k != "kind")


def test_identity_reconstruction_costs_nothing(gpt2):
    result = downstream_eval(gpt2, lambda x: x, windows(gpt2), batch_size=2)
    assert set(result) == CAUSAL_KEYS and result["kind"] == "causal_lm"
    assert result["delta_ce"] == 0.0 and result["ce_spliced"] == result["ce_clean"]
    assert result["ce_loss_recovered"] == 1.0
    assert_plain_floats(result)


def test_zero_reconstruction_is_zero_ablation(gpt2):
    result = downstream_eval(gpt2, torch.zeros_like, windows(gpt2))
    assert result["delta_ce"] > 0
    assert result["ce_spliced"] == result["ce_zero_ablation"]
    assert result["ce_loss_recovered"] == 0.0


def test_only_kept_positions_of_the_first_sequences_are_spliced(gpt2):
    tokens = windows(gpt2)
    seen = []

    def reconstruct(x):
        seen.append(x.shape)
        return x

    downstream_eval(gpt2, reconstruct, tokens, max_sequences=3, batch_size=2)
    assert [s[0] for s in seen] == [int(tokens.keep[:2].sum()), int(tokens.keep[2:3].sum())]
    assert all(s[1] == gpt2.d_model for s in seen)


def test_sae_reconstruction_gives_finite_plain_floats(gpt2):
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in=gpt2.d_model, d_sae=64)
    result = downstream_eval(gpt2, lambda x: sae(x).reconstruction, windows(gpt2))
    assert set(result) == CAUSAL_KEYS
    assert all(math.isfinite(v) for k, v in result.items() if k != "kind")
    assert_plain_floats(result)


def test_encoder_cosines(bert):
    tokens = windows(bert)
    same = downstream_eval(bert, lambda x: x, tokens)
    assert set(same) == {"kind", "cosine_similarity", "token_cosine_similarity"} and same["kind"] == "encoder"
    assert same["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert same["token_cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert_plain_floats(same)
    zeroed = downstream_eval(bert, torch.zeros_like, tokens)
    assert zeroed["cosine_similarity"] < 0.999 and zeroed["token_cosine_similarity"] < 0.999


def test_no_sequences_to_score(gpt2):
    with pytest.raises(HarvestError, match="positive"):
        downstream_eval(gpt2, lambda x: x, windows(gpt2), max_sequences=0)
