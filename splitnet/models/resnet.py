"""ResNets with torchvision's module names (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ``fc``),
so a torchvision ``state_dict`` loads into them; blocks are split-aware.

The ImageNet-22K recipe of the paper splits ``layer4`` and ``fc`` into 4 groups: split ``4-4``.
"""
from __future__ import annotations

from torch import nn

from ..assignment import SplitConfig
from .base import SplitModel, init_weights
from .blocks import BasicBlock, Bottleneck

_LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


class ResNet(SplitModel):
    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, name: str = "resnet50", num_classes: int = 1000, split="1", split_dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if name not in _LAYOUTS:
            raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(_LAYOUTS)}")
        kind, counts = _LAYOUTS[name]
        self.arch, self.arch_kwargs = name, {}
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for i, (count, planes, stride) in enumerate(zip(counts, (64, 128, 256, 512), (1, 2, 2, 2))):
            blocks = []
            for b in range(count):
                s = stride if b == 0 else 1
                if kind == "basic":
                    blocks.append(BasicBlock(in_ch, planes, planes, s))
                    in_ch = planes
                else:
                    blocks.append(Bottleneck(in_ch, planes, planes, planes * 4, s))
                    in_ch = planes * 4
            setattr(self, self.stage_names[i], nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)
        self._finish_init(num_classes, SplitConfig.parse(split), split_dropout)

    def stem_modules(self):
        return [self.conv1, self.bn1, self.relu, self.maxpool]
