"""One SAE's training step on one batch, the one place a step happens: the loss (the dense or the
sparse step, docs/ops.md#the-sparse-step), its backward, the data-parallel gradient, the
decoder-row constraint, clipping, Adam and the lr schedule, θ's clamp and λ's controller
(docs/trainer.md#the-training-step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed
from .optimizer import clip_grad_norm_, keep_threshold_nonnegative


@dataclass(frozen=True)
class StepResult:
    """What a step reports to the log: loss terms on this rank's rows (each a share of the global
    batch's mean), the λ it used, the global gradient norm before clipping, and which step ran."""

    loss: torch.Tensor
    mse: torch.Tensor
    l0: torch.Tensor
    l0_coefficient: float
    grad_norm: float
    path: str  # "dense" or "sparse"


def take_step(member, x: torch.Tensor, rows: int, step: int, autocast, layout) -> StepResult:
    """``member``'s SAE takes one optimiser step on ``x`` (this rank's rows of a global batch of
    ``rows``); the forward kernel adds this batch's fires to the member's firing tracker."""
    sae, cfg = member.sae, member.cfg
    l0_coefficient = member.coefficient.at(step)
    with autocast:
        loss = sae.loss(
            x,
            l0_coefficient,
            sparsity_loss=cfg.sparsity_loss,
            tanh_scale=cfg.tanh_scale,
            pre_act_loss_coefficient=cfg.pre_act_loss_coefficient,
            num_rows=rows,
            fire_counts=member.firing.counts,
        )
    member.optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    distributed.all_reduce_gradients(sae.parameters(), layout)  # data parallel: the global gradient
    sae.remove_parallel_decoder_grad()  # keep decoder rows on the unit sphere ...
    grad_norm = clip_grad_norm_(sae, cfg.max_grad_norm, layout)
    member.optimizer.step()
    member.scheduler.step()
    sae.normalize_decoder()  # ... and undo the step's drift off it
    keep_threshold_nonnegative(sae)
    if cfg.target_l0 is not None:
        member.coefficient.observe(distributed.global_mean(loss.l0, layout))
    member.firing.add_tokens(x.shape[0])
    # Detached: the log line needs the numbers, not the graph or the activations.
    return StepResult(loss.total.detach(), loss.mse.detach(), loss.l0.detach(), l0_coefficient, grad_norm, loss.step)
