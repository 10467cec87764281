"""The pipeline's configuration: YAML -> dataclasses, validated on load, overlay YAML files and
``key=value`` overrides.

    cfg = load_config("pipelines/configs/demo.yaml", ["run_dir=runs/x", "group.epochs=5"])
    cfg = load_config("pipelines/configs/imagenet22k-resnet50.yaml", ["data.source=/tmp/in22k"],
                      overlays=["pipelines/configs/rehearsal-cpu.yaml"])   # the file, then the overlay, then key=value

An overlay is a partial config: its sections merge into the ones before it key by key (a value,
list included, replaces the earlier one), so a recipe can be re-targeted (CPU, tiny schedule,
local data) without copying it.

Every problem raises :class:`ConfigError` with one line naming the key (an unknown key, a value
of the wrong type, a value out of range). ``to_dict(cfg)`` is what gets saved in the run
directory; ``from_dict`` reads it back, so a resumed run can be checked against the original.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message is one line that names the key."""


@dataclass
class DataConfig:
    # A CIFAR-100 folder (train.npz/test.npz), an ImageFolder tree or a folder of per-synset tars
    # (converted once into shards under `shards`), or a folder/URI that already holds shards.
    source: str = "../shared/data/cifar100"
    shards: str = ""               # where converted shards go; default <run_dir>/shards
    format: str = "parquet"        # parquet | webdataset (for converted shards)
    shard_size: int = 1000
    per_class: int = 0             # >0: a class-balanced subset of the train split (short schedules)
    classes: list[str] = field(default_factory=list)  # only these classes (names, or superclass / parent names)
    eval_per_class: int = 0        # >0: the same for the evaluation split
    eval_split: str = "test"       # shards of this split evaluate; "" = hold out val_fraction of train
    val_fraction: float = 0.0
    image_size: int = 32
    mean: list[float] = field(default_factory=list)  # default: CIFAR-100's at 32 px, ImageNet's otherwise
    std: list[float] = field(default_factory=list)
    decode_actors: int = 1         # Ray Data decode actors per dataset
    # small images (<= 64 px) whose decoded copy fits in a quarter of Ray's object store are decoded once
    # per run and re-read every epoch; the training workers then pad/crop/flip. false: decode every epoch
    cache: bool = True
    decode_cpus: float = 0.25      # CPUs per decode actor
    on_bad_record: str = "skip"    # skip | fail
    max_pixels: int = 64_000_000
    download: bool = False         # CIFAR-100 only: fetch with torchvision when `source` has no copy
    parents: str = ""              # class<TAB>parent TSV (local file): the classes' parents the report scores groups against

    @property
    def train_val_fraction(self) -> float:
        """The share of train held out for validation: ``val_fraction``, or none with an ``eval_split``."""
        return 0.0 if self.eval_split else self.val_fraction


@dataclass
class ModelConfig:
    arch: str = "wrn-16-2"
    split: str = "2-2-2"           # groups per level, bottom to top (SPLITNET.md)
    pretrained: str = ""           # dense weights to start from: .safetensors or a torchvision .pth
    split_dropout: float = 0.0     # dropout on the inputs of split layers while grouping (the reference uses 0.5)


@dataclass
class ScalingConfigSpec:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0   # with use_gpu; fractions share a GPU
    backend: str = "auto"          # auto (nccl with GPUs, gloo without) | gloo | nccl
    # auto: bf16 autocast where the workers' device computes bf16 natively (a CUDA GPU with bf16, a CPU
    # with AMX), fp32 elsewhere; bf16: always (emulated, many times slower, on CPUs without it); none:
    # fp32. The run's header says what was chosen and why (splitnet/precision.py)
    amp: str = "auto"
    torch_threads: int = 0         # intra-op threads per worker; 0 = max(1, cpus_per_worker)
    channels_last: bool = True     # NHWC convolutions (1.4-1.6x faster training on CPU, measured; also GPU)
    compile: bool = False          # torch.compile the training forward (eager where compiling fails); docs/scaling.md
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (workers over nodes)
    autoscale: bool = False        # the cluster adds nodes on demand: wait for CPUs/GPUs instead of failing fast


