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

from .models.base import CLASSES, SplitModel

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


def regularizer_terms_reference(model: SplitModel) -> dict[str, torch.Tensor]:
    """:func:`regularizer_terms` written layer by layer, as the formulas read (the fused version is
    tested against it). Same keys and values."""
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


def regularizer_terms(model: SplitModel) -> dict[str, torch.Tensor]:
    """The three regularizers of ``model`` as scalars: ``{"weight", "disjoint", "balance"}``.

    Also returns ``"per_layer"``: the detached layer terms S_l (a [L] tensor, in
    ``model.split_layers()`` order), for logging. Computed by the model's :class:`RegularizerPlan`
    (a few batched ops for all layers and groups, not a loop over them).
    """
    return RegularizerPlan.of(model).terms(model)


def _size_classes(entries: list[dict], max_waste: float = 4.0) -> list[list[dict]]:
    """Layers grouped so that padding every layer of a class to the class's largest [Dout, Din]
    costs at most ``max_waste`` x the elements it holds (one batched matmul per class)."""
    classes: list[list[dict]] = []
    for e in sorted(entries, key=lambda e: (e["groups"], e["dout"] * e["din"])):
        for cls in classes:
            if cls[0]["groups"] != e["groups"]:
                continue
            members = cls + [e]
            padded = len(members) * max(m["dout"] for m in members) * max(m["din"] for m in members)
            if padded <= max_waste * sum(m["dout"] * m["din"] for m in members):
                cls.append(e)
                break
        else:
            classes.append([e])
    return classes


class _PaddedEnergy(torch.autograd.Function):
    """``padded_energy`` with a batched backward: d/dW of sum(G * E) is 2 W G / taps (mean)."""

    @staticmethod
    def forward(ctx, dout: int, din: int, mean: bool, *weights: torch.Tensor) -> torch.Tensor:
        squares = torch._foreach_mul(list(weights), list(weights))
        out = weights[0].new_zeros(len(weights), dout, din)
        for k, e in enumerate(squares):
            if e.dim() > 2:
                e = e.mean((2, 3)) if mean else e.sum((2, 3))
            out[k, :e.shape[0], :e.shape[1]].copy_(e)
        taps = [w[0, 0].numel() if w.dim() > 2 else 1 for w in weights]
        ctx.save_for_backward(*weights)
        ctx.scale = [2.0 / t if mean else 2.0 for t in taps]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights = ctx.saved_tensors
        views = []
        for k, w in enumerate(weights):
            g = grad[k, :w.shape[0], :w.shape[1]]
            views.append(g.reshape(*g.shape, *([1] * (w.dim() - 2))).expand_as(w))
        grads = torch._foreach_mul(list(weights), views)
        torch._foreach_mul_(grads, ctx.scale)
        return (None, None, None, *grads)


