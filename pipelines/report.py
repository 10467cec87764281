"""The run's report: ``report.json`` + ``report.md`` + pictures, from the run directory's outputs.

It answers what a user asks of a SplitNet run: how accurate is the tree against a dense model
trained for the same budget (the ``control`` stage; without it the report says the comparison with
the baseline is not at equal budget and checks nothing on it), how much smaller and cheaper is it, do the learned groups make semantic sense
(purity / NMI against the superclasses or WordNet parents, vs random balanced groups), and
what each stage cost.
"""
from __future__ import annotations

import json
import os
import time

import torch

from splitnet import build_model
from splitnet.accounting import model_cost
from splitnet.artifacts import hard_assignment, read_manifest
from splitnet.grouping import MIN_GROUP_SHARE
from splitnet.metrics import balanced_groups, semantic_quality
from splitnet.models import CLASSES
from splitnet.plots import plot_assignment, plot_group_semantics, plot_split_layers, plot_tree
from splitnet.tree import smallest_group_share
from splitnet.wordnet import categories, is_wnid

from .checkpoints import load_grouped
from .config import PipelineConfig, to_dict
from .rundir import RunDir

# the report's checks (README "The run's report"): what a run must show to say the method worked
ACCURACY_GAP = 0.02          # finetuned tree within 2 points of the dense model of the same budget
MIN_REDUCTION = 0.30         # >= 30% fewer parameters
MAX_OFF_BLOCK = 0.01         # <= 1% of every split layer's weight energy dropped by the cut
MAX_CUT_COST = 0.01          # the cut costs <= 1 point of top-1 against the grouped dense model
# MIN_GROUP_SHARE (splitnet.grouping): every group keeps >= 25% of its balanced share of classes and channels
NMI_SD = 3                   # class groups' NMI above random balanced groups' mean + 3 sd


def _semantic(class_to_group: list[int], parents: list[str]) -> dict | None:
    """Purity / NMI of the groups vs the classes' parents (classes without a parent left out)."""
    known = [i for i, p in enumerate(parents or []) if p]
    if len({parents[i] for i in known}) < 2:
        return None
    result = semantic_quality([class_to_group[i] for i in known], [parents[i] for i in known])
    result["classes_with_parent"] = len(known)
    return result


def _semantic_ref(semantic: dict | None) -> dict | None:
    """The labelling the semantic check uses: WordNet categories when the classes are wnids (against
    one of 7,000+ immediate parents 4 groups cannot be pure), else the classes' parents."""
    ref = (semantic or {}).get("vs_wordnet_category") or semantic
    return ref if ref and "nmi" in ref else None


def semantic_outlook(num_groups: int, class_names: list[str], parents: list[str]) -> dict | None:
    """Before training: can the semantic check pass at all? The labelling it will use (as
    :func:`_semantic_ref`), its bar (random balanced groups' NMI mean + NMI_SD sd, the report's numbers),
    and the most any balanced grouping into ``num_groups`` can score (:func:`splitnet.metrics.nmi_ceiling`).
    None when the run has no labelling to check against."""
    labels, reference = _wordnet_categories(class_names), "WordNet categories"
    if labels is None:
        labels, reference = [p for p in parents or [] if p], "superclasses"
    if len(set(labels)) < 2 or num_groups > len(labels):
        return None
    sq = semantic_quality(balanced_groups(len(labels), num_groups), labels)
    bar = sq["random_nmi_mean"] + NMI_SD * sq["random_nmi_std"]
    return {"reference": reference, "classes": len(labels), "groups": num_groups, "bar": bar,
            "ceiling": sq["nmi_ceiling"], "reachable": sq["nmi_ceiling"] > bar}


def _wordnet_categories(class_names: list[str]) -> list[str] | None:
    """WordNet lexicographer file per class when every class is a wnid and WordNet is installed."""
    if not class_names or not all(is_wnid(n) for n in class_names):
        return None
    try:
        return categories(class_names)
    except FileNotFoundError:
        return None


