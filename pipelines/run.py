"""``splitnet run CONFIG.yaml``: the staged pipeline on Ray, from data to a tree ready to serve.

    prepare -> baseline -> group -> cut -> finetune -> control -> evaluate -> report

``prepare`` converts a raw source (CIFAR-100, ImageFolder, per-synset tars) into shards once
(Ray Data tasks) or takes the shards the config points at. ``baseline``, ``group`` and
``finetune`` are each a Ray Train ``TorchTrainer`` (DDP, gloo on CPU, NCCL on GPU) streaming
their shard of a Ray Data pipeline; ``control`` is one too: the dense model trained for the tree's
budget from where the grouping started (the report's yardstick); ``cut`` is a Ray task; ``evaluate`` is a Train job again, so
every model is scored on the workers, next to the data.

Everything lands in the run directory (local or a URI). ``state.json`` records finished stages: a
re-run skips them, and the interrupted stage resumes from its last Ray Train checkpoint (as does
a stage whose worker dies, up to ``failure.max_failures`` times).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import yaml

from splitnet import cut
from splitnet.accounting import model_cost
from splitnet.assignment import SplitConfig
from splitnet.datasets import CIFAR100_MEAN, CIFAR100_STD
from splitnet.grouping import off_block_energy
from splitnet.precision import OVERRIDE_ENV, choose_precision

from .checkpoints import load_grouped
from .config import PipelineConfig, differences, from_dict, to_dict
from .data.prepare import PrepareError, parents_line, prepare
from .data.records import IMAGENET_MEAN, IMAGENET_STD, DecodeConfig
from .data.sources import download_cifar, read_parents, source_splits
from .data.stream import (bad_record_log, cached_decoded, class_table, count_records, decoded_bytes, has_split,
                          read_dataset)
from .progress import Printer, link_ray_logs, verbose
from .report import NMI_SD, semantic_outlook, write_report
from .rundir import RunDir
from .stages import evaluate_loop, train_loop

STAGES = ("prepare", "baseline", "group", "cut", "finetune", "control", "evaluate", "report")


class PipelineError(RuntimeError):
    """A problem the user can fix (printed as one line, exit status 2)."""


@dataclass
class DataInfo:
    shards: str                 # folder or URI holding <split>-*.parquet|tar, classes.json
    class_names: list[str]
    parents: list[str]
    train_records: int
    eval_split: str             # the split the evaluation reads
    eval_subset: str            # "train" or "val" share of that split
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---- run directory bookkeeping ------------------------------------------------------------

def _check_run_dir(rd: RunDir, cfg: PipelineConfig, log) -> dict:
    """Save the resolved config, or check it against the one a previous run saved."""
    resolved = to_dict(cfg)
    if rd.exists("config.yaml"):
        old = yaml.safe_load(rd.read_text("config.yaml")) or {}
        diff = differences(old, resolved)
        if diff:
            raise PipelineError(f"{rd.display()} holds a run with a different config ({', '.join(diff[:5])} differ); "
                                "re-run with the same config to resume, or pick a new run_dir")
    else:
        rd.write_text("config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    state = rd.read_json("state.json", {"stages": {}})
    done = [s for s in STAGES if state["stages"].get(s, {}).get("status") == "done"]
    if done:
        log(f"run dir {rd.display()}: resuming; finished stages {', '.join(done)} are skipped")
    return state


def _mark(rd: RunDir, state: dict, stage: str, result: dict, seconds: float) -> None:
    state["stages"][stage] = {"status": "done", "seconds": round(seconds, 2), "finished": time.time(), "result": result}
    rd.write_json("state.json", state)


def _done(state: dict, stage: str) -> bool:
    return state["stages"].get(stage, {}).get("status") == "done"


# ---- Ray ----------------------------------------------------------------------------------

def _init_ray() -> str:
    """Connect to the cluster of RAY_ADDRESS / a Ray job, or start a local one; says which.

    Workers' own output (Ray Train's per-report lines, Data's warnings) reaches this terminal
    only with ``--verbose``: the epoch lines come through the run's ProgressLog actor instead.
    """
    import ray

    if ray.is_initialized():
        return "the running Ray"
    address = os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")}}

    if os.environ.get(OVERRIDE_ENV):  # the user's answer to "native bf16?" holds on the workers too
        env["env_vars"][OVERRIDE_ENV] = os.environ[OVERRIDE_ENV]
    if address and address != "local":
        ray.init(address=address, runtime_env=env, log_to_driver=verbose())
        return f"Ray cluster {address}"
    ray.init(address="local" if address else None, runtime_env=env, log_to_driver=verbose())
    return "a local Ray"


def _probe_precision(amp: str, use_gpu: bool):
    """On a node like the workers': what ``scaling.amp`` resolves to there (a ``Precision``)."""
    return choose_precision(amp, "cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def workers_precision(cfg: PipelineConfig, timeout_s: float = 60.0):
    """The precision the training workers will compute in, for the header. A local Ray is this
    machine: resolved here. On a cluster, one task with a worker's resources answers; a cluster
    with no such node up (autoscaling) leaves it to the workers, whose rank 0 then says it."""
    import ray

    s = cfg.scaling
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id():
        return _probe_precision(s.amp, s.use_gpu)
    task = ray.remote(num_cpus=min(1.0, s.cpus_per_worker), num_gpus=s.gpus_per_worker if s.use_gpu else 0)
    ref = task(_probe_precision).remote(s.amp, s.use_gpu)
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None


def _check_resources(cfg: PipelineConfig, log) -> None:
    """Fail early (not hang) when the cluster cannot hold the trainers plus the data pipeline."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    s = cfg.scaling
    short = []
    if s.use_gpu and gpus < s.num_workers * s.gpus_per_worker:
        short.append(f"scaling.use_gpu: {s.num_workers} workers x {s.gpus_per_worker:g} GPU need "
                     f"{s.num_workers * s.gpus_per_worker:g} GPUs and the cluster has {gpus:g}"
                     + ("; run with scaling.use_gpu=false (CPU, gloo) or on GPU nodes" if gpus == 0 else ""))
    trainer_cpus = s.num_workers * s.cpus_per_worker
    data_cpus = 2 * cfg.data.decode_actors * cfg.data.decode_cpus
    if trainer_cpus + data_cpus + 1 > cpus:
        short.append(f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPU + decode actors {data_cpus:g} CPU + "
                     f"1 CPU for Ray Data's read tasks need more than the cluster's {cpus:g} CPUs; lower "
                     "scaling.cpus_per_worker / num_workers or data.decode_actors / decode_cpus")
    if not short:
        return
    if s.autoscale:
        log(f"warning: {short[0]}; waiting for the autoscaler (scaling.autoscale=true)")
        return
    raise PipelineError(short[0] + " (set scaling.autoscale=true on an autoscaling cluster to wait instead)")


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Local relative paths made absolute on the driver: workers run in other folders."""
    def fix(path: str) -> str:
        return path if not path or "://" in path or os.path.isabs(path) else os.path.abspath(path)

    return dataclasses.replace(
        cfg, run_dir=fix(cfg.run_dir),
        data=dataclasses.replace(cfg.data, source=fix(cfg.data.source), shards=fix(cfg.data.shards)),
        model=dataclasses.replace(cfg.model, pretrained=fix(cfg.model.pretrained)))


def _check_source(cfg: PipelineConfig) -> None:
    source = cfg.data.source
    if "://" not in source and not os.path.exists(source) and not cfg.data.download:
        raise PipelineError(f"data.source: {source}: no such folder (set data.source, or data.download=true to "
                            "fetch CIFAR-100 with torchvision when online)")


# ---- prepare ------------------------------------------------------------------------------

def _class_table(uri: str) -> list[dict]:
    try:
        return class_table(uri)
    except FileNotFoundError as e:
        raise PipelineError(str(e)) from None


def _prepare(cfg: PipelineConfig, rd: RunDir, state: dict, log, min_classes: int = 2) -> DataInfo:
    d = cfg.data
    if _done(state, "prepare"):
        info = DataInfo(**state["stages"]["prepare"]["result"]["data"])
        return info
    t0 = time.perf_counter()
    source = d.source
    if "://" not in source and not os.path.exists(source):
        download_cifar(source, log)  # _check_source let this through: data.download is set
    summary, user_parents = None, None
    if has_split(source):
        if d.classes:  # shards are read as they are: a class subset would be silently ignored
            raise PipelineError(f"data.classes: {source} holds prepared shards, read as they are; choose the classes "
                                "when converting (splitnet prepare --classes ...), or set data.classes=[]")
        shards = source
        log(f"prepare: reading the shards at {source} as they are")
        if d.parents:  # not written into the user's shard folder: the run's class table only
            names = [str(r["name"]) for r in _class_table(shards)]
            try:
                user_parents = read_parents(d.parents, names)
            except ValueError as e:
                raise PipelineError(f"data.parents: {e}") from None
            log(parents_line(d.parents, names, user_parents))
    else:
        shards = d.shards or (rd.path("shards") if rd.is_local else "")
        if not shards or "://" in shards:
            raise PipelineError("data.shards: the run dir is a URI; set data.shards to a folder every node can read "
                                "(converted shards are written there), or point data.source at prepared shards")
        if d.eval_split:  # before converting: a new eval_split needs a new run dir (the config is saved)
            try:
                splits = source_splits(source)
            except ValueError as e:
                raise PipelineError(str(e)) from None
            if d.eval_split not in splits:
                held_out = [s for s in splits if s != "train"]
                hint = f"set data.eval_split to {' or '.join(held_out)}, or" if held_out else "set"
                raise PipelineError(f"data.eval_split: {source} has no {d.eval_split} split (it has "
                                    f"{', '.join(splits)}); {hint} data.eval_split='' and data.val_fraction "
                                    "to hold out part of train")
        # eval_per_class for every held-out split of the source (val/ and test/ folders), so the one not
        # evaluated on costs no more than the one that is
        limits = ({"train": d.per_class, **{s: d.eval_per_class for s in ("val", "test", d.eval_split)}}
                  if d.eval_split else d.per_class)
        try:
            summary = prepare(source, shards, fmt=d.format, shard_size=d.shard_size, seed=cfg.seed,
                              on_bad_record=d.on_bad_record, max_pixels=d.max_pixels, per_class=limits,
                              parents=d.parents or None, classes=d.classes or None, log=log,
                              min_classes=min_classes)
        except PrepareError as e:
            raise PipelineError(str(e)) from None
    table = _class_table(shards)
    names = [str(r["name"]) for r in table]
    parents = user_parents if user_parents is not None else [str(r.get("parent", "")) for r in table]
    if d.eval_split and not has_split(shards, d.eval_split):
        held_out = [s for s in ("val", "test") if has_split(shards, s)]
        hint = f"set data.eval_split to {' or '.join(held_out)}, or" if held_out else "set"
        raise PipelineError(f"data.eval_split: no {d.eval_split}-* shards in {shards}; {hint} data.eval_split='' and "
                            "data.val_fraction to hold out part of train")
    records = count_records(shards, "train")
    if not d.eval_split:
        records = int(records * (1 - d.val_fraction))
    # CIFAR-100's channel statistics for CIFAR-100 (or a class subset of it) at 32 px, ImageNet's otherwise
    cifar = d.image_size == 32 and (len(names) == 100 or (summary or {}).get("layout") == "cifar100")

    mean = list(d.mean) or list(CIFAR100_MEAN if cifar else IMAGENET_MEAN)
    std = list(d.std) or list(CIFAR100_STD if cifar else IMAGENET_STD)
    info = DataInfo(shards=shards, class_names=names, parents=parents, train_records=records,
                    eval_split=d.eval_split or "train", eval_subset="train" if d.eval_split else "val", mean=mean, std=std)
    _mark(rd, state, "prepare", {"data": info.__dict__, "prepare": summary}, time.perf_counter() - t0)
    log(f"data: {records} training records, {len(names)} classes, shards at {shards}")
    return info


# ---- datasets for the trainers ------------------------------------------------------------

def _decode_config(cfg: PipelineConfig, info: DataInfo, train: bool):
    """How the run's records become images (train: augmented while decoding)."""
    d = cfg.data
    return DecodeConfig(image_size=d.image_size, train=train, num_classes=info.num_classes, max_pixels=d.max_pixels,
                        on_bad_record=d.on_bad_record)


class DecodedCache:
    """The run's decoded images in Ray's object store (``data.cache``): for small images whose
    decoded copy fits in a quarter of the store, each split is decoded once for the whole run and
    every epoch of every stage reads it back (no decode actors per epoch); the training
    augmentation then runs in the workers. ``None`` from :meth:`get` where it does not apply."""

    SHARE = 0.25  # of the object store

    def __init__(self, cfg: PipelineConfig, info: DataInfo, log=None):
        self.cfg, self.info, self.log = cfg, info, log
        self.datasets: dict[str, object] = {}
        self.enabled = self._fits()

    def _fits(self) -> bool:
        import ray

        d = self.cfg.data
        if not d.cache or d.image_size > 64:
            return False
        records = self.info.train_records + (count_records(self.info.shards, self.info.eval_split)
                                             if self.info.eval_split != "train" else 0)
        need = decoded_bytes(records, d.image_size)
        store = ray.cluster_resources().get("object_store_memory", 0)
        self.need = need
        return need <= self.SHARE * store

    def get(self, which: str):
        if not self.enabled:
            return None
        if which not in self.datasets:
            d, info = self.cfg.data, self.info
            split, subset = ("train", "train") if which == "train" else (info.eval_split, info.eval_subset)
            self.datasets[which] = cached_decoded(
                info.shards, split=split, subset=subset, val_fraction=d.train_val_fraction,
                decode=_decode_config(self.cfg, info, train=False), seed=self.cfg.seed,
                concurrency=d.decode_actors, num_cpus=d.decode_cpus)
            if self.log and len(self.datasets) == 1:
                self.log(f"data: decoded once into Ray's object store ({self.need / 2**20:.0f} MiB for every split); "
                         "each epoch reads it back and the workers augment (data.cache=false: decode every epoch)")
        return self.datasets[which]

    def clear(self) -> None:
        self.datasets.clear()  # the driver's references go: the store frees the blocks


def _datasets(cfg: PipelineConfig, info: DataInfo, train: bool, epoch_seed: int = 0,
              cache: DecodedCache | None = None) -> dict:
    """The trainers' datasets: ``train`` (augmented; from ``cache`` block-shuffled anew every epoch,
    the augmentation left to the workers) and ``val``."""
    import ray

    d = cfg.data
    common = dict(concurrency=d.decode_actors, num_cpus=d.decode_cpus)
    out = {}
    if train:
        cached = cache.get("train") if cache else None
        if cached is not None:
            out["train"] = cached.randomize_block_order(
                seed=ray.data.RandomSeedConfig(seed=cfg.seed + epoch_seed, reseed_after_execution=True))
        else:
            out["train"] = read_dataset(info.shards, split="train", subset="train",
                                        val_fraction=d.train_val_fraction,
                                        decode=_decode_config(cfg, info, train=True), seed=cfg.seed + epoch_seed, **common)
    cached = cache.get("val") if cache else None
    out["val"] = cached if cached is not None else read_dataset(
        info.shards, split=info.eval_split, subset=info.eval_subset, val_fraction=d.train_val_fraction,
        decode=_decode_config(cfg, info, train=False), seed=cfg.seed, shuffle_files=False, **common)
    return out


def steps_per_epoch(cfg: PipelineConfig, stage: str, records: int) -> int | dict[str, int]:
    """Steps in one epoch of ``stage``; the control's: ``{"group": ..., "finetune": ...}`` (it follows their epochs)."""
    if stage == "control":
        return {part: steps_per_epoch(cfg, part, records) for part in ("group", "finetune")}
    st = getattr(cfg, stage)
    per_worker = records // cfg.scaling.num_workers
    steps = per_worker // (st.batch_size // cfg.scaling.num_workers)
    if st.max_steps_per_epoch:
        steps = min(steps, st.max_steps_per_epoch)
    if steps < 1:
        raise PipelineError(f"{stage}.batch_size: {st.batch_size} is larger than the {records} training records "
                            f"split over {cfg.scaling.num_workers} workers (no full batch per epoch)")
    return steps


def _trainer(cfg: PipelineConfig, rd: RunDir, stage: str, loop, loop_config: dict, datasets: dict):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    backend = s.backend if s.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=stage, storage_path=rd.path("checkpoints"), storage_filesystem=rd.fs,
                             failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.failure.checkpoints_to_keep),
                             logging_config=LoggingConfig(log_level=os.environ.get("SPLITNET_TRAIN_LOG_LEVEL", "WARNING"))),
        datasets=datasets,
    )


