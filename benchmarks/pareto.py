"""Top-1 against weights at one training budget: is SplitNet's tree better than a dense model of its size? (issue 27)

Every route trains on the real CIFAR-100 (50k / 10k; ``--superclasses`` / ``--per-class`` for smaller
runs) for the same budget of ``--epochs`` epochs, in one process on the CPU (plain PyTorch, the data in
memory, channels-last), batch 128, lr 0.1, weight decay 5e-4, Nesterov momentum 0.9 — the pipeline's
path with ``group.init: baseline`` (the demo's):

* ``dense-kK`` for every width k of ``--widths``: ``--base-epochs`` B on one cosine (the baseline), then
  E - B more on a second cosine (the group + finetune schedule without the split: the pipeline's
  ``control``). Scored at B and at E. The dense frontier.
* ``splitnet-k-S`` for k in ``--tree-widths`` and split S in ``--splits``: from ``dense-k`` at B, the
  grouping stage for ``--group-epochs`` G (the pipeline's defaults: groups derived from the weights at
  its first step, the proximal step sized from the weights), the cut, then the finetune for E - B - G
  epochs; the learning rate continues the second cosine across both.
* ``random-k-S``: the same with random balanced groups (``group.assign: random``): the tree's capacity
  alone, without groups worth having.
* ``distill-TEACHER-tT-wW-kK-S-sN`` / ``plain-kK-S-sN``: the finetune of ``splitnet-k-S`` again from the same cut tree,
  with the teacher of ``--distill`` (``grouped`` | ``baseline`` | ``dense``: dense-k after the whole budget,
  the pipeline's control; temperature, weight) and without, for
  every seed of ``--distill-seeds`` (for the splits of ``--distill-splits``): distillation's effect at two
  seeds, the grouping shared.

Resumable: each route checkpoints under ``--work`` (safetensors + JSON) every
``--checkpoint-every-steps`` steps (the pipeline's ``checkpoint_every_steps``) and at every epoch's
end; a killed run continues from the step it last saved and ends where an uninterrupted run ends; a
finished route is read back. ``--workers N`` runs N processes at once on the same ``--work`` (one per
core is the fastest on a CPU): each takes the next route no other holds (a lock file per route), a
tree waits for its dense baseline, and the table is printed when all are done; two commands started
by hand on the same ``--work`` share it the same way. ``--out`` gets the JSON; a table is printed;
``--docs DIR`` also writes ``DIR/pareto.md`` (the table) and ``DIR/pareto.png`` (top-1 against
weights, one line per family).

    python benchmarks/pareto.py --workers 2 --threads 1           # the full frontier (hours on 2 CPU cores)
    python benchmarks/pareto.py --table                           # the table of what --work holds
    python benchmarks/pareto.py --superclasses aquatic_mammals,large_carnivores,vehicles_1,vehicles_2 \\
        --widths 1 --tree-widths 1 --splits 2-2-2 --random none --work benchmarks/results/pareto-demo  # the demo's setting
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file  # noqa: E402
from splitnet import build_model, cut  # noqa: E402
from splitnet.accounting import model_cost, tree_cost  # noqa: E402
from splitnet.artifacts import load_tree  # noqa: E402
from splitnet.datasets import iterate_batches, load_cifar100  # noqa: E402
from splitnet.distill import Distiller  # noqa: E402
from splitnet.grouping import Grouping, GroupingSchedule  # noqa: E402
from splitnet.precision import choose_precision  # noqa: E402
from splitnet.regularizers import RegularizerWeights, parameter_groups  # noqa: E402
from splitnet.schedule import Phase, PhaseSchedule  # noqa: E402
from splitnet.train import evaluate, format_epoch, train_one_epoch  # noqa: E402

from pipelines.checkpoints import load_optimizer, save_optimizer, save_state  # noqa: E402

LR, WEIGHT_DECAY, BATCH = 0.1, 5e-4, 128


def _arch(k: float) -> str:
    return f"wrn-16-{k:g}"


def _merge(a: dict | None, b: dict) -> dict:
    """One epoch's statistics from its parts' (train_one_epoch's means, each over its own images)."""
    if a is None:
        return dict(b)
    n = a["images"] + b["images"]
    out = {}
    for k in a.keys() & b.keys() - {"images", "steps", "seconds", "images_per_s"}:
        parts = [(v, m) for v, m in ((a[k], a["images"]), (b[k], b["images"])) if math.isfinite(v)]  # nan: no term
        out[k] = sum(v * m for v, m in parts) / max(sum(m for _, m in parts), 1) if parts else float("nan")
    out.update(images=n, steps=a["steps"] + b["steps"], seconds=a["seconds"] + b["seconds"])
    out["images_per_s"] = n / max(out["seconds"], 1e-9)
    return out


def _write(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all (another process may be reading it)."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Busy(Exception):
    """Another process running this benchmark on the same ``--work`` holds the route, or what it needs."""


@contextlib.contextmanager
def claim(work: Path, name: str):
    """Hold route ``name`` for this process (an exclusive ``flock`` on ``work/locks/NAME.lock``, freed
    when the process ends, however it ends), or raise :class:`Busy`."""
    path = work / "locks" / (name.replace("/", "--") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(name) from None
        yield


class Bench:
    """The data, the settings and the work folder shared by every route."""

    def __init__(self, args, log):
        self.args, self.log = args, log
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        train, test = load_cifar100(args.data, "train"), load_cifar100(args.data, "test")
        if args.superclasses:
            wanted = args.superclasses.split(",")
            unknown = sorted(set(wanted) - set(train.coarse_names))
            if unknown:
                raise SystemExit(f"--superclasses: unknown {', '.join(unknown)} (known: {', '.join(train.coarse_names)})")
            ids = [train.coarse_names.index(name) for name in wanted]
            classes = [c for c in range(len(train.class_names))
                       if int(train.coarse_labels[train.labels == c][0]) in ids]
            train, test = train.select(classes), test.select(classes)
        if args.per_class:
            train = train.subset(args.per_class, seed=0)
        self.train, self.test = train, test
        self.classes = len(train.class_names)
        self.batch = getattr(args, "batch", BATCH)
        self.steps_per_epoch = len(train) // self.batch
        self.group_share = args.group_epochs / (args.epochs - args.base_epochs)  # of the second cosine
        self.amp = choose_precision(args.amp, "cpu").dtype

    def score(self, model) -> float:
        return evaluate(model, iterate_batches(self.test, 500, train=False), amp_dtype=self.amp,
                        channels_last=True)["top1"]

    def epochs(self, name: str, model, epochs: int, *, span=(0.0, 1.0), seed: int, grouping: Grouping | None = None,
               distill: Distiller | None = None) -> list[dict]:
        """Train ``model`` for ``epochs`` epochs in ``work/name``, checkpointed every
        ``--checkpoint-every-steps`` steps and at every epoch's end (resumed from there, the epoch's
        batches replayed up to the step); the lr covers the part ``span`` of one cosine. Returns the
        history (one entry per epoch).

        A checkpoint is written whole into the slot the pointer ``state.json`` does not name, then the
        pointer is replaced (atomic): a kill at any instant leaves the last complete checkpoint. The
        finished weights are also ``work/name/model.safetensors``."""
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        opt = torch.optim.SGD(parameter_groups(model, LR, WEIGHT_DECAY), lr=LR, momentum=0.9, nesterov=True)
        schedule = PhaseSchedule(opt, [Phase(epochs, self.steps_per_epoch, cosine_span=span)])
        state = {"epoch": 0, "step": 0, "partial": None, "history": []}
        if (d / "state.json").exists():
            state = {**state, **json.loads((d / "state.json").read_text())}
            slot = d / state["slot"] if "slot" in state else d  # no slot: an epoch checkpoint of the first format
            model.load_state_dict(load_file(str(slot / "model.safetensors")))
            load_optimizer(opt, slot, "cpu")
            if grouping is not None:
                grouping.load_state(state.get("grouping"))
            if state["epoch"] < epochs:
                at = f"step {state['step']} of epoch {state['epoch'] + 1}" if state["step"] else f"epoch {state['epoch']}"
                self.log(f"[{name}] resuming after {at}")
        spe = self.steps_per_epoch
        every = getattr(self.args, "checkpoint_every_steps", 0) or spe

        def checkpoint() -> None:
            slot = "slot-b" if state.get("slot") == "slot-a" else "slot-a"
            (d / slot).mkdir(exist_ok=True)
            save_state(model, d / slot / "model.safetensors")
            save_optimizer(opt, d / slot)
            if grouping is not None:
                state["grouping"] = grouping.state()
            state["slot"] = slot
            _write(d / "state.json", json.dumps(state))

        while state["epoch"] < epochs:
            epoch = state["epoch"]
            batches = (b for b in iterate_batches(self.train, self.batch, train=True, seed=seed, epoch=epoch)
                       if len(b[1]) == self.batch)
            batches = itertools.islice(batches, state["step"], None)  # drawn (same random crops), not trained on
            while state["step"] < spe:
                step0 = epoch * spe + state["step"]
                schedule.load_state_dict({"last_epoch": step0})
                t0 = time.perf_counter()
                stats = train_one_epoch(model, batches, opt, grouping=grouping, distill=distill, amp_dtype=self.amp,
                                        channels_last=True, global_step=step0,
                                        max_steps=min(every, spe - state["step"]), scheduler=schedule)
                stats["seconds"] = time.perf_counter() - t0
                state["partial"] = _merge(state["partial"], stats)
                state["step"] += stats["steps"]
                if state["step"] < spe:
                    checkpoint()
            stats = state["partial"]
            if grouping is not None:
                stats["off_block"] = max(grouping.off_block_energy().values(), default=0.0)
            state.update(epoch=epoch + 1, step=0, partial=None)
            state["history"].append({k: v for k, v in stats.items() if isinstance(v, (int, float))})
            checkpoint()
            self.log(format_epoch(name, epoch + 1, epochs, stats))
        if "slot" in state:  # else an epoch checkpoint of the first format: its weights are there already
            save_state(model, d / "model.safetensors")
        return state["history"]

    def done(self, name: str) -> dict | None:
        path = self.work / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def once(self, name: str, run) -> dict:
        """Route ``name``'s result: read back when finished, else ``run()`` under its claim (:class:`Busy`
        when another process holds it)."""
        if (r := self.done(name)) is not None:
            return r
        with claim(self.work, name):
            if (r := self.done(name)) is not None:  # finished by another process meanwhile
                return r
            return run()

    def finish(self, name: str, result: dict) -> dict:
        _write(self.work / f"{name}.json", json.dumps(result, indent=1))
        self.log(f"[{name}] top-1 {result['top1']:.4f}, {result['weights'] / 1e6:.3f}M weights")
        return result


def dense_route(b: Bench, k: float) -> dict:
    """dense-k: B epochs on one cosine (the baseline, kept), then E - B on a second."""
    name = f"dense-k{k:g}"
    return b.once(name, lambda: _dense_route(b, k, name))


def _dense_route(b: Bench, k: float, name: str) -> dict:
    a = b.args
    t0 = time.perf_counter()
    model, baseline = dense_baseline(b, k)
    hist = b.epochs(f"{name}-rest", model, a.epochs - a.base_epochs, seed=a.seed + 1)
    cost = model_cost(model, 32)
    return b.finish(name, {"route": name, "family": "dense", "k": k, "split": "1", "top1": b.score(model),
                           "baseline_top1": baseline["top1"], "weights": cost["weights"], "flops": cost["flops"],
                           "history": baseline["history"] + hist, "seconds": time.perf_counter() - t0})


def dense_baseline(b: Bench, k: float):
    """dense-k's first B epochs (one cosine), trained once and kept: where its trees branch off.
    Returns the model and its result (top-1, history)."""
    name = f"dense-k{k:g}"
    torch.manual_seed(b.args.seed)
    model = build_model(_arch(k), b.classes, "1").to(memory_format=torch.channels_last)
    base_path = b.work / f"{name}-baseline.safetensors"
    if not base_path.exists():
        with claim(b.work, f"{name}-baseline"):
            if not base_path.exists():
                hist = b.epochs(f"{name}-baseline", model, b.args.base_epochs, seed=b.args.seed)
                (b.work / f"{name}-baseline-result.json").write_text(
                    json.dumps({"top1": b.score(model), "history": hist}))
                save_state(model.backbone_state_dict(), base_path)  # last: its presence says the baseline is done
    model.load_backbone_state_dict(load_file(str(base_path)), skip_fc_mismatch=False)
    return model, json.loads((b.work / f"{name}-baseline-result.json").read_text())


def finetuned_tree(b: Bench, name: str):
    """The tree route ``name`` finished with: its cut tree with the finetune's last weights."""
    tree = load_tree(b.work / name / "cut")
    tree.load_state_dict(load_file(str(b.work / name / "finetune" / "model.safetensors")))
    return tree.eval()


def group_route(b: Bench, k: float, split: str, assign: str) -> dict:
    """splitnet-k-S (derived groups) or random-k-S: from dense-k's baseline, group, cut, finetune."""
    family = "splitnet" if assign == "derived" else "random"
    name = f"{family}-k{k:g}-{split}"
    return b.once(name, lambda: _group_route(b, k, split, assign, family, name))


def _group_route(b: Bench, k: float, split: str, assign: str, family: str, name: str) -> dict:
    a = b.args
    t0 = time.perf_counter()
    cut_dir = b.work / name / "cut"
    if not (cut_dir / "manifest.yaml").exists():
        dense_baseline(b, k)
        torch.manual_seed(a.seed)
        model = build_model(_arch(k), b.classes, split).to(memory_format=torch.channels_last)
        model.load_backbone_state_dict(load_file(str(b.work / f"dense-k{k:g}-baseline.safetensors")), skip_fc_mismatch=False)
        steps = a.group_epochs * b.steps_per_epoch
        grouping = Grouping(model, RegularizerWeights(), GroupingSchedule(warmup=0.0, assign=assign, random_seed=a.seed),
                            steps)
        hist = b.epochs(f"{name}/group", model, a.group_epochs, span=(0, b.group_share), seed=a.seed + 1,
                        grouping=grouping)
        grouped = b.score(model)
        save_state(model, b.work / name / "grouped.safetensors")
        model.eval()
        tree = cut(model)
        tree.save(cut_dir, input_size=32, dense_cost=model_cost(model, 32))
        (b.work / name / "group.json").write_text(json.dumps(
            {"grouped_top1": grouped, "cut_top1": b.score(tree), "moves": len(tree.moves), "history": hist,
             "fixed_off_block": grouping.fixed_off_block}))
    info = json.loads((b.work / name / "group.json").read_text())
    top1, hist = finetune(b, name, f"{name}/finetune", None, a.seed + 2)
    tree = load_tree(cut_dir)
    cost = tree_cost(tree, 32)
    return b.finish(name, {"route": name, "family": family, "k": k, "split": split, "top1": top1,
                           "grouped_top1": info["grouped_top1"], "cut_top1": info["cut_top1"], "moves": info["moves"],
                           "weights": cost["weights"], "flops": cost["flops"],
                           "history": info["history"] + hist, "seconds": time.perf_counter() - t0})


def _teacher(b: Bench, group_name: str, which: str, k: float, split: str):
    if which == "grouped":
        teacher = build_model(_arch(k), b.classes, split)
        teacher.load_state_dict(load_file(str(b.work / group_name / "grouped.safetensors")))
    elif which == "dense":  # dense-k after the whole budget: the pipeline's control (its epochs are not the tree's)
        teacher = build_model(_arch(k), b.classes, "1")
        teacher.load_state_dict(load_file(str(b.work / f"dense-k{k:g}-rest" / "model.safetensors")))
    else:
        teacher = build_model(_arch(k), b.classes, "1")
        teacher.load_backbone_state_dict(load_file(str(b.work / f"dense-k{k:g}-baseline.safetensors")),
                                         skip_fc_mismatch=False)
    return teacher.to(memory_format=torch.channels_last)


def finetune(b: Bench, group_name: str, name: str, distill: tuple | None, seed: int, k: float = 0, split: str = ""):
    """The cut tree of ``group_name`` finetuned for E - B - G epochs (with ``distill`` = (teacher, T, w))."""
    a = b.args
    tree = load_tree(b.work / group_name / "cut").train().to(memory_format=torch.channels_last)
    d = None
    if distill is not None:
        which, temperature, weight = distill
        d = Distiller(_teacher(b, group_name, which, k, split), temperature, weight, amp_dtype=b.amp)
    hist = b.epochs(name, tree, a.epochs - a.base_epochs - a.group_epochs, span=(b.group_share, 1),
                    seed=seed, distill=d)
    return b.score(tree), hist


def distill_route(b: Bench, k: float, split: str, seed: int, kind: str) -> dict:
    """The finetune of splitnet-k-S again from its cut tree, with the teacher (``kind`` distill) or
    without (plain), at ``seed``: each seed and kind its own route."""
    which, temperature, weight = b.args.distill.split(":")
    distill = (which, float(temperature), float(weight)) if kind == "distill" else None
    group_name = f"splitnet-k{k:g}-{split}"
    tag = f"{which}-t{float(temperature):g}-w{float(weight):g}"
    name = f"plain-k{k:g}-{split}-s{seed}" if kind == "plain" else f"distill-{tag}-k{k:g}-{split}-s{seed}"
    base = b.done(group_name)
    if base is None and b.done(name) is None:
        raise Busy(group_name)  # its tree is being finished by another process

    def run() -> dict:
        t0 = time.perf_counter()
        top1, hist = finetune(b, group_name, name, distill, 100 + seed, k, split)
        return b.finish(name, {"route": name, "family": kind, "k": k, "split": split, "seed": seed, "top1": top1,
                               "distill": b.args.distill if distill else None, "weights": base["weights"],
                               "flops": base["flops"], "history": hist, "seconds": time.perf_counter() - t0})

    return b.once(name, run)


def frontier(dense: list[dict], weights: float) -> float | None:
    """The dense frontier's top-1 at ``weights``: linear in log(weights) between the nearest widths."""
    pts = sorted((r["weights"], r["top1"]) for r in dense)
    for (w0, a0), (w1, a1) in zip(pts, pts[1:]):
        if w0 <= weights <= w1:
            t = (math.log(weights) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return a0 + t * (a1 - a0)
    return None


def analyse(routes: list[dict], distill: str = "") -> dict:
    """Each tree against the frontier at its weights, against its random-group twin and its dense parent;
    the distillation targets on the routes of teacher:temperature:weight ``distill``."""
    dense = [r for r in routes if r["family"] == "dense"]
    by = {r["route"]: r for r in routes}
    for r in routes:
        if r["family"] == "dense":
            continue
        f = frontier(dense, r["weights"])
        r["vs_frontier_points"] = None if f is None else 100 * (r["top1"] - f)
        parent = by.get(f"dense-k{r['k']:g}")
        r["vs_parent_points"] = None if parent is None else 100 * (r["top1"] - parent["top1"])
        twin = by.get(f"random-k{r['k']:g}-{r['split']}")
        if r["family"] == "splitnet" and twin:
            r["vs_random_points"] = 100 * (r["top1"] - twin["top1"])
    targets = {}
    trees = [r for r in routes if r["family"] == "splitnet"]
    if trees:
        targets["on_or_above_frontier"] = all(r["vs_frontier_points"] is not None and r["vs_frontier_points"] >= 0
                                              for r in trees)
        targets["above_random_groups"] = all(r.get("vs_random_points", -1) > 0 for r in trees)
    distilled = [r for r in routes if r["family"] == "distill" and r.get("distill") == distill]
    for k, bar in ((3, -1.5), (2, -2.0)):
        mine = [r for r in distilled if r["k"] == k]
        if mine:
            targets[f"distilled_wrn16_{k}_within_{-bar:g}"] = all(r["vs_parent_points"] >= bar for r in mine)
    return targets


def table(routes: list[dict]) -> str:
    rows = ["| route | family | k | split | weights | GFLOPs | top-1 | vs dense frontier | vs dense parent (same budget) "
            "| vs random groups | training minutes (trees: after the baseline) |", "|" + "---|" * 11]

    def pts(v):
        return "-" if v is None else f"{v:+.1f}"

    for r in sorted(routes, key=lambda r: (r["family"] != "dense", r["family"], r["k"], r["split"], r.get("seed", 0))):
        rows.append(f"| {r['route']} | {r['family']} | {r['k']:g} | {r['split']} | {r['weights'] / 1e6:.3f}M | "
                    f"{r['flops'] / 1e9:.3f} | {r['top1']:.4f}"
                    + (f" (baseline {r['baseline_top1']:.4f})" if "baseline_top1" in r else "")
                    + f" | {pts(r.get('vs_frontier_points'))} | {pts(r.get('vs_parent_points'))} | "
                    f"{pts(r.get('vs_random_points'))} | {sum(h['seconds'] for h in r['history']) / 60:.1f} |")
    return "\n".join(rows)


def plot(routes: list[dict], path: Path, title: str, distill: str = "") -> None:
    from splitnet.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"dense": ("k", "o", "dense WRN-16-k"), "splitnet": ("tab:blue", "s", "SplitNet tree"),
              "random": ("tab:gray", "x", "tree, random groups"), "distill": ("tab:green", "^", "SplitNet tree, distilled")}
    for family, (color, marker, label) in styles.items():
        for split in sorted({r["split"] for r in routes if r["family"] == family}):
            pts = sorted((r["weights"], r["top1"]) for r in routes if r["family"] == family and r["split"] == split
                         and r.get("seed", 0) == 0 and r.get("distill") in (None, distill))
            if not pts:
                continue
            ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], color=color, marker=marker,
                    linestyle="-" if family == "dense" or split == "2-2-2" else "--",
                    label=label + ("" if family == "dense" else f" {split}"))
    for r in routes:
        if r["family"] == "dense":
            ax.annotate(f"k={r['k']:g}", (r["weights"] / 1e6, r["top1"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_xlabel("weights (millions, log scale)")
    ax.set_ylabel("top-1 (CIFAR-100 test)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(work: Path) -> list[dict]:
    """Every finished route's JSON in ``work`` (each file read once)."""
    found = (json.loads(p.read_text()) for p in sorted(work.glob("*.json")) if not p.name.endswith("-result.json"))
    return [r for r in found if "route" in r]


def run_jobs(jobs: list, log, poll_s: float = 30.0) -> None:
    """Run every job (a route); one that another process holds (:class:`Busy`) is come back to after
    the others, until each is done here or there."""
    while jobs:
        waiting = []
        for job in jobs:
            try:
                job()
            except Busy as busy:
                waiting.append((job, busy))
        if len(waiting) == len(jobs):
            log(f"waiting for another process to finish {', '.join(sorted({str(b) for _, b in waiting}))}")
            time.sleep(poll_s)
        jobs = [job for job, _ in waiting]


def run_workers(args, argv: list[str], work: Path, out: Path, log) -> int:
    """``--workers N``: N copies of this benchmark on the same ``--work``, each taking the routes the
    others do not hold (``--threads`` each; by default the cores shared out); then the table."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--workers", "1", "--threads", str(threads)]
    log(f"pareto: {args.workers} worker processes, {threads} thread(s) each, on {work}")
    procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        log(f"pareto: worker exit codes {codes}; the finished routes are kept in {work}, run again to go on")
        return max(codes)
    return main([*argv, "--table", "--workers", "1"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"))
    ap.add_argument("--widths", default="1,1.5,2,3", help="dense WRN-16-k widths (the frontier)")
    ap.add_argument("--tree-widths", default="2,3", help="the widths cut into trees")
    ap.add_argument("--splits", default="2-2-2,2-4-4")
    ap.add_argument("--random", default="all", choices=("all", "none"), help="the random-group trees")
    ap.add_argument("--epochs", type=int, default=10, help="every route's budget")
    ap.add_argument("--base-epochs", type=int, default=5, help="the baseline's share (trees branch off there)")
    ap.add_argument("--group-epochs", type=int, default=3, help="the grouping's share; the finetune gets the rest")
    ap.add_argument("--distill", default="baseline:4:0.2",
                    help="teacher:temperature:weight, or none (default: the demo-setting sweep's best, docs/verdict.md)")
    ap.add_argument("--distill-seeds", default="0,1")
    ap.add_argument("--distill-splits", default="2-2-2", help="the splits whose finetune is also run distilled")
    ap.add_argument("--superclasses", default="", help="only these CIFAR-100 superclasses' classes (comma-separated)")
    ap.add_argument("--per-class", type=int, default=0, help=">0: that many training images per class (smoke runs)")
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "pareto"))
    ap.add_argument("--out", default="", help="the JSON (default: WORK/pareto.json)")
    ap.add_argument("--docs", default="", help="also write DIR/pareto.md and DIR/pareto.png")
    ap.add_argument("--workers", type=int, default=1,
                    help="run the routes in this many processes at once (each one takes the next route nobody holds)")
    ap.add_argument("--checkpoint-every-steps", type=int, default=50,
                    help="also checkpoint every this many steps within an epoch (0: at the epoch's end only)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--table", action="store_true", help="print the table of the routes --work holds, run nothing")
    args = ap.parse_args(argv)
    if not args.base_epochs < args.epochs or not 0 < args.group_epochs < args.epochs - args.base_epochs:
        ap.error("--base-epochs < --epochs and 0 < --group-epochs < --epochs - --base-epochs (the finetune needs epochs)")
    if args.distill != "none" and (len(args.distill.split(":")) != 3
                                   or args.distill.split(":")[0] not in ("grouped", "baseline", "dense")):
        ap.error("--distill: teacher:temperature:weight with teacher grouped, baseline or dense, e.g. grouped:4:0.5")
    if args.workers < 1 or args.checkpoint_every_steps < 0 or args.batch < 2:
        ap.error("--workers >= 1, --checkpoint-every-steps >= 0 and --batch >= 2")
    args.distill_seeds = [int(s) for s in args.distill_seeds.split(",") if s.strip()]
    unknown = set(args.distill_splits.split(",")) - set(args.splits.split(",")) - {""}
    if unknown:
        ap.error(f"--distill-splits {','.join(sorted(unknown))}: not among --splits")
    work = Path(args.work)
    out = Path(args.out) if args.out else work / "pareto.json"

    def log(line: str) -> None:
        print(line, flush=True)

    if args.workers > 1 and not args.table:
        return run_workers(args, list(sys.argv[1:] if argv is None else argv), work, out, log)
    if not args.table:
        if args.threads:
            torch.set_num_threads(args.threads)
        b = Bench(args, log)
        widths = [float(w) for w in args.widths.split(",") if w.strip()]
        tree_widths = [float(w) for w in args.tree_widths.split(",") if w.strip()]
        log(f"pareto: {b.classes} classes, {len(b.train)} / {len(b.test)} images, {args.epochs} epochs per route "
            f"({args.base_epochs} baseline + {args.group_epochs} group + {args.epochs - args.base_epochs - args.group_epochs} "
            f"finetune), {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
        jobs = []
        for k in sorted(set(widths) | set(tree_widths)):  # narrow first: a tree's frontier is there before it
            jobs.append(functools.partial(dense_route, b, k))
            if k not in tree_widths:
                continue
            for split in args.splits.split(","):
                jobs.append(functools.partial(group_route, b, k, split, "derived"))
                if args.random == "all":
                    jobs.append(functools.partial(group_route, b, k, split, "random"))
            for split in args.distill_splits.split(","):
                if args.distill != "none" and split:
                    jobs += [functools.partial(distill_route, b, k, split, seed, kind)
                             for seed in args.distill_seeds for kind in ("plain", "distill")]
        run_jobs(jobs, log)
    routes = collect(work)
    targets = analyse(routes, args.distill)
    result = {"routes": routes, "targets": targets, "settings": {k: v for k, v in vars(args).items() if k != "table"},
              "cpu": platform.processor() or platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, json.dumps(result, indent=1))
    text = table(routes)
    print(text)
    print("targets: " + (", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()) or "none measurable"))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "pareto.md").write_text(
            f"`benchmarks/pareto.py`: {args.epochs} epochs per route on CIFAR-100; written by the benchmark.\n\n"
            + text + "\n\ntargets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()) + "\n")
        plot(routes, docs / "pareto.png", f"CIFAR-100, {args.epochs} epochs per route: top-1 against weights", args.distill)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