class RegularizerPlan:
    """The structure of a model's regularizers, worked out once and cached on the model.

    * Learned assignment matrices with the same number of groups are concatenated along D:
      one softmax for all of them; disjoint and balance of every matrix come out of two matmuls
      with fixed indicator matrices (softmax columns sum to 1, so sum_{i<j} q_i q_j = (1 - sum q^2) / 2).
    * Split layers are batched in size classes (:func:`_size_classes`): their W^2 (tap mean) are
      zero-padded to one [L, Dout, Din] tensor, the soft assignments of their inputs and outputs
      are gathered with precomputed index tensors, and row and column terms of every layer and
      group are two ``bmm`` s and a few element-wise ops.
    The result equals :func:`regularizer_terms_reference` to float rounding (tested).
    """

    @classmethod
    def of(cls, model: SplitModel) -> "RegularizerPlan":
        plan = model.__dict__.get("_regularizer_plan")
        if plan is None:
            plan = model.__dict__["_regularizer_plan"] = cls(model)
        return plan

    def __init__(self, model: SplitModel):
        a = model.assignments
        # learned matrices by number of groups: column offsets into one concatenated matrix
        self.set_buckets: dict[int, list[str]] = {}
        for name in a.names():
            self.set_buckets.setdefault(a.groups(name), []).append(name)
        self.offsets: dict[str, tuple[int, int, int]] = {}   # name -> (fine groups, offset, size)
        self.bucket_consts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for g, names in self.set_buckets.items():
            off, dis_scale, bal_scale = 0, [], []
            sizes = [a.logit(n).shape[1] for n in names]
            total = sum(sizes)
            ind = torch.zeros(total, len(names))
            for k, (n, d) in enumerate(zip(names, sizes)):
                self.offsets[n] = (g, off, d)
                ind[off:off + d, k] = 1.0
                dis_scale.append(1.0 / (d * (g - 1) / g) if g > 1 else 0.0)
                bal_scale.append(g / d ** 2)
                off += d
            self.bucket_consts[g] = (ind, ind * torch.tensor(dis_scale), torch.tensor(bal_scale))
        # for every number of groups a layer uses: which learned buckets merge into it, and where
        # each set's columns land in that level's concatenated matrix (+1 zero column for padding)
        levels = sorted({layer.groups for layer in model.split_layers()})
        self.level_sources: dict[int, list[int]] = {}
        self.level_offsets: dict[int, dict[str, int]] = {}
        self.level_width: dict[int, int] = {}
        for lev in levels:
            srcs = [g for g in sorted(self.set_buckets) if g >= lev and g % lev == 0]
            offs, base = {}, 0
            for g in srcs:
                for n in self.set_buckets[g]:
                    offs[n] = base + self.offsets[n][1]
                base += sum(self.offsets[n][2] for n in self.set_buckets[g])
            self.level_sources[lev], self.level_offsets[lev], self.level_width[lev] = srcs, offs, base
        entries = []
        for pos, layer in enumerate(model.split_layers()):
            w = layer.module.weight
            g = layer.groups
            din, dout = w.shape[1], w.shape[0]
            norm = 2 * (g - 1) * init_std(w) / g
            entries.append({"pos": pos, "layer": layer, "groups": g, "din": din, "dout": dout,
                            "row_c": 1.0 / (din * math.sqrt(dout) * norm), "col_c": 1.0 / (math.sqrt(din) * dout * norm)})
        self.classes = []
        order = []
        for members in _size_classes(entries):
            lev = members[0]["groups"]
            din_max, dout_max = max(m["din"] for m in members), max(m["dout"] for m in members)
            pad_col = self.level_width[lev]  # index of the zero column
            # one gather for inputs and outputs: columns [0, din_max) are the inputs, the rest the outputs
            index = torch.full((len(members), din_max + dout_max), pad_col, dtype=torch.long)
            coef = torch.zeros(len(members), 1, din_max + dout_max)   # c_row on inputs, c_col on outputs
            valid_coef = torch.zeros(len(members), 1, din_max + dout_max)  # the same, 0 on padding
            for k, m in enumerate(members):
                lay = m["layer"]
                index[k, :m["din"]] = self.level_offsets[lev][lay.in_set] + torch.arange(m["din"])
                index[k, din_max:din_max + m["dout"]] = self.level_offsets[lev][lay.out_set] + torch.arange(m["dout"])
                coef[k, 0, :din_max], coef[k, 0, din_max:] = m["row_c"], m["col_c"]
                valid_coef[k, 0, :m["din"]] = m["row_c"]
                valid_coef[k, 0, din_max:din_max + m["dout"]] = m["col_c"]
            self.classes.append({
                "groups": lev, "names": [m["layer"].name for m in members], "shapes": [(m["dout"], m["din"]) for m in members],
                "din": din_max, "dout": dout_max, "index": index, "coef": coef, "valid_coef": valid_coef})
            order += [m["pos"] for m in members]
        # the classes' concatenated layer terms, back in split_layers() order
        self.inverse = torch.argsort(torch.tensor(order, dtype=torch.long)) if order else torch.zeros(0, dtype=torch.long)
        self._device = None

    def _to(self, device) -> None:
        if self._device == device:
            return
        self.bucket_consts = {g: tuple(t.to(device) for t in c) for g, c in self.bucket_consts.items()}
        for c in self.classes:
            for k in ("index", "coef", "valid_coef"):
                c[k] = c[k].to(device)
        self.inverse = self.inverse.to(device)
        self._device = device

    @staticmethod
    def padded_energy(weights: list[torch.Tensor], dout: int, din: int, mean: bool = True) -> torch.Tensor:
        """[L, dout, din]: each weight's W^2 (mean over the k x k taps, or the sum), zero-padded.

        Differentiable; the backward is two ops for all layers (a scale and one ``_foreach_mul``)."""
        return _PaddedEnergy.apply(dout, din, mean, *weights)

    def terms(self, model: SplitModel) -> dict[str, torch.Tensor]:
        a = model.assignments
        layers = model.split_layers()
        device = next(model.parameters()).device
        if not layers:
            zero = torch.zeros((), device=device)
            return {"weight": zero, "disjoint": zero, "balance": zero, "per_layer": zero[None]}
        self._to(device)
        probs, dis, bal = {}, [], []
        for g, names in self.set_buckets.items():
            q = torch.softmax(torch.cat([a.logit(n) for n in names], dim=1), dim=0)     # [g, sum D]
            probs[g] = q
            ind, dis_scale, bal_scale = self.bucket_consts[g]
            dis.append((1 - q.pow(2).sum(0)) @ dis_scale)                              # [sets]
            bal.append((q @ ind).pow(2).sum(0) * bal_scale)                            # [sets]
        disjoint = torch.cat(dis).mean()
        balance = torch.cat(bal).mean()
        level = {}
        for lev, srcs in self.level_sources.items():
            parts = [probs[g] if g == lev else probs[g].reshape(lev, g // lev, -1).sum(1) for g in srcs]
            level[lev] = torch.cat(parts + [probs[srcs[0]].new_zeros(lev, 1)], dim=1)  # + the padding column
        by_name = {layer.name: layer for layer in layers}
        per_class = []
        for c in self.classes:
            din = c["din"]
            pq = level[c["groups"]][:, c["index"]].transpose(0, 1)                   # [L, g, Din + Dout]: p | q
            pq2 = pq.pow(2)
            wsq = self.padded_energy([by_name[n].module.weight for n in c["names"]], c["dout"], din).transpose(1, 2)
            row_energy = torch.bmm(wsq, pq2[:, :, din:].transpose(1, 2))             # [L, Din, g]: sum_j q_gj^2 Wsq_ij
            col_energy = torch.bmm(pq2[:, :, :din], wsq)                            # [L, g, Dout]: sum_i p_gi^2 Wsq_ij
            energy = torch.cat([row_energy.transpose(1, 2), col_energy], dim=2)     # [L, g, Din + Dout]
            # (1 - p) c_row on the inputs, (1 - q) c_col on the outputs, 0 on padding; summed per layer
            factor = torch.addcmul(c["valid_coef"], pq, c["coef"], value=-1.0)
            per_class.append((factor * energy.clamp_min(_EPS).sqrt()).sum((1, 2)))
        stacked = torch.cat(per_class)[self.inverse]
        scale = stacked.detach()
        weight = (scale * stacked).sum() / scale.sum().clamp_min(_EPS)
        return {"weight": weight, "disjoint": disjoint, "balance": balance, "per_layer": scale}


def regularization_loss(model: SplitModel, weights: RegularizerWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """``disjoint*R_d + weight*R_w + balance*R_b`` and the terms as floats (for progress lines)."""
    terms = regularizer_terms(model)
    loss = weights.disjoint * terms["disjoint"] + weights.weight * terms["weight"] + weights.balance * terms["balance"]
    return loss, {k: terms[k].item() for k in ("weight", "disjoint", "balance")}


def parameter_groups(model, lr: float, weight_decay: float, split_lr_mult: float = 1.0,
                     assignment_lr_mult: float = 1.0, class_assignment_lr_mult: float | None = None) -> list[dict]:
    """Optimizer groups with their own ``lr``: weights (with weight decay), split-layer weights
    (``lr * split_lr_mult``, e.g. 10x when grouping a pretrained net), assignments (no weight
    decay, ``lr * assignment_lr_mult``; the class matrix ``lr * class_assignment_lr_mult`` when
    that is given). BatchNorm parameters and biases get no weight decay.
    Works for a dense :class:`SplitModel`, a cut tree (its subtrees are the split layers) and,
    without the split/assignment groups, any module."""
    split_ids = set()
    split_layers = model.split_layers() if isinstance(model, SplitModel) else []
    if hasattr(model, "subtree_parameters"):  # a cut tree (or its fused form): the split layers are the subtrees
        split_ids.update(id(p) for p in model.subtree_parameters())
    for layer in split_layers:
        split_ids.add(id(layer.module.weight))
        if getattr(layer.module, "bias", None) is not None:
            split_ids.add(id(layer.module.bias))
    assign_ids = {id(p) for p in model.assignments.parameters()} if isinstance(model, SplitModel) else set()
    class_ids = set()
    if class_assignment_lr_mult is not None and isinstance(model, SplitModel):
        class_ids = {id(model.assignments.logit(CLASSES))}
    decay, no_decay, split_decay, split_no_decay, assign, class_assign = [], [], [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in class_ids:
            class_assign.append(param)
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
        {"params": class_assign, "weight_decay": 0.0, "lr": lr * (class_assignment_lr_mult or 0.0),
         "name": "class_assignment"},
    ]
    return [g for g in groups if g["params"]]


def freeze_block_bn_scale(model: SplitModel) -> int:
    """The reference's ``bn_no_scale`` during grouping: freeze the BatchNorm scale (gamma) of every
    residual block, split or not, but not the head's BatchNorm (the authors' resnet.py: every
    ``_residual_block`` BN gets ``no_scale``, ``unit_last`` does not). It closes the escape of
    shrinking a split conv's weights under the group lasso while the BN before it grows its gamma.

    Returns how many BatchNorm layers were frozen.
    """
    count = 0
    for spec in model.split_graph().blocks:
        for _, bn, _ in spec.block.norms():
            bn.weight.requires_grad_(False)
            count += 1
    return count


freeze_split_bn_scale = freeze_block_bn_scale  # the config key's name (group.freeze_split_bn_scale)
