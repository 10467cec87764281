"""``splitnet grow RUN_DIR NEW_SOURCE``: a finished run's tree grown by new classes, as a new run.

The driver reads the parent run (its config, its prepared data, its tree), prepares ``NEW_SOURCE``
(any layout ``splitnet prepare`` reads) into the new run dir, picks the sibling subtree the new images
are most often mistaken for, and runs the ``grow`` stage on Ray Train (:class:`pipelines.stages.Grow`):
a new subtree trained on the new classes' images plus ``grow.replay`` images of every old class from
the parent's shards, the trunk and the old subtrees frozen; then the new logits' scale and shift are
fitted on ``grow.calibrate`` held-out images of every class (old ones from the parent's shards apart
from the replay, new ones held out of training) and folded into the new classifiers
(:func:`splitnet.grow.calibrate`). The new run dir then holds the grown tree
(``tree/``: the parent's weight files byte for byte, the new subtree's, a manifest naming the parent
and the added classes) and ``grow.json`` (top-1 on the old and new classes, before and after).
Nothing in the parent run dir is written. Re-running the command resumes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import torch
import yaml

from splitnet.artifacts import load_tree, read_manifest
from splitnet.grow import calibrate, save_grown, sibling_affinity
from splitnet.tree import leaves
from splitnet.train import evaluate_models

from .config import ConfigError, PipelineConfig, apply_overrides, from_dict, to_dict
from .data.records import DecodeConfig, to_float_tensor
from .data.stream import class_samples, read_dataset, rest, torch_batches
from .progress import Printer
from .rundir import RunDir
from .run import (DataInfo, PipelineError, _check_run_dir, _done, _init_ray, _mark, _prepare, _train_stage,
                  absolute_paths, collect_bad_records)

AFFINITY_IMAGES = 512  # new images the sibling is chosen on
HELD_OUT_SHARE = 0.2  # at most this share of a new class's training images is held out for the calibration


def grow_config(parent: RunDir, source: str, out: str, overrides: list[str]) -> PipelineConfig:
    """The new run's config: the parent's (model, scaling, data settings), its run dir ``out`` and
    source ``source``, then ``overrides`` (``grow.replay=50``, ``data.eval_split=``, ...)."""
    if not parent.exists("tree/manifest.yaml"):
        raise PipelineError(f"{parent.display()}: no tree in it (tree/manifest.yaml); a run grows once "
                            "`splitnet run` has finished")
    if not parent.exists("config.yaml"):
        raise PipelineError(f"{parent.display()}: no config.yaml; not a splitnet run dir")
    base = to_dict(from_dict(yaml.safe_load(parent.read_text("config.yaml")) or {}))
    base["name"] = f"{base['name']}-grown"
    base["run_dir"] = out
    base["data"].update(source=source, shards="", classes=[], parents="", download=False)
    try:
        apply_overrides(base, list(overrides))
        return from_dict(base)
    except ConfigError as e:
        raise PipelineError(str(e)) from None


def _parent_info(parent: RunDir) -> DataInfo:
    state = parent.read_json("state.json", {"stages": {}})
    prepared = (state["stages"].get("prepare") or {}).get("result") or {}
    if "data" not in prepared:
        raise PipelineError(f"{parent.display()}: its prepare stage left no record (state.json); not a finished run")
    return DataInfo(**prepared["data"])


def _affinity(tree, cfg: PipelineConfig, info: DataInfo) -> list[float]:
    """The tree's :func:`~splitnet.grow.sibling_affinity` on up to AFFINITY_IMAGES new training images."""
    d = cfg.data
    ds = read_dataset(info.shards, split="train", subset="train", val_fraction=d.train_val_fraction,
                      decode=DecodeConfig(image_size=d.image_size, num_classes=info.num_classes, max_pixels=d.max_pixels),
                      seed=cfg.seed, shuffle_files=False, concurrency=1, num_cpus=d.decode_cpus, log_name=None)
    batch = ds.take_batch(AFFINITY_IMAGES, batch_format="numpy")
    x = to_float_tensor(batch["image"], info.mean, info.std)
    return sibling_affinity(tree, [(x, torch.as_tensor(batch["label"]))])


