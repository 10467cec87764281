"""Knowledge distillation (Hinton et al., 2015): the tree also learns from a dense teacher's soft targets.

The finetuned tree has fewer weights than the dense model it was cut from; its parent (the grouped
dense model, or the dense baseline) still knows how the classes resemble each other, which the
one-hot labels do not say. The student's loss becomes

    (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(``T^2`` keeps the soft term's gradients on the scale of the CE's as ``T`` grows). The teacher is
frozen: evaluation mode (its BatchNorm statistics never move), no parameter requires a gradient,
and its forward runs under ``torch.no_grad`` — no graph is built for it and none of its gradients is
ever computed. ``w = 0`` is plain CE, bit for bit, and skips the teacher's forward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                      weight: float, ce: torch.Tensor | None = None) -> torch.Tensor:
    """``(1 - weight) * CE + weight * T^2 * KL(teacher_T || student_T)``, means over the batch.
    ``ce``: the student's cross-entropy when the caller has it already."""
    if ce is None:
        ce = F.cross_entropy(student, labels)
    if weight == 0:
        return ce
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.detach() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * ce + weight * (t * t) * soft


class Distiller:
    """A frozen ``teacher`` and the loss the student trains on (:func:`distillation_loss`).

    ``amp_dtype``: autocast the teacher's forward as the student's is; ``channels_last``: feed it NHWC.
    """

    def __init__(self, teacher: torch.nn.Module, temperature: float = 4.0, weight: float = 0.5,
                 amp_dtype: torch.dtype | None = None):
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.amp_dtype = amp_dtype

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()  # whatever a caller did to it: its BatchNorm statistics are the teacher's
        with (torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
              else contextlib.nullcontext()):
            return self.teacher(x).float()

    def loss(self, logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
             ce: torch.Tensor | None = None) -> torch.Tensor:
        """The student's loss on a batch ``x`` whose logits (float32) are ``logits``."""
        if self.weight == 0:
            return F.cross_entropy(logits, labels) if ce is None else ce
        return distillation_loss(logits, self.teacher_logits(x), labels, self.temperature, self.weight, ce)
