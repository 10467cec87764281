"""Forward throughput of dense WRN-16-8 vs its SplitTree on CPU (batch 64, 32x32), one run.

For each split config (balanced groups, and deliberately unbalanced ones) it measures images/s of
the dense model and of the tree, alternating single forwards of the two so machine noise hits
both alike, and reports the median speedup of the pairs next to the ideal one (dense FLOPs /
split FLOPs of that tree).
Target (issue 2): measured speedup >= 0.85 x ideal.

    python benchmarks/split_forward.py [--arch wrn-16-8] [--batch 64] [--rounds 11] [--channels-last] [--out benchmarks/results/split_forward.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from splitnet import build_model
from splitnet.accounting import count_flops, count_weights
from splitnet.tree import HardAssignment, balanced_assignment, build_tree


def unbalanced_assignment(model, shares: list[float], seed: int = 0) -> HardAssignment:
    """Every set split into groups of the given relative sizes (e.g. [0.4, 0.3, 0.2, 0.1]), members shuffled."""
    hard = balanced_assignment(model)
    g = torch.Generator().manual_seed(seed)
    for name, groups in hard.groups.items():
        size = hard.sizes[name]
        fine = shares if len(shares) == groups else [sum(shares[i::groups]) for i in range(groups)]
        counts = [max(1, round(s / sum(fine) * size)) for s in fine]
        counts[0] += size - sum(counts)
        labels = torch.repeat_interleave(torch.arange(groups), torch.tensor(counts))
        hard.labels[name] = labels[torch.randperm(size, generator=g)]
    return hard


def time_forward(module, x, repeats: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="wrn-16-8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=11, help="timed dense/tree pairs per case (median of pair ratios)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format for both models (faster oneDNN convs)")
    ap.add_argument("--out", default="benchmarks/results/split_forward.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [("2-2-2", "balanced", None), ("2-4-4", "balanced", None),
             ("2-2-2", "unbalanced 70/30", [0.7, 0.3]), ("2-4-4", "unbalanced 40/30/20/10", [0.4, 0.3, 0.2, 0.1])]
    x = torch.randn(args.batch, 3, 32, 32)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    rows = []
    for split, label, shares in cases:
        model = build_model(args.arch, 100, split).eval()
        hard = balanced_assignment(model) if shares is None else unbalanced_assignment(model, shares)
        tree = build_tree(model, hard).eval()
        model, tree = model.to(memory_format=fmt), tree.to(memory_format=fmt)
        dense_flops, tree_flops = count_flops(model, x[:1]), count_flops(tree, x[:1])
        time_forward(model, x, 2)  # warm-up: allocator, oneDNN kernels
        time_forward(tree, x, 2)
        # Alternate one dense and one tree forward and take the median of the pair ratios: the
        # machine's slow drifts (other tenants, clocks) then hit both sides of every ratio alike.
        dense_t, tree_t = [], []
        for _ in range(args.rounds):
            dense_t += time_forward(model, x, 1)
            tree_t += time_forward(tree, x, 1)
        dense_s, tree_s = statistics.median(dense_t), statistics.median(tree_t)
        speedup = statistics.median(d / t for d, t in zip(dense_t, tree_t))
        ideal = dense_flops / tree_flops
        rows.append({"arch": args.arch, "split": split, "groups": label, "batch": args.batch,
                     "dense_images_per_s": args.batch / dense_s, "tree_images_per_s": args.batch / tree_s,
                     "speedup": speedup, "speedup_spread": [min(d / t for d, t in zip(dense_t, tree_t)),
                                                        max(d / t for d, t in zip(dense_t, tree_t))],
                     "ideal_speedup": ideal, "fraction_of_ideal": speedup / ideal,
                     "dense_weights": count_weights(model), "tree_weights": count_weights(tree),
                     "dense_gflops": dense_flops / 1e9, "tree_gflops": tree_flops / 1e9,
                     "target_met": speedup / ideal >= 0.85})
    result = {"benchmark": "split_forward", "target": "speedup >= 0.85 x ideal", "torch": torch.__version__,
              "memory_format": "channels_last" if args.channels_last else "contiguous",
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'split':7} {'groups':24} {'dense img/s':>11} {'tree img/s':>10} {'speedup':>8} {'ideal':>6} {'of ideal':>9}")
    for r in rows:
        print(f"{r['split']:7} {r['groups']:24} {r['dense_images_per_s']:11.1f} {r['tree_images_per_s']:10.1f} "
              f"{r['speedup']:8.2f} {r['ideal_speedup']:6.2f} {r['fraction_of_ideal']:9.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
