"""The three SplitNet regularizers (SPLITNET.md, "The three regularizers").

For a weight ``W`` from channel set ``p`` ([G, Din] soft assignment) to ``q`` ([G, Dout]):

1. group weight regularization — group lasso on the off-block-diagonal weight. With
   ``Wsq[i, j]`` = ``W[j, i]**2`` (linear) or the mean over the k x k taps of ``W[j, i]**2`` (conv):
   ``row_g = sum_i (1 - p_gi) * sqrt(sum_j q_gj^2 Wsq_ij)``,
   ``col_g = sum_j (1 - q_gj) * sqrt(sum_i p_gi^2 Wsq_ij)``,
   normalized by ``Din sqrt(Dout)`` and ``sqrt(Din) Dout``; the layer term is
   ``S = sum_g (row_g + col_g) / (2 (G-1) sigma / G)`` with ``sigma`` the init std
   (``sqrt(1/(k^2 Din))`` conv, ``sqrt(1/Din)`` linear), so ``S`` is ~1 for a random dense layer
   under uniform assignments. Layers combine self-weighted: ``sum_l sg(S_l) S_l / sum_l sg(S_l)``.
2. disjoint group assignment: ``sum_{i<j} <q_i, q_j> / (D (G-1) / (2G))`` (1 uniform, 0 one-hot).
3. balanced group assignment: ``sum_g (sum_d q_gd)^2 / (D^2 / G)`` (1 when perfectly balanced).
   2 and 3 are computed once per learned matrix (not per merged use) and averaged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from .models.base import SplitModel

_EPS = 1e-12


def squared_weight(weight: torch.Tensor) -> torch.Tensor:
    """``Wsq`` [Din, Dout]: W**2 for a linear weight [Dout, Din]; spatial mean of W**2 for a conv."""
    w2 = weight.pow(2)
    if w2.dim() > 2:
        w2 = w2.flatten(2).mean(2)
    return w2.t()


def init_std(weight: torch.Tensor) -> float:
    """sigma of the normalization: sqrt(1 / (k*k*Din)) for conv, sqrt(1 / Din) for linear."""
    fan_in = weight[0].numel()
    return math.sqrt(1.0 / fan_in)


def group_weight_term(weight: torch.Tensor, in_groups: torch.Tensor, out_groups: torch.Tensor) -> torch.Tensor:
    """Layer term S of the group weight regularization (a scalar).

    weight: [Dout, Din] or [Dout, Din, k, k]; in_groups p: [G, Din]; out_groups q: [G, Dout].
    """
    groups = in_groups.shape[0]
    din, dout = in_groups.shape[1], out_groups.shape[1]
    wsq = squared_weight(weight)                                   # [Din, Dout]
    row_energy = wsq @ out_groups.pow(2).t()                       # [Din, G]: sum_j q_gj^2 Wsq_ij
    col_energy = in_groups.pow(2) @ wsq                            # [G, Dout]: sum_i p_gi^2 Wsq_ij
    row = ((1 - in_groups).t() * row_energy.clamp_min(_EPS).sqrt()).sum(0) / (din * math.sqrt(dout))
    col = ((1 - out_groups) * col_energy.clamp_min(_EPS).sqrt()).sum(1) / (math.sqrt(din) * dout)
    return (row + col).sum() / (2 * (groups - 1) * init_std(weight) / groups)


def disjoint_term(q: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} <q_i, q_j>, normalized: 1 at uniform, 0 when every column is one-hot. q: [G, D]."""
    groups, size = q.shape
    total = q.sum(0)
    pairs = (total.pow(2) - q.pow(2).sum(0)).sum() / 2           # sum_{i<j} q_i . q_j
    return pairs / (size * (groups - 1) / (2 * groups))


def balance_term(q: torch.Tensor) -> torch.Tensor:
    """sum_g (sum_d q_gd)^2, normalized: 1 when groups are perfectly balanced. q: [G, D]."""
    groups, size = q.shape
    return q.sum(1).pow(2).sum() / (size ** 2 / groups)