def _class_groups_at_start(class_to_group: list[int], parents, recorded: list[int], warmed: bool,
                           assign: str) -> dict:
    """Where a classifier started the class groups (the group stage's ``class_start``: the baseline's,
    or the warm-up's for a grouping from scratch), and how many classes the grouping moved away."""
    out = {"assign_init": "classifier", "assign": assign, "from": "warm-up" if warmed else "baseline",
           "classes_moved": sum(a != b for a, b in zip(recorded, class_to_group))}
    at_start = _semantic(list(recorded), parents)
    if at_start:
        out["nmi"] = at_start["nmi"]
    return out


def budgets(c: dict) -> dict:
    """Training epochs behind the tree and the dense models, from the config (a dict): ``tree`` /
    ``baseline`` epochs (the control trains the tree's; counted from scratch, or from the pretrained weights:
    ``pretrained``),
    and ``equal``: whether the baseline alone is at the tree's budget (the control always is)."""
    b, g, f = c["baseline"]["epochs"], c["group"]["epochs"], c["finetune"]["epochs"]
    init = c["group"]["init"]
    tree = (b if init == "baseline" else 0) + g + f
    pretrained = init == "pretrained" or (init == "baseline" and bool(c["model"].get("pretrained")))
    return {"tree": tree, "baseline": b, "pretrained": pretrained,
            "equal": b == tree,
            "tree_parts": (f"{b} + {g} + {f}" if init == "baseline" else f"{g} + {f}")}


def comparison(c: dict, metrics: dict) -> dict:
    """What the tree is measured against: the dense model of the same budget (the control stage, or the
    baseline when it trained as long), else the baseline at another budget (``equal`` False)."""
    bud = budgets(c)
    epochs = "epochs" + (" from the pretrained weights" if bud["pretrained"] else "")
    if metrics.get("control"):
        return {"name": "control", "model": metrics["control"], "equal": True,
                "what": f"the dense model trained for the same budget ({bud['tree_parts']} = {bud['tree']} {epochs})"}
    if metrics.get("baseline") and bud["equal"]:
        return {"name": "baseline", "model": metrics["baseline"], "equal": True,
                "what": f"the dense baseline, trained for the same budget ({bud['tree']} {epochs})"}
    if metrics.get("baseline"):
        more = bud["tree"] - bud["baseline"]
        return {"name": "baseline", "model": metrics["baseline"], "equal": False,
                "what": f"the dense baseline, NOT at equal budget: it trained {bud['baseline']} {epochs}, the tree "
                        f"{bud['tree_parts']} = {bud['tree']} ({more:+d}); not checked (control.enabled: true trains "
                        f"the dense model of the tree's budget)"}
    return {"name": None, "model": None, "equal": False, "what": "no dense model in this run"}


def _semantic_check(ref: dict | None, bar: float | None) -> dict:
    """NMI above the bar; not counted (ok None, out_of_reach) where no grouping of the groups' sizes
    can score above it (e.g. 10 classes of 2 superclasses in 4 groups: ceiling 0.673, bar ~0.69)."""
    check = {"ok": None, "value": ref["nmi"] if ref else None, "what": "NMI of the class groups",
             "goal": f"> {bar:.3f} (random mean + {NMI_SD} sd)" if ref else ""}
    if ref is None:
        return check
    ceiling = ref.get("nmi_ceiling")
    if ceiling is not None and ceiling <= bar:
        return {**check, "out_of_reach": True, "ceiling": ceiling,
                "goal": check["goal"] + f"; out of reach: no grouping of these sizes scores above {ceiling:.3f}"}
    return {**check, "ok": ref["nmi"] > bar, "ceiling": ceiling}


