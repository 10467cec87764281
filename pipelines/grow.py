"""``splitnet grow RUN_DIR NEW_SOURCE``: a finished run's tree grown by new classes, as a new run.

The driver reads the parent run (its config, its prepared data, its tree), prepares ``NEW_SOURCE``
(any layout ``splitnet prepare`` reads) into the new run dir, picks the sibling subtree the new images
are most often mistaken for, and runs the ``grow`` stage on Ray Train (:class:`pipelines.stages.Grow`):
a new subtree trained on the new classes' images plus ``grow.replay`` images of every old class from
the parent's shards, the trunk and the old subtrees frozen. The new run dir then holds the grown tree
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
from splitnet.grow import sibling_affinity
from splitnet.train import evaluate_models

from .config import ConfigError, PipelineConfig, apply_overrides, from_dict, to_dict
from .data.records import DecodeConfig, to_float_tensor
from .data.stream import read_dataset, replay_thresholds, torch_batches
from .progress import Printer
from .rundir import RunDir
from .run import (DataInfo, PipelineError, _check_run_dir, _init_ray, _mark, _prepare, _train_stage, absolute_paths,
                  collect_bad_records)

AFFINITY_IMAGES = 512  # new images the sibling is chosen on


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
    ds = read_dataset(info.shards, split="train", subset="train", val_fraction=0.0 if d.eval_split else d.val_fraction,
                      decode=DecodeConfig(image_size=d.image_size, num_classes=info.num_classes, max_pixels=d.max_pixels),
                      seed=cfg.seed, shuffle_files=False, concurrency=1, num_cpus=d.decode_cpus, log_name=None)
    batch = ds.take_batch(AFFINITY_IMAGES, batch_format="numpy")
    x = to_float_tensor(batch["image"], info.mean, info.std)
    return sibling_affinity(tree, [(x, torch.as_tensor(batch["label"]))])


def _datasets(cfg: PipelineConfig, parent_cfg: PipelineConfig, parent: DataInfo, new: DataInfo,
              sample: dict | None, train: bool) -> dict:
    """train: the new classes' images (labels after the old ones) and the replay sample of the old
    classes, in one shuffled stream; val_new / val_old: each side's evaluation split."""
    n_old, d, pd = parent.num_classes, cfg.data, parent_cfg.data
    common = dict(concurrency=d.decode_actors, num_cpus=d.decode_cpus)

    def decode(classes, augment):
        return DecodeConfig(image_size=d.image_size, train=augment, num_classes=classes, max_pixels=d.max_pixels,
                            on_bad_record=d.on_bad_record)

    out = {"val_new": read_dataset(new.shards, split=new.eval_split, subset=new.eval_subset,
                                   val_fraction=0.0 if d.eval_split else d.val_fraction, decode=decode(new.num_classes, False),
                                   seed=cfg.seed, shuffle_files=False, label_offset=n_old, **common),
           "val_old": read_dataset(parent.shards, split=parent.eval_split, subset=parent.eval_subset,
                                   val_fraction=0.0 if pd.eval_split else pd.val_fraction, decode=decode(n_old, False),
                                   seed=cfg.seed, shuffle_files=False, **common)}
    if train:
        ds = read_dataset(new.shards, split="train", subset="train", val_fraction=0.0 if d.eval_split else d.val_fraction,
                          decode=decode(new.num_classes, True), seed=cfg.seed, label_offset=n_old, **common)
        if sample:
            ds = ds.union(read_dataset(parent.shards, split="train", subset="train",
                                       val_fraction=0.0 if pd.eval_split else pd.val_fraction, decode=decode(n_old, True),
                                       seed=cfg.seed, sample=sample, **common))
        out["train"] = ds.randomize_block_order(seed=cfg.seed)
        out["val"] = out["val_new"].union(out["val_old"])
    return out


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
        # the new images are normalized as the tree's were (the parent's statistics, not the new data's)
        info = dataclasses.replace(_prepare(cfg, rd, state, log), mean=parent_info.mean, std=parent_info.std)
        clash = sorted(set(info.class_names) & set(parent_info.class_names))
        if clash:
            raise PipelineError(f"{source}: class {clash[0]!r} is already in the tree ({len(clash)} of the new classes "
                                "are); growing adds classes it does not have")
        with parent.local_copy("tree") as d:
            parent_tree = load_tree(d)
        g = cfg.grow
        if g.replay == 0:
            log("[grow] warning: grow.replay=0: no old-class images, so the new subtree never learns to stay low on "
                "them; its probabilities are not calibrated against the old classes'")
        plan = state.setdefault("grow_plan", {})
        if "like" not in plan:  # once per grown run: a resumed run reads both back
            affinity = _affinity(parent_tree, cfg, info)
            plan.update(like=max(range(len(affinity)), key=affinity.__getitem__), affinity=affinity,
                        sample=replay_thresholds(parent_info.shards, g.replay, subset="train",
                                                 val_fraction=0.0 if parent_cfg.data.eval_split
                                                 else parent_cfg.data.val_fraction) if g.replay else None)
            rd.write_json("state.json", state)
        sample = {int(k): v for k, v in plan["sample"].items()} if plan.get("sample") else None
        replayed = g.replay * parent_info.num_classes if sample else 0
        like = state["grow_plan"]["like"]
        log(f"[grow] the new subtree is shaped as subtree {like} (the new images' probability mass per subtree: "
            + ", ".join(f"{a:.2f}" for a in state["grow_plan"]["affinity"]) + f"), init {g.init}")
        combined = dataclasses.replace(info, class_names=parent_info.class_names + info.class_names,
                                       train_records=info.train_records + replayed)
        data = _datasets(cfg, parent_cfg, parent_info, info, sample, train=True)
        _train_stage(cfg, rd, state, combined, "grow", log, datasets={"train": data["train"], "val": data["val"]},
                     recipe={"parent": parent.display(), "classes": info.class_names, "like": like})
        with rd.local_copy("tree") as d:
            grown_tree = load_tree(d)
        metrics = _metrics(parent_tree, grown_tree, _datasets(cfg, parent_cfg, parent_info, info, None, train=False),
                           info, cfg.evaluate.max_batches or None)
        manifest = read_manifest(d) if rd.is_local else {}
        result = {"parent": parent.display(), "tree": rd.display("tree"), "added_classes": info.class_names,
                  "like": like, "replay": g.replay, "metrics": metrics, "seconds": time.perf_counter() - t0,
                  "subtrees": len(grown_tree.subtrees), "weights": manifest.get("counts", {}).get("split")}
        rd.write_json("grow.json", result)
        _mark(rd, state, "evaluate", metrics, 0.0)
        log(collect_bad_records(rd, info))
        log(f"[grow] {len(info.class_names)} classes added as subtree {len(grown_tree.subtrees) - 1}: top-1 on the old "
            f"classes {metrics['old']:.3f} (before {metrics['old_before']:.3f}), on the new {metrics['new']:.3f}, "
            f"on all {metrics['all']:.3f}; tree: {rd.display('tree')}")
        return result
    finally:
        printer.close()
