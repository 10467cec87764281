"""The run's report: ``report.json`` + ``report.md`` + pictures, from the run directory's outputs.

It answers what a user asks of a SplitNet run: how accurate is the tree against the dense
baseline, how much smaller and cheaper is it, do the learned groups make semantic sense
(purity / NMI against the superclasses or WordNet parents, vs random balanced groups), and
what each stage cost.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from splitnet.metrics import semantic_quality

from .config import PipelineConfig, to_dict
from .rundir import RunDir

# targets of the demo (issue: within 2 points of the baseline, >= 30% fewer parameters)
ACCURACY_GAP = 0.02
MIN_REDUCTION = 0.30


def _semantic(class_to_group: list[int], parents: list[str]) -> dict | None:
    """Purity / NMI of the groups vs the classes' parents (classes without a parent left out)."""
    known = [i for i, p in enumerate(parents or []) if p]
    if len({parents[i] for i in known}) < 2:
        return None
    result = semantic_quality([class_to_group[i] for i in known], [parents[i] for i in known])
    result["classes_with_parent"] = len(known)
    return result


def _above_random(semantic: dict | None) -> bool | None:
    """Purity more than 2 sd above random groups' — against WordNet categories when the classes
    are wnids (vs one of 7,000+ immediate parents, 4 groups cannot be pure), else the parents."""
    ref = (semantic or {}).get("vs_wordnet_category") or semantic
    if not ref or "purity" not in ref:
        return None
    return ref["purity"] > ref["random_purity_mean"] + 2 * ref["random_purity_std"]


def _wordnet_categories(class_names: list[str]) -> list[str] | None:
    """WordNet lexicographer file per class when every class is a wnid and WordNet is installed."""
    from splitnet.wordnet import categories, is_wnid

    if not class_names or not all(is_wnid(n) for n in class_names):
        return None
    try:
        return categories(class_names)
    except FileNotFoundError:
        return None


def write_report(cfg: PipelineConfig, rd: RunDir, state: dict, info, metrics: dict, seconds: float, log) -> dict:
    import torch

    from splitnet import build_model
    from splitnet.accounting import model_cost
    from splitnet.artifacts import load_tree, read_manifest
    from splitnet.models import CLASSES
    from splitnet.plots import plot_assignment, plot_block_diagonal, plot_tree

    from .stages import load_state_file

    with rd.local_copy("tree") as d:
        manifest = read_manifest(d)
    counts = manifest["counts"]
    with torch.device("meta"):
        dense_model = build_model(cfg.model.arch, info.num_classes, "1")
    baseline_cost = model_cost(dense_model, cfg.data.image_size)
    semantic = _semantic(manifest["class_to_group"], info.parents)
    categories = _wordnet_categories(manifest["class_names"])
    if categories is not None:  # ImageNet-style wnids: thousands of parents, ~26 coarse categories
        semantic = {**(semantic or {}), "vs_wordnet_category": semantic_quality(manifest["class_to_group"], categories)}
    stages = {k: {"seconds": v.get("seconds"), **({"history": v["result"].get("history")} if isinstance(v.get("result"), dict)
                                                   and "history" in v["result"] else {})}
              for k, v in state["stages"].items()}
    base = metrics.get("baseline")
    tree_m = metrics["tree"]
    checks = {
        "split_vs_baseline_top1": (tree_m["top1"] - base["top1"]) if base else None,
        "within_2_points": (tree_m["top1"] >= base["top1"] - ACCURACY_GAP) if base else None,
        "param_reduction": counts["reduction"]["params"],
        "at_least_30pct_fewer_params": counts["reduction"]["params"] >= MIN_REDUCTION,
        "purity_above_random": _above_random(semantic),
    }
    pictures = {}
    with rd.staging("pictures") as tmp:
        grouped = build_model(cfg.model.arch, info.num_classes, cfg.model.split)
        with rd.local_copy("group") as d:
            grouped.load_state_dict(load_state_file(Path(d) / "model.safetensors"))
        with rd.local_copy("cut") as d:
            cut_tree = load_tree(d)
        names = info.class_names if info.num_classes <= 120 else None
        pictures["class_assignment"] = plot_assignment(grouped.assignments.probs(CLASSES), tmp / "class_assignment.png",
                                                       "class -> group (sorted by group)", names)
        if info.num_classes <= 2000:
            feats = grouped.split_graph().features
            pictures["fc_block_diagonal"] = plot_block_diagonal(
                grouped.fc.weight, cut_tree.hard.group_of(feats, grouped.fc_groups), cut_tree.class_to_group,
                tmp / "fc_blocks.png", "|W| of fc, reordered by group")
        pictures["tree"] = plot_tree(manifest, tmp / "tree.png")
        pictures = {k: f"pictures/{os.path.basename(v)}" for k, v in pictures.items()}
    report = {
        "config": to_dict(cfg),
        "data": {"shards": info.shards, "classes": info.num_classes, "train_records": info.train_records,
                 "eval_split": info.eval_split},
        "models": {
            "baseline": {**base, **baseline_cost} if base else None,
            "grouped": {**metrics["grouped"], **counts.get("dense", {})},
            "cut": metrics["cut"],
            "tree": {**tree_m, **counts["split"]},
        },
        "reduction": counts["reduction"],
        "subtrees": [{"name": s["name"], "classes": len(s["classes"]), "weights": s["weights"], "flops": s["flops"],
                      "file_bytes": s["file_bytes"]} for s in manifest["subtrees"]],
        "semantic": semantic,
        "checks": checks,
        "stages": stages,
        "pictures": pictures,
        "tree_dir": rd.display("tree"),
        "seconds": seconds,
        "finished": time.time(),
    }
    rd.write_text("report.json", json.dumps(report, indent=2))
    rd.write_text("report.md", markdown(report))
    state["stages"]["report"] = {"status": "done", "seconds": 0.0, "finished": time.time(), "result": {"checks": checks}}
    rd.write_json("state.json", state)
    gap = checks["split_vs_baseline_top1"]
    log(f"done in {seconds:.0f}s: tree top-1 {tree_m['top1']:.3f}"
        + (f" vs dense baseline {base['top1']:.3f} ({gap * 100:+.1f} points)" if base else "")
        + f", {counts['reduction']['params']:.1%} fewer parameters, {counts['reduction']['flops']:.1%} fewer FLOPs"
        + (f", group purity {semantic['purity']:.3f} (random {semantic['random_purity_mean']:.3f})"
           if semantic and "purity" in semantic else "")
        + f"; report: {rd.display('report.md')}")
    return report


