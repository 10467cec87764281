"""Groups derived from the weights: balanced class groups from the classifier, and every split
layer's channel groups from the class groups and the layers' weight energy. No learning rate.

What the learned assignments (``group.assign: learned``) converge to, when their rates suit the
run, is known: the class groups follow the classifier (with ``assign_init: classifier``) and a
channel joins the group whose members its weights serve (the group-weight term sees the weights
only as ``W**2``). Their step sizes depend on the channel count, the groups, the steps and the
weights' scale, and the wrong ones leave them uniform or collapse them (docs/method.md). This
module computes the same result directly:

* :func:`classifier_class_groups`: recursive spectral bisection of the classes' cosine
  similarity; balanced, and a coarse group is a merge of adjacent fine ones;
* :func:`derive_groups`: with the class groups fixed, every learned channel set gets the balanced
  labels that keep the most weight energy inside the diagonal blocks of the layers around it,
  set by set from the classifier down, then refined round by round until no label changes (each
  update keeps or raises the energy kept, so it terminates);
* :func:`balanced_labels`: the balanced partition of one set for given per-group scores.

The objective is the one the cut is judged by: every split layer's fraction of ``W**2`` inside
the blocks (1 - its off-block energy), each layer counted once.
"""
from __future__ import annotations

import torch

from .assignment import merge_hard
from .models.base import CLASSES, SplitModel


