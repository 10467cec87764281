"""Wide ResNet WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis 2016), pre-activation blocks.

WRN-16-8 is the SplitNet reference for CIFAR-100: 3 stages x 2 blocks, widths 128/256/512.
"""
from __future__ import annotations

from torch import nn

from ..assignment import SplitConfig
from .base import SplitModel, init_weights
from .blocks import WideBasic


class WideResNet(SplitModel):
    stage_names = ("layer1", "layer2", "layer3")
    head_norm_name = "bn"

    def __init__(self, depth: int = 16, widen: float = 8, num_classes: int = 100, split="1",
                 split_dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"invalid WRN depth {depth}: must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)")
        if widen < 1:
            raise ValueError(f"invalid WRN widening factor {widen}: must be >= 1")
        if float(16 * widen) != int(16 * widen):
            raise ValueError(f"invalid WRN widening factor {widen}: 16 x {widen} channels is not a whole number")
        n = (depth - 4) // 6
        self.arch = f"wrn-{depth}-{widen:g}"
        self.arch_kwargs = {"depth": depth, "widen": widen}
        widths = [int(16 * widen), int(32 * widen), int(64 * widen)]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        in_ch = 16
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = []
            for b in range(n):
                blocks.append(WideBasic(in_ch, width, width, stride if b == 0 else 1))
                in_ch = width
            setattr(self, self.stage_names[i], nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)
        self._finish_init(num_classes, SplitConfig.parse(split), split_dropout)

    def stem_modules(self):
        return [self.conv1]
