"""What runs inside the Ray Train workers of each stage (``baseline``, ``group``, ``finetune``,
``control``, ``evaluate``). The driver side (which stage runs when, resuming, the report) is ``pipelines.run``.

A training stage's worker builds its model (dense; split-aware from scratch, from the baseline or
from pretrained weights; or the cut tree), restores the last Ray Train checkpoint if there is one
(a restarted worker group or a re-run of ``splitnet run``), trains with DDP on its shard of the
Ray Data stream and reports one checkpoint per epoch (and every ``checkpoint_every_steps``
steps). Rank 0 prints one progress line per epoch and writes the stage's output into the run
directory when the stage ends.

Checkpoints hold ``model.safetensors``, ``optimizer.safetensors`` (tensors) +
``optimizer.json`` (the rest) and ``progress.json``: nothing in them is unpickled
(:mod:`pipelines.checkpoints`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from splitnet import build_model
from splitnet.artifacts import load_tree, read_manifest
from splitnet.distill import Distiller
from splitnet.fused import FusedTree
from splitnet.grouping import Grouping, classifier_class_groups, collapse_warning, collapsing, init_class_assignment_
from splitnet.grow import GrowingTree, grow, save_grown
from splitnet.models import CLASSES
from splitnet.precision import choose_precision
from splitnet.regularizers import freeze_split_bn_scale, parameter_groups
from splitnet.schedule import Phase, PhaseSchedule
from splitnet.train import CompiledForward, evaluate, evaluate_models, format_epoch, train_one_epoch

from .checkpoints import load_dense_output, load_grouped, load_optimizer, load_state_file, save_optimizer, save_state
from .config import PipelineConfig, from_dict
from .data.stream import torch_batches
from .progress import StepProgress, say, say_status
from .rundir import RunDir

TRAIN_STAGES = ("baseline", "group", "finetune", "control", "grow")
STAGE_SEEDS = {stage: i for i, stage in enumerate(TRAIN_STAGES)}


def _sayer(actor_name: str | None):
    """Rank 0's progress lines: to the driver through the run's ProgressLog actor (pipelines.progress)."""
    return lambda line: say(line, actor_name)


def _step_progress(config: dict, stage: str, epochs: int, steps: int, images_per_step: int):
    """Rank 0's progress inside each epoch (every ``progress_every_s``: 30 s to a log, 2 s as a bar)."""
    actor = config.get("progress")
    return StepProgress(lambda status: say_status(status, actor), stage, epochs, steps, images_per_step,
                        float(config.get("progress_every_s", 30.0)))


# ---- learning-rate schedule ---------------------------------------------------------------

def stage_phases(cfg: PipelineConfig, stage: str, steps_per_epoch: dict[str, int]) -> list[tuple]:
    """``stage``'s schedule as (stage config, :class:`~splitnet.schedule.Phase`) pairs: the config gives
    each epoch its batch size and checkpoint interval, the phase its learning rate. One pair per stage;
    the control (the same-budget dense model) has ``group``'s then ``finetune``'s, each with its lr,
    momentum and weight decay: the tree's schedule without the split."""
    control = stage == "control"
    out = []
    for part in ("group", "finetune") if control else (stage,):
        st = getattr(cfg, part)
        out.append((st, Phase(st.epochs, steps_per_epoch[part], lr=st.lr, schedule=st.schedule,
                              warmup_epochs=st.warmup_epochs, milestones=tuple(st.milestones), gamma=st.gamma,
                              cosine_span=tuple(st.cosine_span), momentum=st.momentum if control else None,
                              weight_decay=st.weight_decay if control else None)))
    return out


# ---- the stages' recipes ------------------------------------------------------------------

def _fetch(uri: str) -> str:
    """A local path for ``uri`` (downloaded to a temp file when it is a URI)."""
    if "://" not in uri:
        return uri
    fs, path = pafs.FileSystem.from_uri(uri)
    tmp = Path(tempfile.mkdtemp(prefix="splitnet-")) / Path(path).name
    with fs.open_input_stream(path) as src:
        tmp.write_bytes(src.read())
    return str(tmp)


