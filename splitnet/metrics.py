"""Accuracy and the semantic quality of learned groups.

Semantic quality compares the learned class -> group map with a reference labelling of the
classes (CIFAR-100 superclasses, or WordNet parents for ImageNet): superclass *purity* (the share
of classes whose group's majority superclass is their own) and *normalized mutual information*
(arithmetic normalization, as scikit-learn's default). Both are reported next to their mean and
standard deviation under random balanced assignments, so "above random" is a number.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the top-k logits, for each k. logits [B, C], target [B]."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(target[:, None])
    return {k: int(hit[:, :min(k, maxk)].any(1).sum()) for k in ks}


def purity(groups: Sequence[int], labels: Sequence[int]) -> float:
    """Share of items whose group's most common label is their own label."""
    by_group: dict[int, Counter] = {}
    for g, lab in zip(groups, labels):
        by_group.setdefault(int(g), Counter())[lab] += 1
    return sum(c.most_common(1)[0][1] for c in by_group.values()) / len(groups)


def normalized_mutual_info(a: Sequence, b: Sequence) -> float:
    """NMI(a, b) = I(a; b) / ((H(a) + H(b)) / 2); 0 for independent, 1 for identical partitions."""
    n = len(a)
    ca, cb, cab = Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log((c * n) / (ca[x] * cb[y])) for (x, y), c in cab.items())
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    if ha == 0 and hb == 0:
        return 1.0
    denom = (ha + hb) / 2
    return mi / denom if denom > 0 else 0.0


def _table_nmi(table: np.ndarray) -> float:
    """:func:`normalized_mutual_info` from a contingency table (rows: groups, columns: labels)."""
    n = table.sum()
    p, rows, cols = table / n, table.sum(1) / n, table.sum(0) / n
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(rows, cols)[nz])).sum())
    ha, hb = -float((rows[rows > 0] * np.log(rows[rows > 0])).sum()), -float((cols[cols > 0] * np.log(cols[cols > 0])).sum())
    if ha == 0 and hb == 0:
        return 1.0
    return mi / ((ha + hb) / 2) if ha + hb > 0 else 0.0


def _entropy(counts) -> float:
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts if c)


def balanced_groups(num_items: int, num_groups: int) -> list[int]:
    """A balanced item -> group map (the sizes random balanced groups and the ceiling's sizes are drawn with)."""
    return [i * num_groups // num_items for i in range(num_items)]


def nmi_ceiling(group_sizes: Sequence[int], labels: Sequence) -> float:
    """The most NMI any grouping with these group sizes can score against ``labels``.

    I(G; P) <= min(H(G), H(P)), and the sizes fix H(G) and the labels H(P), so NMI <= 2 min(H(G), H(P)) /
    (H(G) + H(P)); it is reached when every label's items can lie in one group (or every group in one
    label). E.g. 10 classes of 2 superclasses in 4 groups (3, 3, 2, 2): 0.673, however the groups are found.
    """
    hg, hp = _entropy([s for s in group_sizes if s]), _entropy(Counter(labels).values())
    if hg == 0 and hp == 0:
        return 1.0
    return 2 * min(hg, hp) / (hg + hp)


def semantic_quality(class_to_group: Sequence[int], class_to_super: Sequence, num_random: int = 200, seed: int = 0) -> dict:
    """Purity and NMI of the learned groups against a reference labelling, vs random balanced groups.

    class_to_group: group id per class; class_to_super: superclass (or WordNet parent) per class.
    Returns {purity, nmi, random_purity_mean, random_purity_std, random_nmi_mean, random_nmi_std,
    num_groups, num_superclasses, nmi_ceiling}: the ceiling is the most any grouping with the same
    group sizes can score (:func:`nmi_ceiling`); a bar above it is out of reach.
    """
    groups = [int(g) for g in class_to_group]
    labels = list(class_to_super)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} classes in the grouping but {len(labels)} in the reference labelling")
    num_groups = len(set(groups))
    rng = np.random.default_rng(seed)
    balanced = np.array(balanced_groups(len(groups), num_groups))
    codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)[1].ravel()
    rand_p, rand_n = [], []
    for _ in range(num_random):  # numpy contingency tables: 200 draws over 21,841 classes in a fraction of a second
        table = np.bincount(rng.permutation(balanced) * (codes.max() + 1) + codes,
                            minlength=num_groups * (codes.max() + 1)).reshape(num_groups, -1)
        rand_p.append(table.max(1).sum() / len(groups))
        rand_n.append(_table_nmi(table))
    return {
        "purity": purity(groups, labels),
        "nmi": normalized_mutual_info(groups, labels),
        "random_purity_mean": float(np.mean(rand_p)), "random_purity_std": float(np.std(rand_p)),
        "random_nmi_mean": float(np.mean(rand_n)), "random_nmi_std": float(np.std(rand_n)),
        "num_groups": num_groups, "num_superclasses": len(set(labels)),
        "nmi_ceiling": nmi_ceiling(list(Counter(groups).values()), labels),
    }