def _checks(metrics: dict, counts: dict, cut_result: dict, semantic: dict | None, versus: dict) -> dict:
    """Each check: {ok, value, goal, what} (ok None when the run lacks what it needs, e.g. no dense model
    at the tree's budget)."""
    tree_m = metrics["tree"]
    energy = cut_result.get("off_block_energy") or {}
    worst_layer = max(energy, key=energy.get) if energy else None
    sizes = cut_result.get("group_sizes") or {}
    share, share_set = smallest_group_share(sizes) if sizes else (None, "")
    cut_cost = metrics["grouped"]["top1"] - metrics["cut"]["top1"]
    dense = versus["model"]
    gap = tree_m["top1"] - dense["top1"] if dense else None
    ref = _semantic_ref(semantic)
    bar = ref["random_nmi_mean"] + NMI_SD * ref["random_nmi_std"] if ref else None
    return {
        "off_block_energy": {"ok": (energy[worst_layer] <= MAX_OFF_BLOCK) if worst_layer else None,
                             "value": energy.get(worst_layer), "layer": worst_layer, "goal": f"<= {MAX_OFF_BLOCK:.0%}",
                             "what": "weight energy the cut dropped, worst split layer"},
        "cut_cost": {"ok": cut_cost <= MAX_CUT_COST, "value": cut_cost, "goal": f"<= {MAX_CUT_COST * 100:.0f} point",
                     "what": "top-1 lost by the cut (grouped dense model -> tree before finetuning)"},
        "tree_vs_dense": {"ok": (gap >= -ACCURACY_GAP) if dense and versus["equal"] else None, "value": gap,
                          "goal": f">= -{ACCURACY_GAP * 100:.0f} points", "equal_budget": versus["equal"],
                          "what": f"finetuned tree vs {versus['what']}, top-1"},
        "param_reduction": {"ok": counts["reduction"]["params"] >= MIN_REDUCTION, "value": counts["reduction"]["params"],
                            "goal": f">= {MIN_REDUCTION:.0%}", "what": "fewer parameters than the dense model"},
        "semantic_groups": _semantic_check(ref, bar),
        "balanced_groups": {"ok": None if share is None else (share >= MIN_GROUP_SHARE and not cut_result.get("moves")),
                            "value": share, "set": share_set, "moves": cut_result.get("moves", 0),
                            "goal": f">= {MIN_GROUP_SHARE:.0%} of balanced, 0 members moved",
                            "what": "smallest group's share of its balanced size"},
    }


