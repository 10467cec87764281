"""Split configurations and the learned group assignments.

A split configuration is written bottom to top, ``G3-G2-G1`` (``2-2-2``, ``1-2-4``, ``2-4-4``):
the last number is the number of groups of the classifier (classes and its input features),
the one before it the groups of the last stage of the backbone, and so on downwards. Stages not
named stay in the shared trunk. Lower levels have fewer groups, and a coarse group is a merge of
adjacent fine groups (4 -> 2 merges fine groups ``[0, 0, 1, 1]``).

For every channel set the split layers touch there is one learned matrix of logits ``alpha``
``[G, D]``; the soft assignment is ``softmax(alpha, dim=0)``: each column (a channel or a class)
is a distribution over the G groups (the paper's P and Q). A channel set is learned at the finest
number of groups of any layer that touches it; coarser layers use the merged matrix (the sum of
the fine rows of each coarse group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn


class SplitConfigError(ValueError):
    """A split configuration that cannot be built (the message names the value and the rule)."""


@dataclass(frozen=True)
class SplitConfig:
    """Groups per level, bottom to top: ``SplitConfig((2, 4, 4))`` is ``2-4-4``."""

    groups: tuple[int, ...]

    @classmethod
    def parse(cls, value: "str | int | Sequence[int] | SplitConfig") -> "SplitConfig":
        if isinstance(value, SplitConfig):
            return value
        if isinstance(value, int):
            parts: list = [value]
        elif isinstance(value, str):
            parts = value.strip().split("-")
        else:
            parts = list(value)
        try:
            groups = tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            raise SplitConfigError(
                f"invalid split {value!r}: write groups per level bottom to top as integers, e.g. '2-2-2' or '1-2-4'"
            ) from None
        if not groups or any(g < 1 for g in groups):
            raise SplitConfigError(f"invalid split {value!r}: every level needs at least 1 group")
        for lower, upper in zip(groups, groups[1:]):
            if upper < lower or upper % lower:
                raise SplitConfigError(
                    f"invalid split {value!r}: each level's groups must divide the groups of the level above "
                    f"(coarse groups are merges of fine ones), got {lower} below {upper}")
        return cls(groups)

    def __str__(self) -> str:
        return "-".join(str(g) for g in self.groups)

    @property
    def num_groups(self) -> int:
        """Groups of the classifier: the number of leaves of the tree."""
        return self.groups[-1]

    def stage_groups(self, num_stages: int) -> list[int]:
        """Groups of each backbone stage (1 = in the trunk), for a backbone with ``num_stages``."""
        below_fc = list(self.groups[:-1])
        if len(below_fc) > num_stages:
            raise SplitConfigError(
                f"split {self} names {len(self.groups)} levels but this backbone has only "
                f"{num_stages} stages + the classifier ({num_stages + 1} levels at most)")
        return [1] * (num_stages - len(below_fc)) + below_fc


def merge_groups(q: torch.Tensor, groups: int) -> torch.Tensor:
    """Merge a [G_fine, D] assignment into [groups, D] by summing adjacent fine rows."""
    fine = q.shape[0]
    if fine == groups:
        return q
    if fine % groups:
        raise SplitConfigError(f"cannot merge {fine} groups into {groups}")
    return q.reshape(groups, fine // groups, q.shape[1]).sum(1)


def merge_hard(labels: torch.Tensor, fine: int, groups: int) -> torch.Tensor:
    """Hard version of :func:`merge_groups`: fine group ids -> coarse group ids."""
    return labels // (fine // groups)


def _key(name: str) -> str:
    return name.replace(".", "_")


class Assignments(nn.Module):
    """The learned soft assignments, one logit matrix ``[G, D]`` per channel set (and ``classes``).

    Only the regularizers read these; the network's forward pass never does, so the
    cross-entropy cannot reach them.
    """

    def __init__(self, sets: dict[str, tuple[int, int]] | None = None, init_std: float = 0.01):
        super().__init__()
        self.logits = nn.ParameterDict()
        self._names: dict[str, str] = {}
        self._groups: dict[str, int] = {}
        for name, (groups, size) in (sets or {}).items():
            self.add(name, groups, size, init_std)

    def add(self, name: str, groups: int, size: int, init_std: float = 0.01) -> None:
        device = next(iter(self.logits.values())).device if len(self.logits) else None
        self.logits[_key(name)] = nn.Parameter(torch.randn(groups, size, device=device) * init_std)
        self._names[name] = _key(name)
        self._groups[name] = groups

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def groups(self, name: str) -> int:
        return self._groups[name]

    def logit(self, name: str) -> torch.Tensor:
        return self.logits[self._names[name]]

    def probs(self, name: str, groups: int | None = None) -> torch.Tensor:
        """Soft assignment of set ``name``, [groups, D]; merged when ``groups`` is coarser."""
        q = torch.softmax(self.logit(name), dim=0)
        return q if groups is None else merge_groups(q, groups)

    def learned(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(name, soft assignment [G, D]) for every learned matrix."""
        for name in self._names:
            yield name, self.probs(name)
