"""The in-process demo: group -> cut -> finetune -> evaluate a small WRN on CIFAR-100.

Plain PyTorch on the local CPU, no Ray (the Ray Train pipeline is ``splitnet run``). It writes
``OUT/tree`` (the cut tree's artifacts), ``OUT/report.json``, ``OUT/report.md`` and the pictures.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from splitnet import build_model, cut
from splitnet.accounting import model_cost
from splitnet.artifacts import read_manifest
from splitnet.datasets import CIFAR100_MEAN, CIFAR100_STD, iterate_batches, load_cifar100
from splitnet.metrics import semantic_quality
from splitnet.models import CLASSES
from splitnet.plots import plot_assignment, plot_block_diagonal, plot_tree
from splitnet.regularizers import RegularizerWeights, parameter_groups
from splitnet.train import evaluate, format_epoch, train_one_epoch


@dataclass
class DemoConfig:
    data: str = "../shared/data/cifar100"
    out: str = "runs/demo"
    arch: str = "wrn-16-2"
    split: str = "2-2-2"
    train_per_class: int = 100
    test_per_class: int = 20
    group_epochs: int = 3
    finetune_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    # The per-element gradient on an assignment logit is O(1/D) (the terms are normalized by D), and
    # this schedule has ~1/500 of the reference steps: the logits need a much larger step to leave
    # uniform in 3 epochs (measured: x100 -> disjoint 0.80 after 2 epochs, x1000 -> 0.10).
    assignment_lr_mult: float = 1000.0
    disjoint: float = 1.0
    weight: float = 1.0
    balance: float = 10.0
    seed: int = 0


def _cosine(optimizer, steps: int):
    """Cosine decay to zero over ``steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))