def _datasets(cfg: PipelineConfig, parent_cfg: PipelineConfig, parent: DataInfo, new: DataInfo, plan: dict,
              parts: tuple[str, ...]) -> dict:
    """The grow stage's datasets (``parts`` of them), the per-class samples as ``plan`` drew them:
    train: the new classes' images (labels after the old ones) but those held out, and the replay sample
    of the old classes, in one shuffled stream; calibrate: the held-out images of both; val_new /
    val_old: each side's evaluation split."""
    n_old, d, pd = parent.num_classes, cfg.data, parent_cfg.data
    common = dict(concurrency=d.decode_actors, num_cpus=d.decode_cpus)
    samples = plan.get("samples") or {}

    def decode(classes, augment):
        return DecodeConfig(image_size=d.image_size, train=augment, num_classes=classes, max_pixels=d.max_pixels,
                            on_bad_record=d.on_bad_record)

    def train_split(shards, conf, classes, augment, sample, offset=0, shuffle=True):
        return read_dataset(shards, split="train", subset="train", val_fraction=conf.train_val_fraction,
                            decode=decode(classes, augment), seed=cfg.seed, sample=sample, label_offset=offset,
                            shuffle_files=shuffle, **common)

    out = {}
    if "val_new" in parts or "train" in parts:
        out["val_new"] = read_dataset(new.shards, split=new.eval_split, subset=new.eval_subset,
                                      val_fraction=d.train_val_fraction, decode=decode(new.num_classes, False),
                                      seed=cfg.seed, shuffle_files=False, label_offset=n_old, **common)
        out["val_old"] = read_dataset(parent.shards, split=parent.eval_split, subset=parent.eval_subset,
                                      val_fraction=pd.train_val_fraction, decode=decode(n_old, False),
                                      seed=cfg.seed, shuffle_files=False, **common)
    if "train" in parts:
        held_out = samples.get("calibrate_new")
        ds = train_split(new.shards, d, new.num_classes, True, rest([held_out]) if held_out else None, n_old)
        if samples.get("replay"):
            ds = ds.union(train_split(parent.shards, pd, n_old, True, samples["replay"]))
        out["train"] = ds.randomize_block_order(seed=cfg.seed)
        out["val"] = out["val_new"].union(out["val_old"])
    if "calibrate" in parts:
        out["calibrate"] = train_split(new.shards, d, new.num_classes, False, samples["calibrate_new"], n_old,
                                       shuffle=False).union(
            train_split(parent.shards, pd, n_old, False, samples["calibrate_old"], shuffle=False))
    return out


def _draw_samples(cfg: PipelineConfig, parent_cfg: PipelineConfig, parent: DataInfo, new: DataInfo) -> dict:
    """The per-class samples, drawn once per grown run from the shards' keys: the replay and the old
    classes' calibration images (disjoint), the new classes' held-out calibration images."""
    g = cfg.grow
    replay, calibrate_old = class_samples(parent.shards, [g.replay, g.calibrate],
                                          val_fraction=parent_cfg.data.train_val_fraction)
    [calibrate_new] = class_samples(new.shards, [g.calibrate], val_fraction=cfg.data.train_val_fraction,
                                    max_share=HELD_OUT_SHARE)
    out = {"replay": replay}
    if g.calibrate:
        missing = [new.class_names[c] for c in range(new.num_classes) if c not in calibrate_new]
        if missing or not calibrate_old:
            raise PipelineError(f"grow.calibrate={g.calibrate}: no images to hold out for "
                                + (f"new class {missing[0]!r} ({len(missing)} classes have fewer than "
                                   f"{int(1 / HELD_OUT_SHARE)} training images)" if missing else
                                   "the old classes (every image of the parent's shards is in the replay)")
                                + "; set grow.calibrate=0 to skip the calibration")
        out.update(calibrate_old=calibrate_old, calibrate_new=calibrate_new)
    return out