class Recipe:
    """What one training stage adds to the loop every stage shares (:func:`train_loop`), as torchtune's
    recipes do: ``model`` and ``param_groups`` (before a checkpoint is restored), ``setup`` (after it:
    what the stage trains with besides the optimizer), ``after_step`` / ``after_epoch`` (its state for
    the checkpoint, its numbers in the epoch's row) and ``cleanup`` (its output in the run dir). The
    dense stages write their backbone (loadable as torchvision weights)."""

    name = ""
    settings = ""  # the config section of its optimizer settings (default: its own)
    grouping: Grouping | None = None
    distill: Distiller | None = None

    def __init__(self, cfg: PipelineConfig, rd: RunDir, num_classes: int, extra: dict | None = None):
        self.cfg, self.rd, self.num_classes, self.extra = cfg, rd, num_classes, dict(extra or {})
        self.st = getattr(cfg, self.settings or self.name)

    def dense(self, start: str):
        """The dense model from ``start``: the baseline's output, the pretrained weights, or scratch."""
        model = build_model(self.cfg.model.arch, self.num_classes, "1")
        if start == "baseline":
            load_dense_output(model, self.rd, "baseline")
        elif start == "pretrained":
            model.load_backbone_state_dict(load_state_file(_fetch(self.cfg.model.pretrained)))
        return model

    def param_groups(self, model) -> list[dict]:
        return parameter_groups(model, self.st.lr, self.st.weight_decay)

    def setup(self, model, progress: dict, total_steps: int, device, amp, say) -> None:
        pass

    def after_step(self, progress: dict) -> None:
        pass

    def after_epoch(self, model, row: dict, progress: dict) -> list[str]:
        """The stage's numbers added to ``row``; returns what rank 0 should say about them."""
        return []

    def cleanup(self, model, progress: dict) -> None:
        with self.rd.staging(self.name) as d:
            save_state(model.backbone_state_dict(), d / "model.safetensors")
            _write_result(d, progress)


class Baseline(Recipe):
    name = "baseline"

    def model(self):
        return self.dense("pretrained" if self.cfg.model.pretrained else "scratch")


class Control(Recipe):
    """The dense model of the tree's budget: from where the grouping started, on the tree's schedule
    (:func:`stage_phases`), starting on the grouping's optimizer settings."""

    name, settings = "control", "group"

    def model(self):
        return self.dense(self.cfg.group.init)


