"""Counting the operators a piece of PyTorch code dispatches (the torch profiler), for the
benchmarks and for tests that pin how many ops the regularizers and the tree's step cost.

Op counts are a machine-independent proxy for launch overhead: on a GPU every compute op is at
least one kernel launch, so hundreds of small ops cost milliseconds however small they are.
Views (transpose, slice, expand, ...) and allocations launch no kernel and are counted apart.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from torch.profiler import ProfilerActivity, profile

# aten ops that only make a view or allocate: no kernel runs
VIEW_OPS = frozenset({
    "aten::transpose", "aten::unsqueeze", "aten::expand", "aten::select", "aten::narrow", "aten::view",
    "aten::reshape", "aten::permute", "aten::as_strided", "aten::slice", "aten::t", "aten::alias", "aten::detach",
    "aten::squeeze", "aten::flatten", "aten::unbind", "aten::split", "aten::_unsafe_view", "aten::expand_as",
    "aten::unflatten", "aten::lift_fresh", "aten::result_type", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::is_nonzero", "aten::scalar_tensor", "aten::_reshape_alias", "aten::chunk",
    "aten::split_with_sizes", "aten::view_as", "aten::contiguous",
})


def count_ops(fn: Callable[[], object], warmup: int = 1) -> dict:
    """Run ``fn`` under the profiler; top-level aten ops (not those called by another aten op).

    Returns {"top_level": n, "compute": n without views/allocations, "by_name": Counter of compute ops}.
    """
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = []
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top.append(event.name)
    compute = [name for name in top if name not in VIEW_OPS]
    return {"top_level": len(top), "compute": len(compute), "by_name": Counter(compute)}