def _fit(trainer, stage: str):
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise StageFailed(f"stage {stage} failed after its retries: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                          "re-run the same command to resume from its last checkpoint") from e


class StageFailed(RuntimeError):
    """A stage that failed beyond its retries (exit status 1; re-running resumes)."""


def progress_interval(log) -> float:
    """Seconds between rank 0's progress statuses inside an epoch: 2 s where the terminal shows
    them as a bar in place, 30 s where each is a line (a log file, CI); ``SPLITNET_PROGRESS_EVERY_S``
    sets it (0: none)."""
    env = os.environ.get("SPLITNET_PROGRESS_EVERY_S", "").strip()
    if env:
        try:
            return float(env)
        except ValueError:
            raise PipelineError(f"SPLITNET_PROGRESS_EVERY_S={env!r}: expected seconds, e.g. 30") from None
    return 2.0 if getattr(getattr(log, "log", log), "interactive", False) else 30.0


def _train_stage(cfg: PipelineConfig, rd: RunDir, state: dict, info: DataInfo, stage: str, log,
                 precision: str | None = None, cache: DecodedCache | None = None, datasets: dict | None = None,
                 recipe: dict | None = None) -> None:
    """One training stage on Ray Train (resumed from its checkpoints; skipped when done). ``datasets``:
    the trainer's own (``splitnet grow``'s mix of new and replayed images), else the run's;
    ``recipe``: what the stage's recipe needs besides the config (:class:`pipelines.stages.Recipe`)."""
    st = getattr(cfg, stage)
    if not st.enabled:
        log(f"[{stage}] disabled in the config")
        return
    if _done(state, stage):
        log(f"[{stage}] done earlier, skipped")
        return
    t0 = time.perf_counter()
    spe = steps_per_epoch(cfg, stage, info.train_records)
    on = f"over {cfg.scaling.num_workers} workers{' (GPU)' if cfg.scaling.use_gpu else ''}"
    if stage == "control":
        g, f = cfg.group, cfg.finetune
        start = {"baseline": "the baseline's weights", "pretrained": "the pretrained weights"}.get(g.init, "scratch")
        log(f"[control] the dense model at the tree's budget: from {start}, {g.epochs} + {f.epochs} epochs on the "
            f"group and finetune schedules ({g.epochs} x {spe['group']} + {f.epochs} x {spe['finetune']} steps) {on}")
    else:
        log(f"[{stage}] {st.epochs} epochs x {spe} steps, batch {st.batch_size} {on}")
    loop_config = {"cfg": to_dict(cfg), "stage": stage, "progress": getattr(log, "name", None), "precision": precision,
                   "progress_every_s": progress_interval(log),
                   "num_classes": info.num_classes, "steps_per_epoch": spe if isinstance(spe, dict) else {stage: spe},
                   "mean": info.mean, "std": info.std, "recipe": recipe}
    if datasets is None:
        datasets = _datasets(cfg, info, True, epoch_seed=STAGES.index(stage), cache=cache)
        loop_config["augment_in_workers"] = bool(cache and cache.enabled)  # decoded once: pad/crop/flip per batch there
    _fit(_trainer(cfg, rd, stage, train_loop, loop_config, datasets), stage)
    out = "tree" if stage in ("finetune", "grow") else stage
    result = rd.read_json(f"{out}/result.json", {})
    history = result.get("history", [])
    last = history[-1] if history else {}
    _mark(rd, state, stage, {"history": history, "resumed": result.get("resumed", []), "val_top1": last.get("val_top1"),
                             "workers": result.get("workers", []),
                             **{k: result[k] for k in ("class_start", "fixed_off_block") if k in result}},
          time.perf_counter() - t0)
    log(f"[{stage}] done in {time.perf_counter() - t0:.0f}s: val top-1 {last.get('val_top1', float('nan')):.3f}")


# ---- cut ----------------------------------------------------------------------------------

def cut_stage(cfg_dict: dict, num_classes: int, class_names: list[str], mean, std) -> dict:
    """Ray task: load the grouped model, cut it into the tree, write ``cut/``."""
    cfg = from_dict(cfg_dict)
    rd = RunDir(cfg.run_dir)
    model = load_grouped(cfg.model.arch, cfg.model.split, num_classes, rd).eval()
    dense_cost = model_cost(model, cfg.data.image_size)
    info = {"class_names": class_names, "mean": list(mean), "std": list(std), "input_size": cfg.data.image_size}
    tree = cut(model, cfg.cut.min_classes_per_group, cfg.cut.min_channels_per_group, info=info)
    energy = off_block_energy(model, tree.hard)
    sizes = tree.hard.group_sizes()
    with rd.staging("cut") as d:
        tree.save(d, input_size=cfg.data.image_size, dense_cost=dense_cost)
    return {"moves": len(tree.moves), "moved": tree.moves[:50], "subtrees": len(tree.subtrees), "dense_cost": dense_cost,
            "off_block_energy": energy, "group_sizes": sizes}


def _cut(cfg: PipelineConfig, rd: RunDir, state: dict, info: DataInfo, log) -> None:
    import ray

    if _done(state, "cut"):
        log("[cut] done earlier, skipped")
        return
    t0 = time.perf_counter()
    result = ray.get(ray.remote(num_cpus=min(1.0, cfg.scaling.cpus_per_worker or 1.0))(cut_stage).remote(
        to_dict(cfg), info.num_classes, info.class_names, info.mean, info.std))
    _mark(rd, state, "cut", result, time.perf_counter() - t0)
    energy = result["off_block_energy"]
    worst = max(energy, key=energy.get) if energy else None
    log(f"[cut] {result['subtrees']} subtrees written to {rd.display('cut')}; off-block energy dropped: "
        + (f"at most {energy[worst]:.2%} ({worst})" if worst and energy[worst] > 0 else "none (every off-block weight was zero)")
        + f"; {result['moves']} members moved to keep groups non-empty")
    if result["moves"]:
        log(f"warning: the cut moved {result['moves']} members into groups that would have been (nearly) empty; the "
            "grouping did not keep them apart (raise group.balance or train the grouping longer)")
    for name, sizes in (result.get("group_sizes") or {}).items():
        if sizes and max(sizes) > 2 * sum(sizes) / len(sizes):
            log(f"warning: {name} is badly unbalanced after the cut, group sizes {sizes}")


def _evaluate(cfg: PipelineConfig, rd: RunDir, state: dict, info: DataInfo, log,
              cache: DecodedCache | None = None) -> dict:
    if _done(state, "evaluate"):
        log("[evaluate] done earlier, skipped")
        return rd.read_json("evaluate/metrics.json")
    t0 = time.perf_counter()
    loop_config = {"cfg": to_dict(cfg), "num_classes": info.num_classes, "mean": info.mean, "std": info.std}
    _fit(_trainer(cfg, rd, "evaluate", evaluate_loop, loop_config, _datasets(cfg, info, False, cache=cache)), "evaluate")
    metrics = rd.read_json("evaluate/metrics.json")
    _mark(rd, state, "evaluate", metrics, time.perf_counter() - t0)
    log("[evaluate] " + ", ".join(f"{k} top-1 {v['top1']:.3f}" for k, v in metrics.items()))
    return metrics


def collect_bad_records(rd: RunDir, info: DataInfo) -> str:
    """Merge the bad records seen so far (prepare's, and every stage's stream) into the run dir's
    ``bad_records.jsonl``, once per (shard, key, kind) however many epochs met them; a summary line."""
    import ray

    rows = {}
    for line in (rd.read_text("bad_records.jsonl") if rd.exists("bad_records.jsonl") else "").splitlines():
        r = json.loads(line)
        rows[(r.get("shard"), r.get("key"), r.get("kind"))] = r
    prepared = f"{info.shards.rstrip('/')}/bad_records.jsonl"
    if "://" not in prepared and os.path.exists(prepared):
        for line in open(prepared).read().splitlines():
            r = json.loads(line)
            rows.setdefault((r.get("shard"), r.get("key"), r.get("kind")), {**r, "stage": "prepare"})
    for r in ray.get(bad_record_log().records_list.remote()):
        rows.setdefault((r.get("shard"), r.get("key"), r.get("kind")), r)
    rd.write_text("bad_records.jsonl", "".join(json.dumps(r) + "\n" for r in rows.values()))
    kinds: dict[str, int] = {}
    for r in rows.values():
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    skipped = sum(v for k, v in kinds.items() if k != "converted")
    detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
    return f"bad records: {skipped} skipped, {kinds.get('converted', 0)} converted ({detail}) -> {rd.display('bad_records.jsonl')}"


# ---- the pipeline -------------------------------------------------------------------------

def run(cfg: PipelineConfig, log: Callable[[str], None] = print, stop_after: str | None = None,
        logs_dir: str | None = None) -> dict:
    """Run (or resume) every stage; returns the report. ``stop_after``: a stage name (for tests).
    ``logs_dir``: where Ray's own output went (named in the header)."""
    import ray

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)
    _check_source(cfg)
    rd = RunDir(cfg.run_dir)
    where = _init_ray()
    printer = Printer(log)
    try:
        log = printer
        res = ray.cluster_resources()
        ray_logs = link_ray_logs(logs_dir) if logs_dir and rd.is_local else None
        log(f"splitnet run {cfg.name}: {cfg.model.arch} split {cfg.model.split}, run dir {rd.display()}; "
            f"{where} with {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
            f"{cfg.scaling.num_workers} workers{' on GPUs' if cfg.scaling.use_gpu else ''}"
            + (f"; Ray's output: {logs_dir}" if logs_dir else ""))
        if ray_logs and verbose():
            log(f"ray session logs: {ray_logs}")
        state = _check_run_dir(rd, cfg, log)
        progress_env = os.environ.get("SPLITNET_PROGRESS")
        ray.data.DataContext.get_current().enable_progress_bars = (progress_env != "0") if progress_env else verbose()
        _check_resources(cfg, log)
        precision = workers_precision(cfg)
        if precision is None:
            log(f"precision: scaling.amp {cfg.scaling.amp}, chosen on the workers (no node like theirs answered in 60 s)")
        else:
            log(precision.line())
            if precision.warning():
                log(precision.warning())
        announced = precision.line() if precision else None
        info = _prepare(cfg, rd, state, log)
        _check_split_fits(cfg, info)
        _warn_semantic_out_of_reach(cfg, info, log)
        cache = DecodedCache(cfg, info, log)
        steps = [("baseline", lambda: _train_stage(cfg, rd, state, info, "baseline", log, announced, cache)),
                 ("group", lambda: _train_stage(cfg, rd, state, info, "group", log, announced, cache)),
                 ("cut", lambda: _cut(cfg, rd, state, info, log)),
                 ("finetune", lambda: _train_stage(cfg, rd, state, info, "finetune", log, announced, cache)),
                 ("control", lambda: _train_stage(cfg, rd, state, info, "control", log, announced, cache))]
        collect_bad_records(rd, info)
        seen_bad = _bad_count(rd)  # prepare reported its own
        for name, fn in steps:
            fn()
            collect_bad_records(rd, info)
            seen_bad = _warn_new_bad_records(rd, seen_bad, name, log)
            if stop_after == name:
                return {}
        metrics = _evaluate(cfg, rd, state, info, log, cache)
        cache.clear()
        log(collect_bad_records(rd, info))
        return write_report(cfg, rd, state, info, metrics, time.perf_counter() - t0, log)
    finally:
        printer.close()