class Group(Recipe):
    """The split-aware model learns its groups (:class:`~splitnet.grouping.Grouping`); its output keeps
    the assignments."""

    name = "group"

    def model(self):
        m, g = self.cfg.model, self.cfg.group
        model = build_model(m.arch, self.num_classes, m.split, split_dropout=m.split_dropout)
        skipped = []
        if g.init == "baseline":
            load_dense_output(model, self.rd, "baseline")
        elif g.init == "pretrained":
            skipped = model.load_backbone_state_dict(load_state_file(_fetch(m.pretrained)))
        derived = g.method == "staged" and g.assign in ("derived", "random")  # at the warm-up's end
        if not derived and g.assign_init == "classifier" and g.init != "scratch":  # scratch: at the warm-up's end
            if any(key.startswith("fc.") for key in skipped):
                raise ValueError("group.assign_init: classifier, but the pretrained weights have another number of "
                                 "classes (their classifier was not loaded); use assign_init: random")
            labels = classifier_class_groups(model.fc.weight, model.assignments.groups(CLASSES))
            init_class_assignment_(model, labels, g.assign_init_margin)
            self.class_start = labels.tolist()  # recorded in the stage's result: the report reads, not recomputes
        if g.freeze_split_bn_scale:
            freeze_split_bn_scale(model)
        return model

    def param_groups(self, model):
        g = self.st
        return parameter_groups(model, g.lr, g.weight_decay, split_lr_mult=g.split_lr_mult,
                                assignment_lr_mult=g.assignment_lr_mult,
                                class_assignment_lr_mult=g.class_assignment_lr_mult or None)

    def setup(self, model, progress, total_steps, device, amp, say):
        g, cut = self.cfg.group, self.cfg.cut
        if getattr(self, "class_start", None) is not None:
            progress.setdefault("class_start", self.class_start)
        self.grouping = Grouping(model, g.regularizer_weights(), g.grouping_schedule(self.cfg.seed), total_steps,
                                 min_classes_per_group=cut.min_classes_per_group,
                                 min_channels_per_group=cut.min_channels_per_group,
                                 classifier_init_margin=(g.assign_init_margin if g.assign_init == "classifier"
                                                         and g.init == "scratch" else None))
        # resumed past the groups' start: the checkpoint holds where they started (and the derived thresholds)
        self.grouping.load_state({"class_start": progress.get("class_start"), **(progress.get("grouping") or {})})

    def after_step(self, progress):
        progress["grouping"] = self.grouping.state()  # where the classes started, the derived thresholds
        if self.grouping.class_start is not None:
            progress["class_start"] = self.grouping.class_start

    def after_epoch(self, model, row, progress):
        grouping = self.grouping
        energy, shares = grouping.off_block_energy(), grouping.group_shares()
        row.update(phase=grouping.phase(max(progress["global_step"] - 1, 0)), off_block_energy=energy,
                   off_block=max(energy.values(), default=0.0), group_shares=shares)
        if shares and row["phase"] != "warmup":  # in the warm-up the assignments are init noise: nothing to say
            row["smallest_group_set"], row["smallest_group"] = min(shares.items(), key=lambda kv: kv[1])
        warned = progress.setdefault("collapse_warned", [])
        collapsed = {k: v for k, v in collapsing(shares, phase=row["phase"]).items() if k not in warned}
        warned += sorted(collapsed)  # seen while grouping, said once per set: not first discovered by the cut
        return [collapse_warning(self.name, row["epoch"], collapsed, row["phase"])] if collapsed else []

    def cleanup(self, model, progress):
        with self.rd.staging(self.name) as d:
            save_state(model, d / "model.safetensors")
            _write_result(d, progress)


class Finetune(Recipe):
    """The cut tree (fused per level when ``finetune.fuse``), optionally distilled from a dense teacher;
    its output is the tree to serve."""

    name = "finetune"

    def model(self):
        with self.rd.local_copy("cut") as d:
            tree = load_tree(d).train()
        return FusedTree(tree) if self.cfg.finetune.fuse else tree

    def param_groups(self, model):
        return parameter_groups(model, self.st.lr, self.st.weight_decay, split_lr_mult=self.st.split_lr_mult)

    def teacher(self):
        """``finetune.distill``'s teacher: the grouped dense model the tree was cut from, or the baseline."""
        if self.st.distill == "grouped":
            return load_grouped(self.cfg.model.arch, self.cfg.model.split, self.num_classes, self.rd)
        return self.dense("baseline") if self.st.distill == "baseline" else None

    def setup(self, model, progress, total_steps, device, amp, say):
        teacher = self.teacher()
        if teacher is None:
            return
        teacher.to(device)
        if self.cfg.scaling.channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.distill = Distiller(teacher, self.st.distill_temperature, self.st.distill_weight, amp_dtype=amp)
        say(f"[{self.name}] distilling from the {self.st.distill} model: T {self.distill.temperature:g}, "
            f"weight {self.distill.weight:g}")

    def cleanup(self, model, progress):
        if hasattr(model, "write_back"):  # fused for training: the tree is what is saved and served
            model = model.write_back()
        with self.rd.local_copy("cut") as cut_dir:
            manifest = read_manifest(cut_dir)
        with self.rd.staging("tree") as d:  # the dense model's counts carried over from the cut
            model.eval().cpu().save(d, input_size=manifest["input_size"], dense_cost=manifest["counts"].get("dense"))
            _write_result(d, progress)