@dataclass
class RegularizerWeights:
    """Coefficients of the grouping loss ``CE + disjoint*R_d + weight*R_w + balance*R_b``.

    Reference: (1, 1, 10) for CIFAR-100, (1, 1, 3) for ImageNet-22K.
    """

    disjoint: float = 1.0
    weight: float = 1.0
    balance: float = 10.0


def regularizer_terms(model: SplitModel) -> dict[str, torch.Tensor]:
    """The three regularizers of ``model`` as scalars: ``{"weight", "disjoint", "balance"}``.

    Also returns ``"per_layer"``: the detached layer terms S_l (a [L] tensor), for logging.
    """
    assignments = model.assignments
    terms = []
    for layer in model.split_layers():
        p = assignments.probs(layer.in_set, layer.groups)
        q = assignments.probs(layer.out_set, layer.groups)
        terms.append(group_weight_term(layer.module.weight, p, q))
    learned = [q for _, q in assignments.learned()]
    if not terms:
        zero = torch.zeros((), device=next(model.parameters()).device)
        return {"weight": zero, "disjoint": zero, "balance": zero, "per_layer": zero[None]}
    stacked = torch.stack(terms)
    scale = stacked.detach()
    weight = (scale * stacked).sum() / scale.sum().clamp_min(_EPS)
    disjoint = torch.stack([disjoint_term(q) for q in learned]).mean()
    balance = torch.stack([balance_term(q) for q in learned]).mean()
    return {"weight": weight, "disjoint": disjoint, "balance": balance, "per_layer": scale}


def regularization_loss(model: SplitModel, weights: RegularizerWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """``disjoint*R_d + weight*R_w + balance*R_b`` and the terms as floats (for progress lines)."""
    terms = regularizer_terms(model)
    loss = weights.disjoint * terms["disjoint"] + weights.weight * terms["weight"] + weights.balance * terms["balance"]
    return loss, {k: terms[k].item() for k in ("weight", "disjoint", "balance")}


def parameter_groups(model, lr: float, weight_decay: float, split_lr_mult: float = 1.0,
                     assignment_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer groups with their own ``lr``: weights (with weight decay), split-layer weights
    (``lr * split_lr_mult``, e.g. 10x when grouping a pretrained net), assignments (no weight
    decay, ``lr * assignment_lr_mult``). BatchNorm parameters and biases get no weight decay.
    Works for a dense :class:`SplitModel` and, without the split/assignment groups, any module."""
    split_ids = set()
    split_layers = model.split_layers() if isinstance(model, SplitModel) else []
    for layer in split_layers:
        split_ids.add(id(layer.module.weight))
        if getattr(layer.module, "bias", None) is not None:
            split_ids.add(id(layer.module.bias))
    assign_ids = {id(p) for p in model.assignments.parameters()} if isinstance(model, SplitModel) else set()
    decay, no_decay, split_decay, split_no_decay, assign = [], [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in assign_ids:
            assign.append(param)
            continue
        is_split = id(param) in split_ids
        if param.dim() <= 1:
            (split_no_decay if is_split else no_decay).append(param)
        else:
            (split_decay if is_split else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "name": "norm_bias"},
        {"params": split_decay, "weight_decay": weight_decay, "lr": lr * split_lr_mult, "name": "split_weights"},
        {"params": split_no_decay, "weight_decay": 0.0, "lr": lr * split_lr_mult, "name": "split_bias"},
        {"params": assign, "weight_decay": 0.0, "lr": lr * assignment_lr_mult, "name": "assignments"},
    ]
    return [g for g in groups if g["params"]]


def freeze_split_bn_scale(model: SplitModel) -> int:
    """Reference trick during grouping: freeze the BatchNorm scale (gamma) of split layers.

    Returns how many BatchNorm layers were frozen.
    """
    count = 0
    graph = model.split_graph()
    for spec in graph.blocks:
        if model.stage_groups[spec.stage] > 1:
            for _, bn, _ in spec.block.norms():
                bn.weight.requires_grad_(False)
                count += 1
    if model.head_norm is not None and model.fc_groups > 1:
        model.head_norm.weight.requires_grad_(False)
        count += 1
    return count