def write_report(cfg: PipelineConfig, rd: RunDir, state: dict, info, metrics: dict, seconds: float, log) -> dict:
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
    group_result = (state["stages"].get("group") or {}).get("result") or {}
    recorded = group_result.get("class_start")
    derived = cfg.group.method == "staged" and cfg.group.assign == "derived"
    if (derived or cfg.group.assign_init == "classifier") and recorded is not None:
        start = _class_groups_at_start(manifest["class_to_group"], info.parents, recorded,
                                       warmed=cfg.group.warmup_fraction() > 0 and (derived or cfg.group.init == "scratch"),
                                       assign="derived" if derived else "learned")
        if group_result.get("fixed_off_block"):
            start["fixed_off_block"] = group_result["fixed_off_block"]
        semantic = {**(semantic or {}), "start": start}
    stages = {k: {"seconds": v.get("seconds"), **({"history": v["result"].get("history")} if isinstance(v.get("result"), dict)
                                                   and "history" in v["result"] else {})}
              for k, v in state["stages"].items()}
    cut_result = state["stages"].get("cut", {}).get("result") or {}
    base = metrics.get("baseline")
    tree_m = metrics["tree"]
    versus = comparison(to_dict(cfg), metrics)
    checks = _checks(metrics, counts, cut_result, semantic, versus)
    pictures = {}
    with rd.staging("pictures") as tmp:
        grouped = load_grouped(cfg.model.arch, cfg.model.split, info.num_classes, rd)
        hard = hard_assignment(manifest)  # the cut's groups, as the manifest holds them
        pictures["split_layers"] = plot_split_layers(
            [(layer.name, layer.module.weight, hard.group_of(layer.in_set, layer.groups), hard.group_of(layer.out_set, layer.groups))
             for layer in grouped.split_layers() if layer.name != "fc" or info.num_classes <= 2000],
            tmp / "split_layers.png", "weight energy W^2 of every split layer at the cut, rows/columns by group "
                                      "(log scale; black = exactly zero: what the cut drops)")
        labels = categories or info.parents or []
        known = [i for i, p in enumerate(labels) if p]
        if 2 <= len({labels[i] for i in known}) <= 40:
            pictures["group_semantics"] = plot_group_semantics(
                [manifest["class_to_group"][i] for i in known], [labels[i] for i in known], tmp / "group_semantics.png",
                "classes of each group, by " + ("WordNet category" if categories else "superclass"))
        names = info.class_names if info.num_classes <= 60 else None
        pictures["class_assignment"] = plot_assignment(grouped.assignments.probs(CLASSES), tmp / "class_assignment.png",
                                                       "learned class -> group probabilities", names)
        pictures["tree"] = plot_tree(manifest, tmp / "tree.png")
        pictures = {k: f"pictures/{os.path.basename(v)}" for k, v in pictures.items()}
    groups = [{"group": g, "subtree": entry.get("subtree"), "classes": [manifest["class_names"][c] for c in entry["classes"]]}
              for g, entry in enumerate(manifest["groups"])]
    report = {
        "config": to_dict(cfg),
        "data": {"shards": info.shards, "classes": info.num_classes, "train_records": info.train_records,
                 "eval_split": info.eval_split},
        "models": {
            "baseline": {**base, **baseline_cost} if base else None,
            "control": {**metrics["control"], **baseline_cost} if metrics.get("control") else None,
            "grouped": {**metrics["grouped"], **counts.get("dense", {})},
            "cut": {**metrics["cut"], **counts["split"]},
            "tree": {**tree_m, **counts["split"]},
        },
        "reduction": counts["reduction"],
        "budget": {**budgets(to_dict(cfg)), "versus": versus["name"], "equal_budget": versus["equal"]},
        "cut": {"off_block_energy": cut_result.get("off_block_energy"), "group_sizes": cut_result.get("group_sizes"),
                "moves": cut_result.get("moves", 0), "moved": cut_result.get("moved", [])},
        "groups": groups,
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
    log(f"done in {seconds:.0f}s. {summary(report)}")
    log(f"report: {rd.display('report.md')}")
    return report


def summary(r: dict) -> str:
    """The "what this means" paragraph: what was cut, what it cost, whether the checks pass."""
    c, m, red, ch = r["config"], r["models"], r["reduction"], r["checks"]
    grouped, cut_m = m["grouped"], m["cut"]
    energy = ch["off_block_energy"]
    parts = [f"The grouping split {c['model']['arch']} into a trunk and {len(r['subtrees'])} subtrees "
             f"(split {c['model']['split']}, {len(r['groups'])} class groups of "
             f"{', '.join(str(len(g['classes'])) for g in r['groups'])} classes), "
             f"{red['weights']:.0%} fewer weights and {red['flops']:.0%} fewer FLOPs than the dense model."]
    if energy["value"] is not None:
        cost = (grouped["top1"] - cut_m["top1"]) * 100
        dropped = ("nothing: every off-block weight was exactly zero" if energy["value"] == 0 else
                   f"{energy['value']:.2%} of the weight energy in the worst split layer ({energy['layer']})")
        effect = f"gained {-cost:.1f} points of top-1" if cost < 0 else f"cost {cost:.1f} points of top-1"
        parts.append(f"The cut dropped {dropped}, and {effect} ({grouped['top1']:.3f} grouped -> {cut_m['top1']:.3f} cut).")
    parts.append(_verdict(c, m))
    ref = _semantic_ref(r["semantic"])
    if ref:
        sem, labelling = ch["semantic_groups"], ("WordNet categories" if (r["semantic"] or {}).get("vs_wordnet_category")
                                                 else "superclasses")
        numbers = f"NMI {ref['nmi']:.3f} against {ref['random_nmi_mean']:.3f} ± {ref['random_nmi_std']:.3f} for random groups"
        if sem.get("out_of_reach"):
            parts.append(f"The class groups score {numbers} against the {labelling}; the semantic check is not counted: "
                         f"no grouping of these sizes can score above {sem['ceiling']:.3f}, and its bar is "
                         f"{ref['random_nmi_mean'] + NMI_SD * ref['random_nmi_std']:.3f}.")
        else:
            parts.append(f"The class groups {'follow' if sem['ok'] else 'do NOT clearly follow'} the {labelling}: "
                         f"{numbers}.")
    start = (r["semantic"] or {}).get("start")
    if start:
        where = "the classifier the warm-up trained" if start.get("from") == "warm-up" else "the dense baseline's classifier"
        if start.get("assign") == "derived":
            fixed = start.get("fixed_off_block") or {}
            worst = max(fixed, key=fixed.get) if fixed else None
            parts.append(f"They are the similarity split of {where} (group.assign: derived"
                         + (f", NMI {start['nmi']:.3f}" if "nmi" in start else "") + "), and every channel's group was "
                         "derived from the weights" + (f", leaving {fixed[worst]:.0%} of the weight energy of the worst "
                                                       f"layer ({worst}) off the blocks for the sparsify phase to empty"
                                                       if worst else "") + ".")
        else:
            parts.append(f"They started from {where} (group.assign_init: classifier"
                         + (f", NMI {start['nmi']:.3f}" if "nmi" in start else "")
                         + f"); grouping moved {start['classes_moved']} of {r['data']['classes']} classes.")
    if c["group"]["method"] == "staged" and c["group"]["assign"] == "random":
        parts.append("The groups are random and balanced (group.assign: random): a tree of this shape without groups "
                     "worth having, the control for the derived ones.")
    known = {k: v for k, v in ch.items() if v["ok"] is not None}
    failed = [k for k, v in known.items() if not v["ok"]]
    parts.append(f"Checks: {len(known) - len(failed)} of {len(known)} pass" + (f"; failing: {', '.join(failed)}." if failed else "."))
    return " ".join(parts)


def _verdict(c: dict, metrics: dict) -> str:
    """The accuracy sentence: the tree against the dense model of its budget (:func:`comparison`), or plainly
    not at equal budget."""
    bud, versus = budgets(c), comparison(c, metrics)
    t, base = metrics["tree"]["top1"], metrics.get("baseline")
    if versus["name"] is None:
        return f"Finetuned, the tree reaches {t:.3f} (no dense model in this run)."
    gap = (t - versus["model"]["top1"]) * 100
    if versus["name"] == "control":
        out = (f"Finetuned, the tree reaches {t:.3f} against {versus['model']['top1']:.3f} for the dense model trained "
               f"for the same budget ({bud['tree_parts']} = {bud['tree']} epochs), {gap:+.1f} points")
        return out + (f"; the dense baseline ({bud['baseline']} epochs) reached {base['top1']:.3f}." if base else ".")
    if versus["equal"]:
        return (f"Finetuned, the tree reaches {t:.3f} against {base['top1']:.3f} for the dense baseline trained for the "
                f"same budget ({bud['tree']} epochs), {gap:+.1f} points.")
    return (f"Finetuned, the tree reaches {t:.3f} against {base['top1']:.3f} for the dense baseline "
            f"({gap:+.1f} points), but that is NOT an equal budget: the baseline trained "
            f"{bud['baseline']} epochs, the tree {bud['tree_parts']} = {bud['tree']}, so no check is passed on the "
            "difference (control.enabled: true trains the dense model of the tree's budget).")


def _row(name: str, m: dict | None) -> str:
    if not m:
        return f"| {name} | - | - | - | - | - |"
    weights = f"{m['weights'] / 1e6:.3f}M" if "weights" in m else ""
    params = f"{m['params'] / 1e6:.3f}M" if "params" in m else ""
    flops = f"{m['flops'] / 1e9:.3f}" if "flops" in m else ""
    return f"| {name} | {m['top1']:.3f} | {m['top5']:.3f} | {weights} | {params} | {flops} |"


def _fmt_check(name: str, v: dict) -> str:
    value = v["value"]
    if value is None:
        shown = "-"
    elif name in ("cut_cost", "tree_vs_dense"):
        shown = f"{value * 100:+.1f} points"
    elif name in ("off_block_energy", "param_reduction", "balanced_groups"):
        shown = f"{value:.2%}"
    else:
        shown = f"{value:.3f}"
    extra = ""
    if name == "off_block_energy" and v.get("layer"):
        extra = f" ({v['layer']})"
    if name == "balanced_groups":
        extra = f" ({v['set']}; {v['moves']} members moved by the cut)" if v.get("set") else f" ({v['moves']} members moved)"
    status = "-" if v["ok"] is None else ("pass" if v["ok"] else "**FAIL**")
    return f"| {v['what']} | {shown}{extra} | {v['goal']} | {status} |"


def markdown(r: dict) -> str:
    c, m, red, s, ch = r["config"], r["models"], r["reduction"], r["semantic"], r["checks"]
    lines = [
        f"# SplitNet run: {c['model']['arch']} split {c['model']['split']}, {r['data']['classes']} classes",
        "",
        summary(r),
        "",
        f"{r['data']['train_records']} training records from `{r['data']['shards']}`, evaluated on the "
        f"`{r['data']['eval_split']}` split; {c['scaling']['num_workers']} Ray Train workers"
        f"{' on GPUs' if c['scaling']['use_gpu'] else ' on CPU'}; {r['seconds']:.0f} s in all. Grouping method "
        f"`{c['group']['method']}`.",
        "",
        "| model | top-1 | top-5 | weights | params | GFLOPs |",
        "|---|---|---|---|---|---|",
        _row(f"dense baseline ({c['baseline']['epochs']} epochs)" if m["baseline"] else "dense baseline (disabled)", m["baseline"]),
        *([_row(f"dense, the tree's budget ({r['budget']['tree_parts']} = {r['budget']['tree']} epochs)", m["control"])]
          if m.get("control") else []),
        _row(f"dense, grouped ({c['group']['epochs']} epochs, regularized)", m["grouped"]),
        _row("tree right after the cut", m["cut"]),
        _row(f"tree finetuned ({c['finetune']['epochs']} epochs)", m["tree"]),
        "",
        f"Reduction of the tree vs the dense model: {red['weights']:.1%} weights, {red['params']:.1%} parameters, "
        f"{red['flops']:.1%} FLOPs.",
        "",
        "## Checks",
        "",
        "| check | value | goal | |",
        "|---|---|---|---|",
    ]
    lines += [_fmt_check(name, v) for name, v in ch.items()]
    lines.append("")
    for ref, what in (((s or {}), "the classes' parents: superclasses or WordNet hypernyms"),
                      ((s or {}).get("vs_wordnet_category") or {}, "WordNet categories: noun.animal, noun.artifact, ...")):
        if "purity" in ref:
            lines += [f"Semantic quality of the class groups (vs {what}): "
                      f"NMI {ref['nmi']:.3f} (random balanced groups {ref['random_nmi_mean']:.3f} ± "
                      f"{ref['random_nmi_std']:.3f}), purity {ref['purity']:.3f} (random {ref['random_purity_mean']:.3f} ± "
                      f"{ref['random_purity_std']:.3f}).", ""]
    hist = (r["stages"].get("group") or {}).get("history") or []
    if hist:
        lines += ["## Grouping, epoch by epoch", "",
                  "| epoch | phase | ce | weight | disjoint | balance | off-block energy (worst layer) | val top-1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for h in hist:
            terms = " | ".join(f"{h[k]:.3f}" if isinstance(h.get(k), (int, float)) else "-" for k in ("weight", "disjoint", "balance"))
            off = f"{h['off_block']:.2%}" if isinstance(h.get("off_block"), (int, float)) else "-"
            lines.append(f"| {h['epoch']} | {h.get('phase', '-')} | {h['ce']:.3f} | {terms} | {off} | {h.get('val_top1', 0):.3f} |")
        lines.append("")
    energy = (r.get("cut") or {}).get("off_block_energy") or {}
    if energy:
        lines += ["## What the cut dropped", "", "| split layer | off-block share of W^2 |", "|---|---|"]
        lines += [f"| {name} | {frac:.2e} |" for name, frac in energy.items()]
        sizes = (r.get("cut") or {}).get("group_sizes") or {}
        lines += ["", "Group sizes: " + "; ".join(f"{k} {v}" for k, v in sizes.items())
                  + f". Members moved by the cut to keep groups non-empty: {r['cut']['moves']}.", ""]
    if r.get("groups") and r["data"]["classes"] <= 200:
        lines += ["## Classes of each group", ""]
        for g in r["groups"]:
            lines.append(f"- **group {g['group']}** ({len(g['classes'])}): {', '.join(g['classes'])}")
        lines.append("")
    lines += ["## Subtrees", "", "| subtree | classes | weights | GFLOPs | file |", "|---|---|---|---|---|"]
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
    titles = {"split_layers": "The blocks", "group_semantics": "Groups vs superclasses", "class_assignment": "Class assignment",
              "tree": "The tree"}
    lines += [""]
    for k, v in r["pictures"].items():
        lines += [f"### {titles.get(k, k)}", "", f"![{k}]({v})", ""]
    return "\n".join(lines)
