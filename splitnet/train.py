"""Training and evaluation loops in plain PyTorch (Ray Train wraps these; nothing here imports Ray).

``train_one_epoch`` adds the SplitNet grouping objective to the cross-entropy when a
:class:`~splitnet.grouping.Grouping` is given (the grouping stage: regularizers, proximal step,
phases); without it it is plain training (baseline, finetune). The step itself never waits for the
device: losses, accuracy and the regularizer terms are summed on the device and read once per
``log_every`` steps and at the end of the epoch.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .grouping import MIN_GROUP_SHARE, Grouping, GroupingSchedule
from .metrics import topk_correct
from .regularizers import RegularizerWeights

TERMS = ("weight", "disjoint", "balance")


def _prox_lr(optimizer: torch.optim.Optimizer) -> float:
    """The split weights' effective step ``lr / (1 - momentum)`` (what a gradient step moves them by)."""
    groups = optimizer.param_groups
    g = next((g for g in groups if g.get("name") == "split_weights"), groups[0])
    return g["lr"] / max(1.0 - g.get("momentum", 0.0), 1e-3)


class CompiledForward(torch.nn.Module):
    """``module``'s training forward through ``torch.compile``, falling back to ``module`` itself.

    Compilation happens at the first call; where it fails (no working C++ compiler for Inductor
    on a CPU node, an op Dynamo cannot trace, an old GPU), ``warn`` gets one line naming the error
    and every later call runs eager: a run never dies of an optimization. The wrapper holds no
    parameters of its own (``state_dict`` is ``module``'s, saved from ``module``); ``train()`` /
    ``eval()`` reach ``module``. Evaluation keeps the eager module (one graph, not two).

    Measured (``benchmarks/train_step.py --compile``, CPU, bf16 + channels-last): see docs/scaling.md.
    """

    def __init__(self, module: torch.nn.Module, warn: Callable[[str], None] = print, **compile_kwargs):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_compiled", torch.compile(module, **{"dynamic": False, **compile_kwargs}))
        self._warn = warn
        self.failed: str | None = None

    def forward(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eager instead
                first = (str(e).strip().splitlines() or [""])[0]
                self.failed = f"{type(e).__name__}: {first[:200]}"
                self._warn(f"torch.compile failed ({self.failed}); training continues eager")
        return self.module(*args, **kwargs)


def train_one_epoch(model: torch.nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, *,
                    grouping: Grouping | None = None, reg_weights: RegularizerWeights | None = None,
                    split_model=None, device="cpu", max_steps: int | None = None,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False, global_step: int = 0,
                    log_every: int = 0, on_log: Callable[[dict], None] | None = None,
                    scheduler=None, after_step: Callable[[int], None] | None = None, distill=None) -> dict:
    """One pass over ``batches`` of (images [B,3,H,W], labels [B]).

    ``grouping``: the grouping stage's driver (its phase follows ``global_step``, the stage's step
    count before this epoch). ``reg_weights`` alone means the reference objective at every step.
    ``split_model``: the module whose assignments the regularizers read (defaults to ``model``;
    differs when ``model`` is wrapped, e.g. by DDP). ``amp_dtype``: autocast the forward pass
    (e.g. ``torch.bfloat16``, also on CPUs with AVX-512 BF16); the regularizers stay in float32.
    ``channels_last``: feed NHWC images (faster convolutions on CPU and GPU). ``scheduler``: a torch LR
    scheduler stepped after every step (:class:`~splitnet.schedule.PhaseSchedule`); ``after_step(i)``
    runs after step ``i`` (checkpoints).
    ``on_log(stats)`` gets the running means every ``log_every`` steps (the only other host sync).
    ``distill``: a :class:`~splitnet.distill.Distiller`; the loss is then its mix of the cross-entropy
    and the teacher's soft targets (``ce`` stays the plain cross-entropy in the returned means).
    Returns mean loss, ce, accuracy, images/s and, when grouping, the mean regularizer terms.
    """
    model.train()
    split_model = split_model if split_model is not None else model
    if grouping is None and reg_weights is not None:
        grouping = Grouping(split_model, reg_weights, GroupingSchedule(method="reference"), total_steps=0)
    dev = torch.device(device)
    # running sums on the device: loss, ce, correct, images, and the terms (with the steps that had them)
    sums = torch.zeros(4 + len(TERMS) + 1, dtype=torch.float64, device=dev)
    steps = 0
    start = time.perf_counter()
    device_type = dev.type
    for x, y in batches:
        if max_steps is not None and steps >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()):
            logits = model(x)
        logits = logits.float()
        ce = F.cross_entropy(logits, y)
        loss = ce if distill is None else distill.loss(logits, x, y, ce)
        terms = {}
        if grouping is not None:
            reg, terms = grouping.loss(global_step + steps)
            if reg is not None:
                loss = loss + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if grouping is not None:
            grouping.after_step(global_step + steps, _prox_lr(optimizer))  # at the lr of the step just taken
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        # in place on the device, python scalars as kernel arguments: no host sync, no host->device copy
        sums[:3] += torch.stack([loss.detach() * n, ce.detach() * n, (logits.detach().argmax(1) == y).sum()]).to(sums.dtype)
        sums[3] += n
        if terms:
            sums[4:4 + len(TERMS)] += torch.stack([terms[k] for k in TERMS]).to(sums.dtype) * n
            sums[-1] += n
        steps += 1
        if log_every and on_log is not None and steps % log_every == 0:
            on_log(_means(sums.tolist(), steps, time.perf_counter() - start))
        if after_step is not None:
            after_step(steps)
        if max_steps is not None and steps >= max_steps:
            break
    out = _means(sums.tolist(), steps, time.perf_counter() - start)
    if grouping is None:
        for k in TERMS:
            out.pop(k, None)
    return out