def _check_split_fits(cfg: PipelineConfig, info: DataInfo) -> None:
    """Before anything trains: the classifier's groups (the split's last level) need
    ``cut.min_classes_per_group`` classes each, or the cut could only fail after the training."""
    leaves, minimum = SplitConfig.parse(cfg.model.split).num_groups, cfg.cut.min_classes_per_group
    if info.num_classes < leaves * minimum:
        raise PipelineError(f"model.split: {cfg.model.split} puts the classes into {leaves} groups of at least {minimum} "
                            f"(cut.min_classes_per_group), but the data has {info.num_classes} classes; choose a split "
                            f"with at most {info.num_classes // minimum} groups at its last level, or more classes")


def _warn_semantic_out_of_reach(cfg: PipelineConfig, info: DataInfo, log) -> None:
    """Before anything trains: one line when the report's semantic check cannot pass with this split
    (no balanced grouping into the last level's groups scores above random's bar), so its "not counted"
    at the end is no surprise. The run goes on: the tree is as useful, the check says nothing here."""
    leaves = SplitConfig.parse(cfg.model.split).num_groups
    outlook = semantic_outlook(leaves, info.class_names, info.parents)
    if outlook and not outlook["reachable"]:
        log(f"warning: model.split {cfg.model.split}: no grouping of {outlook['classes']} classes into {leaves} balanced "
            f"groups scores above NMI {outlook['ceiling']:.3f} against their {outlook['reference']}, and random groups' "
            f"mean + {NMI_SD} sd is {outlook['bar']:.3f}: the report's semantic check cannot pass and is not counted (fewer "
            f"groups, or classes from more {outlook['reference']}, make it reachable)")


def _bad_count(rd: RunDir) -> int:
    if not rd.exists("bad_records.jsonl"):
        return 0
    return sum(1 for line in rd.read_text("bad_records.jsonl").splitlines()
               if line.strip() and json.loads(line).get("kind") != "converted")


def _warn_new_bad_records(rd: RunDir, seen: int, stage: str, log) -> int:
    """One warning line when a stage met bad records the run had not seen before."""
    now = _bad_count(rd)
    if now > seen:
        log(f"warning: {now - seen} bad records skipped during {stage} ({now} in all; listed in {rd.display('bad_records.jsonl')})")
    return now
