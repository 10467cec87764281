"""The split tree run as one network per level: sibling subtrees fused into grouped ops.

A :class:`~splitnet.tree.SplitTree` runs its G subtrees one after the other: every conv,
BatchNorm and ReLU of a level is dispatched G times (G kernels where one would do), and the
logits come back through a concatenation and a gather. On a GPU those launches, not the FLOPs,
set the pace of a small-batch step, which is why the tree trained slower than the dense model it
replaces although it has half the weights.

:class:`FusedTree` computes the same function with one op per layer and level:

* the channels of a level live in G equal *slots* (each padded to the largest group's size), so
  the G sibling convolutions are one grouped convolution (``groups=G``) and the G BatchNorms one
  BatchNorm over all slots;
* a level reads its channels of the level below with one ``index_select`` (padding slots read a
  zero channel);
* the classifiers of the leaves are one batched matmul (``baddbmm``) and one ``index_select``
  puts the logits in the original class order: no scatter per group.

Padding is exact: padded weights, BatchNorm scales and shifts are zero, so padded channels are
exactly zero forward and receive exactly zero gradient backward (SGD with momentum and weight
decay keeps them at zero). :meth:`FusedTree.write_back` copies the trained weights and statistics
into the tree, which stays the format saved, served and counted.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .tree import SplitTree, SubtreeNode


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        root = getattr(root, name)
    setattr(root, leaf, module)


def _get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    for name in dotted.split("."):
        root = getattr(root, name)
    return root


def _grouped_conv(convs: list[nn.Conv2d], in_slot: int, out_slot: int) -> nn.Conv2d:
    """One ``groups=G`` convolution holding each of ``convs`` in its slot, zero-padded."""
    c0, groups = convs[0], len(convs)
    if c0.groups != 1:
        raise ValueError("fusing already grouped convolutions is not supported")
    w0 = c0.weight
    with torch.device(w0.device):
        fused = nn.Conv2d(groups * in_slot, groups * out_slot, c0.kernel_size, c0.stride, c0.padding, c0.dilation,
                          groups=groups, bias=c0.bias is not None, padding_mode=c0.padding_mode)
    with torch.no_grad():
        weight = torch.zeros(groups * out_slot, in_slot, *c0.kernel_size, dtype=w0.dtype, device=w0.device)
        bias = torch.zeros(groups * out_slot, dtype=w0.dtype, device=w0.device) if c0.bias is not None else None
        for g, conv in enumerate(convs):
            o, i = conv.weight.shape[:2]
            weight[g * out_slot:g * out_slot + o, :i] = conv.weight
            if bias is not None:
                bias[g * out_slot:g * out_slot + o] = conv.bias
    fused.weight = nn.Parameter(weight, requires_grad=w0.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=c0.bias.requires_grad)
    return fused


def _fused_norm(norms: list[nn.BatchNorm2d], slot: int) -> nn.BatchNorm2d:
    """One BatchNorm over G slots; padded channels get scale 0, shift 0, mean 0, variance 1."""
    n0, groups = norms[0], len(norms)
    device = (n0.weight if n0.affine else n0.running_mean).device
    with torch.device(device):
        fused = nn.BatchNorm2d(groups * slot, eps=n0.eps, momentum=n0.momentum, affine=n0.affine,
                               track_running_stats=n0.track_running_stats)
    with torch.no_grad():
        if n0.affine:
            fused.weight.zero_()
            fused.bias.zero_()
            fused.weight.requires_grad_(n0.weight.requires_grad)
            fused.bias.requires_grad_(n0.bias.requires_grad)
        for g, norm in enumerate(norms):
            c = norm.num_features
            if norm.affine:
                fused.weight[g * slot:g * slot + c] = norm.weight
                fused.bias[g * slot:g * slot + c] = norm.bias
            if norm.track_running_stats:
                fused.running_mean[g * slot:g * slot + c] = norm.running_mean
                fused.running_var[g * slot:g * slot + c] = norm.running_var
        if n0.track_running_stats:
            fused.num_batches_tracked.copy_(n0.num_batches_tracked)
    fused.train(n0.training)
    return fused


@torch.no_grad()
def _write_conv(fused: nn.Conv2d, convs: list[nn.Conv2d], out_slot: int) -> None:
    for g, conv in enumerate(convs):
        o, i = conv.weight.shape[:2]
        conv.weight.copy_(fused.weight[g * out_slot:g * out_slot + o, :i])
        if conv.bias is not None:
            conv.bias.copy_(fused.bias[g * out_slot:g * out_slot + o])


@torch.no_grad()
def _write_norm(fused: nn.BatchNorm2d, norms: list[nn.BatchNorm2d], slot: int) -> None:
    for g, norm in enumerate(norms):
        c = norm.num_features
        if norm.affine:
            norm.weight.copy_(fused.weight[g * slot:g * slot + c])
            norm.bias.copy_(fused.bias[g * slot:g * slot + c])
        if norm.track_running_stats:
            norm.running_mean.copy_(fused.running_mean[g * slot:g * slot + c])
            norm.running_var.copy_(fused.running_var[g * slot:g * slot + c])
            norm.num_batches_tracked.copy_(fused.num_batches_tracked)


class FusedBlock(nn.Module):
    """G sibling blocks of one class run as one: the same block class built with G slots per
    role, its convolutions grouped and its BatchNorms spanning the slots."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        b0 = blocks[0]
        if any(type(b) is not type(b0) for b in blocks):
            raise ValueError("sibling blocks of different classes cannot be fused")
        counts = [b.channel_counts() for b in blocks]
        self.slots = {role: max(c[role] for c in counts) for role in b0.roles}
        groups = len(blocks)
        device = next(b0.parameters()).device
        with torch.device(device):
            fused = type(b0)(**b0._ctor_kwargs({role: groups * s for role, s in self.slots.items()}))
        for name, _, in_role, out_role in b0.split_layers():
            convs = [_get_submodule(b, name) for b in blocks]
            _set_submodule(fused, name, _grouped_conv(convs, self.slots[in_role], self.slots[out_role]))
        for name, _, role in b0.norms():
            _set_submodule(fused, name, _fused_norm([_get_submodule(b, name) for b in blocks], self.slots[role]))
        fused.train(b0.training)
        self.block = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def write_back(self, blocks: list[nn.Module]) -> None:
        b0 = blocks[0]
        for name, _, _, out_role in b0.split_layers():
            _write_conv(_get_submodule(self.block, name), [_get_submodule(b, name) for b in blocks], self.slots[out_role])
        for name, _, role in b0.norms():
            _write_norm(_get_submodule(self.block, name), [_get_submodule(b, name) for b in blocks], self.slots[role])


