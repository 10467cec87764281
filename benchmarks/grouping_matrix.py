"""One grouping config over a matrix of class counts, splits and budgets (issue 26): does it give
balanced, hardened, semantic groups everywhere, or only on the setting it was tuned on?

In one process on the CPU (plain PyTorch, the data in memory, like method_quality.py):

* **class subsets** of the real CIFAR-100 (``--subsets``): ``10`` / ``20`` / ``50`` / ``100`` classes
  taken by superclass (the first 2, 4, 10, 20 superclasses' classes), ``r20`` 20 classes at random;
* for each subset a **dense model** trained once (``--dense-epochs``) and kept in
  ``--work`` (safetensors), reused by every cell of that subset;
* **cells**: every split (``--splits``) x grouping budget in steps (``--budgets``). A cell starts the
  split model from its subset's dense weights, the class groups from the dense classifier
  (``assign_init: classifier``, as ``group.init: baseline`` does), and runs the grouping stage for
  the budget with **one config**: the defaults of a pipeline run with ``group.init: baseline``
  (``pipelines.config.GroupStageConfig``; ``warmup: auto`` is then none) unless ``--set key=value``
  changes them (the same keys as ``group.*``), then cuts.

Per cell it records: each split layer's off-block energy at the end of the assign phase (before any
proximal step) against its uniform level (1 - 1/G), the smallest group's share of balanced, the
members the cut moved, the off-block energy at the cut, the cut's cost in points, class NMI vs the
superclasses with random balanced groups' mean +- sd, grouped and cut top-1, and the issue's
targets. Cells are written one JSON file each under ``--work`` as they finish: a killed run
continues with the next cell not done. ``--out`` gets the whole matrix and a table is printed.

    python benchmarks/grouping_matrix.py                                   # the full matrix (hours on 2 cores)
    python benchmarks/grouping_matrix.py --subsets 20 --splits 2-2-2 --budgets 120 --per-class 100   # one cell
    python benchmarks/grouping_matrix.py --set assignment_lr_mult=300 --work benchmarks/results/gm-x300
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitnet import build_model, cut  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from splitnet.datasets import CIFAR100_COARSE, ImageArrays, iterate_batches, load_cifar100  # noqa: E402
from splitnet.grouping import (MIN_GROUP_SHARE, Grouping, classifier_class_groups,  # noqa: E402
                               init_class_assignment_, off_block_energy)
from splitnet.metrics import balanced_groups, nmi_ceiling, semantic_quality  # noqa: E402
from splitnet.assignment import SplitConfig  # noqa: E402
from splitnet.models import CLASSES  # noqa: E402
from splitnet.precision import choose_precision  # noqa: E402
from splitnet.regularizers import parameter_groups  # noqa: E402
from splitnet.schedule import Phase, PhaseSchedule  # noqa: E402
from splitnet.train import evaluate, train_one_epoch  # noqa: E402
from splitnet.tree import smallest_group_share  # noqa: E402

SUPERCLASSES = sorted(set(CIFAR100_COARSE))  # coarse ids


def select_classes(data: ImageArrays, classes: list[int]) -> ImageArrays:
    """The images of ``classes`` (fine labels), relabelled 0..len(classes)-1 in that order."""
    return data.select(classes)


def subset_classes(name: str, seed: int) -> list[int]:
    """CIFAR-100 fine labels of subset ``name``: ``N`` = the classes of the first N/5 superclasses
    (sorted by name), ``rN`` = N classes at random."""
    import random

    if name.startswith("r"):
        return sorted(random.Random(seed).sample(range(100), int(name[1:])))
    count = int(name)
    if count % 5:
        raise ValueError(f"subset {name}: superclass subsets hold multiples of 5 classes")
    chosen = set(SUPERCLASSES[:count // 5])
    return [c for c in range(100) if CIFAR100_COARSE[c] in chosen]


def semantic_reach(cell: dict, seed: int = 0) -> tuple[float, bool]:
    """The most class NMI any balanced grouping of the cell's classes into its split's last-level groups
    can score against their superclasses, and whether that is at or under the cell's bar (random's
    mean + 3 sd): then the semantic target is out of reach for every method (cells written before the
    ceiling was recorded get it computed here)."""
    ceiling = cell.get("nmi_ceiling")
    if ceiling is None:
        parents = [CIFAR100_COARSE[c] for c in subset_classes(cell["subset"], seed)]
        groups = SplitConfig.parse(cell["split"]).num_groups
        ceiling = nmi_ceiling(list(Counter(balanced_groups(len(parents), groups)).values()), parents)
    return ceiling, ceiling <= cell["random_nmi_mean"] + 3 * cell["random_nmi_std"]


def _train(model, data, steps: int, args, *, lr: float, grouping: Grouping | None = None, assignment_lr_mult=1.0,
           class_assignment_lr_mult=None, on_step=None) -> None:
    """``steps`` SGD steps over ``data`` (epochs as needed), lr on one cosine over them."""
    opt = torch.optim.SGD(parameter_groups(model, lr, 5e-4, assignment_lr_mult=assignment_lr_mult,
                                           class_assignment_lr_mult=class_assignment_lr_mult),
                          lr=lr, momentum=0.9, nesterov=True)
    schedule = PhaseSchedule(opt, [Phase(1, steps)])
    amp = choose_precision(args.amp, "cpu").dtype
    done, epoch = 0, 0
    while done < steps:
        def after(i):
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(done)

        batches = (b for b in iterate_batches(data, args.batch, train=True, seed=args.seed, epoch=epoch)
                   if len(b[1]) == args.batch)
        train_one_epoch(model, batches, opt, grouping=grouping, amp_dtype=amp, channels_last=True, global_step=done,
                        max_steps=steps - done, scheduler=schedule, after_step=after)
        epoch += 1


def _score(model, data, args) -> float:
    amp = choose_precision(args.amp, "cpu").dtype
    return evaluate(model, iterate_batches(data, 500, train=False), amp_dtype=amp, channels_last=True)["top1"]


def dense_model(subset: str, train_set, test_set, args, log):
    """The subset's dense model: trained once, then read back from ``--work``."""
    path = Path(args.work) / f"dense-{subset}.safetensors"
    n = len(set(train_set.labels.tolist()))
    model = build_model(args.arch, n, "1").to(memory_format=torch.channels_last)
    if path.exists():
        model.load_backbone_state_dict(load_file(str(path)), skip_fc_mismatch=False)
        return model, json.loads(path.with_suffix(".json").read_text())
    t0 = time.perf_counter()
    steps = args.dense_epochs * (len(train_set) // args.batch)
    _train(model, train_set, steps, args, lr=0.1)
    info = {"top1": _score(model, test_set, args), "steps": steps, "seconds": time.perf_counter() - t0}
    save_file({k: v.contiguous() for k, v in model.backbone_state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(info))
    log(f"dense {subset}: {n} classes, top-1 {info['top1']:.4f} after {steps} steps ({info['seconds']:.0f} s)")
    return model, info


def group_config(overrides: list[str]):
    """The pipeline's ``group`` settings for a cell: the defaults of a run with ``group.init: baseline``
    (a cell starts from its subset's dense model), with ``key=value`` overrides of the group.* keys,
    parsed and checked as ``splitnet run`` parses them."""
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(None, ["group.init=baseline", *(f"group.{item}" for item in overrides)]).group
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None


def run_cell(subset: str, split: str, budget: int, dense, train_set, test_set, g, args, log) -> dict:
    t0 = time.perf_counter()
    n = dense.fc.out_features
    model = build_model(args.arch, n, split).to(memory_format=torch.channels_last)
    model.load_backbone_state_dict(dense.backbone_state_dict(), skip_fc_mismatch=False)
    if g.assign_init == "classifier":  # as group.init: baseline does (derived: again at the derivation)
        labels = classifier_class_groups(model.fc.weight, model.assignments.groups(CLASSES))
        init_class_assignment_(model, labels, g.assign_init_margin)
    schedule = g.grouping_schedule()
    grouping = Grouping(model, g.regularizer_weights(), schedule, budget)
    sparsify_from = next((s for s in range(budget) if schedule.phase(s, budget) == "sparsify"), budget)
    at_assign_end: dict = {}

    def on_step(done: int) -> None:  # the step before the first proximal step: the model the groups are fixed on
        if done == sparsify_from and not at_assign_end:
            at_assign_end.update(top1=_score(model, test_set, args))

    if sparsify_from == 0:
        on_step(0)
    _train(model, train_set, budget, args, lr=g.lr, grouping=grouping, assignment_lr_mult=g.assignment_lr_mult,
           class_assignment_lr_mult=g.class_assignment_lr_mult or None, on_step=on_step)
    grouped = _score(model, test_set, args)
    model.eval()
    tree = cut(model)
    cut_top1 = _score(tree, test_set, args)
    parents = [CIFAR100_COARSE[c] for c in subset_classes(subset, args.seed)]
    sq = semantic_quality(tree.class_to_group.tolist(), parents, num_random=300, seed=args.seed)
    sizes = tree.hard.group_sizes()
    share, where = smallest_group_share(sizes)
    groups = {layer.name: layer.groups for layer in model.split_layers()}
    uniform = {name: 1 - 1 / groups[name] for name in groups}
    energy_end = grouping.fixed_off_block or {}  # when the groups were fixed, before any proximal step
    cell = {
        "subset": subset, "split": split, "budget": budget, "classes": n,
        "assign_end_off_block": energy_end, "uniform_off_block": uniform,
        "assign_end_vs_uniform": {k: v / uniform[k] for k, v in energy_end.items()},
        "assign_end_top1": at_assign_end.get("top1"), "grouped_top1": grouped, "cut_top1": cut_top1,
        "cut_cost_points": 100 * (grouped - cut_top1), "moves": len(tree.moves), "smallest_group_share": share,
        "smallest_group_set": where, "off_block_at_cut": off_block_energy(model, tree.hard),
        "nmi": sq["nmi"], "random_nmi_mean": sq["random_nmi_mean"], "random_nmi_std": sq["random_nmi_std"],
        "nmi_ceiling": sq["nmi_ceiling"],
        "seconds": time.perf_counter() - t0}
    cell["targets"] = {
        "balanced": cell["moves"] == 0 and share >= 0.5,
        "cut_cost": cell["cut_cost_points"] <= 0.5,
        "semantic": sq["nmi"] > sq["random_nmi_mean"] + 3 * sq["random_nmi_std"],
        "assignments_learn": bool(energy_end) and all(v <= 0.5 for v in cell["assign_end_vs_uniform"].values()),
        "sparsify_loss": cell["assign_end_top1"] is not None and 100 * (cell["assign_end_top1"] - grouped) <= 5,
    }
    log(f"cell {subset}/{split}/{budget}: moves {cell['moves']}, smallest {share:.0%} ({where}), cut cost "
        f"{cell['cut_cost_points']:.2f} pt, NMI {sq['nmi']:.3f} (random {sq['random_nmi_mean']:.3f} ± "
        f"{sq['random_nmi_std']:.3f}), assign-end off-block / uniform max "
        f"{max(cell['assign_end_vs_uniform'].values(), default=float('nan')):.2f}, {cell['seconds']:.0f} s")
    return cell


def table(cells: list[dict]) -> str:
    head = ("| subset | split | steps | moves | smallest | cut cost | NMI (random +3sd; most any split can) | off-block at the fix / uniform "
            "(worst) | top-1 at the fix -> grouped -> cut | targets missed |")
    rows = [head, "|" + "---|" * 10]
    for c in cells:
        ceiling, out_of_reach = semantic_reach(c)
        missed = [k + (" (out of reach)" if k == "semantic" and out_of_reach else "")
                  for k, ok in c["targets"].items() if not ok]
        fixed = c.get("assign_end_top1")
        rows.append(f"| {c['subset']} | {c['split']} | {c['budget']} | {c['moves']} | {c['smallest_group_share']:.0%} | "
                    f"{c['cut_cost_points']:.2f} | {c['nmi']:.3f} ({c['random_nmi_mean'] + 3 * c['random_nmi_std']:.3f}; "
                    f"{ceiling:.3f}) | "
                    f"{max(c['assign_end_vs_uniform'].values(), default=float('nan')):.2f} | "
                    + (f"{fixed:.3f} -> " if fixed is not None else "")
                    + f"{c['grouped_top1']:.3f} -> {c['cut_top1']:.3f} | {', '.join(missed) or '-'} |")
    return "\n".join(rows)


def summary(cells: list[dict]) -> str:
    """How many cells meet each target."""
    keys = list(cells[0]["targets"]) if cells else []
    out = ", ".join(f"{k} {sum(c['targets'][k] for c in cells)}/{len(cells)}" for k in keys)
    unreachable = sum(semantic_reach(c)[1] and not c["targets"]["semantic"] for c in cells)
    return out + (f" ({unreachable} semantic misses out of reach: no balanced grouping scores above the bar)"
                  if unreachable else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"))
    ap.add_argument("--arch", default="wrn-16-1")
    ap.add_argument("--subsets", default="10,20,50,100,r20")
    ap.add_argument("--splits", default="2-2-2,2-4-4,1-2-4")
    ap.add_argument("--budgets", default="100,400,2000", help="grouping steps per cell")
    ap.add_argument("--dense-epochs", type=int, default=15)
    ap.add_argument("--per-class", type=int, default=0, help=">0: that many training images per class")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a group.* key of the one config")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "grouping_matrix"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grouping_matrix.json"))
    ap.add_argument("--table", action="store_true", help="print the table of the cells already in --work, run nothing")
    args = ap.parse_args(argv)
    if args.table:
        cells = sorted((json.loads(p.read_text()) for p in Path(args.work).glob("cell-*.json")),
                       key=lambda c: (c["classes"], c["subset"], c["split"], c["budget"]))
        print(table(cells))
        for path in sorted(Path(args.work).glob("dense-*.json")):
            print(f"{path.stem}: top-1 {json.loads(path.read_text())['top1']:.3f}")
        print(summary(cells))
        return 0
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    g = group_config(args.set)
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {line}", flush=True)

    full_train, full_test = load_cifar100(args.data, "train"), load_cifar100(args.data, "test")
    cells = []
    for subset in args.subsets.split(","):
        classes = subset_classes(subset, args.seed)
        train_set = select_classes(full_train, classes).subset(args.per_class or None, seed=args.seed)
        test_set = select_classes(full_test, classes)
        dense = None
        for split in args.splits.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                path = Path(args.work) / f"cell-{subset}-{split}-{budget}.json"
                if path.exists():
                    cells.append(json.loads(path.read_text()))
                    continue
                if dense is None:
                    dense, _ = dense_model(subset, train_set, test_set, args, log)
                torch.manual_seed(args.seed)
                cell = run_cell(subset, split, budget, dense, train_set, test_set, g, args, log)
                path.write_text(json.dumps(cell, indent=1))
                cells.append(cell)
    result = {"config": {**dataclasses.asdict(g), "warmup_fraction": g.warmup_fraction()}, "args": vars(args), "cells": cells,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "all_targets": all(all(c["targets"].values()) for c in cells), "min_group_share_floor": MIN_GROUP_SHARE}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(cells))
    print(summary(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
