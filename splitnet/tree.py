"""Cutting a grouped model into a tree: a shared trunk and G disjoint subtrees.

``cut(model)`` takes the hard assignment (argmax over groups per class / channel), makes sure no
group is empty or below a configured minimum (moving the least confident members and logging
each move), and builds a :class:`SplitTree`:

* ``trunk``: the stem and every stage with one group, copied unchanged;
* ``subtrees[g]``: one per group of the first split level. A subtree reads its own channels of
  the trunk's output (an index gather), runs its slices of the split stages, and either branches
  into finer groups (hierarchical configs like ``1-2-4``) or ends in its slice of the classifier;
* the logits of all leaves are concatenated and put back into the original class order.

Each split layer keeps only its diagonal blocks ``W[out_g][:, in_g]``; BatchNorm statistics are
sliced, not re-initialized. When the off-block weights are zero, the tree computes exactly the
dense model's function (tested for every registered arch).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .assignment import SplitConfig, SplitConfigError, merge_hard
from .models.base import CLASSES, SplitModel

log = logging.getLogger("splitnet")


# -- hard assignment ----------------------------------------------------------------------------
def smallest_group_share(sizes: dict[str, list[int]]) -> tuple[float, str]:
    """The smallest group as a share of its balanced size (1.0 = balanced), over every set in
    ``sizes`` (e.g. :meth:`HardAssignment.group_sizes`), and the set it is in."""
    worst, where = 1.0, ""
    for name, counts in sizes.items():
        share = min(counts) / (sum(counts) / len(counts)) if counts and sum(counts) else 1.0
        if share < worst:
            worst, where = share, name
    return worst, where


def class_order(subtree_classes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """For the logits of some subtrees concatenated in that order (each over its ``classes``): the
    classes they cover, ascending, and where each sits in the concatenation (``logits[:, position]``
    puts them in class order). :meth:`SplitTree.combine` uses it for all the subtrees, a serving
    ingress for the ones a request needs."""
    order = torch.cat([torch.as_tensor(c, dtype=torch.long) for c in subtree_classes])
    position = torch.argsort(order, stable=True)
    return order[position], position


@dataclass
class HardAssignment:
    """Group id of every member of every learned channel set (and of every class).

    ``labels[name]`` is a LongTensor [D] of group ids at ``groups[name]`` groups (the finest level
    that set is learned at). ``moves`` records what the minimum-size rule moved.
    """

    labels: dict[str, torch.Tensor]
    groups: dict[str, int]
    sizes: dict[str, int]
    moves: list[dict] = field(default_factory=list)

    def group_of(self, name: str, groups: int) -> torch.Tensor:
        """Group ids [D] of set ``name`` at a level with ``groups`` groups (merged if coarser)."""
        if name not in self.labels:
            if groups != 1:
                raise KeyError(f"channel set {name!r} has no assignment at {groups} groups")
            return torch.zeros(self.sizes[name], dtype=torch.long)
        return merge_hard(self.labels[name], self.groups[name], groups)

    def group_sizes(self) -> dict[str, list[int]]:
        """Members per group of every learned set: ``{name: [size of group 0, ...]}``."""
        return {name: torch.bincount(lab, minlength=self.groups[name]).tolist() for name, lab in self.labels.items()}

    def members(self, name: str, groups: int, group: int) -> torch.Tensor:
        """Sorted indices of the members of ``group`` (at ``groups`` groups) of set ``name``."""
        return torch.nonzero(self.group_of(name, groups) == group).flatten()

    def to_dict(self) -> dict:
        """JSON/YAML-friendly: {name: {groups, size, members: [[indices of group 0], ...]}}."""
        return {name: {"groups": self.groups[name], "size": self.sizes[name],
                       "members": [self.members(name, self.groups[name], g).tolist() for g in range(self.groups[name])]}
                for name in self.labels}

    @classmethod
    def from_dict(cls, data: dict, sizes: dict[str, int]) -> "HardAssignment":
        labels, groups = {}, {}
        for name, entry in data.items():
            lab = torch.full((int(entry["size"]),), -1, dtype=torch.long)
            for g, members in enumerate(entry["members"]):
                lab[torch.as_tensor(members, dtype=torch.long)] = g
            if (lab < 0).any():
                raise ValueError(f"assignment of {name!r} leaves {int((lab < 0).sum())} members without a group")
            labels[name], groups[name] = lab, int(entry["groups"])
        return cls(labels, groups, dict(sizes))


def enforce_minimum(q: torch.Tensor, labels: torch.Tensor, minimum: int, name: str = "?") -> tuple[torch.Tensor, list[dict]]:
    """Make every group hold at least ``minimum`` members by moving the least confident ones.

    q: soft assignment [G, D]; labels: argmax ids [D]. The member moved into an under-full group
    g is the one (from a group that can spare it) whose preference for g over its current group,
    ``q[g, d] - q[current, d]``, is largest. Returns new labels and one record per move.
    """
    groups, size = q.shape
    if minimum * groups > size:
        raise SplitConfigError(f"{name}: {size} members cannot fill {groups} groups with at least {minimum} each")
    labels = labels.clone()
    counts = torch.bincount(labels, minlength=groups)
    moves = []
    cols = torch.arange(size)
    while bool((counts < minimum).any()):
        target = int(torch.argmin(counts))
        spare = counts[labels] > minimum
        score = q[target] - q[labels, cols]
        score[~spare] = -float("inf")
        d = int(torch.argmax(score))
        src = int(labels[d])
        moves.append({"set": name, "index": d, "from": src, "to": target,
                      "confidence": round(float(q[src, d]), 4), "target_prob": round(float(q[target, d]), 4)})
        labels[d] = target
        counts[src] -= 1
        counts[target] += 1
    return labels, moves


@torch.no_grad()
def hard_assignment(model: SplitModel, min_classes_per_group: int = 1, min_channels_per_group: int = 1, *,
                    quiet: bool = False) -> HardAssignment:
    """Argmax of every learned assignment, with the minimum-size rule applied (moves are logged).

    quiet: log nothing (a measurement during grouping, e.g. the per-epoch off-block energy, where
    no member is moved for good; the moves are still in the result)."""
    graph = model.split_graph()
    labels, groups, moves = {}, {}, []
    for name, q in model.assignments.learned():
        q = q.detach().float().cpu()
        minimum = min_classes_per_group if name == CLASSES else min_channels_per_group
        lab, moved = enforce_minimum(q, q.argmax(0), minimum, name)
        labels[name], groups[name] = lab, q.shape[0]
        moves += moved
    result = HardAssignment(labels, groups, {s.name: s.size for s in graph.sets.values()}, moves)
    if quiet:
        return result
    for move in moves:
        log.info("cut: moved %s[%d] from group %d to group %d (confidence %.3f) to keep groups non-empty",
                 move["set"], move["index"], move["from"], move["to"], move["confidence"])
    for name, lab in labels.items():
        counts = torch.bincount(lab, minlength=groups[name])
        if int(counts.max()) > 2 * lab.numel() / groups[name]:
            log.warning("cut: %s is badly unbalanced, group sizes %s; raise the balance coefficient or train the "
                        "grouping longer", name, counts.tolist())
    if moves:
        log.warning("cut: %d members moved to satisfy the minimum group sizes (classes >= %d, channels >= %d)",
                    len(moves), min_classes_per_group, min_channels_per_group)
    return result


def balanced_assignment(model: SplitModel) -> HardAssignment:
    """Contiguous, perfectly balanced groups for every set (what ``splitnet plan`` counts)."""
    graph = model.split_graph()
    labels, groups = {}, {}
    for name in model.assignments.names():
        size, g = graph.sets[name].size, model.assignments.groups(name)
        labels[name] = torch.arange(size) * g // size
        groups[name] = g
    return HardAssignment(labels, groups, {s.name: s.size for s in graph.sets.values()})


@torch.no_grad()
def mask_off_block_weights_(model: SplitModel, hard: HardAssignment) -> None:
    """Zero every weight between different groups, in place (the dense model the tree equals)."""
    for layer in model.split_layers():
        gin = hard.group_of(layer.in_set, layer.groups).to(layer.module.weight.device)
        gout = hard.group_of(layer.out_set, layer.groups).to(layer.module.weight.device)
        mask = (gout[:, None] == gin[None, :]).to(layer.module.weight.dtype)
        layer.module.weight.mul_(mask.view(*mask.shape, *([1] * (layer.module.weight.dim() - 2))))


# -- the tree -----------------------------------------------------------------------------------
class Trunk(nn.Module):
    """The shared lower layers: the stem and every stage with one group."""

    def __init__(self, stem: list[nn.Module], stages: list[nn.Module]):
        super().__init__()
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> trunk features [B, C, H', W']."""
        return self.stages(self.stem(x))