class FusedLevel(nn.Module):
    """The nodes of one depth of the tree: a gather from the level below, fused blocks, then
    either nothing (the next level gathers) or the fused head and classifiers of the leaves."""

    def __init__(self, nodes: list[SubtreeNode], parent_slot: int, parent_of: list[int]):
        super().__init__()
        groups = len(nodes)
        self.groups = groups
        inputs = [node.input_index.cpu() if node.input_index is not None else torch.arange(self._in_size(node))
                  for node in nodes]
        self.in_slot = max(int(i.numel()) for i in inputs)
        # channel c of parent slot p is channel p * parent_slot + c of the level below; a padding
        # position reads channel 0 of that tensor padded in front with one zero channel
        gather = torch.full((groups * self.in_slot,), -1, dtype=torch.long)
        for g, idx in enumerate(inputs):
            gather[g * self.in_slot:g * self.in_slot + idx.numel()] = parent_of[g] * parent_slot + idx
        self.pad = bool((gather < 0).any())
        if self.pad:
            gather += 1
        identity = not self.pad and torch.equal(gather, torch.arange(gather.numel()))
        device = nodes[0].classes.device
        self.register_buffer("gather", None if identity else gather.to(device))
        depth = len(nodes[0].blocks)
        if any(len(n.blocks) != depth for n in nodes):
            raise ValueError("sibling subtrees of different depth cannot be fused")
        self.blocks = nn.Sequential(*(FusedBlock([n.blocks[j] for n in nodes]) for j in range(depth)))
        last = self.blocks[-1].slots["out"] if depth else self.in_slot
        self.out_slot = last
        self.leaf = nodes[0].branches is None
        if not self.leaf:
            return
        head = []
        for j, module in enumerate(nodes[0].head):
            if isinstance(module, nn.BatchNorm2d):
                head.append(_fused_norm([n.head[j] for n in nodes], last))
            else:
                head.append(copy.deepcopy(module))
        self.head = nn.Sequential(*head)
        fcs = [n.fc for n in nodes]
        self.class_slot = max(fc.out_features for fc in fcs)
        w0 = fcs[0].weight
        weight = torch.zeros(groups, self.class_slot, last, dtype=w0.dtype, device=w0.device)
        bias = torch.zeros(groups, self.class_slot, dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            for g, fc in enumerate(fcs):
                weight[g, :fc.out_features, :fc.in_features] = fc.weight
                if fc.bias is not None:
                    bias[g, :fc.out_features] = fc.bias
        self.fc_weight = nn.Parameter(weight, requires_grad=w0.requires_grad)
        self.fc_bias = nn.Parameter(bias, requires_grad=fcs[0].bias is not None)

    @staticmethod
    def _in_size(node: SubtreeNode) -> int:
        """Channels a node reads (all of its parent's when it has no ``input_index``)."""
        if len(node.blocks):
            return node.blocks[0].channel_counts()["in"]
        return node.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather is not None:
            if self.pad:
                x = F.pad(x, (0, 0, 0, 0, 1, 0))
            x = x.index_select(1, self.gather)
        x = self.blocks(x)
        if not self.leaf:
            return x
        x = self.head(x)  # [B, G * slot]
        x = x.view(x.shape[0], self.groups, -1).transpose(0, 1)  # [G, B, slot]
        logits = torch.baddbmm(self.fc_bias.unsqueeze(1).to(x.dtype), x, self.fc_weight.transpose(1, 2).to(x.dtype))
        return logits.transpose(0, 1).reshape(x.shape[1], -1)  # [B, G * class_slot]

    def write_back(self, nodes: list[SubtreeNode]) -> None:
        for j, fused in enumerate(self.blocks):
            fused.write_back([n.blocks[j] for n in nodes])
        if not self.leaf:
            return
        for j, module in enumerate(self.head):
            if isinstance(module, nn.BatchNorm2d):
                _write_norm(module, [n.head[j] for n in nodes], self.out_slot)
        with torch.no_grad():
            for g, node in enumerate(nodes):
                fc = node.fc
                fc.weight.copy_(self.fc_weight[g, :fc.out_features, :fc.in_features])
                if fc.bias is not None:
                    fc.bias.copy_(self.fc_bias[g, :fc.out_features])


class FusedTree(nn.Module):
    """``tree``'s function with the subtrees of each level fused (see the module docstring).

    Holds its own copy of the subtrees' weights (the trunk is shared with ``tree``); train it,
    then :meth:`write_back` (or :meth:`to_tree`) to put the weights into the tree for saving.
    ``forward`` returns logits [B, num_classes] in the original class order, like the tree.
    """

    def __init__(self, tree: SplitTree):
        super().__init__()
        self.__dict__["_tree"] = tree  # not a submodule: its subtree weights are not ours
        self.trunk = tree.trunk
        self.num_classes = tree.num_classes
        levels, nodes = [], list(tree.subtrees)
        parent_slot, parent_of = 0, [0] * len(nodes)  # the trunk's output is one slot
        self._nodes = []
        while True:
            level = FusedLevel(nodes, parent_slot, parent_of)
            levels.append(level)
            self._nodes.append(nodes)
            if level.leaf:
                break
            children, parent_of = [], []
            for p, node in enumerate(nodes):
                children += list(node.branches)
                parent_of += [p] * len(node.branches)
            parent_slot, nodes = level.out_slot, children
        self.levels = nn.ModuleList(levels)
        leaves, slot = self._nodes[-1], levels[-1].class_slot
        position = torch.empty(tree.num_classes, dtype=torch.long)
        for g, leaf in enumerate(leaves):
            position[leaf.classes.cpu()] = g * slot + torch.arange(leaf.classes.numel())
        self.register_buffer("class_position", position.to(leaves[0].classes.device), persistent=False)
        self.train(tree.training)

    @property
    def tree(self) -> SplitTree:
        return self.__dict__["_tree"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)
        for level in self.levels:
            x = level(x)
        return x.index_select(1, self.class_position)

    def write_back(self) -> SplitTree:
        """Copy the trained weights and BatchNorm statistics into the tree; returns the tree."""
        for level, nodes in zip(self.levels, self._nodes):
            level.write_back(nodes)
        self.tree.train(self.training)
        return self.tree

    to_tree = write_back

    def subtree_parameters(self) -> list[nn.Parameter]:
        """The weights above the trunk (what ``split_lr_mult`` scales when finetuning)."""
        return list(self.levels.parameters())
