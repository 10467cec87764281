"""The learning-rate schedule of a stage, as a torch LR scheduler stepped once per optimizer step.

A schedule is a list of :class:`Phase`: a stretch of epochs on one setting (its lr, warm-up, cosine /
step / constant curve, its share of a longer cosine). One phase is the usual case (the baseline, the
grouping, the finetune); several are how the same-budget dense control follows the tree's group then
finetune schedule, each phase with its own lr, momentum and weight decay.

The learning rate at step ``s`` is a closed form of ``s``: the scheduler's whole state is the step
(``state_dict()`` is ``{"last_epoch": s}``, JSON), so a checkpoint restores it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Phase:
    """``epochs`` x ``steps_per_epoch`` steps on one setting.

    ``lr``: the phase's base learning rate (each parameter group keeps its ratio to the optimizer's
    default lr, e.g. the assignments' multiplier); None keeps the optimizer's. ``cosine_span``: the
    part of one cosine this phase covers ([0, 0.4] then [0.4, 1] put two stages on one curve).
    ``momentum`` / ``weight_decay``: set on entering the phase when given (weight decay only on the
    groups that had some: norms and biases stay undecayed)."""

    epochs: float
    steps_per_epoch: int
    lr: float | None = None
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    milestones: tuple = ()
    gamma: float = 0.1
    cosine_span: tuple = (0.0, 1.0)
    momentum: float | None = None
    weight_decay: float | None = None

    @property
    def steps(self) -> int:
        return int(round(self.epochs * self.steps_per_epoch))

    def factor(self, step: int) -> float:
        """Multiplier of the phase's lr at its own ``step`` (warm-up, then the curve)."""
        spe = max(self.steps_per_epoch, 1)
        epoch, warm = step / spe, self.warmup_epochs
        if warm > 0 and epoch < warm:
            return (epoch + 1 / spe) / warm
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            return self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        total = max(self.epochs * spe, 1)
        t = min(max(step - warm * spe, 0) / max(total - warm * spe, 1), 1.0)
        start, end = self.cosine_span
        return 0.5 * (1 + math.cos(math.pi * (start + (end - start) * t)))


class PhaseSchedule(torch.optim.lr_scheduler.LRScheduler):
    """``phases`` one after another; ``step()`` after every ``optimizer.step()``. Past the last phase
    the last phase's end holds."""

    def __init__(self, optimizer: torch.optim.Optimizer, phases: list[Phase]):
        if not phases:
            raise ValueError("a schedule needs at least one phase")
        self.phases = list(phases)
        for g in optimizer.param_groups:  # which groups take weight decay, kept through checkpoints
            g.setdefault("initial_weight_decay", g.get("weight_decay", 0.0))
        super().__init__(optimizer)

    def phase_at(self, step: int) -> tuple[Phase, int]:
        """The phase of global ``step`` and the step within it."""
        for phase in self.phases[:-1]:
            if step < phase.steps:
                return phase, step
            step -= phase.steps
        return self.phases[-1], step

    def get_lr(self) -> list[float]:
        return self.lrs_at(self.last_epoch)

    def lrs_at(self, step: int) -> list[float]:
        """Every parameter group's learning rate at global ``step``."""
        phase, step = self.phase_at(max(step, 0))
        ratio = 1.0 if phase.lr is None else phase.lr / self.optimizer.defaults["lr"]
        return [base * ratio * phase.factor(step) for base in self.base_lrs]

    def step(self, epoch=None) -> None:  # noqa: D102 - LRScheduler.step, plus the phase's momentum / decay
        super().step(epoch)
        self._enter_phase()

    def _enter_phase(self) -> None:
        phase, _ = self.phase_at(max(self.last_epoch, 0))
        for g in self.optimizer.param_groups:
            if phase.momentum is not None:
                g["momentum"], g["nesterov"] = phase.momentum, phase.momentum > 0
            if phase.weight_decay is not None:
                g["weight_decay"] = phase.weight_decay if g["initial_weight_decay"] else 0.0

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state["last_epoch"]``: the lr (and the phase's settings) of that step are set now."""
        self.last_epoch = int(state["last_epoch"])
        self._last_lr = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, self._last_lr):
            g["lr"] = lr
        self._enter_phase()
