"""Parameters and FLOPs of dense models and split trees.

Counting rule (the one SPLITNET.md's reference numbers use): ``weights`` = elements of every conv
and linear weight matrix; BatchNorm parameters and biases excluded. ``params`` = every parameter
(what the safetensors files hold, less buffers). ``flops`` = 2 x multiply-accumulates of the conv
and linear layers for one image (BatchNorm, ReLU, pooling and the tree's index gathers are not
counted); WRN-16-8 on 32x32 is ~3.10 GFLOPs by this rule.
"""
from __future__ import annotations

import torch
from torch import nn


def count_weights(module: nn.Module) -> int:
    """Conv + linear weight elements (the reference counting rule)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def count_params(module: nn.Module) -> int:
    """Every parameter element (weights, biases, BatchNorm affine)."""
    return sum(p.numel() for p in module.parameters())


def count_bytes(module: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what a replica keeps in memory for weights)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@torch.no_grad()
def count_flops(module: nn.Module, inputs: torch.Tensor) -> int:
    """2 x MACs of every conv and linear layer in one forward of ``inputs`` (divided by batch)."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += 2 * out.numel() * k
        else:
            total += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    module.eval()
    try:
        module(inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return total // inputs.shape[0]


def default_input_size(arch: str) -> int:
    """32 for the CIFAR WRNs, 224 for the ImageNet ResNets."""
    return 32 if arch.startswith("wrn") else 224


def model_cost(model: nn.Module, input_size: int) -> dict:
    """{weights, params, state_bytes, flops} of a dense model for one ``input_size`` x ``input_size`` image.

    A split model's learned assignments (``assignments.*``, one logit per channel and group) are
    training state, not part of the network a user deploys: they are not counted."""
    x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    assignments = getattr(model, "assignments", None)
    params, state_bytes = count_params(model), count_bytes(model)
    if isinstance(assignments, nn.Module):
        params, state_bytes = params - count_params(assignments), state_bytes - count_bytes(assignments)
    return {"weights": count_weights(model), "params": params, "state_bytes": state_bytes,
            "flops": count_flops(model, x)}


def tree_cost(tree, input_size: int) -> dict:
    """Cost of a :class:`~splitnet.tree.SplitTree`: total, trunk and one entry per subtree."""
    x = torch.zeros(1, 3, input_size, input_size, device=next(tree.parameters()).device)
    with torch.no_grad():
        tree_was = tree.training
        tree.eval()
        features = tree.trunk(x)
        tree.train(tree_was)
    trunk = {"weights": count_weights(tree.trunk), "params": count_params(tree.trunk),
             "state_bytes": count_bytes(tree.trunk), "flops": count_flops(tree.trunk, x)}
    subtrees = [{"weights": count_weights(s), "params": count_params(s), "state_bytes": count_bytes(s),
                 "flops": count_flops(s, features)} for s in tree.subtrees]
    total = {k: trunk[k] + sum(s[k] for s in subtrees) for k in trunk}
    return {**total, "trunk": trunk, "subtrees": subtrees}


def reduction(dense: dict, split: dict) -> dict:
    """Fractions saved by the split, e.g. {"weights": 0.479, "flops": 0.347} (0.479 = 47.9% fewer)."""
    return {k: 1.0 - split[k] / dense[k] for k in ("weights", "params", "flops") if dense.get(k)}