def _calibrate(rd: RunDir, parent: RunDir, data: dict, info: DataInfo, log) -> dict:
    """Fit the grown tree's new logits on the held-out images and write the tree again (the old files
    copied byte for byte as before, the new subtree's rewritten). Fitting again on the same images
    gives (1, 0): a run resumed after the write and before the stage's mark changes nothing."""
    with rd.local_copy("tree") as d:
        tree = load_tree(d)
    fit = calibrate(tree, torch_batches(data["calibrate"], 256, info.mean, info.std))
    with parent.local_copy("tree") as p, rd.staging("tree") as d:
        save_grown(tree, p, d, parent_uri=parent.display("tree"))
        if rd.exists("tree/result.json"):
            (d / "result.json").write_text(rd.read_text("tree/result.json"))
    log(f"[grow] calibrated the new logits on {fit['images']} held-out images of {fit['classes']} classes: "
        f"scale {fit['scale']:.3f}, shift {fit['shift']:+.3f} (class-balanced loss {fit['loss_before']:.3f} -> "
        f"{fit['loss_after']:.3f})")
    return fit


def _metrics(parent_tree, grown_tree, data: dict, info: DataInfo, max_batches: int | None) -> dict:
    """Top-1 of the grown tree on the old and the new classes' held-out images (and over both), and
    of the parent tree on the old ones: what growing cost the old classes."""
    def batches(ds):
        return torch_batches(ds, 256, info.mean, info.std)

    old = evaluate_models({"grown": grown_tree, "parent": parent_tree}, batches(data["val_old"]), max_batches=max_batches)
    new = evaluate_models({"grown": grown_tree}, batches(data["val_new"]), max_batches=max_batches)["grown"]
    n_old, n_new = old["grown"]["images"], new["images"]
    return {"old": old["grown"]["top1"], "old_before": old["parent"]["top1"], "new": new["top1"],
            "all": (old["grown"]["top1"] * n_old + new["top1"] * n_new) / max(n_old + n_new, 1),
            "images": {"old": n_old, "new": n_new}}


