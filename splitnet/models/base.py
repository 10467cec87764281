"""The split-aware model: a backbone (stem, stages of :class:`SplitBlock`, optional head norm,
classifier) plus the learned :class:`~splitnet.assignment.Assignments`.

``split_graph()`` describes the model the way the method sees it: every weight layer with the
channel sets it reads and writes and its number of groups, and every channel set with the
number of groups it is learned at. The regularizers, ``cut()`` and the accounting all work from
that description, so a new backbone only has to be built from split blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..assignment import Assignments, SplitConfig
from .blocks import SplitBlock, slice_norm_

CLASSES = "classes"


@dataclass
class LayerSpec:
    """One weight layer: ``W`` maps channel set ``in_set`` to ``out_set``; ``groups`` = 1 means unsplit."""

    name: str
    module: nn.Module
    in_set: str
    out_set: str
    groups: int


@dataclass
class ChannelSetSpec:
    """A set of channels (or the classes). ``groups`` is the finest grouping any layer needs."""

    name: str
    size: int
    groups: int = 1
    layers: list[str] = field(default_factory=list)


@dataclass
class BlockSpec:
    stage: int
    index: int
    block: SplitBlock
    sets: dict[str, str]  # role -> channel-set name


@dataclass
class SplitGraph:
    layers: list[LayerSpec]
    sets: dict[str, ChannelSetSpec]
    blocks: list[BlockSpec]
    stem_out: str
    features: str  # the set the classifier reads


class SplitModel(nn.Module):
    """Base class of the split-aware backbones.

    Subclasses create their modules, then call :meth:`_finish_init`. They provide
    ``stem_modules()`` (the unsplittable input layers, in order), ``stage_names`` (attributes
    holding ``nn.Sequential`` of split blocks), ``head_norm_name`` (the attribute of a BatchNorm
    on the final features, or None) and ``fc``.
    """

    arch: str = "?"
    min_input_size: int = 1  # the smallest image side the network can take (AlexNet's pooling needs 63)
    stage_names: tuple[str, ...] = ()
    head_norm_name: str | None = None  # attribute holding the BatchNorm on the final features, if any

    @property
    def head_norm(self) -> nn.BatchNorm2d | None:
        return getattr(self, self.head_norm_name) if self.head_norm_name else None

    def __init__(self):
        super().__init__()
        self.arch_kwargs: dict = {}

    # -- construction ---------------------------------------------------------------------------
    def _finish_init(self, num_classes: int, split: SplitConfig, split_dropout: float) -> None:
        self.num_classes = num_classes
        self.split = split
        self.stage_groups = split.stage_groups(len(self.stage_names))
        self.fc_groups = split.groups[-1]
        self.fc_drop = nn.Dropout(split_dropout) if split_dropout > 0 and self.fc_groups > 1 else None
        if split_dropout > 0:
            for stage, groups in zip(self.stages(), self.stage_groups):
                if groups > 1:
                    for block in stage:
                        block.drop = nn.Dropout(split_dropout)
                        block.dropout_p = split_dropout
        graph = self.split_graph()
        self.assignments = Assignments({s.name: (s.groups, s.size) for s in graph.sets.values() if s.groups > 1})

    def stem_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def head_modules(self, index: torch.Tensor | None = None) -> list[nn.Module]:
        """The layers between the last stage and pooling; sliced to ``index`` channels when given."""
        if self.head_norm is None:
            return []
        norm = self.head_norm
        if index is not None:
            with torch.device(norm.weight.device):
                new = nn.BatchNorm2d(int(index.numel()))
            slice_norm_(new, norm, index)
            new.train(norm.training)
            norm = new
        return [norm, nn.ReLU(inplace=True)]

    # -- the method's view of the model ---------------------------------------------------------
    def split_graph(self) -> SplitGraph:
        """Layers, channel sets and blocks, with the groups of each (see module docstring).

        The structure never changes after construction, so the graph is built once and cached.
        """
        cached = self.__dict__.get("_split_graph")
        if cached is not None:
            return cached
        sets: dict[str, ChannelSetSpec] = {}
        layers: list[LayerSpec] = []
        blocks: list[BlockSpec] = []
        stem_out = "stem"
        stem_channels = [m for m in self.stem_modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        sets[stem_out] = ChannelSetSpec(stem_out, stem_channels)
        stream = stem_out
        for s, (stage_name, stage, groups) in enumerate(zip(self.stage_names, self.stages(), self.stage_groups)):
            for b, block in enumerate(stage):
                counts = block.channel_counts()
                role_sets = {"in": stream}
                for role in block.roles:
                    if role == "in":
                        continue
                    if role == "out" and block.tied:
                        role_sets[role] = stream
                    else:
                        role_sets[role] = f"{stage_name}.{b}.{role}"
                        sets[role_sets[role]] = ChannelSetSpec(role_sets[role], counts[role])
                for lname, module, in_role, out_role in block.split_layers():
                    layers.append(LayerSpec(f"{stage_name}.{b}.{lname}", module, role_sets[in_role],
                                            role_sets[out_role], groups))
                blocks.append(BlockSpec(s, b, block, role_sets))
                stream = role_sets["out"]
        sets[CLASSES] = ChannelSetSpec(CLASSES, self.num_classes)
        layers.append(LayerSpec("fc", self.fc, stream, CLASSES, self.fc_groups))
        for layer in layers:
            for name in (layer.in_set, layer.out_set):
                sets[name].groups = max(sets[name].groups, layer.groups)
                sets[name].layers.append(layer.name)
        graph = SplitGraph(layers, sets, blocks, stem_out, stream)
        self.__dict__["_split_graph"] = graph
        return graph

    def split_layers(self) -> list[LayerSpec]:
        """Weight layers with more than one group (the ones the regularizer acts on)."""
        return [layer for layer in self.split_graph().layers if layer.groups > 1]

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.stem_modules():
            x = module(x)
        for stage in self.stages():
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> logits [B, num_classes]. Dense weights; assignments unused."""
        x = self.forward_features(x)
        if self.head_norm is not None:
            x = F.relu(self.head_norm(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.fc_drop is not None:
            x = self.fc_drop(x)
        return self.fc(x)

    # -- parameters -----------------------------------------------------------------------------
    def to_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Own state-dict names and shapes -> torchvision's (the same for the ResNets; AlexNet
        holds its fully connected layers as convolutions)."""
        return state

    def from_torchvision(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's state-dict names and shapes -> own (the inverse of :meth:`to_torchvision`)."""
        return state

    @property
    def classifier_key(self) -> str:
        """The classifier's prefix in :meth:`backbone_state_dict` (``fc.``; AlexNet: ``classifier.6.``)."""
        return next(iter(self.to_torchvision({"fc.weight": self.fc.weight}))).rsplit("weight", 1)[0]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the assignments, in torchvision's names and shapes (what the
        torchvision model of the same architecture holds and loads)."""
        return self.to_torchvision({k: v for k, v in self.state_dict().items() if not k.startswith("assignments.")})

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor], skip_fc_mismatch: bool = True) -> list[str]:
        """Load backbone weights (e.g. a torchvision checkpoint) and keep the assignments.

        Returns the keys that were skipped: the classifier when its number of classes differs
        and ``skip_fc_mismatch`` is set (starting ImageNet-22K from ImageNet-1K weights).
        Raises ``ValueError`` naming any other missing, unexpected or mis-shaped key.
        """
        own = self.backbone_state_dict()
        classifier = self.classifier_key
        skipped, problems = [], []
        for key, value in state_dict.items():
            if key not in own:
                problems.append(f"unexpected key {key}")
            elif tuple(own[key].shape) != tuple(value.shape):
                if skip_fc_mismatch and key.startswith(classifier):
                    skipped.append(key)
                else:
                    problems.append(f"{key}: shape {tuple(value.shape)} in checkpoint, {tuple(own[key].shape)} in model")
        missing = [k for k in own if k not in state_dict]
        problems += [f"missing key {k}" for k in missing]
        if problems:
            raise ValueError(f"checkpoint does not fit {self.arch}: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        load = self.from_torchvision({k: v for k, v in state_dict.items() if k not in skipped})
        self.load_state_dict(load, strict=False)
        return skipped


def init_weights(model: nn.Module) -> None:
    """torchvision's initialization: Kaiming-normal (fan_out) convs, unit BN, default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