@dataclass
class StageConfig:
    enabled: bool = True
    epochs: int = 1
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 128          # global: split evenly across the workers
    schedule: str = "cosine"       # cosine | step | constant
    milestones: list[int] = field(default_factory=list)  # step: epochs where lr x= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    max_steps_per_epoch: int = 0   # >0: cap an epoch (rehearsals, smoke runs)
    checkpoint_every_steps: int = 0  # >0: also checkpoint inside an epoch (long ImageNet epochs)
    # cosine: the part of one cosine curve this stage runs through, e.g. group [0, 0.5] and finetune
    # [0.5, 1] with the same lr put both stages on one schedule (the tree does not restart at full lr)
    cosine_span: list[float] = field(default_factory=lambda: [0.0, 1.0])


WARMUP_UNTRAINED = 0.25  # group.warmup: auto from an untrained classifier (init scratch / pretrained)


@dataclass
class GroupStageConfig(StageConfig):
    init: str = "scratch"          # scratch | baseline | pretrained
    disjoint: float = 1.0          # regularizer weights g1, g2, g3 (SPLITNET.md)
    weight: float = 1.0
    balance: float = 10.0
    # staged: warm-up (CE only) -> the groups -> sparsify (hard assignment fixed, the group-weight term
    # as a proximal step: off-block weights reach exactly zero). reference: the objective at every
    # step, plain subgradient SGD (the authors' code). See splitnet/grouping.py.
    method: str = "staged"
    # staged: how the groups are found. derived: computed at the end of the warm-up, class groups from
    # the classifier and every channel's from the weights (splitnet/partition.py), no learning rate;
    # everything after the warm-up sparsifies. learned: the paper's assignments, learned from the
    # regularizers in an assign phase (rates: assignment_lr_mult, class_assignment_lr_mult). random:
    # as derived, with random balanced groups (seeded by `seed`): the control that says what the derived
    # groups are worth against a tree of the same shape
    assign: str = "derived"
    # staged: fraction of the stage's steps before the groups (CE only). auto: none with init baseline
    # (its classifier and features are trained: the groups are read from them at once; a warm-up at the
    # group stage's lr only blurs them, docs/method.md), WARMUP_UNTRAINED with init scratch or pretrained
    # (the classifier the groups are read from is trained by the warm-up)
    warmup: float | str = "auto"
    sparsify: float = 0.35         # staged, learned: fraction at the end with the hard assignment fixed
    # the proximal step's size: 0 derives it from the weights (the thresholds over the sparsify phase
    # add up to 6x each layer's largest off-block segment); >= 1: the multiplier of `weight` at the
    # end of a geometric ramp from 1 (the reference coefficient)
    sparsify_strength: float = 0.0
    disjoint_hold: float = 0.5     # staged, learned: first part of the assign phase without the disjoint term
    assignment_lr_mult: float = 1.0
    # the class matrix's own multiplier (0: assignment_lr_mult). With few classes its per-logit
    # gradients are several times the channel matrices': one rate cannot suit both
    class_assignment_lr_mult: float = 0.0
    # learned: where the class groups start: random (the paper: logits ~ N(0, 0.01^2)) or classifier
    # (from the dense model's classifier: classes whose weight vectors agree share a group, a lean of
    # assign_init_margin on the logits). With init baseline or pretrained it is applied before the
    # first step; with init scratch at the end of the warm-up, from the classifier the warm-up
    # trained (method staged, warmup > 0). derived ignores it: its class groups are the classifier's.
    assign_init: str = "random"
    assign_init_margin: float = 2.0
    split_lr_mult: float = 1.0
    freeze_split_bn_scale: bool = False  # the reference's bn_no_scale: BN gamma of every residual block frozen (not the head BN)

    def warmup_fraction(self) -> float:
        """``warmup`` as the fraction it means (``auto`` resolved by ``init``)."""
        if self.warmup == "auto":
            return 0.0 if self.init == "baseline" else WARMUP_UNTRAINED
        return float(self.warmup)

    def grouping_schedule(self, seed: int = 0):
        """These settings as the library's :class:`~splitnet.grouping.GroupingSchedule` (which validates them)."""
        from splitnet.grouping import GroupingSchedule

        return GroupingSchedule(**{**_same_fields(GroupingSchedule, self), "warmup": self.warmup_fraction()},
                                random_seed=seed)

    def regularizer_weights(self):
        """``disjoint`` / ``weight`` / ``balance`` as the library's :class:`~splitnet.regularizers.RegularizerWeights`."""
        from splitnet.regularizers import RegularizerWeights

        return RegularizerWeights(**_same_fields(RegularizerWeights, self))


