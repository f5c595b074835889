"""One SAE being trained: the SAE, its optimiser and lr schedule, its λ (fixed or steered to a
target L0), its firing tracker, its log and its output folder. A single run trains one; a sweep
(``--l0-coefficient 1e-3,2e-3``) trains one per value, every one on the same batches
(docs/trainer.md#several-saes-from-one-stream)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import sharding
from .checkpoint import capture_rng_state, restore_rng_state
from .errors import UserError
from .optimizer import build_optimizer, follow_schedule
from .report.metrics import FiringTracker
from .report.run_log import RunLog
from .sparsity import sparsity_coefficient
from .step import StepResult

# What a checkpoint holds for each SAE (the rest, the step, stream and RNG, is shared).
STATE_KEYS = ("sae", "optimizer", "scheduler", "sparsity", "step_policy")


@dataclass
class Member:
    name: str | None  # `l0_coefficient-0.002` in a sweep; None for a single run
    cfg: Any  # this SAE's own single-run TrainConfig: its λ or L0 target, its --out
    sae: Any
    optimizer: Any
    scheduler: Any
    coefficient: Any  # λ: warmed up to a fixed value, or steered to --target-l0
    firing: FiringTracker  # features fired since the last log line
    run_log: RunLog | None = None
    last: StepResult | None = None  # the last step's result, for the log line

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def open_log(self, resume_step: int, layout) -> None:
        if layout.is_main:
            self.out.mkdir(exist_ok=True)  # a sweep member's folder inside --out
            self.run_log = RunLog(self.out, self.cfg, resume_step=resume_step)

    def state_dict(self, layout) -> dict:
        """The whole SAE and its optimiser in the single-process format (a collective when features
        are sharded: every rank calls it; only rank 0's is whole)."""
        sae_state, optimizer_state = sharding.gather_states(self.sae, self.optimizer, layout)
        return {
            "sae": sae_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "sparsity": self.coefficient.state_dict(),
            "step_policy": self.sae.step_policy.state_dict(),
        }

    def load_state_dict(self, state: dict, layout, d_sae: int) -> None:
        sae_state, optimizer_state = sharding.shard_states(
            state["sae"], state["optimizer"], self.sae, self.optimizer, layout, d_sae
        )
        self.sae.load_state_dict(sae_state)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        follow_schedule(self.optimizer, self.scheduler)
        self.coefficient.load_state_dict(state.get("sparsity", {}))
        self.sae.step_policy.load_state_dict(state.get("step_policy") or {})  # absent before --step


def build_members(cfg, d_in: int, d_sae: int, layout, device, data_mean: torch.Tensor) -> list[Member]:
    """One Member per SAE of the run. The global RNG is rewound before each SAE is initialised,
    so every member starts exactly as the single run with its value would. ``data_mean``: the
    (scaled) training rows' mean, b_dec's start under ``--b-dec-init mean``."""
    rng = capture_rng_state()
    members = []
    for name, member_cfg in cfg.members():
        restore_rng_state(rng)
        sae = sharding.build_sae(
            d_in,
            d_sae,
            layout,
            device,
            bandwidth=member_cfg.bandwidth,
            init_threshold=member_cfg.init_threshold,
            threshold_param=member_cfg.threshold_param,
            ste_to_input=member_cfg.ste_to_input,
            encoder_init_scale=member_cfg.encoder_init_scale,
            apply_b_dec_to_input=member_cfg.apply_b_dec_to_input,
            step=member_cfg.step,
        )
        if member_cfg.b_dec_init == "mean":
            with torch.no_grad():
                sae.b_dec.copy_(data_mean)
        optimizer, scheduler = build_optimizer(sae, member_cfg)
        coefficient = sparsity_coefficient(member_cfg)
        members.append(Member(name, member_cfg, sae, optimizer, scheduler, coefficient, FiringTracker.for_sae(sae)))
    return members


def pack_states(members: list[Member], states: list[dict]) -> dict:
    """The per-SAE part of a checkpoint: a single run's keys at the top level, as they always
    were; a sweep's under ``members``, by name."""
    if members[0].name is None:
        return states[0]
    return {"members": {member.name: state for member, state in zip(members, states)}}


def unpack_states(checkpoint: dict, members: list[Member], where) -> list[dict]:
    """Each member's state from a checkpoint, in ``members``' order; refused when the checkpoint
    trains other SAEs than this run does."""
    saved = checkpoint.get("members", {None: {k: checkpoint.get(k) for k in STATE_KEYS}})
    names = [member.name for member in members]
    if sorted(saved, key=str) != sorted(names, key=str):
        raise UserError(
            f"--resume: the checkpoint in {where} trains {_describe(list(saved))}, this run {_describe(names)}"
        )
    return [saved[name] for name in names]


def _describe(names: list) -> str:
    return "one SAE (no list of values)" if names == [None] else ", ".join(names)
