"""Grow a trained tree by new classes instead of retraining it (issue 29): CIFAR-100, a tree trained on
80 classes, grown by the other 20.

Routes (plain PyTorch in one process, the data in memory, the pipeline's recipe as pareto.py runs it:
``--base-epochs`` dense, ``--group-epochs`` grouping with derived groups, the cut, the finetune to
``--epochs`` in all):

* ``tree-80``: the tree on the 80 old classes (the 4 superclasses of ``--new`` left out);
* ``retrain-100``: the same recipe on all 100 classes: what growing saves;
* ``grow-INIT-kK``: ``tree-80`` grown by a subtree shaped as its most similar sibling (weights from it:
  ``sibling``, or ``fresh``), trained ``--grow-epochs`` on the new classes' images plus K replayed
  images of every old class, the trunk and the old subtrees frozen (:mod:`splitnet.grow`);
* ``grow-INIT-kK-cC``: the same, C images of every new class held out of training, then the new logits
  calibrated (:func:`splitnet.grow.calibrate`) on those and C old-class images per class apart from the
  replay (as ``splitnet grow`` with ``grow.calibrate=C``);
* ``finetune-all-kK``: the same grown tree with every weight trainable, on the same images and epochs:
  the forgetting route.

A route trained for another ``--grow-epochs`` than 5 is named with ``-eN`` (the default is the pipeline's
``grow.epochs``, 10).

Per route: top-1 on all 100 classes (100-way), on the old 80 (and ``tree-80``'s own before growing)
and on the new 20; compute as images seen and as FLOPs (forward of every layer run, plus 2x forward of
the trainable ones for the backward), against retraining's; wall time. Resumable (each route checkpoints
every epoch under ``--work``); ``--out`` gets the JSON and a table is printed.

    python benchmarks/grow.py --threads 1                          # the full comparison (~1.5 h of 1 core)
    python benchmarks/grow.py --per-class 50 --epochs 3 --base-epochs 1 --group-epochs 1 --grow-epochs 1 \\
        --replay 0,5 --work /tmp/grow-smoke                         # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pareto import BATCH, Bench, finetuned_tree, group_route  # noqa: E402
from pipelines.config import GrowStageConfig  # noqa: E402
from splitnet.accounting import model_cost, tree_cost  # noqa: E402
from splitnet.artifacts import load_tree  # noqa: E402
from splitnet.datasets import ImageArrays, iterate_batches  # noqa: E402
from splitnet.grow import GrowingTree, calibrate, grow, save_grown, sibling_affinity  # noqa: E402
from splitnet.train import evaluate_models  # noqa: E402

NEW = "people,reptiles,small_mammals,trees"  # 4 superclasses: the 20 classes the tree grows by
NAMED_EPOCHS = 5  # routes trained for another number of growth epochs are named -eN


def _concat(a: ImageArrays, b: ImageArrays) -> ImageArrays:
    return ImageArrays(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]), b.class_names,
                       None, None)


class Growth:
    """The 80 / 20 split of CIFAR-100, the tree on 80, and the grown and retrained routes."""

    def __init__(self, args, log):
        self.args, self.log = args, log
        self.work = Path(args.work)
        new_names = args.new.split(",")
        full = argparse.Namespace(**{**vars(args), "superclasses": "", "work": str(self.work / "retrain-100")})
        self.b100 = Bench(full, log)
        train, test = self.b100.train, self.b100.test
        unknown = sorted(set(new_names) - set(train.coarse_names))
        if unknown:
            raise SystemExit(f"--new: unknown superclasses {', '.join(unknown)}")
        new_ids = {train.coarse_names.index(n) for n in new_names}
        coarse_of = {int(c): int(train.coarse_labels[train.labels == c][0]) for c in range(len(train.class_names))}
        self.old = [c for c in range(100) if coarse_of[c] not in new_ids]
        self.new = [c for c in range(100) if coarse_of[c] in new_ids]
        old_super = [n for i, n in enumerate(train.coarse_names) if i not in new_ids]
        part = argparse.Namespace(**{**vars(args), "superclasses": ",".join(old_super), "work": str(self.work / "tree-80")})
        self.b80 = Bench(part, log)
        self.order = self.old + self.new  # the grown tree's class ids: the old ones, then the new ones
        self.test = test.select(self.order)
        self.new_train = train.select(self.new)
        self.old_train = train.select(self.old)

    def score(self, models: dict, columns: dict | None = None) -> dict:
        """Top-1 of each model over the test images of all 100 classes (grown order), the old 80 and the new 20."""
        out = {}
        for part, keep in (("all", None), ("old", lambda y: y < len(self.old)), ("new", lambda y: y >= len(self.old))):
            data = self.test if keep is None else _subset(self.test, keep)
            wrapped = {k: _Logits(m, (columns or {}).get(k)) for k, m in models.items()}
            res = evaluate_models(wrapped, iterate_batches(data, 500, train=False), amp_dtype=self.b100.amp,
                                  channels_last=True)
            for k, r in res.items():
                out.setdefault(k, {})[part] = r["top1"]
        return out


class _Logits(torch.nn.Module):
    """A model's logits as the 100-class grown order reads them: columns reordered (a model in CIFAR-100's
    ids), or padded to ``classes`` with logits that never win (the 80-class tree before growing)."""

    def __init__(self, model, columns=None, classes: int | None = None):
        super().__init__()
        self.model, self.columns, self.classes = model, columns, classes

    def forward(self, x):
        out = self.model(x)
        if self.columns is not None:
            out = out.index_select(1, self.columns.to(out.device))
        if self.classes is not None:
            out = torch.cat([out, out.new_full((len(out), self.classes - out.shape[1]), -1e9)], 1)
        return out


def _subset(data: ImageArrays, keep) -> ImageArrays:
    mask = keep(data.labels)
    return ImageArrays(data.images[mask], data.labels[mask], data.class_names, None, None)


def _flops(tree, trainable: str) -> dict:
    """Forward FLOPs per image: trunk, old subtrees, the new one; and per training image, ``trainable``
    (``new`` or ``all``): forward of everything + 2x forward of the trainable part (its backward)."""
    cost = tree_cost(tree, 32)
    trunk, subs = cost["trunk"]["flops"], [s["flops"] for s in cost["subtrees"]]
    forward = trunk + sum(subs)
    trained = subs[-1] if trainable == "new" else forward
    return {"forward": forward, "per_train_image": forward + 2 * trained}


def _as_new(data: ImageArrays, g: "Growth") -> ImageArrays:
    """New-class images labelled as the grown tree numbers them (after the old classes)."""
    return ImageArrays(data.images, data.labels + len(g.old), g.order, None, None)


def grow_route(g: Growth, init: str, replay: int, trainable: str = "new", held_out: int = 0) -> dict:
    """tree-80 grown by the new classes: the new subtree alone trained (``new``), or every weight (``all``);
    ``held_out`` > 0: that many images per class (new ones held out of training) calibrate the new logits."""
    a = g.args
    name = ((f"grow-{init}-k{replay}" + (f"-c{held_out}" if held_out else "") if trainable == "new"
             else f"finetune-all-k{replay}") + (f"-e{a.grow_epochs}" if a.grow_epochs != NAMED_EPOCHS else ""))
    done = g.work / f"{name}.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)  # the new classifiers' init
    parent = g.work / "tree-80-finetuned"
    tree = load_tree(parent)
    affinity = sibling_affinity(tree, iterate_batches(g.new_train, 500, train=False), max_batches=4)
    like = max(range(len(affinity)), key=affinity.__getitem__)
    grown = grow(tree, [g.b100.train.class_names[c] for c in g.new], like=like, init=init)
    calibrate_new, new = (_as_new(d, g) for d in g.new_train.split_per_class([held_out], a.seed))
    replayed, calibrate_old, _ = g.old_train.split_per_class([replay, held_out], a.seed)
    data = _concat(replayed, new) if replay else new
    model = (GrowingTree(grown) if trainable == "new" else grown.train()).to(memory_format=torch.channels_last)
    bench = copy.copy(g.b80)  # its epoch loop (a checkpoint per epoch) over the growth's images
    bench.train, bench.steps_per_epoch, bench.work = data, max(len(data) // BATCH, 1), g.work
    hist = bench.epochs(name, model, a.grow_epochs, seed=a.seed + 3)  # SGD over the trainable weights only
    grown.eval()
    calibration, calibration_images = None, 0
    if held_out:
        before = g.score({"grown": grown})["grown"]
        held = _concat(calibrate_old, calibrate_new)
        calibration = {**calibrate(grown, iterate_batches(held, 500, train=False)), "top1_before": before}
        calibration_images = len(held)
    scores = g.score({"grown": grown})["grown"]
    images = sum(h["images"] for h in hist)
    result = {"route": name, "init": init, "replay": replay, "trainable": trainable, "like": like,
              "affinity": affinity, "top1": scores, "images": images, "calibration": calibration,
              "flops": images * _flops(grown, trainable)["per_train_image"]  # + the calibration's forward passes
                       + calibration_images * _flops(grown, trainable)["forward"],
              "seconds": sum(h["seconds"] for h in hist), "history": hist}
    if trainable == "new":
        save_grown(grown, parent, g.work / name / "tree")
    done.write_text(json.dumps(result, indent=1))
    g.log(f"[{name}] all {scores['all']:.4f} old {scores['old']:.4f} new {scores['new']:.4f}, "
          f"{images} images, {result['seconds']:.0f} s training ({time.perf_counter() - t0:.0f} s in all)")
    return result


def tree_routes(g: Growth) -> dict:
    """tree-80 and retrain-100 (the pipeline's recipe through pareto.py), and tree-80 saved as a tree dir."""
    a = g.args
    k, split = a.width, a.split
    r80 = group_route(g.b80, k, split, "derived")
    r100 = group_route(g.b100, k, split, "derived")
    parent = g.work / "tree-80-finetuned"
    tree80 = finetuned_tree(g.b80, f"splitnet-k{k:g}-{split}")
    if not (parent / "manifest.yaml").exists():  # the tree to grow, as the pipeline would serve it
        tree80.info["class_names"] = [g.b100.train.class_names[c] for c in g.old]
        tree80.save(parent, input_size=32, dense_cost=model_cost(_dense(a, len(g.old)), 32))
    tree100 = finetuned_tree(g.b100, f"splitnet-k{k:g}-{split}")
    columns = torch.tensor(g.order)  # retrain-100's logits are in CIFAR-100's ids
    scores = g.score({"tree-80": _Logits(tree80, classes=100), "retrain-100": tree100}, {"retrain-100": columns})
    n80, n100 = len(g.b80.train), len(g.b100.train)
    dense80, dense100 = _dense(a, 80), _dense(a, 100)
    recipe = lambda n, dense, tree: n * (3 * model_cost(dense, 32)["flops"] * (a.base_epochs + a.group_epochs)  # noqa: E731
                                         + 3 * tree_cost(tree, 32)["flops"] * (a.epochs - a.base_epochs - a.group_epochs))
    for r, b in ((r80, g.b80), (r100, g.b100)):  # training time: the baseline's epochs and the route's
        base = json.loads((b.work / f"dense-k{k:g}-baseline-result.json").read_text())
        r["seconds"] = sum(h["seconds"] for h in base["history"] + r["history"])
    return {"tree-80": {**r80, "top1_100way": scores["tree-80"], "top1_old_80way": scores["tree-80"]["old"],  # padded: its 80-way answer
                        "images": n80 * a.epochs, "flops": recipe(n80, dense80, tree80)},
            "retrain-100": {**r100, "top1_100way": scores["retrain-100"], "images": n100 * a.epochs,
                            "flops": recipe(n100, dense100, tree100)}}


def _dense(a, classes: int):
    from splitnet import build_model

    with torch.device("meta"):
        return build_model(f"wrn-16-{a.width:g}", classes, "1")


def table(result: dict) -> str:
    base = result["routes"]["retrain-100"]
    rows = ["| route | all 100 | old 80 | new 20 | images | compute vs retraining | training s |", "|---|---|---|---|---|---|---|"]
    for name, r in result["routes"].items():
        top = r.get("top1_100way") or r["top1"]
        rows.append(f"| {name} | {top['all']:.4f} | {top['old']:.4f} | {top['new']:.4f} | {r['images']} | "
                    f"{r['flops'] / base['flops']:.1%} | {r.get('seconds', 0):.0f} |")
    old80 = result["routes"]["tree-80"]["top1_old_80way"]
    rows.append(f"\ntree-80 before growing, 80-way on the old classes: {old80:.4f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"))
    ap.add_argument("--new", default=NEW, help="the superclasses whose classes the tree grows by")
    ap.add_argument("--width", type=float, default=1.0, help="WRN-16-k")
    ap.add_argument("--split", default="2-2-2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--base-epochs", type=int, default=5)
    ap.add_argument("--group-epochs", type=int, default=3)
    ap.add_argument("--grow-epochs", type=int, default=GrowStageConfig.epochs, help="default: the pipeline's grow.epochs")
    ap.add_argument("--replay", default="0,20,50", help="old-class images replayed per class (the grow routes)")
    ap.add_argument("--inits", default="sibling,fresh")
    ap.add_argument("--calibrate", default="0,20", help="held-out images per class calibrating the new logits "
                    "(0: none; the grow routes)")
    ap.add_argument("--finetune-all", type=int, default=1, choices=(0, 1),
                    help="1: also the forgetting route (every weight trained, the largest replay)")
    ap.add_argument("--per-class", type=int, default=0)
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "grow"))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    args.superclasses, args.distill = "", "none"
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f}s] {line}", flush=True)

    g = Growth(args, log)
    routes = tree_routes(g)
    for held_out in [int(c) for c in args.calibrate.split(",")]:
        for replay in [int(k) for k in args.replay.split(",")]:
            for init in args.inits.split(","):
                r = grow_route(g, init, replay, held_out=held_out)
                routes[r["route"]] = r
    if args.finetune_all:
        r = grow_route(g, "sibling", max(int(k) for k in args.replay.split(",")), trainable="all")
        routes[r["route"]] = r
    result = {"routes": routes, "settings": vars(args), "cpu": platform.processor() or platform.machine(),
              "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    out = Path(args.out or work / "grow.json")
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