def _means(sums: list[float], steps: int, elapsed: float) -> dict:
    """Running sums -> means; raises FloatingPointError when the loss is no longer finite."""
    loss, ce, correct, seen = sums[:4]
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss / max(seen, 1)} after {steps} steps; lower the learning rate")
    out = {"loss": loss / max(seen, 1), "ce": ce / max(seen, 1), "acc": correct / max(seen, 1),
           "images": int(seen), "images_per_s": seen / max(elapsed, 1e-9), "steps": steps}
    reg_seen = sums[-1]
    for i, k in enumerate(TERMS):
        out[k] = sums[4 + i] / reg_seen if reg_seen else float("nan")
    return out


def evaluate(model: torch.nn.Module, batches: Iterable, device="cpu", amp_dtype: torch.dtype | None = None,
             max_batches: int | None = None, channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` (eval mode) over ``batches``. The
    model's mode is restored after: evaluating in the middle of an epoch does not leave the rest of
    the epoch training with frozen BatchNorm statistics."""
    return evaluate_models({"model": model}, batches, device, amp_dtype, max_batches, channels_last)["model"]


@torch.inference_mode()
def evaluate_models(models: dict[str, torch.nn.Module], batches: Iterable, device="cpu",
                    amp_dtype: torch.dtype | None = None, max_batches: int | None = None,
                    channels_last: bool = False) -> dict[str, dict]:
    """:func:`evaluate` for several models over one pass of ``batches`` (each batch read once):
    ``{name: {"top1", "top5", "loss", "images"}}``."""
    modes = {name: m.training for name, m in models.items()}
    sums = {name: [0, 0, 0.0] for name in models}  # top-1 hits, top-5 hits, summed loss
    n = 0
    device_type = torch.device(device).type
    try:
        for m in models.values():
            m.eval()
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for name, m in models.items():
                with (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()):
                    logits = m(x)
                logits = logits.float()
                hits = topk_correct(logits, y, (1, 5))
                s = sums[name]
                s[0], s[1] = s[0] + hits[1], s[1] + hits[5]
                s[2] += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: {"top1": s[0] / max(n, 1), "top5": s[1] / max(n, 1), "loss": s[2] / max(n, 1), "images": n}
            for name, s in sums.items()}


def format_epoch(stage: str, epoch: int, epochs: int, stats: dict, val: dict | None = None,
                 eta_s: float | None = None) -> str:
    """One progress line: ``[group] epoch 3/10 | loss 2.91 | ce 2.41 | acc 0.38 | ... | 812 img/s``.

    While grouping, ``stats`` may also hold ``phase`` and ``off_block`` (the largest off-block
    energy fraction of any split layer), printed after the regularizer terms, and
    ``smallest_group`` / ``smallest_group_set``, printed when a group is collapsing (under 25% of
    its balanced size).
    """
    parts = [f"[{stage}] epoch {epoch}/{epochs}", f"loss {stats['loss']:.3f}", f"ce {stats['ce']:.3f}",
             f"acc {stats['acc']:.3f}"]
    for k in TERMS:
        if k in stats and math.isfinite(stats[k]):
            parts.append(f"{k} {stats[k]:.3f}")
    if "phase" in stats:
        parts.append(f"phase {stats['phase']}")
    if "off_block" in stats:
        parts.append(f"off-block {stats['off_block']:.2%}")
    if stats.get("smallest_group") is not None and stats["smallest_group"] < MIN_GROUP_SHARE:
        parts.append(f"smallest group {stats['smallest_group']:.0%} ({stats.get('smallest_group_set', '?')})")
    if val:
        parts.append(f"val top1 {val['top1']:.3f}")
    parts.append(f"{stats['images_per_s']:.0f} img/s")
    if eta_s is not None:
        parts.append(f"ETA {_clock(eta_s)}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
