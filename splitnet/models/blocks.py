"""Residual blocks that know how they can be split.

Every block names the channel sets it touches by *role*: ``in`` (its input), ``mid``/``mid1``/
``mid2`` (the channels between its convs) and ``out`` (its output). A block with an identity
shortcut is *tied*: its input and output are the same channel set, so they must be grouped the
same way. A projection shortcut is an ordinary split layer from ``in`` to ``out``.

``sliced(idx)`` builds a smaller block of the same class that keeps only the channels in
``idx[role]`` (sorted global indices), copying the weights and the BatchNorm statistics. The
module names follow torchvision's (``conv1``, ``bn1``, ``downsample.0``), so a torchvision
``state_dict`` loads into the dense ResNets unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _maybe_drop(drop: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return drop(x) if drop is not None else x


def _needs_projection(in_ch: int, out_ch: int, stride: int, projection: bool | None) -> bool:
    return (in_ch != out_ch or stride != 1) if projection is None else projection


class SplitBlock(nn.Module):
    """Base class. Subclasses define ``roles``, ``tied``, ``split_layers`` and ``norms``, take
    ``<role>_ch, stride, projection, dropout`` in their constructor and keep ``stride`` and
    ``dropout_p`` as attributes."""

    roles: tuple[str, ...] = ()

    def channel_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, layer, in_role, out_role in self.split_layers():
            counts[in_role] = layer.weight.shape[1]
            counts[out_role] = layer.weight.shape[0]
        return counts

    @property
    def tied(self) -> bool:
        """True when the shortcut is the identity: input and output share one channel set."""
        raise NotImplementedError

    def split_layers(self) -> list[tuple[str, nn.Module, str, str]]:
        """(name, conv, in_role, out_role) for every weight layer of the block."""
        raise NotImplementedError

    def norms(self) -> list[tuple[str, nn.BatchNorm2d, str]]:
        """(name, batchnorm, role) for every BatchNorm of the block."""
        raise NotImplementedError

    def _ctor_kwargs(self, counts: dict[str, int]) -> dict:
        """Constructor arguments of the same block with ``counts[role]`` channels per role."""
        return dict(**{f"{role}_ch": counts[role] for role in self.roles}, stride=self.stride,
                    projection=not self.tied, dropout=self.dropout_p)

    @torch.no_grad()
    def sliced(self, idx: dict[str, torch.Tensor]) -> "SplitBlock":
        """A new block keeping channels ``idx[role]`` of every role (1-D LongTensors, sorted).

        Weights are sliced (``W[out_idx][:, in_idx]``, a bias ``b[out_idx]``), BatchNorm affine parameters and running
        statistics are sliced, not re-initialized. Works on the ``meta`` device too.
        """
        counts = {role: int(idx[role].numel()) for role in self.roles}
        device = next(self.parameters()).device
        with torch.device(device):
            new = type(self)(**self._ctor_kwargs(counts))
        new_layers = dict((name, layer) for name, layer, _, _ in new.split_layers())
        for name, layer, in_role, out_role in self.split_layers():
            w = layer.weight.index_select(0, idx[out_role].to(device)).index_select(1, idx[in_role].to(device))
            new_layers[name].weight = nn.Parameter(w.clone(), requires_grad=layer.weight.requires_grad)
            if layer.bias is not None:  # a bias belongs to its output channel
                b = layer.bias.index_select(0, idx[out_role].to(device))
                new_layers[name].bias = nn.Parameter(b.clone(), requires_grad=layer.bias.requires_grad)
        new_norms = dict((name, bn) for name, bn, _ in new.norms())
        for name, bn, role in self.norms():
            slice_norm_(new_norms[name], bn, idx[role])
        new.train(self.training)
        return new


@torch.no_grad()
def slice_norm_(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, index: torch.Tensor) -> None:
    """Copy src's affine parameters and running statistics at ``index`` into ``dst``."""
    index = index.to(src.weight.device if src.weight is not None else src.running_mean.device)
    if src.affine:
        dst.weight = nn.Parameter(src.weight.index_select(0, index).clone(), requires_grad=src.weight.requires_grad)
        dst.bias = nn.Parameter(src.bias.index_select(0, index).clone(), requires_grad=src.bias.requires_grad)
    if src.track_running_stats:
        dst.running_mean = src.running_mean.index_select(0, index).clone()
        dst.running_var = src.running_var.index_select(0, index).clone()
        dst.num_batches_tracked = src.num_batches_tracked.clone()
    dst.num_features = int(index.numel())


