"""Split-aware backbones and their registry: ``build_model(arch, num_classes, split)``.

Registered: ``wrn-<depth>-<widen>`` (any valid WRN, e.g. ``wrn-16-8``; a fractional widening factor
whose widths 16k, 32k, 64k are whole, e.g. ``wrn-16-1.5``), ``resnet18``,
``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``, ``alexnet``. Add your own with
:func:`register_model`: a factory ``(num_classes, split, **kwargs) -> SplitModel``.
"""
from __future__ import annotations

import re
from typing import Callable

from .base import SplitModel, SplitGraph, LayerSpec, ChannelSetSpec, CLASSES
from .blocks import SplitBlock, WideBasic, BasicBlock, Bottleneck
from .resnet import ResNet, _LAYOUTS
from .alexnet import AlexNet, ConvPool, FullyConnected
from .wrn import WideResNet

_REGISTRY: dict[str, Callable[..., SplitModel]] = {}
_PATTERNS: list[tuple[re.Pattern, Callable[..., SplitModel]]] = []


def register_model(name: str, factory: Callable[..., SplitModel] | None = None):
    """Register ``factory(num_classes, split, **kwargs) -> SplitModel`` under ``name``.

    Usable as a decorator. A name with a regex group (e.g. ``r"wrn-(\\d+)-(\\d+)"``) is a pattern;
    its groups are passed to the factory first.
    """
    def deco(fn):
        if any(ch in name for ch in "()\\"):
            _PATTERNS.append((re.compile(name + r"\Z"), fn))
        else:
            _REGISTRY[name] = fn
        return fn
    return deco(factory) if factory is not None else deco


register_model(r"wrn-(\d+)-(\d+(?:\.\d+)?)", lambda d, k, num_classes, split="1", **kw:
               WideResNet(int(d), float(k) if "." in k else int(k), num_classes, split, **kw))
for _name in _LAYOUTS:
    register_model(_name, lambda num_classes, split="1", _n=_name, **kw: ResNet(_n, num_classes, split, **kw))
register_model("alexnet", lambda num_classes, split="1", **kw: AlexNet(num_classes, split, **kw))


def list_models() -> list[str]:
    """Names users can pass to :func:`build_model` (patterns shown with an example)."""
    return sorted(_REGISTRY) + ["wrn-<depth>-<widen> (e.g. wrn-16-8)"]


def build_model(arch: str, num_classes: int, split="1", **kwargs) -> SplitModel:
    """Build a split-aware model. ``split`` is a config like ``"2-2-2"`` (see SplitConfig)."""
    if arch in _REGISTRY:
        return _REGISTRY[arch](num_classes=num_classes, split=split, **kwargs)
    for pattern, factory in _PATTERNS:
        m = pattern.match(arch)
        if m:
            return factory(*m.groups(), num_classes=num_classes, split=split, **kwargs)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(list_models())}")


__all__ = ["build_model", "register_model", "list_models", "SplitModel", "SplitGraph", "LayerSpec",
           "ChannelSetSpec", "CLASSES", "SplitBlock", "WideBasic", "BasicBlock", "Bottleneck",
           "ResNet", "WideResNet", "AlexNet", "ConvPool", "FullyConnected"]
