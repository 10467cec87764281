"""Training and evaluation loops in plain PyTorch (Ray Train wraps these; nothing here imports Ray).

``train_one_epoch`` adds the SplitNet regularizers to the cross-entropy when ``reg_weights`` is
given (the grouping stage); without them it is plain training (baseline, finetune).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .metrics import topk_correct
from .regularizers import RegularizerWeights, regularization_loss


def train_one_epoch(model: torch.nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, *,
                    reg_weights: RegularizerWeights | None = None, split_model=None, device="cpu",
                    max_steps: int | None = None, amp_dtype: torch.dtype | None = None,
                    before_step: Callable[[int], None] | None = None,
                    after_step: Callable[[int], None] | None = None) -> dict:
    """One pass over ``batches`` of (images [B,3,H,W], labels [B]).

    ``split_model``: the module whose assignments the regularizers read (defaults to ``model``;
    differs when ``model`` is wrapped, e.g. by DDP). ``amp_dtype``: autocast the forward pass
    (e.g. ``torch.bfloat16``); the regularizers stay in float32. ``before_step(i)`` runs before
    step ``i`` (a learning-rate schedule), ``after_step(i)`` after it (mid-epoch checkpoints).
    Returns mean loss, ce, accuracy, images/s and, when grouping, the mean regularizer terms.
    """
    model.train()
    split_model = split_model if split_model is not None else model
    totals = {"loss": 0.0, "ce": 0.0, "weight": 0.0, "disjoint": 0.0, "balance": 0.0}
    seen = correct = steps = 0
    start = time.perf_counter()
    device_type = torch.device(device).type
    for x, y in batches:
        if max_steps is not None and steps >= max_steps:
            break
        if before_step is not None:
            before_step(steps)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()):
            logits = model(x)
        logits = logits.float()
        ce = F.cross_entropy(logits, y)
        loss = ce
        if reg_weights is not None:
            reg, terms = regularization_loss(split_model, reg_weights)
            loss = ce + reg
            for k, v in terms.items():
                totals[k] += v * len(y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {steps}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += loss.item() * len(y)
        totals["ce"] += ce.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        steps += 1
        if after_step is not None:
            after_step(steps)
        if max_steps is not None and steps >= max_steps:
            break
    elapsed = time.perf_counter() - start
    out = {k: v / max(seen, 1) for k, v in totals.items()}
    if reg_weights is None:
        for k in ("weight", "disjoint", "balance"):
            out.pop(k)
    out.update(acc=correct / max(seen, 1), images=seen, images_per_s=seen / max(elapsed, 1e-9), steps=steps)
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterable, device="cpu", amp_dtype: torch.dtype | None = None,
             max_batches: int | None = None) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` (eval mode) over ``batches``."""
    model.eval()
    n = top1 = top5 = 0
    loss = 0.0
    device_type = torch.device(device).type
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        with (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()):
            logits = model(x)
        logits = logits.float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        hits = topk_correct(logits, y, (1, 5))
        top1 += hits[1]
        top5 += hits[5]
        n += len(y)
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "loss": loss / max(n, 1), "images": n}


def format_epoch(stage: str, epoch: int, epochs: int, stats: dict, val: dict | None = None) -> str:
    """One progress line: ``[group] epoch 3/10 loss 2.91 ce 2.41 acc 0.38 ... 812 img/s``."""
    parts = [f"[{stage}] epoch {epoch}/{epochs}", f"loss {stats['loss']:.3f}", f"ce {stats['ce']:.3f}",
             f"acc {stats['acc']:.3f}"]
    for k in ("weight", "disjoint", "balance"):
        if k in stats:
            parts.append(f"{k} {stats[k]:.3f}")
    if val:
        parts.append(f"val top1 {val['top1']:.3f}")
    parts.append(f"{stats['images_per_s']:.0f} img/s")
    return " | ".join(parts)