def _capacities(size: int, groups: int) -> torch.Tensor:
    """Balanced group sizes: ``size // groups``, the first ``size % groups`` groups one more."""
    return torch.tensor([size // groups + (g < size % groups) for g in range(groups)])


def _resplit_pair(score: torch.Tensor, labels: torch.Tensor, a: int, b: int) -> bool:
    """Re-split the members of groups ``a`` and ``b`` optimally, sizes kept. True if labels changed."""
    members = torch.nonzero((labels == a) | (labels == b)).flatten()
    if members.numel() < 2:
        return False
    keep_a = int((labels[members] == a).sum())
    gain = score[a, members] - score[b, members]
    order = members[torch.argsort(gain, descending=True, stable=True)]
    new = labels.clone()
    new[order[:keep_a]], new[order[keep_a:]] = a, b
    better = float(score[new[members], members].sum() - score[labels[members], members].sum()) > 1e-12
    if better:
        labels.copy_(new)
    return better


def balanced_labels(score: torch.Tensor, init: torch.Tensor | None = None, max_passes: int = 50) -> torch.Tensor:
    """Labels [D] with balanced group sizes (``D // G`` or one more) that maximize ``sum_d score[label_d, d]``.

    score: [G, D]. Two groups: exact (sort by the score difference). More: greedy by regret
    (members with the largest lead of their best group over the next choose first), then pairwise
    exact re-splits until no pair improves (a local optimum of the 2-exchange neighbourhood).
    ``init``: balanced labels to start the local search from instead of the greedy pass.
    """
    g, d = score.shape
    score = score.double()
    if g == 1:
        return torch.zeros(d, dtype=torch.long)
    if init is not None and torch.equal(torch.bincount(init, minlength=g).sort().values,
                                        _capacities(d, g).sort().values):
        labels = init.clone()
    else:
        labels = torch.full((d,), -1, dtype=torch.long)
        room = _capacities(d, g)
        top2 = score.topk(2, dim=0).values
        for i in torch.argsort(top2[0] - top2[1], descending=True, stable=True).tolist():
            choice = score[:, i].masked_fill(room == 0, float("-inf"))
            best = int(choice.argmax())
            labels[i] = best
            room[best] -= 1
    for _ in range(max_passes):
        changed = False
        for a in range(g):
            for b in range(a + 1, g):
                changed |= _resplit_pair(score, labels, a, b)
        if not changed:
            break
    return labels


def _layer_energy(weight: torch.Tensor) -> torch.Tensor:
    """W**2 summed over taps, [Dout, Din], as a share of the layer's total (each layer counts once)."""
    w2 = weight.detach().double().cpu().pow(2)
    e = w2.flatten(2).sum(2) if w2.dim() > 2 else w2
    return e / e.sum().clamp_min(1e-300)


@torch.no_grad()
def derive_groups(model: SplitModel, class_labels: torch.Tensor, rounds: int = 20) -> dict[str, torch.Tensor]:
    """Balanced labels for every learned set of ``model``, the classes fixed at ``class_labels``.

    Returns ``{set name: LongTensor [D] of group ids at the set's finest groups}`` (the classes'
    entry is ``class_labels``). A member's score for a fine group is the energy, summed over the
    split layers that touch its set, between it and the members of the other side's group that
    contains that fine group at the layer's level (``layer.groups``, merged as the hierarchy
    merges: fine ``g`` lies in coarse ``g // (G / G_layer)``).
    """
    graph = model.split_graph()
    learned = {name: model.assignments.groups(name) for name in model.assignments.names()}
    if class_labels.numel() != graph.sets[CLASSES].size:
        raise ValueError(f"{class_labels.numel()} class labels for {graph.sets[CLASSES].size} classes")
    layers = [(layer, _layer_energy(layer.module.weight)) for layer in model.split_layers()]
    labels: dict[str, torch.Tensor] = {CLASSES: class_labels.long().cpu()}

    # the sets in order of distance from the classes through the split layers
    order, frontier = [], [CLASSES]
    while frontier:
        nxt = []
        for name in frontier:
            for layer, _ in layers:
                for here, there in ((layer.in_set, layer.out_set), (layer.out_set, layer.in_set)):
                    if there == name and here in learned and here != CLASSES and here not in order:
                        order.append(here)
                        nxt.append(here)
        frontier = nxt
    order += [name for name in learned if name not in order and name != CLASSES]

    def scores(name: str) -> torch.Tensor:
        g, size = learned[name], graph.sets[name].size
        total = torch.zeros(g, size, dtype=torch.float64)
        fine = torch.arange(g)
        for layer, energy in layers:
            if name not in (layer.in_set, layer.out_set):
                continue
            other = layer.out_set if layer.in_set == name else layer.in_set
            if other not in labels:
                continue
            gl = layer.groups
            onehot = torch.nn.functional.one_hot(merge_hard(labels[other], learned[other], gl), gl).double()
            toward = (energy.T @ onehot) if layer.in_set == name else (energy @ onehot)   # [size, gl]
            total += toward.T[fine // (g // gl)]
        return total

    for round_ in range(rounds):
        changed = False
        for name in order:
            new = balanced_labels(scores(name), init=labels.get(name))
            if name not in labels or not torch.equal(new, labels[name]):
                changed = changed or name in labels
                labels[name] = new
        if round_ > 0 and not changed:
            break
    return labels


def random_groups(model: SplitModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random balanced labels for every learned set, the classes included (sizes differ by at most one):
    the control for :func:`derive_groups`, a tree of the same shape without groups worth having."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in model.assignments.names():
        groups, size = model.assignments.groups(name), model.assignments.logit(name).shape[1]
        out[name] = (torch.arange(size) % groups)[torch.randperm(size, generator=gen)]
    return out


@torch.no_grad()
def set_assignment_(model: SplitModel, labels: dict[str, torch.Tensor], margin: float = 6.0) -> None:
    """Write hard labels into the assignment logits: ``margin`` for a member's group, 0 elsewhere
    (q = e^m / (e^m + G - 1): 0.9975 for two groups at the default). Argmax gives ``labels`` back."""
    for name, lab in labels.items():
        logits = model.assignments.logit(name)
        logits.zero_()
        logits.scatter_(0, lab.to(logits.device)[None, :], margin)


@torch.no_grad()
def classifier_class_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Balanced class groups [C] from a trained classifier's weight [C, F]: classes whose weight
    vectors point the same way (cosine similarity, signs included) share a group.

    Recursive spectral bisection: split a set of classes at the median of the Fiedler vector of
    their similarity graph (affinity ``(1 + cos) / 2``, normalized Laplacian); the first half gets
    the lower group ids, so merging adjacent fine groups (4 -> 2: ``[0, 0, 1, 1]``) gives the
    coarse split. Group sizes differ by at most one class per split.

    The affinity is ``X X^T`` with ``X = [1, w] / sqrt(2)`` (``w`` the unit weight rows), so the
    normalized Laplacian's eigenvectors are the left singular vectors of ``D^-1/2 X``, a [C, F + 1]
    matrix: 21,841 classes cost one thin SVD, never a C x C matrix.

    Why not the group-weight term alone: it sees only ``W**2`` and so cannot tell a class that
    uses a feature from one that votes against it. From a trained dense model the assignments it
    learns converge to the co-clustering of ``W**2`` (its second singular vectors) whatever their
    init; on the demo's 20 classes that split scores NMI 0.26 against the superclasses, the
    signed similarity's 0.67 (animals vs vehicles, the best a 2-group split can score).
    """
    w = weight.detach().double().cpu()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = torch.cat([torch.ones(w.shape[0], 1, dtype=w.dtype), w], dim=1) / 2 ** 0.5
    labels = torch.zeros(w.shape[0], dtype=torch.long)

    def split(index: torch.Tensor, first: int, count: int) -> None:
        if count == 1 or index.numel() <= 1:
            labels[index] = first
            return
        xs = x[index]
        inv_sqrt = (xs @ xs.sum(0)).clamp_min(1e-12).rsqrt()     # degrees of the sub-graph
        u, _, _ = torch.linalg.svd(inv_sqrt[:, None] * xs, full_matrices=False)
        fiedler = u[:, 1] * inv_sqrt if u.shape[1] > 1 else torch.zeros(len(index), dtype=w.dtype)
        if fiedler[0] > 0:  # singular vectors have no sign: make the result deterministic
            fiedler = -fiedler
        order = index[torch.argsort(fiedler, stable=True)]
        low = count // 2
        cut_at = round(index.numel() * low / count)
        split(order[:cut_at].sort().values, first, low)
        split(order[cut_at:].sort().values, first + low, count - low)

    split(torch.arange(w.shape[0]), 0, groups)
    return labels