def _row(name: str, m: dict | None) -> str:
    if not m:
        return f"| {name} | - | - | - | - | - |"
    weights = f"{m['weights'] / 1e6:.3f}M" if "weights" in m else ""
    params = f"{m['params'] / 1e6:.3f}M" if "params" in m else ""
    flops = f"{m['flops'] / 1e9:.3f}" if "flops" in m else ""
    return f"| {name} | {m['top1']:.3f} | {m['top5']:.3f} | {weights} | {params} | {flops} |"


def markdown(r: dict) -> str:
    c, m, red, s, ch = r["config"], r["models"], r["reduction"], r["semantic"], r["checks"]
    lines = [
        f"# SplitNet run: {c['model']['arch']} split {c['model']['split']}, {r['data']['classes']} classes",
        "",
        f"{r['data']['train_records']} training records from `{r['data']['shards']}`, evaluated on the "
        f"`{r['data']['eval_split']}` split; {c['scaling']['num_workers']} Ray Train workers"
        f"{' on GPUs' if c['scaling']['use_gpu'] else ' on CPU'}; {r['seconds']:.0f} s in all.",
        "",
        "| model | top-1 | top-5 | weights | params | GFLOPs |",
        "|---|---|---|---|---|---|",
        _row(f"dense baseline ({c['baseline']['epochs']} epochs)" if m["baseline"] else "dense baseline (disabled)", m["baseline"]),
        _row(f"dense, grouped ({c['group']['epochs']} epochs, regularized)", m["grouped"]),
        _row("tree right after the cut", m["cut"]),
        _row(f"tree finetuned ({c['finetune']['epochs']} epochs)", m["tree"]),
        "",
        f"Reduction of the tree vs the dense model: {red['weights']:.1%} weights, {red['params']:.1%} parameters, "
        f"{red['flops']:.1%} FLOPs.",
        "",
    ]
    for ref, what in (((s or {}), "the classes' parents: superclasses or WordNet hypernyms"),
                      ((s or {}).get("vs_wordnet_category") or {}, "WordNet categories: noun.animal, noun.artifact, ...")):
        if "purity" in ref:
            lines += [f"Semantic quality of the class groups (vs {what}): "
                      f"purity {ref['purity']:.3f} (random balanced groups {ref['random_purity_mean']:.3f} ± "
                      f"{ref['random_purity_std']:.3f}), NMI {ref['nmi']:.3f} (random {ref['random_nmi_mean']:.3f} ± "
                      f"{ref['random_nmi_std']:.3f}).", ""]
    lines += ["## Checks", ""]
    if ch["split_vs_baseline_top1"] is not None:
        lines.append(f"- tree vs dense baseline: {ch['split_vs_baseline_top1'] * 100:+.1f} points top-1 "
                     f"({'within' if ch['within_2_points'] else 'NOT within'} 2 points)")
    lines.append(f"- parameters: {ch['param_reduction']:.1%} fewer ({'>=' if ch['at_least_30pct_fewer_params'] else '<'} 30%)")
    if ch["purity_above_random"] is not None:
        lines.append(f"- group purity {'clearly above' if ch['purity_above_random'] else 'NOT clearly above'} random "
                     "(more than 2 standard deviations)")
    lines += ["", "## Subtrees", "", "| subtree | classes | weights | GFLOPs | file |", "|---|---|---|---|---|"]
    for sub in r["subtrees"]:
        lines.append(f"| {sub['name']} | {sub['classes']} | {sub['weights'] / 1e6:.3f}M | {sub['flops'] / 1e9:.4f} | "
                     f"{sub['file_bytes'] / 2**20:.2f} MiB |")
    lines += ["", "## Stages", "", "| stage | seconds | epochs | last val top-1 | images/s |", "|---|---|---|---|---|"]
    for name, st in r["stages"].items():
        hist = st.get("history") or []
        last = hist[-1] if hist else {}
        val = f"{last['val_top1']:.3f}" if "val_top1" in last else ""
        ips = f"{last['images_per_s']:.0f}" if "images_per_s" in last else ""
        lines.append(f"| {name} | {st['seconds'] or 0:.0f} | {len(hist) or ''} | {val} | {ips} |")
    lines += [""] + [f"![{k}]({v})" for k, v in r["pictures"].items()] + [""]
    return "\n".join(lines)