class Grow(Recipe):
    """``splitnet grow``: the parent run's tree with one more subtree for the new classes, trained alone
    (:class:`~splitnet.grow.GrowingTree`); its output is the grown tree, the old weight files copied
    from the parent byte for byte. ``extra``: the parent run dir, the new class names, the sibling."""

    name = "grow"

    def model(self):
        with RunDir(self.extra["parent"]).local_copy("tree") as d:
            tree = load_tree(d)
        return GrowingTree(grow(tree, self.extra["classes"], int(self.extra["like"]), self.st.init))

    def cleanup(self, model, progress):
        with RunDir(self.extra["parent"]).local_copy("tree") as parent, self.rd.staging("tree") as d:
            save_grown(model.tree.eval().cpu(), parent, d, parent_uri=RunDir(self.extra["parent"]).display("tree"))
            _write_result(d, progress)


RECIPES = {r.name: r for r in (Baseline, Group, Finetune, Control, Grow)}


# ---- distributed helpers ------------------------------------------------------------------

def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _merge_train_stats(stats: dict, elapsed: float) -> dict:
    # the regularizer terms are NaN in epochs without them (warm-up, sparsify): same on every rank
    keys = [k for k in ("loss", "ce", "weight", "disjoint", "balance", "acc") if k in stats and math.isfinite(stats[k])]
    n = stats["images"]
    sums = _all_reduce([stats[k] * n for k in keys] + [n, stats["steps"]])
    total = max(sums[-2], 1)
    out = {k: sums[i] / total for i, k in enumerate(keys)}
    slowest = _all_reduce([elapsed], "max")[0]
    out.update(images=int(sums[-2]), steps=int(stats["steps"]), images_per_s=sums[-2] / max(slowest, 1e-9))
    return out


def _merge_eval(val: dict) -> dict:
    n = val["images"]
    s = _all_reduce([val["top1"] * n, val["top5"] * n, val["loss"] * n, n])
    total = max(s[3], 1)
    return {"top1": s[0] / total, "top5": s[1] / total, "loss": s[2] / total, "images": int(s[3])}


