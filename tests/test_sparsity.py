"""The sparsity coefficient: the fixed warm-up and the --target-l0 controller
(docs/trainer.md#reaching-a-target-l0). The trainer's own run to a target is in test_recipe.py."""

import math

import pytest
import torch

from jumprelu_ext import JumpReLUSAE
from jumprelu_ext.train.sparsity import FixedCoefficient, TargetL0Controller


def test_a_fixed_coefficient_warms_up():
    fixed = FixedCoefficient(0.2, warmup_steps=4)
    assert [fixed.at(s) for s in (0, 2, 4, 9)] == [0.0, 0.1, 0.2, 0.2]


def test_lambda_rises_above_the_target_falls_below_and_holds_at_it():
    controller = TargetL0Controller(target=40, initial=1e-3)
    controller.observe(400)
    raised = controller.at(0)
    assert 1e-3 < raised <= 1e-3 * math.exp(controller.max_change) * (1 + 1e-12)  # at most ~5% a step
    for _ in range(30):
        controller.observe(4)
    assert controller.at(0) < 1e-3
    held = TargetL0Controller(target=40, initial=1e-3)
    for _ in range(10):
        held.observe(40)
    assert held.at(0) == pytest.approx(1e-3, rel=1e-12)


def test_state_round_trips_so_a_resumed_run_steers_the_same():
    l0s = [900, 500, 200, 90, 60, 45, 38, 36, 39, 41, 40, 42]
    straight = TargetL0Controller(target=40, initial=4e-3)
    for l0 in l0s:
        straight.observe(l0)
    first = TargetL0Controller(target=40, initial=4e-3)
    for l0 in l0s[:5]:
        first.observe(l0)
    resumed = TargetL0Controller(target=40, initial=1.0)
    resumed.load_state_dict(first.state_dict())
    for l0 in l0s[5:]:
        resumed.observe(l0)
    assert resumed.state_dict() == straight.state_dict() and resumed.at(0) == straight.at(0)


def _synthetic_run(controller, steps, d_in=16, d_sae=64, batch=256):
    """A small real training run: an SAE on sparse synthetic activations, Adam (β1 = 0, θ with a
    learning rate of its own, as in the trainer), λ from the controller. Returns the batch L0s."""
    g = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(128, d_in, generator=g), dim=1)
    codes = (torch.rand(4096, 128, generator=g) < 0.05) * torch.rand(4096, 128, generator=g).add(0.5)
    x = codes @ dictionary + 0.05 * torch.randn(4096, d_in, generator=g)
    x = x / x.pow(2).sum(1).mean().sqrt()
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in, d_sae, bandwidth=0.02, init_threshold=0.02, encoder_init_scale=0.1)
    theta = sae.log_threshold
    weights = [p for p in sae.parameters() if p is not theta]
    optimizer = torch.optim.Adam([{"params": weights}, {"params": [theta], "lr": 0.02}], lr=3e-3, betas=(0.0, 0.999))
    l0s = []
    for step in range(steps):
        loss = sae.loss(x[torch.randint(0, len(x), (batch,), generator=g)], controller.at(step))
        optimizer.zero_grad()
        loss.total.backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        sae.normalize_decoder()
        controller.observe(loss.l0.item())
        l0s.append(loss.l0.item())
    return l0s


@pytest.mark.slow
@pytest.mark.parametrize("target", [4, 12])
def test_a_small_synthetic_run_settles_at_the_target_without_swinging(target):
    l0s = _synthetic_run(TargetL0Controller(target=target, initial=1e-3), steps=500)
    window = 25  # batch L0 is noisy; judge averages over windows of steps
    means = [sum(l0s[i : i + window]) / window for i in range(0, len(l0s), window)]
    assert means[-1] == pytest.approx(target, rel=0.1)
    reached = next(i for i, m in enumerate(means) if abs(m / target - 1) < 0.2)
    assert all(abs(m / target - 1) < 0.25 for m in means[reached:])  # no swing past the target and back
