"""Learning-rate and sparsity-coefficient schedules."""

import math

import pytest

from jumprelu_ext.train.config import CHOICES
from jumprelu_ext.train.schedules import DECAYS, l0_coefficient_at, lr_factor


@pytest.mark.parametrize("decay", DECAYS)
def test_lr_warmup_is_linear_and_ends_at_one(decay):
    assert lr_factor(0, 10, 100, decay) == pytest.approx(0.1)  # the first step is not zero
    assert lr_factor(4, 10, 100, decay) == pytest.approx(0.5)
    assert lr_factor(9, 10, 100, decay) == 1.0
    assert lr_factor(10, 10, 100, decay) == 1.0


def test_lr_constant_after_warmup():
    assert all(lr_factor(s, 10, 100) == 1.0 for s in (10, 50, 99, 100, 1000))


def test_lr_cosine_decay():
    # warm-up 10, total 110: cosine over steps 10..110
    assert lr_factor(10, 10, 110, "cosine") == 1.0
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_factor(35, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(500, 10, 110, "cosine") == 0.0
    values = [lr_factor(s, 10, 110, "cosine") for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_tail_decay():
    # total 1000: constant to step 800, then a straight line to 0 at step 1000
    assert all(lr_factor(s, 10, 1000, "tail") == 1.0 for s in (10, 500, 800))
    assert lr_factor(900, 10, 1000, "tail") == pytest.approx(0.5)
    assert lr_factor(999, 10, 1000, "tail") == pytest.approx(0.005)
    assert lr_factor(1000, 10, 1000, "tail") == 0.0 and lr_factor(2000, 10, 1000, "tail") == 0.0
    assert lr_factor(2, 0, 3, "tail") == pytest.approx(1.0)  # a tail of at least one step


def test_lr_without_warmup():
    assert lr_factor(0, 0, 100) == 1.0
    assert lr_factor(0, 0, 100, "cosine") == 1.0
    assert lr_factor(50, 0, 100, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args",
    [
        (-1, 10, 100),
        (0, -1, 100),
        (0, 10, -1),
        (1.0, 10, 100),
        (0, 10.0, 100),
        (True, 10, 100),
        (0, 10, 100, "linear"),
    ],
)
def test_lr_bad_arguments(args):
    with pytest.raises(ValueError):
        lr_factor(*args)


def test_l0_coefficient_warms_up_linearly_from_zero():
    assert l0_coefficient_at(0, 2.0, 10) == 0.0
    assert l0_coefficient_at(5, 2.0, 10) == pytest.approx(1.0)
    assert l0_coefficient_at(9, 2.0, 10) == pytest.approx(1.8)
    assert all(l0_coefficient_at(s, 2.0, 10) == 2.0 for s in (10, 11, 10_000))


def test_l0_coefficient_without_warmup():
    assert l0_coefficient_at(0, 3.0, 0) == 3.0
    assert isinstance(l0_coefficient_at(0, 3, 0), float)


@pytest.mark.parametrize(
    "args",
    [(-1, 1.0, 10), (0, 1.0, -1), (0.5, 1.0, 10), (0, -1.0, 10), (0, math.nan, 10), (0, math.inf, 10), (0, "1", 10)],
)
def test_l0_coefficient_bad_arguments(args):
    with pytest.raises(ValueError):
        l0_coefficient_at(*args)


def test_decay_names_match_the_config_choices():
    assert CHOICES["lr_decay"] == DECAYS