def grow_run(parent_dir: str, source: str, out: str | None = None, overrides: list[str] = (),
             log: Callable[[str], None] = print) -> dict:
    """Grow the tree of the run at ``parent_dir`` by the classes of ``source`` into the run dir ``out``
    (default: ``<parent_dir>-grown``); returns ``grow.json``'s content."""
    t0 = time.perf_counter()
    parent = RunDir(parent_dir if "://" in parent_dir else os.path.abspath(parent_dir))
    out = out or parent.display().rstrip("/") + "-grown"
    cfg = absolute_paths(grow_config(parent, source, out, list(overrides)))
    if RunDir(cfg.run_dir).display() == parent.display():
        raise PipelineError("--out: the grown run needs its own run dir (the parent's is never written)")
    parent_cfg = from_dict(yaml.safe_load(parent.read_text("config.yaml")))
    parent_info = _parent_info(parent)
    rd = RunDir(cfg.run_dir)
    where = _init_ray()
    printer = Printer(log)
    try:
        log = printer
        log(f"splitnet grow: the tree of {parent.display()} ({parent_info.num_classes} classes) by the classes of "
            f"{source}, into {rd.display()}; {where}")
        state = _check_run_dir(rd, cfg, log)
        if _done(state, "evaluate") and rd.exists("grow.json"):  # a finished grown run: its result, nothing read again
            log(f"[grow] done earlier, skipped: {rd.display('grow.json')}")
            return rd.read_json("grow.json")
        # the new images are normalized as the tree's were (the parent's statistics, not the new data's)
        info = dataclasses.replace(_prepare(cfg, rd, state, log, min_classes=1),  # a tree may grow by one class
                                   mean=parent_info.mean, std=parent_info.std)
        clash = sorted(set(info.class_names) & set(parent_info.class_names))
        if clash:
            raise PipelineError(f"{source}: class {clash[0]!r} is already in the tree ({len(clash)} of the new classes "
                                "are); growing adds classes it does not have")
        with parent.local_copy("tree") as d:
            parent_tree = load_tree(d)
        g = cfg.grow
        if g.replay == 0:
            log("[grow] warning: grow.replay=0: no old-class images, so the new subtree never learns to stay low on "
                "them; " + (f"only the calibration on {g.calibrate} held-out images per class will scale its logits "
                            "against the old classes'" if g.calibrate else
                            "its probabilities are not calibrated against the old classes' (grow.calibrate=0)"))
        plan = state.setdefault("grow_plan", {})
        if "like" not in plan or "samples" not in plan:  # once per grown run: a resumed run reads both back
            affinity = _affinity(parent_tree, cfg, info)
            plan.update(like=max(range(len(affinity)), key=affinity.__getitem__), affinity=affinity,
                        samples=_draw_samples(cfg, parent_cfg, parent_info, info))
            rd.write_json("state.json", state)
        samples = plan["samples"]
        like = plan["like"]
        n_leaves = len(leaves(parent_tree.subtrees[like]))
        if info.num_classes < n_leaves:  # the new subtree is shaped as its sibling: a class per leaf at least
            raise PipelineError(f"{source}: {info.num_classes} new class(es) cannot fill the {n_leaves} leaves of "
                                f"subtree {like}, the one the new images are most like; grow by {n_leaves} or more")
        log(f"[grow] the new subtree is shaped as subtree {like} (the new images' probability mass per subtree: "
            + ", ".join(f"{a:.2f}" for a in plan["affinity"]) + f"), init {g.init}")
        held_out = min(g.calibrate * info.num_classes, int(info.train_records * HELD_OUT_SHARE)) if g.calibrate else 0
        combined = dataclasses.replace(info, class_names=parent_info.class_names + info.class_names,
                                       train_records=max(info.train_records - held_out, 1)
                                       + (g.replay * parent_info.num_classes if samples.get("replay") else 0))
        data = _datasets(cfg, parent_cfg, parent_info, info, plan, ("train",))
        _train_stage(cfg, rd, state, combined, "grow", log, datasets={"train": data["train"], "val": data["val"]},
                     recipe={"parent": parent.display(), "classes": info.class_names, "like": like})
        if g.calibrate and not _done(state, "calibrate"):
            t1 = time.perf_counter()
            fit = _calibrate(rd, parent, _datasets(cfg, parent_cfg, parent_info, info, plan, ("calibrate",)), info, log)
            _mark(rd, state, "calibrate", fit, time.perf_counter() - t1)
        with rd.local_copy("tree") as d:
            grown_tree = load_tree(d)
        metrics = _metrics(parent_tree, grown_tree, _datasets(cfg, parent_cfg, parent_info, info, plan, ("val_new",)),
                           info, cfg.evaluate.max_batches or None)
        manifest = read_manifest(d) if rd.is_local else {}
        result = {"parent": parent.display(), "tree": rd.display("tree"), "added_classes": info.class_names,
                  "like": like, "replay": g.replay, "calibration": (state["stages"].get("calibrate") or {}).get("result"),
                  "metrics": metrics, "seconds": time.perf_counter() - t0,
                  "subtrees": len(grown_tree.subtrees), "weights": manifest.get("counts", {}).get("split")}
        rd.write_json("grow.json", result)
        _mark(rd, state, "evaluate", metrics, 0.0)
        log(collect_bad_records(rd, info))
        n_new = len(info.class_names)
        log(f"[grow] {n_new} class{'es' if n_new > 1 else ''} added as subtree {len(grown_tree.subtrees) - 1}: top-1 on the old "
            f"classes {metrics['old']:.3f} (before {metrics['old_before']:.3f}), on the new {metrics['new']:.3f}, "
            f"on all {metrics['all']:.3f}; tree: {rd.display('tree')}")
        return result
    finally:
        printer.close()
