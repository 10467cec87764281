"""AlexNet as torchvision builds it (Krizhevsky et al. 2012, the one-tower variant), split-aware.

Most of AlexNet's weights sit in its fully connected layers: of torchvision's 61.1M parameters,
fc6 (9216 -> 4096) holds 37.7M, fc7 16.8M and fc8 4.1M, the five convolutions 2.5M. Those are
the levels the split cuts, bottom to top, in the same ``G3-G2-G1`` notation as the ResNets:

* ``2-2-2``: fc6, fc7 and fc8 (the classes) in 2 groups; conv1..conv5 stay in the trunk;
* ``2-2-2-2``: conv5 as a further level below them (split ``G4-G3-G2-G1``).

fc6 reads conv5's 256 channels at 6 x 6 positions; its inputs are grouped by channel (the 36
positions of a channel go with it). To make that the same thing as a split convolution, fc6 and
fc7 are held as convolutions whose kernel covers their whole input (fc6: 256 -> 4096 with a 6 x 6
kernel; fc7: 4096 -> 4096, 1 x 1): ``W[out, channel, 6, 6]`` is exactly torchvision's
``W[out, channel * 36 + position]``, so the regularizers, the cut and the fused tree treat them as
they treat any split layer.

Weights cross the boundary in torchvision's names and shapes: :meth:`AlexNet.backbone_state_dict`
returns them (``features.10.weight``, ``classifier.1.weight`` of shape [4096, 9216], ...) and
:meth:`~splitnet.models.base.SplitModel.load_backbone_state_dict` takes them, so torchvision's
ImageNet weights load as they are (the classifier skipped when the class count differs) and a
baseline trained here loads into ``torchvision.models.alexnet``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..assignment import SplitConfig
from .base import SplitModel
from .blocks import SplitBlock, _maybe_drop


class _OneLayer(SplitBlock):
    """A block with one split layer from ``in`` to ``out`` (attribute ``layer``), no BatchNorm."""

    roles = ("in", "out")
    layer = ""

    @property
    def tied(self) -> bool:
        return False

    def split_layers(self):
        return [(self.layer, getattr(self, self.layer), "in", "out")]

    def norms(self):
        return []


class ConvPool(_OneLayer):
    """A convolution + ReLU, then AlexNet's max-pool (3, stride 2) and its adaptive average pool
    to ``pool`` x ``pool`` (conv5 of AlexNet)."""

    layer = "conv"

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, projection: bool | None = None, dropout: float = 0.0,
                 *, kernel: int = 3, padding: int = 1, pool: int = 6):
        super().__init__()
        self.stride, self.dropout_p = stride, dropout
        self.kernel, self.padding, self.pool_size = kernel, padding, pool
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def _ctor_kwargs(self, counts: dict[str, int]) -> dict:
        return {**super()._ctor_kwargs(counts), "kernel": self.kernel, "padding": self.padding, "pool": self.pool_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.maxpool(self.relu(self.conv(_maybe_drop(self.drop, x)))))


class FullyConnected(_OneLayer):
    """Dropout, a fully connected layer over the whole ``kernel`` x ``kernel`` input map (held as a
    convolution with that kernel: [B, C, k, k] -> [B, out, 1, 1]), ReLU: fc6 and fc7 of AlexNet."""

    layer = "fc"

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, projection: bool | None = None, dropout: float = 0.0,
                 *, kernel: int = 1, p: float = 0.5):
        super().__init__()
        self.stride, self.dropout_p = stride, dropout
        self.kernel, self.p = kernel, p
        self.dropout = nn.Dropout(p)  # torchvision's, before each of fc6 and fc7
        self.fc = nn.Conv2d(in_ch, out_ch, kernel)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None  # split_dropout, as in the residual blocks

    def _ctor_kwargs(self, counts: dict[str, int]) -> dict:
        return {**super()._ctor_kwargs(counts), "kernel": self.kernel, "p": self.p}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(_maybe_drop(self.drop, self.dropout(x))))


# torchvision's name -> ours, for the layers whose names differ; ``linear``: a torchvision Linear
# held here as a convolution over its whole input (same weights, reshaped)
_TORCHVISION = (("features.10.", "conv5.0.conv.", False), ("classifier.1.", "fc6.0.fc.", True),
                ("classifier.4.", "fc7.0.fc.", True), ("classifier.6.", "fc.", False))


class AlexNet(SplitModel):
    """torchvision's ``alexnet``: five convolutions (conv5 a split level of its own), then fc6,
    fc7 and the classifier fc8, with dropout before fc6 and fc7. Inputs of at least 63 x 63 px
    (224 is the reference; smaller maps are average-pooled up to 6 x 6 as in torchvision)."""

    stage_names = ("conv5", "fc6", "fc7")
    min_input_size = 63  # conv1 (11, stride 4) and three 3/2 max-pools leave at least one position

    def __init__(self, num_classes: int = 1000, split="1", split_dropout: float = 0.0, in_channels: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        self.arch, self.arch_kwargs = "alexnet", {}
        self.features = nn.Sequential(  # torchvision's features.0 .. features.9; features.10 (conv5) is a stage
            nn.Conv2d(in_channels, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True))
        self.conv5 = nn.Sequential(ConvPool(256, 256, kernel=3, padding=1, pool=6))
        self.fc6 = nn.Sequential(FullyConnected(256, 4096, kernel=6, p=dropout))
        self.fc7 = nn.Sequential(FullyConnected(4096, 4096, kernel=1, p=dropout))
        self.fc = nn.Linear(4096, num_classes)
        # torchvision's initialization is PyTorch's default for every layer; a Linear and the
        # convolution holding it draw from the same range (fan-in 9216 for fc6, 4096 for fc7)
        self._finish_init(num_classes, SplitConfig.parse(split), split_dropout)

    def stem_modules(self):
        return list(self.features)

    def to_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            for tv, own, linear in _TORCHVISION:
                if key.startswith(own):
                    key = tv + key[len(own):]
                    if linear and value.dim() == 4:
                        value = value.flatten(1)
                    break
            out[key] = value
        return out

    def from_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {k: v.shape for k, v in self.state_dict().items()}
        out = {}
        for key, value in state.items():
            for tv, own, linear in _TORCHVISION:
                if key.startswith(tv):
                    key = own + key[len(tv):]
                    if linear and value.dim() == 2 and key in shapes and value.numel() == shapes[key].numel():
                        value = value.reshape(shapes[key])
                    break
            out[key] = value
        return out