def _same_fields(cls, settings) -> dict:
    """The values of ``settings`` for the dataclass ``cls``'s fields of the same name: a library object
    built from a config section by name, never by position."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if hasattr(settings, f.name)}


@dataclass
class CutConfig:
    min_classes_per_group: int = 1
    min_channels_per_group: int = 1


@dataclass
class FinetuneStageConfig(StageConfig):
    split_lr_mult: float = 1.0     # x lr on every weight above the trunk
    # train the tree with each level's sibling subtrees fused into grouped ops (splitnet.fused):
    # the same function and gradients, one kernel per layer instead of one per subtree. For GPUs,
    # where a small step is launch-bound (the GPU recipes turn it on); on CPU the separate convs
    # measured faster (WRN-16-8 2-2-2, batch 128, bf16: tree 1.26x dense, fused 1.16x)
    fuse: bool = False
    # distillation (splitnet/distill.py): the tree also learns from a frozen dense teacher's soft targets.
    # none | grouped (the grouped dense model the tree was cut from) | baseline (the dense baseline)
    distill: str = "none"
    distill_temperature: float = 4.0
    distill_weight: float = 0.5    # w in (1 - w) CE + w T^2 KL(teacher || tree); 0 is plain CE


@dataclass
class ControlConfig:
    # the tree's yardstick at equal budget: a dense model trained from where the grouping started (the
    # baseline's weights, pretrained weights, or scratch) for group.epochs + finetune.epochs on the very
    # schedule the tree had (each epoch with its stage's lr, batch, weight decay and cosine span). The
    # report's accuracy check compares the tree with it; false: the report says its comparison with the
    # baseline is not at equal budget, by how many epochs, and checks nothing on it
    enabled: bool = True


@dataclass
class GrowStageConfig(StageConfig):
    # splitnet grow RUN_DIR NEW_SOURCE (splitnet/grow.py): a new top-level subtree for the new classes,
    # trained with the trunk and the old subtrees frozen, in one softmax with the old subtrees' logits;
    # 10 epochs: measured against 5 on CIFAR-100 (docs/growing.md), both under a tenth of retraining's compute
    epochs: int = 10
    # old-class images replayed per class from the run's shards, mixed with the new classes' images:
    # what teaches the new subtree's features which images are not its own (0: none; the calibration
    # below then alone keeps it from claiming old images)
    replay: int = 20
    init: str = "sibling"          # sibling: start from the most similar subtree's weights | fresh
    # held-out images per class, old and new, on which the new logits' scale and shift are fitted after
    # training (splitnet.grow.calibrate): the old ones drawn from the run's shards apart from the replay,
    # the new ones held out of training (at most a fifth of a class); 0: no calibration
    calibrate: int = 20


@dataclass
class EvaluateConfig:
    batch_size: int = 256
    max_batches: int = 0           # >0: evaluate on a prefix (rehearsals)


@dataclass
class FailureSpec:
    max_failures: int = 2          # worker failures a stage survives (resuming from its checkpoint)
    checkpoints_to_keep: int = 2


@dataclass
class PipelineConfig:
    name: str = "splitnet"
    run_dir: str = "runs/demo"     # local path or URI (s3://bucket/prefix); re-running resumes
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scaling: ScalingConfigSpec = field(default_factory=ScalingConfigSpec)
    baseline: StageConfig = field(default_factory=StageConfig)
    group: GroupStageConfig = field(default_factory=GroupStageConfig)
    cut: CutConfig = field(default_factory=CutConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    failure: FailureSpec = field(default_factory=FailureSpec)
    grow: GrowStageConfig = field(default_factory=GrowStageConfig)


ON_BAD_RECORD = ("skip", "fail")  # data.on_bad_record, splitnet prepare --on-bad-record, the decoders

CHOICES = {
    "data.format": ("parquet", "webdataset"),
    "data.on_bad_record": ON_BAD_RECORD,
    "scaling.backend": ("auto", "gloo", "nccl"),
    "scaling.amp": ("auto", "bf16", "none"),
    "scaling.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "group.init": ("scratch", "baseline", "pretrained"),
    "group.method": ("staged", "reference"),
    "finetune.distill": ("none", "grouped", "baseline"),
    "grow.init": ("sibling", "fresh"),
}
TRAINED = ("baseline", "group", "finetune", "grow")  # the sections with a StageConfig's settings
for _stage in TRAINED:
    CHOICES[f"{_stage}.schedule"] = ("cosine", "step", "constant")


def _check_value(key: str, tp, value):
    """``value`` converted to ``tp`` (int/float/bool/str/list[...]), or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp == (float | str):  # a number, or a word the key's validation knows (group.warmup: auto)
        if isinstance(value, str):
            return value
        return _check_value(key, float, value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(f"{prefix}{key}", tp, value)
    return cls(**kwargs)


def from_dict(data: dict) -> PipelineConfig:
    cfg = _build(PipelineConfig, data)
    validate(cfg)
    return cfg


def to_dict(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(cfg)


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["group.epochs=5", "run_dir=s3://b/x"]`` applied to the raw mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. group.epochs=5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set(data, key, value)
    return data


def _read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping, or ConfigError naming the file (and the line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``base`` in place: mappings key by key, anything else replaced (an
    empty section, ``data:`` with every line commented out, changes nothing)."""
    for key, value in overlay.items():
        if isinstance(base.get(key), dict) and value is None:
            continue
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                overlays: list[str | Path] | None = None) -> PipelineConfig:
    """Read ``path`` (YAML; None = the built-in defaults), merge each overlay YAML in order, apply
    ``key=value`` overrides, validate. An unknown key in an overlay is reported with its file."""
    data: dict = _read_yaml(path) if path is not None else {}
    for overlay in overlays or []:
        extra = _read_yaml(overlay)
        try:
            _build(PipelineConfig, extra)  # its keys and types, before they mix with the others
        except ConfigError as e:
            raise ConfigError(f"{overlay}: {e}") from None
        merge(data, extra)
    apply_overrides(data, overrides or [])
    return from_dict(data)


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: PipelineConfig) -> None:
    """Range and choice checks, and that the model can be built (arch, split)."""
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
    if not cfg.run_dir:
        raise ConfigError("run_dir: must not be empty")
    if not cfg.data.source:
        raise ConfigError("data.source: must not be empty")
    d = cfg.data
    _positive("data.shard_size", d.shard_size)
    _positive("data.per_class", d.per_class, True)
    _positive("data.eval_per_class", d.eval_per_class, True)
    _positive("data.image_size", d.image_size)
    _positive("data.decode_actors", d.decode_actors)
    _positive("data.decode_cpus", d.decode_cpus)
    _positive("data.max_pixels", d.max_pixels)
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if not d.eval_split and d.val_fraction == 0:
        raise ConfigError("data.eval_split is empty and data.val_fraction is 0: nothing to evaluate on")
    if "://" in d.parents:
        raise ConfigError(f"data.parents: {d.parents!r}: must be a local file (class<TAB>parent TSV), not a URI")
    for key in ("mean", "std"):
        values = getattr(d, key)
        if values and len(values) != 3:
            raise ConfigError(f"data.{key}: expected 3 numbers (R, G, B), got {values}")
    if any(s <= 0 for s in d.std):
        raise ConfigError(f"data.std: must be > 0, got {d.std}")
    s = cfg.scaling
    _positive("scaling.num_workers", s.num_workers)
    _positive("scaling.cpus_per_worker", s.cpus_per_worker, True)
    _positive("scaling.gpus_per_worker", s.gpus_per_worker)
    _positive("scaling.torch_threads", s.torch_threads, True)
    if s.backend == "nccl" and not s.use_gpu:
        raise ConfigError("scaling.backend: nccl needs scaling.use_gpu=true (gloo runs on CPU)")
    for stage in TRAINED:
        st = getattr(cfg, stage)
        _positive(f"{stage}.epochs", st.epochs, allow_zero=not st.enabled)
        _positive(f"{stage}.lr", st.lr)
        _positive(f"{stage}.weight_decay", st.weight_decay, True)
        _positive(f"{stage}.momentum", st.momentum, True)
        _positive(f"{stage}.batch_size", st.batch_size)
        _positive(f"{stage}.max_steps_per_epoch", st.max_steps_per_epoch, True)
        _positive(f"{stage}.checkpoint_every_steps", st.checkpoint_every_steps, True)
        _positive(f"{stage}.warmup_epochs", st.warmup_epochs, True)
        if st.batch_size < s.num_workers:
            raise ConfigError(f"{stage}.batch_size: {st.batch_size} is smaller than scaling.num_workers ({s.num_workers})")
        span = st.cosine_span
        if len(span) != 2 or not 0 <= span[0] < span[1] <= 1:
            raise ConfigError(f"{stage}.cosine_span: expected [start, end] with 0 <= start < end <= 1, got {span}")
        if st.schedule == "step" and not st.milestones:
            raise ConfigError(f"{stage}.milestones: the step schedule needs at least one milestone epoch")
    if not cfg.group.enabled or not cfg.finetune.enabled:
        raise ConfigError("group and finetune cannot be disabled: they are the method (baseline is optional)")
    for key in ("disjoint", "weight", "balance", "assignment_lr_mult", "split_lr_mult"):
        _positive(f"group.{key}", getattr(cfg.group, key), allow_zero=key in ("disjoint", "weight", "balance"))
    g = cfg.group
    if isinstance(g.warmup, str) and g.warmup != "auto":
        raise ConfigError(f"group.warmup: a fraction of the stage's steps in [0, 1), or auto; got {g.warmup!r}")
    try:
        g.grouping_schedule()  # the phases, the proximal step, the assignment mode: checked where they are used
    except ValueError as e:
        raise ConfigError(f"group.{e}") from None
    derived = g.method == "staged" and g.assign == "derived"
    if derived and g.init == "scratch" and g.warmup_fraction() <= 0:
        raise ConfigError("group.assign: derived computes the groups from the classifier and weights the warm-up "
                          "trained; with group.init: scratch it needs group.warmup > 0 (or group.init: baseline / "
                          "pretrained)")
    if not 0 <= cfg.model.split_dropout < 1:
        raise ConfigError(f"model.split_dropout: must be in [0, 1), got {cfg.model.split_dropout}")
    _positive("group.class_assignment_lr_mult", g.class_assignment_lr_mult, allow_zero=True)
    _positive("group.assign_init_margin", g.assign_init_margin)
    if g.assign_init not in ("random", "classifier"):
        raise ConfigError(f"group.assign_init: {g.assign_init!r}; use random or classifier")
    if not derived and g.assign_init == "classifier" and g.init == "scratch" and (g.method != "staged" or g.warmup_fraction() <= 0):
        # from scratch the classifier the warm-up trained is the start (at the first assign step)
        raise ConfigError("group.assign_init: classifier with group.init: scratch starts from the classifier the "
                          "warm-up trained; it needs group.method: staged with group.warmup > 0 (or group.init: "
                          "baseline / pretrained, or group.assign_init: random)")
    _positive("grow.replay", cfg.grow.replay, allow_zero=True)
    _positive("grow.calibrate", cfg.grow.calibrate, allow_zero=True)
    f = cfg.finetune
    _positive("finetune.distill_temperature", f.distill_temperature)
    if not 0 <= f.distill_weight <= 1:
        raise ConfigError(f"finetune.distill_weight: must be in [0, 1], got {f.distill_weight}")
    if f.distill == "baseline" and not cfg.baseline.enabled:
        raise ConfigError("finetune.distill: baseline, but baseline.enabled is false (use distill: grouped)")
    if cfg.group.init == "baseline" and not cfg.baseline.enabled:
        raise ConfigError("group.init: baseline, but baseline.enabled is false")
    if cfg.group.init == "pretrained" and not cfg.model.pretrained:
        raise ConfigError("group.init: pretrained, but model.pretrained names no weights file")
    if cfg.model.pretrained and "://" not in cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained: {cfg.model.pretrained}: no such file")
    _positive("cut.min_classes_per_group", cfg.cut.min_classes_per_group)
    _positive("cut.min_channels_per_group", cfg.cut.min_channels_per_group)
    _positive("evaluate.batch_size", cfg.evaluate.batch_size)
    _positive("evaluate.max_batches", cfg.evaluate.max_batches, True)
    _positive("failure.max_failures", cfg.failure.max_failures, True)
    _positive("failure.checkpoints_to_keep", cfg.failure.checkpoints_to_keep)
    _check_model(cfg.model, cfg.data.image_size)


def _check_model(m: ModelConfig, image_size: int) -> None:
    import torch

    from splitnet import build_model
    from splitnet.assignment import SplitConfigError

    try:
        with torch.device("meta"):
            model = build_model(m.arch, 10, m.split)
    except SplitConfigError as e:
        raise ConfigError(f"model.split: {e}") from None
    except ValueError as e:
        raise ConfigError(f"model.arch: {e}") from None
    if image_size < model.min_input_size:
        raise ConfigError(f"data.image_size: {image_size} px is too small for {m.arch} (at least "
                          f"{model.min_input_size} px)")


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
