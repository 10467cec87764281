"""``splitnet plan``: a split's cost against the dense model with balanced groups, before any training."""
from __future__ import annotations

from splitnet.accounting import default_input_size, model_cost, reduction, tree_cost
from splitnet.models import build_model
from splitnet.tree import balanced_assignment, build_tree


def plan(arch: str, split: str, num_classes: int, input_size: int | None = None) -> dict:
    """Dense vs split cost of ``arch`` with balanced groups, without training.

    Returns {arch, split, num_classes, input_size, dense, split_tree, reduction, ideal_speedup}.
    """
    input_size = input_size or default_input_size(arch)
    model = build_model(arch, num_classes, split).eval()
    if input_size < model.min_input_size:
        raise ValueError(f"--input-size {input_size}: {arch} takes images of at least {model.min_input_size} px")
    dense = model_cost(model, input_size)
    tree = build_tree(model, balanced_assignment(model)).eval()
    cost = tree_cost(tree, input_size)
    return {"arch": arch, "split": str(model.split), "num_classes": num_classes, "input_size": input_size,
            "counting_rule": "weights = conv + linear weight elements (BN and biases excluded); "
                             "flops = 2 x MACs of conv + linear per image; groups balanced",
            "dense": dense, "split_tree": cost, "reduction": reduction(dense, cost),
            "ideal_speedup": dense["flops"] / cost["flops"]}