class WideBasic(SplitBlock):
    """Pre-activation wide-ResNet block (Zagoruyko & Komodakis): BN-ReLU-conv3x3-BN-ReLU-conv3x3.

    With a projection, the shortcut is a 1x1 conv on the pre-activated input (as in the WRN
    reference code); otherwise the shortcut is the identity.
    """

    roles = ("in", "mid", "out")

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1,
                 projection: bool | None = None, dropout: float = 0.0):
        super().__init__()
        projection = _needs_projection(in_ch, out_ch, stride, projection)
        self.stride, self.dropout_p = stride, dropout
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False) if projection else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def tied(self) -> bool:
        return self.shortcut is None

    def split_layers(self):
        layers = [("conv1", self.conv1, "in", "mid"), ("conv2", self.conv2, "mid", "out")]
        if self.shortcut is not None:
            layers.append(("shortcut", self.shortcut, "in", "out"))
        return layers

    def norms(self):
        return [("bn1", self.bn1, "in"), ("bn2", self.bn2, "mid")]


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        o_in = _maybe_drop(self.drop, o)
        shortcut = self.shortcut(o_in) if self.shortcut is not None else x
        y = self.conv1(o_in)
        y = self.conv2(_maybe_drop(self.drop, F.relu(self.bn2(y))))
        return y + shortcut


class _TorchvisionBlock(SplitBlock):
    """What torchvision's residual blocks share: the ``downsample`` projection (conv + BN)."""

    def _init_shortcut(self, in_ch: int, out_ch: int, stride: int, projection: bool | None, dropout: float) -> None:
        self.stride, self.dropout_p = stride, dropout
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
                           if _needs_projection(in_ch, out_ch, stride, projection) else None)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def tied(self) -> bool:
        return self.downsample is None

    def _shortcut_layers(self):
        return [] if self.downsample is None else [("downsample.0", self.downsample[0], "in", "out")]

    def _shortcut_norms(self):
        return [] if self.downsample is None else [("downsample.1", self.downsample[1], "out")]


class BasicBlock(_TorchvisionBlock):
    """torchvision's ResNet BasicBlock (post-activation), same module names."""

    roles = ("in", "mid", "out")

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1,
                 projection: bool | None = None, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self._init_shortcut(in_ch, out_ch, stride, projection, dropout)

    def split_layers(self):
        return [("conv1", self.conv1, "in", "mid"), ("conv2", self.conv2, "mid", "out")] + self._shortcut_layers()

    def norms(self):
        return [("bn1", self.bn1, "mid"), ("bn2", self.bn2, "out")] + self._shortcut_norms()


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = _maybe_drop(self.drop, x)
        identity = self.downsample(x_in) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x_in)))
        out = self.bn2(self.conv2(_maybe_drop(self.drop, out)))
        return self.relu(out + identity)


class Bottleneck(_TorchvisionBlock):
    """torchvision's ResNet v1.5 Bottleneck (stride on the 3x3 conv), same module names."""

    roles = ("in", "mid1", "mid2", "out")

    def __init__(self, in_ch: int, mid1_ch: int, mid2_ch: int, out_ch: int, stride: int = 1,
                 projection: bool | None = None, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid1_ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1_ch)
        self.conv2 = nn.Conv2d(mid1_ch, mid2_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2_ch)
        self.conv3 = nn.Conv2d(mid2_ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self._init_shortcut(in_ch, out_ch, stride, projection, dropout)

    def split_layers(self):
        return [("conv1", self.conv1, "in", "mid1"), ("conv2", self.conv2, "mid1", "mid2"),
                ("conv3", self.conv3, "mid2", "out")] + self._shortcut_layers()

    def norms(self):
        return [("bn1", self.bn1, "mid1"), ("bn2", self.bn2, "mid2"), ("bn3", self.bn3, "out")] + self._shortcut_norms()


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = _maybe_drop(self.drop, x)
        identity = self.downsample(x_in) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x_in)))
        out = self.relu(self.bn2(self.conv2(_maybe_drop(self.drop, out))))
        out = self.bn3(self.conv3(_maybe_drop(self.drop, out)))
        return self.relu(out + identity)
