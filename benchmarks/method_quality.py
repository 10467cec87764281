"""Does the method deliver? SplitNet on the real CIFAR-100, against a dense baseline of the same budget.

Runs, in one process on the CPU (plain PyTorch, the data in memory, channels-last, bf16 autocast where the CPU has native bf16):

* **dense baseline**: the dense model, ``--epochs`` epochs, one cosine schedule;
* **SplitNet**: grouping (``--group-epochs``, ``--method``; after the warm-up the groups are derived
  from the classifier and the weights, ``--assign derived``, the pipeline's default; ``--assign
  learned`` learns them at ``--assignment-lr-mult`` / ``--class-assignment-lr-mult``) -> cut -> finetune the tree
  (``--epochs - --group-epochs``), the same total epochs, the learning rate on one cosine over
  both stages (``--schedule joint``; ``restart`` starts the finetune's own cosine at ``--lr``).

It writes JSON (``--out``) and prints a table: top-1 of the dense baseline, the grouped dense
model, the tree right after the cut and the finetuned tree; weights and FLOPs; the off-block
energy fraction of every split layer at the cut (and per grouping epoch); NMI and purity of the
class groups vs the 20 CIFAR-100 superclasses with random balanced groups (mean +- sd); the group
sizes and how many members ``cut()`` had to move. Targets (issue 11) are checked at the end.

    python benchmarks/method_quality.py                                  # WRN-16-2 2-2-2, 10 epochs (~22 min, 2 idle cores)
    python benchmarks/method_quality.py --assign learned --assignment-lr-mult 1000 --class-assignment-lr-mult 10 --sparsify-strength 100   # 2026-12-04's
    python benchmarks/method_quality.py --method reference --assign-init random --out benchmarks/results/method_quality_reference.json
    python benchmarks/method_quality.py --epochs 2 --group-epochs 1 --per-class 50 --quick   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitnet import build_model, cut  # noqa: E402
from splitnet.accounting import count_weights, model_cost, tree_cost as tree_costs  # noqa: E402
from splitnet.datasets import CIFAR100_COARSE, iterate_batches, load_cifar100  # noqa: E402
from splitnet.grouping import Grouping, GroupingSchedule, off_block_energy  # noqa: E402
from splitnet.metrics import semantic_quality  # noqa: E402
from splitnet.precision import choose_precision  # noqa: E402
from splitnet.regularizers import RegularizerWeights, parameter_groups  # noqa: E402
from splitnet.schedule import Phase, PhaseSchedule  # noqa: E402
from splitnet.train import evaluate, format_epoch, train_one_epoch  # noqa: E402
from splitnet.tree import smallest_group_share  # noqa: E402


def train(model, data, epochs: int, args, *, lr_span: tuple[float, float], grouping: Grouping | None = None,
          stage: str, log, test=None, assignment_lr_mult: float = 1.0,
          class_assignment_lr_mult: float | None = None) -> list[dict]:
    """``epochs`` epochs of SGD; the learning rate follows ``args.lr`` times the part ``lr_span`` of one cosine."""
    opt = torch.optim.SGD(parameter_groups(model, args.lr, args.weight_decay, assignment_lr_mult=assignment_lr_mult,
                                           class_assignment_lr_mult=class_assignment_lr_mult),
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(data) // args.batch
    schedule = PhaseSchedule(opt, [Phase(epochs, steps_per_epoch, cosine_span=lr_span)])
    history, step = [], 0
    amp = choose_precision(args.amp, "cpu").dtype
    start = time.perf_counter()
    for epoch in range(epochs):
        batches = (b for b in iterate_batches(data, args.batch, train=True, seed=args.seed, epoch=epoch)
                   if len(b[1]) == args.batch)
        stats = train_one_epoch(model, batches, opt, grouping=grouping, amp_dtype=amp, channels_last=True,
                                global_step=step, max_steps=steps_per_epoch, scheduler=schedule)
        step += stats["steps"]
        row = {"stage": stage, "epoch": epoch + 1, **stats, "lr": schedule.lrs_at(step - 1)[0]}  # its last step's
        if grouping is not None:
            energy = grouping.off_block_energy()
            row.update(phase=grouping.phase(step - 1), off_block_energy=energy, off_block=max(energy.values()))
            q = model.assignments.probs("classes").detach()
            row["class_nmi"] = semantic_quality(q.argmax(0).tolist(), CIFAR100_COARSE, num_random=1)["nmi"]
        val = evaluate(model, iterate_batches(test, 500, train=False), amp_dtype=amp, channels_last=True) if test else None
        if val:
            row["test_top1"] = val["top1"]
        history.append(row)
        elapsed = time.perf_counter() - start
        log(format_epoch(stage, epoch + 1, epochs, row, val, eta_s=elapsed / (epoch + 1) * (epochs - epoch - 1))
            + (f" | class NMI {row['class_nmi']:.3f}" if "class_nmi" in row else ""))
    return history


def score(model, test, args) -> dict:
    amp = choose_precision(args.amp, "cpu").dtype
    return evaluate(model, iterate_batches(test, 500, train=False), amp_dtype=amp, channels_last=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"))
    ap.add_argument("--arch", default="wrn-16-2")
    ap.add_argument("--split", default="2-2-2")
    ap.add_argument("--epochs", type=int, default=10, help="total epochs of each route (baseline; group + finetune)")
    ap.add_argument("--group-epochs", type=int, default=5)
    ap.add_argument("--method", default="staged", choices=("staged", "reference"))
    ap.add_argument("--warmup", type=float, default=0.25)
    ap.add_argument("--sparsify", type=float, default=0.35)
    ap.add_argument("--assign", default="derived", choices=("derived", "learned"),
                    help="derived (group.assign's default): the groups computed from the weights after the warm-up; "
                         "learned: the paper's assignments, with the rates below")
    ap.add_argument("--sparsify-strength", type=float, default=0.0, help="0: derived from the weights (the default)")
    ap.add_argument("--disjoint-hold", type=float, default=0.5)
    ap.add_argument("--assignment-lr-mult", type=float, default=1.0, help="--assign learned only")
    ap.add_argument("--assign-init", default="classifier", choices=("random", "classifier"),
                    help="--assign learned: classifier starts the class groups from the classifier at the end of "
                         "the warm-up (group.assign_init: classifier, margin --assign-init-margin)")
    ap.add_argument("--assign-init-margin", type=float, default=2.0)
    ap.add_argument("--class-assignment-lr-mult", type=float, default=0.0,
                    help="--assign learned: the class matrix's own rate (group.class_assignment_lr_mult); 0: "
                         "--assignment-lr-mult")
    ap.add_argument("--reg", type=float, nargs=3, default=(1.0, 1.0, 10.0), metavar=("G1", "G2", "G3"))
    ap.add_argument("--schedule", default="joint", choices=("joint", "restart"))
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--per-class", type=int, default=0, help=">0: a class-balanced subset of train (smoke runs)")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"),
                    help="auto: bf16 autocast where this CPU computes bf16 natively, fp32 elsewhere (splitnet.precision)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the dense baseline (e.g. take it from --baseline-json)")
    ap.add_argument("--baseline-json", default="", help="reuse the baseline of an earlier run's JSON (same settings)")
    ap.add_argument("--epoch-test", action="store_true", help="test accuracy after every epoch (slower)")
    ap.add_argument("--stop-after-cut", action="store_true", help="grouping experiments: no finetune")
    ap.add_argument("--tree-scratch", action="store_true",
                    help="the tree's capacity alone: train the balanced (contiguous) tree from scratch for --epochs")
    ap.add_argument("--baseline-only", action="store_true", help="only the dense baseline (run the routes in two processes)")
    ap.add_argument("--combine", nargs=2, metavar=("BASELINE.json", "SPLITNET.json"),
                    help="merge a --baseline-only run and a --no-baseline run into --out, print the table")
    ap.add_argument("--quick", action="store_true", help="do not check the targets (smoke runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "method_quality.json"))
    args = ap.parse_args(argv)
    if args.combine:
        base, split = (json.loads(Path(p).read_text()) for p in args.combine)
        result = {**split, "baseline": base["baseline"]}
        result["targets"] = targets(result)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(table(result))
        return 0
    if args.group_epochs >= args.epochs:
        ap.error("--group-epochs must be below --epochs (the finetune needs epochs)")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {line}", flush=True)

    train_set = load_cifar100(args.data, "train").subset(args.per_class or None, seed=args.seed)
    test_set = load_cifar100(args.data, "test")
    log(f"CIFAR-100: {len(train_set)} train / {len(test_set)} test images; {args.arch} split {args.split}; "
        f"{args.epochs} epochs each route ({args.group_epochs} group + {args.epochs - args.group_epochs} finetune), "
        f"method {args.method}, {torch.get_num_threads()} threads")
    result = {"args": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "torch": torch.__version__}}
    per_epoch_test = test_set if args.epoch_test else None

    # -- dense baseline --------------------------------------------------------------------------
    if args.baseline_json:
        result["baseline"] = json.loads(Path(args.baseline_json).read_text())["baseline"]
        log(f"baseline from {args.baseline_json}: top-1 {result['baseline']['top1']:.4f}")
    elif not args.no_baseline:
        tb = time.perf_counter()
        dense = build_model(args.arch, 100, "1").to(memory_format=torch.channels_last)
        hist = train(dense, train_set, args.epochs, args, lr_span=(0, 1), stage="baseline", log=log, test=per_epoch_test)
        result["baseline"] = {**score(dense, test_set, args), "weights": count_weights(dense),
                              **model_cost(dense, 32), "history": hist, "seconds": time.perf_counter() - tb}
        log(f"baseline: top-1 {result['baseline']['top1']:.4f}")
        if args.baseline_only:
            Path(args.out).write_text(json.dumps(result, indent=2))
            return 0

    if args.tree_scratch:
        from splitnet.tree import balanced_assignment, build_tree

        model = build_model(args.arch, 100, args.split)
        tree = build_tree(model, balanced_assignment(model)).to(memory_format=torch.channels_last)
        hist = train(tree, train_set, args.epochs, args, lr_span=(0, 1), stage="tree-scratch", log=log, test=per_epoch_test)
        result["tree_scratch"] = {**score(tree, test_set, args), "history": hist, **tree_costs(tree, 32)}
        log(f"balanced tree from scratch: top-1 {result['tree_scratch']['top1']:.4f}")
        Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    # -- grouping ----------------------------------------------------------------------------------
    tg = time.perf_counter()
    model = build_model(args.arch, 100, args.split).to(memory_format=torch.channels_last)
    schedule = GroupingSchedule(args.method, args.warmup, args.sparsify, args.sparsify_strength, args.disjoint_hold,
                                args.assign)
    steps = args.group_epochs * (len(train_set) // args.batch)
    learned_init = not schedule.derived and args.assign_init == "classifier"
    if schedule.derived and args.warmup <= 0:
        ap.error("--assign derived groups by the classifier the warm-up trained: needs --warmup > 0")
    if learned_init and (args.method != "staged" or args.warmup <= 0):
        ap.error("--assign-init classifier starts from the classifier the warm-up trained: needs --method staged "
                 "and --warmup > 0")
    grouping = Grouping(model, RegularizerWeights(*args.reg), schedule, steps,
                        classifier_init_margin=args.assign_init_margin if learned_init else None)
    span = args.group_epochs / args.epochs if args.schedule == "joint" else 1.0
    hist = train(model, train_set, args.group_epochs, args, lr_span=(0, span), grouping=grouping, stage="group",
                 log=log, test=per_epoch_test, assignment_lr_mult=args.assignment_lr_mult,
                 class_assignment_lr_mult=args.class_assignment_lr_mult or None)
    grouped = score(model, test_set, args)
    result["grouped"] = {**grouped, "history": hist, "seconds": time.perf_counter() - tg}
    if grouping.class_start is not None:  # where --assign-init classifier started the class groups
        result["grouped"]["class_start"] = {
            "nmi": semantic_quality(grouping.class_start, CIFAR100_COARSE, num_random=1)["nmi"],
            "classes_moved": sum(a != b for a, b in zip(grouping.class_start,
                                                        model.assignments.probs("classes").argmax(0).tolist()))}
        log(f"class groups started from the warm-up's classifier (NMI {result['grouped']['class_start']['nmi']:.3f}); "
            f"grouping moved {result['grouped']['class_start']['classes_moved']} of {len(grouping.class_start)}")
    log(f"grouped dense model: top-1 {grouped['top1']:.4f}")

    # -- cut -----------------------------------------------------------------------------------------
    model.eval()
    tree = cut(model)
    hard = tree.hard
    energy = off_block_energy(model, hard)
    cut_score = score(tree, test_set, args)
    sizes = hard.group_sizes()
    sq = semantic_quality(tree.class_to_group.tolist(), CIFAR100_COARSE, num_random=1000, seed=args.seed)
    dense_cost = model_cost(model, 32)
    tree_cost = tree_costs(tree, 32)
    result["cut"] = {**cut_score, "off_block_energy": energy, "moves": len(tree.moves), "group_sizes": sizes,
                     "weights": tree_cost["weights"], "flops": tree_cost["flops"], "semantic": sq}
    log(f"cut: top-1 {cut_score['top1']:.4f}; off-block energy max {max(energy.values()):.2e}; "
        f"{len(tree.moves)} members moved; class NMI {sq['nmi']:.3f} (random {sq['random_nmi_mean']:.3f} ± "
        f"{sq['random_nmi_std']:.3f})")

    if args.stop_after_cut:
        Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    # -- finetune ----------------------------------------------------------------------------------
    tf = time.perf_counter()
    tree.train()
    tree.to(memory_format=torch.channels_last)
    span = (args.group_epochs / args.epochs, 1.0) if args.schedule == "joint" else (0.0, 1.0)
    hist = train(tree, train_set, args.epochs - args.group_epochs, args, lr_span=span, stage="finetune", log=log,
                 test=per_epoch_test)
    result["tree"] = {**score(tree, test_set, args), "history": hist, "seconds": time.perf_counter() - tf,
                      "weights": tree_cost["weights"], "flops": tree_cost["flops"]}
    result["dense_cost"] = dense_cost
    result["seconds"] = time.perf_counter() - t0
    result["targets"] = targets(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    log(f"wrote {out}")
    return 0 if args.quick or all(v["ok"] for v in result["targets"].values() if v["ok"] is not None) else 1


def targets(r: dict) -> dict:
    """Issue 11's targets, each {value, goal, ok} (ok None when the run has no baseline)."""
    energy = r["cut"]["off_block_energy"]
    sq = r["cut"]["semantic"]
    reduction = 1 - r["tree"]["weights"] / r["dense_cost"]["weights"]
    min_share, _ = smallest_group_share(r["cut"]["group_sizes"])
    base = r.get("baseline")
    gap = (r["tree"]["top1"] - base["top1"]) * 100 if base else None
    nmi_bar = sq["random_nmi_mean"] + 3 * sq["random_nmi_std"]
    return {
        "off_block_energy_max": {"value": max(energy.values()), "goal": "<= 1%", "ok": max(energy.values()) <= 0.01},
        "cut_cost_points": {"value": (r["grouped"]["top1"] - r["cut"]["top1"]) * 100, "goal": "<= 1",
                            "ok": (r["grouped"]["top1"] - r["cut"]["top1"]) * 100 <= 1.0},
        "tree_vs_baseline_points": {"value": gap, "goal": ">= -1 at >= 45% fewer weights",
                                    "ok": None if gap is None else (gap >= -1.0 and reduction >= 0.45)},
        "weight_reduction": {"value": reduction, "goal": ">= 45%", "ok": reduction >= 0.45},
        "class_nmi": {"value": sq["nmi"], "goal": f"> random mean + 3 sd = {nmi_bar:.3f}", "ok": sq["nmi"] > nmi_bar},
        "smallest_group_share": {"value": min_share, "goal": ">= 0.25 of balanced, 0 moves",
                                 "ok": min_share >= 0.25 and r["cut"]["moves"] == 0},
    }