def _batches_per_epoch(n: int, batch: int) -> int:
    return (n + batch - 1) // batch


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_cifar100(cfg.data, "train").subset(cfg.train_per_class, cfg.seed)
    test = load_cifar100(cfg.data, "test").subset(cfg.test_per_class, cfg.seed)
    log(f"data: {len(train)} train / {len(test)} test images of CIFAR-100 from {cfg.data}")

    def test_batches():
        return iterate_batches(test, 256, train=False)

    model = build_model(cfg.arch, len(train.class_names), cfg.split)
    log(f"model: {model.arch}, split {model.split}, {len(model.split_layers())} split layers, "
        f"{len(model.assignments.names())} learned assignments")
    reg = RegularizerWeights(cfg.disjoint, cfg.weight, cfg.balance)
    opt = torch.optim.SGD(parameter_groups(model, cfg.lr, cfg.weight_decay, assignment_lr_mult=cfg.assignment_lr_mult),
                          momentum=0.9, nesterov=True)
    sched = _cosine(opt, cfg.group_epochs * _batches_per_epoch(len(train), cfg.batch_size))
    history = []
    for epoch in range(1, cfg.group_epochs + 1):
        stats = train_one_epoch(model, _stepping(iterate_batches(train, cfg.batch_size, train=True, seed=cfg.seed, epoch=epoch), sched),
                                opt, reg_weights=reg)
        val = evaluate(model, test_batches())
        log(format_epoch("group", epoch, cfg.group_epochs, stats, val))
        history.append({"stage": "group", "epoch": epoch, **stats, "val_top1": val["top1"]})

    dense_eval = evaluate(model, test_batches())
    dense_cost = model_cost(model, 32)
    info = {"class_names": train.class_names, "dataset": "cifar100", "mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD),
            "input_size": 32}
    tree = cut(model, info=info)
    cut_eval = evaluate(tree, test_batches())
    log(f"cut: {len(tree.subtrees)} subtrees; accuracy right after the cut {cut_eval['top1']:.3f} "
        f"(grouped dense model {dense_eval['top1']:.3f}); {len(tree.moves)} members moved to keep groups non-empty")

    opt = torch.optim.SGD(parameter_groups(tree, cfg.lr / 2, cfg.weight_decay), momentum=0.9, nesterov=True)
    sched = _cosine(opt, cfg.finetune_epochs * _batches_per_epoch(len(train), cfg.batch_size))
    for epoch in range(1, cfg.finetune_epochs + 1):
        stats = train_one_epoch(tree, _stepping(iterate_batches(train, cfg.batch_size, train=True, seed=cfg.seed, epoch=100 + epoch), sched), opt)
        val = evaluate(tree, test_batches())
        log(format_epoch("finetune", epoch, cfg.finetune_epochs, stats, val))
        history.append({"stage": "finetune", "epoch": epoch, **stats, "val_top1": val["top1"]})
    tree_eval = evaluate(tree, test_batches())

    manifest_path = tree.save(out / "tree", input_size=32, dense_cost=dense_cost)
    manifest = read_manifest(out / "tree")
    semantic = semantic_quality(tree.class_to_group.tolist(), _coarse_per_class(train))
    pictures = {
        "class_assignment": plot_assignment(model.assignments.probs(CLASSES), out / "class_assignment.png",
                                            "class -> group (sorted by group)", train.class_names),
        "fc_block_diagonal": plot_block_diagonal(model.fc.weight, tree.hard.group_of(model.split_graph().features, model.fc_groups),
                                                 tree.class_to_group, out / "fc_blocks.png", "|W| of fc, reordered by group"),
        "tree": plot_tree(manifest, out / "tree.png"),
    }
    report = {
        "config": asdict(cfg),
        "dense_grouped": {**dense_eval, **dense_cost},
        "tree_after_cut": cut_eval,
        "tree_finetuned": {**tree_eval, **manifest["counts"]["split"]},
        "reduction": manifest["counts"]["reduction"],
        "semantic": semantic,
        "moves": len(tree.moves),
        "history": history,
        "pictures": {k: os.path.basename(v) for k, v in pictures.items()},
        "tree_dir": str(manifest_path.parent),
        "seconds": time.perf_counter() - t0,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    log(f"done in {report['seconds']:.0f}s: dense {dense_eval['top1']:.3f} -> tree {tree_eval['top1']:.3f} top-1, "
        f"{report['reduction']['weights']:.1%} fewer weights, {report['reduction']['flops']:.1%} fewer FLOPs, "
        f"superclass purity {semantic['purity']:.3f} (random {semantic['random_purity_mean']:.3f}); report: {out / 'report.md'}")
    return report


def _stepping(batches, scheduler):
    for batch in batches:
        yield batch
        scheduler.step()


def _coarse_per_class(data) -> list[int]:
    coarse = {}
    for fine, c in zip(data.labels.tolist(), data.coarse_labels.tolist()):
        coarse.setdefault(fine, c)
    return [coarse[c] for c in range(len(data.class_names))]


def _markdown(r: dict) -> str:
    s, c = r["semantic"], r["config"]
    return "\n".join([
        f"# SplitNet demo: {c['arch']} split {c['split']} on CIFAR-100",
        "",
        f"{c['train_per_class']} train / {c['test_per_class']} test images per class, {c['group_epochs']} grouping + "
        f"{c['finetune_epochs']} finetune epochs on CPU ({r['seconds']:.0f} s). A short schedule: accuracies are far "
        "below the reference schedule's; the point is the whole path.",
        "",
        "| model | top-1 | top-5 | weights | GFLOPs |",
        "|---|---|---|---|---|",
        f"| dense (grouped) | {r['dense_grouped']['top1']:.3f} | {r['dense_grouped']['top5']:.3f} | "
        f"{r['dense_grouped']['weights'] / 1e6:.3f}M | {r['dense_grouped']['flops'] / 1e9:.3f} |",
        f"| tree right after the cut | {r['tree_after_cut']['top1']:.3f} | {r['tree_after_cut']['top5']:.3f} | | |",
        f"| tree finetuned | {r['tree_finetuned']['top1']:.3f} | {r['tree_finetuned']['top5']:.3f} | "
        f"{r['tree_finetuned']['weights'] / 1e6:.3f}M | {r['tree_finetuned']['flops'] / 1e9:.3f} |",
        "",
        f"Reduction: {r['reduction']['weights']:.1%} weights, {r['reduction']['flops']:.1%} FLOPs.",
        "",
        f"Semantic quality of the class groups vs CIFAR-100 superclasses: purity {s['purity']:.3f} "
        f"(random balanced {s['random_purity_mean']:.3f} ± {s['random_purity_std']:.3f}), NMI {s['nmi']:.3f} "
        f"(random {s['random_nmi_mean']:.3f} ± {s['random_nmi_std']:.3f}).",
        "",
        f"![class assignment]({r['pictures']['class_assignment']})",
        f"![fc blocks]({r['pictures']['fc_block_diagonal']})",
        f"![tree]({r['pictures']['tree']})",
        "",
    ])
