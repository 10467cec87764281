"""Training-step throughput: SplitNet grouping step vs a plain dense step vs the split finetune step, one run.

* dense: the model, cross-entropy only (the baseline);
* grouping: the same model, CE + the three SplitNet regularizers (``regularization_loss``), the
  same SGD with ``parameter_groups`` (the assignments get their own group);
* split: the SplitTree ``splitnet.cut(model)`` gives, trained with plain CE, one subtree after
  the other;
* fused: the same tree with each level's subtrees fused into grouped ops (``splitnet.fused``,
  what the finetune stage trains by default).

Each variant runs ``--warmup`` steps, then timed blocks of steps alternate dense / grouping /
split / fused for ``--rounds`` rounds, so the machine's slow drifts hit all of them alike. Images/s is the
batch over the median block time per step; the ratios are the medians of the per-round ratios
(``best``: fastest block vs fastest block, the least disturbed estimate on a busy machine).
Target: grouping / dense >= 0.90 (regularizer overhead <= 10%). On CUDA the clock is read only
after ``torch.cuda.synchronize()``.

    python benchmarks/train_step.py [--arch wrn-16-2] [--split 2-2-2] [--batch 128] [--size 32]
        [--steps 30] [--rounds 5] [--device cpu|cuda] [--amp bf16] [--channels-last]
    python benchmarks/train_step.py --arch resnet50 --classes 21841 --split 4-4 --size 224 --batch 64 --device cuda --amp bf16
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from splitnet import build_model, cut, hard_assignment
from splitnet.accounting import count_weights
from splitnet.fused import FusedTree
from splitnet.grouping import BlockProx, Grouping, GroupingSchedule
from splitnet.precision import choose_precision
from splitnet.profiling import count_ops
from splitnet.regularizers import RegularizerWeights, parameter_groups, regularizer_terms, regularizer_terms_reference
from splitnet.train import CompiledForward

# split used when --split is not given: the paper's configs (resnet: layer4 + fc in 4 groups).
DEFAULT_SPLIT = {"wrn": "2-2-2", "resnet": "4-4"}


def make_step(model, optimizer, x, y, *, reg_weights=None, amp_dtype=None, device_type="cpu", compile=False):
    """One training step as ``splitnet.train.train_one_epoch`` runs it while grouping (the assign
    phase: CE + the three regularizers, fused) or plainly. Like the loop, it never waits for the
    device: the loss stays there. The regularizers are computed outside autocast, in float32 (sqrt /
    clamp at 1e-12 of bf16 sums would lose the small terms)."""
    grouping = Grouping(model, reg_weights, GroupingSchedule(method="reference"), 0) if reg_weights is not None else None
    forward = CompiledForward(model) if compile else model  # as scaling.compile runs it: the regularizers stay eager

    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
        if grouping is not None:
            reg, _terms = grouping.loss(0)
            loss = loss.float() + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def regularizer_cost(model, sync, clock, repeats: int = 5, compiled: bool = False) -> dict:
    """The regularizers' own forward + backward: time (median of ``repeats``) and dispatched ops,
    layer by layer as the formulas read (``before``) and batched (``after``, what training runs);
    and the sparsify phase's proximal step (batched)."""
    out = {}
    fns = [("before", regularizer_terms_reference), ("after", regularizer_terms)]
    if compiled:  # the batched regularizers through torch.compile (not what training runs: see docs/scaling.md)
        fns.append(("after_compiled", torch.compile(regularizer_terms, dynamic=False)))
    for name, fn in fns:
        def run(fn=fn):
            t = fn(model)
            (t["disjoint"] + t["weight"] + 10 * t["balance"]).backward()
        run()
        times = []
        for _ in range(repeats):
            sync()
            t0 = clock()
            run()
            sync()
            times.append(clock() - t0)
        ops = count_ops(run) if name != "after_compiled" else {"compute": None, "top_level": None}
        out[name] = {"ms": statistics.median(times) * 1e3, "ops": ops["compute"], "ops_with_views": ops["top_level"]}
    model.zero_grad(set_to_none=True)
    prox = BlockProx(model, hard_assignment(model))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ops = count_ops(lambda: prox.step(1e-4, 1.0))
    model.load_state_dict(state)
    out["prox_step"] = {"ops": ops["compute"], "ops_with_views": ops["top_level"]}
    return out