def table(r: dict) -> str:
    base, c = r.get("baseline"), r["cut"]
    dense_w, dense_f = r["dense_cost"]["weights"], r["dense_cost"]["flops"]
    lines = ["", "| model | top-1 | weights | GFLOPs |", "|---|---|---|---|"]
    if base:
        lines.append(f"| dense baseline ({r['args']['epochs']} epochs) | {base['top1']:.4f} | {base['weights'] / 1e6:.3f}M | "
                     f"{base['flops'] / 1e9:.3f} |")
    lines += [f"| dense, grouped ({r['args']['group_epochs']} epochs, {r['args']['method']}) | {r['grouped']['top1']:.4f} | "
              f"{dense_w / 1e6:.3f}M | {dense_f / 1e9:.3f} |",
              f"| tree right after the cut | {c['top1']:.4f} | {c['weights'] / 1e6:.3f}M | {c['flops'] / 1e9:.3f} |",
              f"| tree finetuned (+{r['args']['epochs'] - r['args']['group_epochs']} epochs) | {r['tree']['top1']:.4f} | "
              f"{r['tree']['weights'] / 1e6:.3f}M ({1 - r['tree']['weights'] / dense_w:.1%} fewer) | "
              f"{r['tree']['flops'] / 1e9:.3f} ({1 - r['tree']['flops'] / dense_f:.1%} fewer) |", ""]
    lines += ["| split layer | off-block energy at the cut |", "|---|---|"]
    lines += [f"| {name} | {frac:.2e} |" for name, frac in c["off_block_energy"].items()]
    sq = c["semantic"]
    lines += ["", f"class groups vs the 20 superclasses: NMI {sq['nmi']:.3f} (random balanced groups "
                  f"{sq['random_nmi_mean']:.3f} ± {sq['random_nmi_std']:.3f}), purity {sq['purity']:.3f} "
                  f"(random {sq['random_purity_mean']:.3f} ± {sq['random_purity_std']:.3f})",
              "group sizes: " + ", ".join(f"{k} {v}" for k, v in c["group_sizes"].items()) + f"; members moved by cut(): {c['moves']}",
              "", "| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in r["targets"].items():
        v = t["value"]
        shown = "-" if v is None else (f"{v:.2e}" if name == "off_block_energy_max" else f"{v:.3f}")
        lines.append(f"| {name} | {shown} | {t['goal']} | {'-' if t['ok'] is None else ('yes' if t['ok'] else 'NO')} |")
    lines.append(f"\n{r['seconds'] / 60:.1f} min in all")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