class SubtreeNode(nn.Module):
    """One node of the tree: gathers its channels of the parent's output, runs its blocks, then
    branches into finer nodes or ends in its slice of the classifier.

    ``forward`` returns the logits of ``self.classes`` (leaf order), shape [B, len(classes)].
    """

    def __init__(self, input_index: torch.Tensor | None, blocks: list[nn.Module], branches: list["SubtreeNode"] | None = None,
                 head: list[nn.Module] | None = None, fc: nn.Linear | None = None, classes: torch.Tensor | None = None):
        super().__init__()
        if input_index is not None:
            self.register_buffer("input_index", input_index.clone())
        else:
            self.input_index = None
        self.blocks = nn.Sequential(*blocks)
        if branches:
            self.branches = nn.ModuleList(branches)
            self.head, self.fc = None, None
            classes = torch.cat([b.classes for b in branches])
        else:
            self.branches = None
            self.head = nn.Sequential(*(head or []), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.fc = fc
        self.register_buffer("classes", classes.clone())

    @property
    def input_channels(self) -> int | None:
        """How many of the parent's channels this node reads (None: all of them, in order)."""
        return None if self.input_index is None else int(self.input_index.numel())

    def select_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Its channels of the parent's output, in its order: what ``forward(..., inputs_selected=True)`` takes.
        A server that sends a subtree only these moves a fraction of the trunk's features."""
        return features if self.input_index is None else features.index_select(1, self.input_index)

    def forward(self, x: torch.Tensor, inputs_selected: bool = False) -> torch.Tensor:
        if not inputs_selected:
            x = self.select_inputs(x)
        x = self.blocks(x)
        if self.branches is not None:
            return torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.fc(self.head(x))


def leaves(node: SubtreeNode) -> list[SubtreeNode]:
    """The nodes under ``node`` that end in a classifier, in logit order."""
    return [node] if node.branches is None else [leaf for b in node.branches for leaf in leaves(b)]


def sibling_copy(sibling: SubtreeNode, leaf_classes: list[torch.Tensor], fresh: bool = False) -> SubtreeNode:
    """A new subtree shaped as ``sibling`` (its blocks, branches and the trunk channels it reads) whose
    leaves answer ``leaf_classes`` (one id tensor per leaf, in logit order): every leaf gets a new
    classifier; the rest starts as the sibling's weights, or re-initialised (``fresh``: BatchNorm
    statistics reset too). Works on ``meta`` (a grown tree's skeleton)."""
    node = copy.deepcopy(sibling)
    ends = leaves(node)
    if len(leaf_classes) != len(ends):
        raise ValueError(f"the sibling has {len(ends)} leaves, {len(leaf_classes)} class lists given")
    for leaf, classes in zip(ends, leaf_classes):
        old = leaf.fc
        with torch.device(old.weight.device):
            leaf.fc = nn.Linear(old.in_features, len(classes), bias=True)
        leaf.classes = torch.as_tensor(classes, dtype=torch.long, device=leaf.classes.device)
    if fresh:
        for m in node.modules():
            if m is not node and hasattr(m, "reset_parameters") and not isinstance(m, nn.Linear):
                m.reset_parameters()  # BatchNorm: also its running statistics
    _refresh_classes(node)
    return node


def _refresh_classes(node: SubtreeNode) -> None:
    if node.branches is not None:
        for b in node.branches:
            _refresh_classes(b)
        node.classes = torch.cat([b.classes for b in node.branches])


class SplitTree(nn.Module):
    """Shared trunk + G subtrees; ``forward`` returns logits [B, num_classes] in the original order.

    Attributes users read: ``subtrees[g].classes`` (class ids subtree g answers, in the order of
    its logits), ``class_to_group`` (leaf group of every class), ``group_to_subtree``, ``split``,
    ``arch``, ``num_classes``, ``hard`` (the :class:`HardAssignment` of the cut: the dense model's
    classes only), ``info`` (free metadata saved in the manifest: class names, input normalization,
    ...), ``grown`` / ``lineage`` (the subtrees :mod:`splitnet.grow` added and where the tree came from).
    """

    def __init__(self, trunk: Trunk, subtrees: list[SubtreeNode], *, arch: str, split: SplitConfig, num_classes: int,
                 hard: HardAssignment, class_to_group: torch.Tensor, info: dict | None = None,
                 group_to_subtree: list[int] | None = None, grown: list[dict] | None = None,
                 lineage: dict | None = None):
        super().__init__()
        self.trunk = trunk
        self.subtrees = nn.ModuleList(subtrees)
        classes, position = class_order([s.classes for s in subtrees])
        if classes.numel() != num_classes or not torch.equal(classes, torch.arange(num_classes, device=classes.device)):
            raise RuntimeError("subtrees do not cover every class exactly once")
        self.register_buffer("class_position", position, persistent=False)
        self.arch, self.split, self.num_classes = arch, split, num_classes
        self.hard = hard
        self.class_to_group = class_to_group
        if group_to_subtree is None:  # as cut: the split's groups, evenly over its subtrees
            groups_per_subtree = split.num_groups // len(subtrees)
            group_to_subtree = [g // groups_per_subtree for g in range(split.num_groups)]
        self.group_to_subtree = list(group_to_subtree)
        # a grown tree (splitnet.grow): the subtrees added after the cut, and the tree it was grown from
        self.grown, self.lineage = list(grown or []), dict(lineage or {})
        self.info = dict(info or {})
        self.moves = list(hard.moves)

    def save(self, directory, input_size: int | None = None, dense_cost: dict | None = None):
        """Write manifest.yaml + safetensors to ``directory`` (see :mod:`splitnet.artifacts`)."""
        from .artifacts import save_tree
        return save_tree(self, directory, input_size=input_size, dense_cost=dense_cost)

    def subtree_parameters(self) -> list[nn.Parameter]:
        """The weights above the trunk (what ``split_lr_mult`` scales when finetuning)."""
        return list(self.subtrees.parameters())

    def forward_subtree(self, g: int, features: torch.Tensor) -> torch.Tensor:
        """Logits [B, len(subtrees[g].classes)] of subtree ``g`` from trunk features."""
        return self.subtrees[g](features)

    def combine(self, subtree_logits: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-subtree logits (in subtree order) and restore the class order."""
        return torch.cat(subtree_logits, dim=1).index_select(1, self.class_position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> logits [B, num_classes], original class order."""
        features = self.trunk(x)
        return self.combine([subtree(features) for subtree in self.subtrees])


def _segments(model: SplitModel) -> list[tuple[int, list[int], bool]]:
    """Split levels as (groups, stage indices, has_classifier), bottom to top."""
    segments: list[tuple[int, list[int], bool]] = []
    for s, g in enumerate(model.stage_groups):
        if g == 1:
            continue
        if segments and segments[-1][0] == g:
            segments[-1][1].append(s)
        else:
            segments.append((g, [s], False))
    if segments and segments[-1][0] == model.fc_groups:
        segments[-1] = (segments[-1][0], segments[-1][1], True)
    else:
        segments.append((model.fc_groups, [], True))
    return segments


@torch.no_grad()
def build_tree(model: SplitModel, hard: HardAssignment, info: dict | None = None) -> SplitTree:
    """Build the :class:`SplitTree` of ``model`` for a given hard assignment (works on ``meta``)."""
    graph = model.split_graph()
    blocks_by_stage: dict[int, list] = {}
    for spec in graph.blocks:
        blocks_by_stage.setdefault(spec.stage, []).append(spec)
    segments = _segments(model)
    trunk_stages = [s for s, g in enumerate(model.stage_groups) if g == 1]
    trunk = Trunk([copy.deepcopy(m) for m in model.stem_modules()],
                  [copy.deepcopy(model.stages()[s]) for s in trunk_stages])
    trunk_out = blocks_by_stage[trunk_stages[-1]][-1].sets["out"] if trunk_stages else graph.stem_out
    seg_input = [trunk_out]
    for _, stage_ids, _ in segments[:-1]:
        seg_input.append(blocks_by_stage[stage_ids[-1]][-1].sets["out"])
    fc = model.fc

    def node(level: int, group: int, parent_kept: torch.Tensor) -> SubtreeNode:
        groups, stage_ids, has_fc = segments[level]
        in_idx = hard.members(seg_input[level], groups, group)
        if in_idx.numel() == 0:
            raise SplitConfigError(f"group {group} of {seg_input[level]!r} at {groups} groups is empty")
        gather = torch.searchsorted(parent_kept, in_idx)
        input_index = None if in_idx.numel() == parent_kept.numel() else gather
        blocks = []
        kept = in_idx
        for s in stage_ids:
            for spec in blocks_by_stage[s]:
                idx = {role: hard.members(spec.sets[role], groups, group) for role in spec.block.roles}
                blocks.append(spec.block.sliced(idx))
                kept = idx["out"]
        if not has_fc:
            ratio = segments[level + 1][0] // groups
            branches = [node(level + 1, group * ratio + k, kept) for k in range(ratio)]
            return SubtreeNode(input_index, blocks, branches=branches)
        classes = hard.members(CLASSES, groups, group)
        feat = hard.members(graph.features, groups, group)
        with torch.device(fc.weight.device):
            leaf_fc = nn.Linear(int(feat.numel()), int(classes.numel()), bias=fc.bias is not None)
        leaf_fc.weight = nn.Parameter(fc.weight.index_select(0, classes.to(fc.weight.device))
                                      .index_select(1, feat.to(fc.weight.device)).clone())
        if fc.bias is not None:
            leaf_fc.bias = nn.Parameter(fc.bias.index_select(0, classes.to(fc.bias.device)).clone())
        head = model.head_modules(feat.to(fc.weight.device) if model.head_norm is not None else None)
        return SubtreeNode(input_index, blocks, head=head, fc=leaf_fc, classes=classes)

    trunk_size = graph.sets[trunk_out].size
    root = torch.arange(trunk_size)
    subtrees = [node(0, g, root) for g in range(segments[0][0])]
    device = next(model.parameters()).device
    if device.type != "meta":
        for sub in subtrees:
            sub.to(device)
    tree = SplitTree(trunk, subtrees, arch=model.arch, split=model.split, num_classes=model.num_classes, hard=hard,
                     class_to_group=hard.group_of(CLASSES, model.fc_groups), info=info)
    tree.set_layers = {name: spec.layers for name, spec in graph.sets.items() if name in hard.labels}
    tree.train(model.training)
    return tree


def cut(model: SplitModel, min_classes_per_group: int = 1, min_channels_per_group: int = 1,
        info: dict | None = None) -> SplitTree:
    """Hard-assign ``model``'s learned groups and cut it into a :class:`SplitTree`.

    ``min_classes_per_group`` / ``min_channels_per_group``: no group ends up smaller (members
    move from groups that can spare them, least confident first; ``tree.moves`` lists them).
    ``info`` is saved in the manifest (e.g. ``{"class_names": [...], "mean": ..., "std": ...}``).
    """
    hard = hard_assignment(model, min_classes_per_group, min_channels_per_group)
    return build_tree(model, hard, info)