def timed_block(step, steps: int, sync, clock=time.perf_counter) -> float:
    """Seconds per step over ``steps`` steps (synchronized before and after on CUDA)."""
    sync()
    t = clock()
    for _ in range(steps):
        step()
    sync()
    return (clock() - t) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="wrn-16-2", help="wrn-16-2 (CPU default), wrn-16-8, resnet50, ...")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--split", default=None, help="split config, bottom to top; default 2-2-2 for WRN, 4-4 "
                    "(layer4 + fc in 4 groups) for ResNet")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32, help="input size (32 CIFAR, 224 ImageNet)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (split into --rounds blocks)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed blocks per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"],
                    help="torch.autocast bf16 for forward + CE; auto: where the device computes bf16 natively")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format for models and inputs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: this process's CPU time (with --threads 1 a robust measure of "
                         "the work per step on a machine other jobs load; CPU device only)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--no-split-step", action="store_true", help="skip the split finetune step")
    ap.add_argument("--compile", action="store_true", help="also each variant with its forward through torch.compile "
                    "(scaling.compile), and the regularizers compiled")
    ap.add_argument("--tag", default=None, help="result file tag (default from arch/size/device/amp)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_step: --device cuda but torch sees no CUDA device on this machine", file=sys.stderr)
        sys.exit(2)
    if args.clock == "cpu" and args.device != "cpu":
        print("train_step: --clock cpu measures host CPU time; use it with --device cpu", file=sys.stderr)
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    family = "wrn" if args.arch.startswith("wrn") else "resnet"
    split = args.split or DEFAULT_SPLIT[family]
    device = torch.device(args.device)
    precision = choose_precision(args.amp, device)
    print(precision.line() + (f"\n{precision.warning()}" if precision.warning() else ""))
    amp_dtype = precision.dtype
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)

    grouping = build_model(args.arch, args.classes, split).to(device=device, memory_format=fmt).train()
    dense = copy.deepcopy(grouping)
    variants = {
        "dense": dense,
        "grouping": grouping,
    }
    if not args.no_split_step:
        variants["split"] = cut(grouping).to(device=device, memory_format=fmt).train()
        # the same tree trained as the finetune stage does by default: each level's subtrees fused
        variants["fused"] = FusedTree(copy.deepcopy(variants["split"])).to(device=device, memory_format=fmt).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    reg_weights = RegularizerWeights()
    if args.compile:  # the same models again (copies: own weights and optimizer state), forward compiled
        variants.update({f"{name}+c": copy.deepcopy(model) for name, model in list(variants.items())})
    steps = {}
    for name, model in variants.items():
        opt = torch.optim.SGD(parameter_groups(model, args.lr, 5e-4), lr=args.lr, momentum=0.9, nesterov=True)
        steps[name] = make_step(model, opt, x, y, reg_weights=reg_weights if name.startswith("grouping") else None,
                                amp_dtype=amp_dtype, device_type=device.type, compile=name.endswith("+c"))
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    sync()
    per_block = max(1, math.ceil(args.steps / args.rounds))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed_block(step, per_block, sync, clock))

    def ratio(name):
        per_round = [d / v for d, v in zip(times["dense"], times[name])]
        return statistics.median(per_round), [min(per_round), max(per_round)]

    rows = []
    for name in steps:
        r, spread = ratio(name)
        sec = statistics.median(times[name])
        rows.append({"variant": name, "images_per_s": args.batch / sec, "ms_per_step": sec * 1e3,
                     "ratio_vs_dense": r, "ratio_spread": spread,
                     # fastest block of each: the least disturbed estimate on a busy machine
                     "best_ms_per_step": min(times[name]) * 1e3, "best_ratio_vs_dense": min(times["dense"]) / min(times[name]),
                     "weights": count_weights(variants[name].tree if name.startswith("fused") else variants[name])})
    by = {r["variant"]: r for r in rows}
    overhead_ratio = by["grouping"]["ratio_vs_dense"]
    reg = regularizer_cost(variants["grouping"], sync, clock, compiled=args.compile)
    dense_ms = by["dense"]["ms_per_step"]
    for k in ("before", "after") + (("after_compiled",) if args.compile else ()):
        reg[k]["share_of_dense_step"] = reg[k]["ms"] / dense_ms
    tree_ops = None
    if "split" in variants:
        tree_ops = count_ops(steps["split"])["compute"]
        reg["dense_step_ops"] = count_ops(steps["dense"])["compute"]
        reg["split_step_ops"] = tree_ops
        reg["fused_split_step_ops"] = count_ops(steps["fused"])["compute"]
    tag = args.tag or "-".join([args.arch, f"{args.size}px", device.type] + (["bf16"] if amp_dtype else [])
                               + (["cl"] if args.channels_last else []) + (["cputime"] if args.clock == "cpu" else [])
                               + (["compile"] if args.compile else []))
    result = {
        "benchmark": "train_step", "target": "grouping / dense images/s >= 0.90",
        "arch": args.arch, "classes": args.classes, "split": split, "batch": args.batch, "size": args.size,
        "device": device.type, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "amp": precision.name, "precision": precision.line(), "memory_format": "channels_last" if args.channels_last else "contiguous",
        "steps_per_block": per_block, "rounds": args.rounds, "warmup": args.warmup,
        "clock": args.clock, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "grouping_over_dense": overhead_ratio, "split_over_dense": by["split"]["ratio_vs_dense"] if "split" in by else None,
        "fused_split_over_dense": by["fused"]["ratio_vs_dense"] if "fused" in by else None,
        "grouping_over_dense_best": by["grouping"]["best_ratio_vs_dense"],
        "target_met": overhead_ratio >= 0.90, "rows": rows, "regularizer": reg,
        "compiled_over_eager": {name: by[name]["ratio_vs_dense"] / by[name[:-2]]["ratio_vs_dense"]
                                for name in by if name.endswith("+c")},
        "block_seconds_per_step": times,
    }
    out = Path(args.out_dir) / f"train_step-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.arch} split {split} classes {args.classes} batch {args.batch} {args.size}px {device.type}"
          f" amp {precision.name} {result['memory_format']} ({args.rounds} rounds x {per_block} steps,"
          f" {torch.get_num_threads()} threads, {'process CPU time' if args.clock == 'cpu' else 'wall clock'})")
    print(f"{'variant':9} {'img/s':>9} {'ms/step':>9} {'vs dense':>9} {'spread':>13} {'best ms':>9} {'best vs':>8} {'weights':>10}")
    for r in rows:
        print(f"{r['variant']:9} {r['images_per_s']:9.1f} {r['ms_per_step']:9.1f} {r['ratio_vs_dense']:9.3f} "
              f"{r['ratio_spread'][0]:6.3f}-{r['ratio_spread'][1]:<6.3f} {r['best_ms_per_step']:9.1f} "
              f"{r['best_ratio_vs_dense']:8.3f} {r['weights'] / 1e6:9.2f}M")
    b, a = reg["before"], reg["after"]
    print(f"regularizers alone (forward + backward): before {b['ms']:.1f} ms, {b['ops']} ops ({b['ops_with_views']} with views); "
          f"after {a['ms']:.1f} ms, {a['ops']} ops ({a['ops_with_views']}): {b['ops'] / a['ops']:.1f}x fewer ops, "
          f"{a['share_of_dense_step']:.2%} of a dense step (target <= 3%, >= 5x fewer ops)")
    if args.compile:
        print("torch.compile, rate compiled / eager: " + ", ".join(f"{k[:-2]} {v:.2f}x" for k, v in
                                                                 result["compiled_over_eager"].items())
              + f"; regularizers alone {a['ms']:.1f} ms eager, {reg['after_compiled']['ms']:.1f} ms compiled")
    print(f"proximal step (sparsify phase): {reg['prox_step']['ops']} ops"
          + (f"; training step ops: dense {reg['dense_step_ops']}, split tree {reg['split_step_ops']}, "
             f"fused tree {reg['fused_split_step_ops']}" if tree_ops else ""))
    print(f"grouping/dense {overhead_ratio:.3f} median of rounds, {result['grouping_over_dense_best']:.3f} best blocks "
          f"(target >= 0.90: {'met' if result['target_met'] else 'NOT met'})")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