def _workers() -> list[dict]:
    """(rank, node, host, device) of every worker, gathered on every rank."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    me = {"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [me]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return everyone


def _ddp(model):
    """DDP over the workers, with the assignments left out of its gradient all-reduce.

    The regularizers do not read the batch: every rank computes the same gradient for the
    assignments from the same (synchronized) weights, and the assignments get none at all in the
    grouping's warm-up and sparsify phases, which DDP's reducer would wait for forever. They are
    averaged across the workers once per epoch instead (:func:`_sync_assignments`).
    """
    import ray.train.torch

    ignore = [f"assignments.{name}" for name, _ in model.assignments.named_parameters()] if hasattr(model, "assignments") else []
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return ray.train.torch.prepare_model(model, move_to_device=False)


def _sync_assignments(model) -> None:
    """Average the assignment logits over the workers (guards against float drift between ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in model.assignments.parameters():
            dist.all_reduce(p.data, op=dist.ReduceOp.SUM)
            p.data.div_(dist.get_world_size())


def _setup(cfg: PipelineConfig):
    import ray.train
    import ray.train.torch

    # one progress line per epoch is ours; Ray Train's per-report INFO lines would drown it
    logging.getLogger("ray.train").setLevel(os.environ.get("SPLITNET_TRAIN_LOG_LEVEL", "WARNING"))
    threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    precision = choose_precision(cfg.scaling.amp, device)  # on the device that computes (auto: native bf16 only)
    return ctx, device, precision


# ---- the training loop of a stage ---------------------------------------------------------

def train_loop(config: dict) -> None:
    """``TorchTrainer(train_loop_per_worker=train_loop, train_loop_config=...)`` for a training stage.

    config: {"cfg": the pipeline config as a dict, "stage", "num_classes", "steps_per_epoch" ({stage:
    steps}; the control's {"group": steps, "finetune": steps}), "mean", "std"}.
    """
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["cfg"])
    say = _sayer(config.get("progress"))
    stage = config["stage"]
    phases = stage_phases(cfg, stage, config["steps_per_epoch"])
    plan = [(st, phase.steps_per_epoch) for st, phase in phases for _ in range(st.epochs)]  # per epoch
    st, steps_per_epoch = plan[0]  # the stage's (the control: its first phase's)
    epochs = len(plan)
    rd = RunDir(cfg.run_dir)
    ctx, device, precision = _setup(cfg)
    amp = precision.dtype
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    announced = config.get("precision")
    if rank == 0 and precision.line() != announced:  # the header could not speak for the workers' nodes
        say(f"[{stage}] workers' {precision.line()}")
    torch.manual_seed(cfg.seed)
    recipe = RECIPES[stage](cfg, rd, config["num_classes"], config.get("recipe"))
    model = recipe.model()
    groups = [g for g in recipe.param_groups(model) if g["params"]]
    opt = torch.optim.SGD(groups, lr=recipe.st.lr, momentum=recipe.st.momentum, nesterov=recipe.st.momentum > 0)
    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            d = Path(d)
            model.load_state_dict(load_state_file(d / "model.safetensors"))
            model.to(device)
            load_optimizer(opt, d, device)
            progress = json.loads((d / "progress.json").read_text())
        if rank == 0:
            say(f"[{stage}] resuming from the checkpoint at epoch {progress['epoch']} step {progress['step_in_epoch']} "
                f"(global step {progress['global_step']})")
    progress.setdefault("resumed", [])
    if checkpoint is not None:
        progress["resumed"].append({"epoch": progress["epoch"], "step_in_epoch": progress["step_in_epoch"]})
    schedule = PhaseSchedule(opt, [phase for _, phase in phases])
    schedule.load_state_dict(progress.get("schedule", {"last_epoch": progress["global_step"]}))
    model.to(device)
    if cfg.scaling.channels_last:
        model.to(memory_format=torch.channels_last)
    recipe.setup(model, progress, epochs * steps_per_epoch, device, amp, say if rank == 0 else (lambda line: None))
    grouping = recipe.grouping
    ddp = _ddp(model) if world > 1 else model
    if cfg.scaling.compile:  # the training forward only; evaluation and the regularizers stay eager
        ddp = CompiledForward(ddp, warn=(lambda m: say(f"[{stage}] {m}")) if rank == 0 else (lambda m: None))
    mean, std = config["mean"], config["std"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    steps_shown = (_step_progress(config, stage, epochs, steps_per_epoch, st.batch_size // world * world)
                   if rank == 0 else None)

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="splitnet-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                tmp_path = Path(tmp)
                save_state(model, tmp_path / "model.safetensors")
                save_optimizer(opt, tmp_path)
                (tmp_path / "progress.json").write_text(json.dumps(progress))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def after_step(i: int) -> None:
        recipe.after_step(progress)
        progress["global_step"] += 1
        progress["step_in_epoch"] += 1
        progress["schedule"] = schedule.state_dict()
        if steps_shown is not None:
            steps_shown.step(progress["step_in_epoch"])
        st_e, limit = plan[progress["epoch"]]
        every = st_e.checkpoint_every_steps
        if every and progress["step_in_epoch"] % every == 0 and progress["step_in_epoch"] < limit:
            report({"stage": stage, "epoch": progress["epoch"], "step_in_epoch": progress["step_in_epoch"]}, True)

    stage_start, first_epoch = time.perf_counter(), progress["epoch"]
    while progress["epoch"] < epochs:
        epoch = progress["epoch"]
        st_e, limit = plan[epoch]
        per_worker_batch = st_e.batch_size // world
        remaining = limit - progress["step_in_epoch"]
        if steps_shown is not None:
            steps_shown.start_epoch(epoch, progress["step_in_epoch"], limit, per_worker_batch * world)
        start = time.perf_counter()
        augment = None
        if config.get("augment_in_workers"):  # the images come decoded once, not augmented (pipelines.run.DecodedCache)
            augment = np.random.default_rng([cfg.seed, STAGE_SEEDS[stage], rank, epoch, progress["step_in_epoch"]])
        batches = torch_batches(train_shard, per_worker_batch, mean, std, str(device), drop_last=True, augment=augment,
                                shuffle_buffer=max(16 * per_worker_batch, 2048) if augment is not None else None)
        if steps_shown is not None:
            batches = steps_shown.batches(batches)  # a slow stream told apart from a slow step
        stats = train_one_epoch(ddp, batches, opt, grouping=grouping, split_model=model, device=device,
                                max_steps=remaining, amp_dtype=amp, channels_last=cfg.scaling.channels_last,
                                global_step=progress["global_step"], scheduler=schedule, after_step=after_step,
                                distill=recipe.distill)
        if grouping is not None and grouping.prox is None:  # frozen once sparsifying: the cut must find the same argmax
            _sync_assignments(model)
        stats = _merge_train_stats(stats, time.perf_counter() - start)
        if steps_shown is not None:
            steps_shown.validating()
        val = _merge_eval(evaluate(model, torch_batches(val_shard, per_worker_batch, mean, std, str(device)), device,
                                   amp_dtype=amp, max_batches=cfg.evaluate.max_batches or None,
                                   channels_last=cfg.scaling.channels_last))
        progress["epoch"] += 1
        progress["step_in_epoch"] = 0
        row = {"stage": stage, "epoch": epoch + 1, **stats, "val_top1": val["top1"], "val_top5": val["top5"],
               "lr": schedule.lrs_at(progress["global_step"] - 1)[0]}  # the epoch's last step's
        said = recipe.after_epoch(model, row, progress)
        progress["history"].append(row)
        elapsed = time.perf_counter() - stage_start
        done_epochs = progress["epoch"] - first_epoch
        eta = elapsed / done_epochs * (epochs - progress["epoch"]) if done_epochs else None
        if rank == 0:
            for line in [format_epoch(stage, epoch + 1, epochs, row, val, eta_s=eta)] + said:
                say(line)
        report(row, True)

    if steps_shown is not None:
        steps_shown.close()
    progress["workers"] = _workers()
    if rank == 0:
        recipe.cleanup(model, progress)
    # every rank reports the same number of times: a last, checkpoint-less report
    ray.train.report({"stage": stage, "done": True})


def _write_result(directory: Path, progress: dict) -> None:
    """``result.json``: what the driver records for the stage (history, resumptions, workers; the class
    groups a classifier started, ``class_start``: the baseline's at the start, or the warm-up's)."""
    result = {k: progress.get(k, []) for k in ("history", "resumed", "workers")}
    if progress.get("class_start") is not None:
        result["class_start"] = progress["class_start"]
    fixed = (progress.get("grouping") or {}).get("fixed_off_block")
    if fixed is not None:  # the off-block energy the groups left when they were fixed, before any proximal step
        result["fixed_off_block"] = fixed
    (directory / "result.json").write_text(json.dumps(result))


# ---- evaluation ---------------------------------------------------------------------------

def evaluate_loop(config: dict) -> None:
    """Every model of the run on the evaluation split, one pass, sums reduced over the workers."""
    import ray.train

    cfg = from_dict(config["cfg"])
    rd = RunDir(cfg.run_dir)
    ctx, device, precision = _setup(cfg)
    amp = precision.dtype
    n_classes = config["num_classes"]
    models = {}
    for dense in ("baseline", "control"):
        if getattr(cfg, dense).enabled and rd.exists(f"{dense}/model.safetensors"):
            models[dense] = load_dense_output(build_model(cfg.model.arch, n_classes, "1"), rd, dense)
    models["grouped"] = load_grouped(cfg.model.arch, cfg.model.split, n_classes, rd)
    with rd.local_copy("cut") as d:
        models["cut"] = load_tree(d)
    with rd.local_copy("tree") as d:
        models["tree"] = load_tree(d)
    for m in models.values():
        m.to(device)

    batches = torch_batches(ray.train.get_dataset_shard("val"), cfg.evaluate.batch_size, config["mean"], config["std"],
                            str(device))
    result = {name: _merge_eval(v) for name, v in evaluate_models(models, batches, device, amp_dtype=amp,
                                                                   max_batches=cfg.evaluate.max_batches or None).items()}
    if ctx.get_world_rank() == 0:
        rd.write_json("evaluate/metrics.json", result)
    ray.train.report({"stage": "evaluate", "images": result["tree"]["images"]})
