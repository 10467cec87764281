"""The pipeline config: YAML -> dataclasses, validation with one-line errors, overrides."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from pipelines.config import ConfigError, GroupStageConfig, PipelineConfig, differences, from_dict, load_config, to_dict
from pipelines.stages import stage_phases
from splitnet.schedule import PhaseSchedule

CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))


def test_shipped_configs_load_and_round_trip():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "cifar100-wrn16-8", "imagenet22k-resnet50"} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert from_dict(to_dict(cfg)) == cfg


def test_reference_configs_say_what_the_issue_asks():
    demo = load_config(ROOT / "pipelines/configs/demo.yaml")
    assert demo.data.source == "../shared/data/cifar100" and not demo.scaling.use_gpu
    # the demo groups from its dense baseline (a 10-minute CPU budget has no room for a warm-up from scratch)
    assert demo.baseline.enabled and demo.group.init == "baseline" and demo.group.method == "staged"
    assert demo.data.classes and demo.group.warmup_fraction() == 0  # group.warmup: auto, from the baseline
    ref = load_config(ROOT / "pipelines/configs/cifar100-wrn16-8.yaml")
    assert (ref.model.arch, ref.model.split, ref.scaling.use_gpu) == ("wrn-16-8", "2-2-2", True)
    assert (ref.group.epochs, ref.group.milestones, ref.group.batch_size) == (400, [240, 300], 90)
    big = load_config(ROOT / "pipelines/configs/imagenet22k-resnet50.yaml")
    assert (big.model.arch, big.model.split, big.group.init, big.group.assign) == ("resnet50", "4-4", "pretrained", "derived")
    assert big.data.source.startswith("s3://") and big.data.image_size == 224
    # the subtrees fused into grouped ops where a step is launch-bound (GPU); on CPU they measured slower
    assert ref.finetune.fuse and big.finetune.fuse and not demo.finetune.fuse
    # the GPU recipes compile the training forward; the demo (a few minutes per stage) does not
    assert ref.scaling.compile and big.scaling.compile and not demo.scaling.compile
    # the demo's groups are derived from its baseline, the proximal step sized from the weights
    assert (demo.group.assign, demo.group.sparsify_strength, demo.group.init) == ("derived", 0.0, "baseline")


RATES = ("assignment_lr_mult", "class_assignment_lr_mult", "sparsify_strength", "assign_init_margin", "disjoint_hold",
         "disjoint", "weight", "balance")


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_carry_no_grouping_rates(path):
    """What a user chooses (split, epochs, init, warm-up) and nothing tuned to a dataset: the grouping's
    rates come from the run (issue 26)."""
    import yaml

    group = (yaml.safe_load(path.read_text()) or {}).get("group") or {}
    assert not set(group) & set(RATES), sorted(set(group) & set(RATES))


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml",
                      ["group.epochs=7", "run_dir=s3://bucket/x", "scaling.use_gpu=false", "data.mean=[0.5,0.5,0.5]",
                       "group.lr=0.2"])
    assert cfg.group.epochs == 7 and cfg.run_dir == "s3://bucket/x" and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.group.lr == 0.2 and cfg.baseline.lr == 0.1 and cfg.group.warmup == "auto"  # the rest untouched
    assert load_config(None, ["model.split=4"]).model.split == "4"  # an int in YAML is still a split string


@pytest.mark.parametrize("overrides,fragment", [
    (["group.epoch=3"], "unknown key group.epoch (did you mean group.epochs?)"),
    (["nonsense=1"], "unknown key nonsense"),
    (["group.epochs=three"], "group.epochs: expected an integer, got 'three'"),
    (["group.epochs=0"], "group.epochs: must be > 0"),
    (["scaling.use_gpu=maybe"], "scaling.use_gpu: expected true or false"),
    (["scaling.compile=yes please"], "scaling.compile: expected true or false"),
    (["scaling.backend=mpi"], "scaling.backend: 'mpi' is not one of"),
    (["model.arch=vgg"], "model.arch: unknown arch 'vgg'"),
    (["model.split=2-3-2"], "model.split:"),
    (["model.arch=alexnet"], "data.image_size: 32 px is too small for alexnet (at least 63 px)"),
    (["data.val_fraction=1.5"], "data.val_fraction: must be in [0, 1)"),
    (["group.init=baseline", "baseline.enabled=false"], "group.init: baseline, but baseline.enabled is false"),
    (["model.pretrained=/no/such/weights.pth"], "model.pretrained: /no/such/weights.pth: no such file"),
    (["scaling.backend=nccl"], "nccl needs scaling.use_gpu=true"),
    (["group.schedule=step"], "group.milestones"),
    (["data=3"], "data: expected a mapping"),
    (["group.epochs"], "expected key=value"),
    (["group.assign_init=classifier", "group.init=scratch", "group.warmup=0", "group.assign=learned"],
     "group.assign_init: classifier with group.init: scratch starts from the classifier the warm-up trained"),
    (["group.init=scratch", "group.warmup=0"],
     "group.assign: derived computes the groups from the classifier and weights the warm-up trained"),
    (["group.assign=guess"], "group.assign: 'guess'; use derived, learned or random"),
    (["group.sparsify_strength=0.5"], "group.sparsify_strength: 0 (derived from the weights) or >= 1, got 0.5"),
    (["group.assign_init=classifier", "group.init=scratch", "group.method=reference"],
     "it needs group.method: staged with group.warmup > 0"),
    (["group.assign_init=kmeans"], "group.assign_init: 'kmeans'; use random or classifier"),
    (["group.class_assignment_lr_mult=-1"], "group.class_assignment_lr_mult"),
    (["finetune.distill=control"], "finetune.distill: 'control' is not one of none, grouped, baseline"),
    (["finetune.distill_weight=1.5"], "finetune.distill_weight: must be in [0, 1], got 1.5"),
    (["finetune.distill_temperature=0"], "finetune.distill_temperature: must be > 0"),
    (["finetune.distill=baseline", "baseline.enabled=false", "group.init=scratch", "group.warmup=0.2"],
     "finetune.distill: baseline, but baseline.enabled is false"),
    (["group.warmup=soon"], "group.warmup: a fraction of the stage's steps in [0, 1), or auto; got 'soon'"),
    (["group.warmup=[0.1]"], "group.warmup: expected a number, got [0.1]"),
    (["control.epochs=3"], "unknown key control.epochs"),
    (["grow.replay=-1"], "grow.replay: must be >= 0, got -1"),
    (["grow.calibrate=-5"], "grow.calibrate: must be >= 0, got -5"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "pipelines/configs/demo.yaml", overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_classifier_init_from_scratch_is_accepted_when_a_warm_up_trains_the_classifier():
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", ["group.assign_init=classifier", "group.init=scratch",
                                                            "group.method=staged", "group.warmup=0.25"])
    assert (cfg.group.assign_init, cfg.group.init) == ("classifier", "scratch")


@pytest.mark.parametrize("init,fraction,extra", [("baseline", 0.0, []), ("scratch", 0.25, []),
                                                 ("pretrained", 0.25, ["model.pretrained={tmp}/r50.safetensors"])])
def test_the_warm_up_is_none_from_a_trained_baseline_unless_set(init, fraction, extra, tmp_path):
    """group.warmup: auto (the default) reads the groups from a trained baseline at once, and gives a
    classifier that is not trained yet (scratch, pretrained features) a quarter of the steps first;
    a number, from the YAML or an override, is taken as it is."""
    (tmp_path / "r50.safetensors").write_bytes(b"")  # validation asks only that it exists
    extra = [e.format(tmp=tmp_path) for e in extra]
    cfg = load_config(None, [f"group.init={init}", *extra])
    assert cfg.group.warmup == "auto" and cfg.group.grouping_schedule().warmup == fraction
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"group:\n  init: {init}\n  warmup: auto\n")
    assert load_config(yaml_file, extra).group.warmup_fraction() == fraction
    assert load_config(yaml_file, [*extra, "group.warmup=0.1"]).group.grouping_schedule().warmup == 0.1


def test_differences_lists_dotted_keys():
    a = to_dict(PipelineConfig())
    b = to_dict(load_config(None, ["group.epochs=9", "seed=3"]))
    assert differences(a, b) == ["group.epochs", "seed"]


def _lrs(cfg, stage: str, spe: dict) -> list[float]:
    """The learning rate of every step of ``stage`` as the worker's scheduler sets it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=(cfg.group if stage == "control" else getattr(cfg, stage)).lr,
                          momentum=0.9)
    phases = [phase for _, phase in stage_phases(cfg, stage, spe)]
    schedule, lrs = PhaseSchedule(opt, phases), []
    for _ in range(sum(p.steps for p in phases)):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


def test_lr_schedules():
    cfg = load_config(None, ["group.epochs=10", "group.schedule=step", "group.milestones=[5,8]", "group.gamma=0.1",
                             "group.lr=1", "finetune.epochs=4", "finetune.warmup_epochs=1", "finetune.lr=1"])
    lrs = _lrs(cfg, "group", {"group": 100})
    assert (lrs[0], lrs[500], lrs[850]) == pytest.approx((1.0, 0.1, 0.01))
    lrs = _lrs(cfg, "finetune", {"finetune": 10})  # cosine with one warm-up epoch
    assert (lrs[0], lrs[9], lrs[10], lrs[25]) == pytest.approx((0.1, 1.0, 1.0, 0.5))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))
    # group then finetune on one cosine: the second stage starts where the first ended
    cfg = load_config(None, ["group.epochs=4", "group.cosine_span=[0, 0.4]", "finetune.epochs=6",
                             "finetune.cosine_span=[0.4, 1]", "finetune.lr=0.1", "group.lr=0.1"])
    group, finetune = _lrs(cfg, "group", {"group": 100}), _lrs(cfg, "finetune", {"finetune": 100})
    assert finetune[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.4)))
    assert group[-1] > finetune[0] > finetune[1]
    with pytest.raises(ConfigError, match="finetune.cosine_span"):
        load_config(None, ["finetune.cosine_span=[0.5, 0.2]"])


def test_the_control_follows_the_trees_schedule_epoch_by_epoch():
    """The control (the dense model of the tree's budget) runs group's epochs on group's settings, then
    finetune's on finetune's: at every step its learning rate is the tree's, and on entering the
    finetune's phase its momentum and weight decay are the finetune's."""
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", ["group.epochs=3", "finetune.epochs=2", "finetune.lr=0.05",
                                                            "finetune.batch_size=64", "group.warmup_epochs=0.5",
                                                            "finetune.momentum=0.5", "finetune.weight_decay=0.001"])
    spe = {"group": 10, "finetune": 20}
    assert [(st.lr, st.batch_size, phase.steps) for st, phase in stage_phases(cfg, "control", spe)] == \
        [(0.1, 128, 30), (0.05, 64, 40)]
    assert _lrs(cfg, "control", spe) == pytest.approx(_lrs(cfg, "group", spe) + _lrs(cfg, "finetune", spe))
    decayed, plain = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [decayed], "weight_decay": cfg.group.weight_decay},
                           {"params": [plain], "weight_decay": 0.0}], lr=cfg.group.lr, momentum=cfg.group.momentum)
    schedule = PhaseSchedule(opt, [phase for _, phase in stage_phases(cfg, "control", spe)])
    schedule.load_state_dict({"last_epoch": 30})  # resumed at the finetune phase's first step
    assert [(g["momentum"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.001), (0.5, 0.0)]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * schedule.phases[1].factor(0))  # its span's start
    assert [(phase.momentum, phase.weight_decay) for _, phase in stage_phases(cfg, "baseline", {"baseline": 7})] == \
        [(None, None)]  # a one-phase stage keeps its optimizer's


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.integration  # a subprocess run of the CLI
def test_cli_run_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("group:\n  epochs: 3\n  learning_rate: 0.1\n")
    r = _cli("run", str(bad))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "splitnet: error: unknown key group.learning_rate (known: "
        + ", ".join(f.name for f in dataclasses.fields(GroupStageConfig)) + ")"], r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("group: [1, 2\n")
    r = _cli("run", str(broken))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not valid YAML" in r.stderr
    r = _cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such config file" in r.stderr
    r = _cli("run", str(ROOT / "pipelines/configs/demo.yaml"), "group.epochs=-1")
    assert r.returncode == 2 and "group.epochs: must be > 0" in r.stderr


@pytest.mark.integration  # a subprocess run of the CLI
def test_cli_print_config_shows_the_resolved_config():
    r = _cli("run", str(ROOT / "pipelines/configs/demo.yaml"), "group.epochs=5", "--print-config")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["group"]["epochs"] == 5 and data["model"]["arch"] == "wrn-16-1"


# ---- overlay YAML files: CONFIG.yaml OVERLAY.yaml ... key=value ----------------------------

IN22K = ROOT / "pipelines/configs/imagenet22k-resnet50.yaml"
REHEARSAL = ROOT / "pipelines/configs/rehearsal-cpu.yaml"


def test_rehearsal_overlay_retargets_the_imagenet22k_recipe_to_cpu():
    base = load_config(IN22K)
    cfg = load_config(IN22K, ["data.source=/tmp/in22k"], overlays=[REHEARSAL])
    assert cfg.data.source == "/tmp/in22k"                      # key=value last
    assert not cfg.scaling.use_gpu and cfg.scaling.amp == "none" and cfg.scaling.num_workers == 2
    assert 0 < cfg.scaling.cpus_per_worker < 1 and cfg.group.init == "scratch" and cfg.model.pretrained == ""
    assert "://" not in cfg.run_dir and cfg.data.image_size < base.data.image_size
    assert 0 < cfg.group.max_steps_per_epoch <= 10 and cfg.group.epochs == cfg.finetune.epochs == 1
    # what the overlay does not name is the real recipe's
    assert (cfg.model.arch, cfg.model.split, cfg.data.val_fraction) == ("resnet50", "4-4", base.data.val_fraction)
    assert (cfg.group.balance, cfg.group.split_lr_mult, cfg.group.lr) == (base.group.balance, base.group.split_lr_mult,
                                                                          base.group.lr)
    assert cfg.baseline == base.baseline and base.scaling.compile and not cfg.scaling.compile
    # the overlay's opening comment is the command that runs it
    assert "splitnet run pipelines/configs/imagenet22k-resnet50.yaml pipelines/configs/rehearsal-cpu.yaml" \
        in REHEARSAL.read_text().split("\nname:")[0]


def test_overlays_apply_in_order_then_overrides(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("group:\n  epochs: 3\n  lr: 0.2\ndata:\n  mean: [0.1, 0.2, 0.3]\n")
    second.write_text("group:\n  epochs: 4\ndata:\n  mean: [0.5, 0.5, 0.5]\n# finetune: every line commented out\nfinetune:\n")
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", ["group.lr=0.3"], overlays=[first, second])
    assert cfg.group.epochs == 4 and cfg.group.lr == 0.3 and cfg.data.mean == [0.5, 0.5, 0.5]  # lists replaced
    demo = load_config(ROOT / "pipelines/configs/demo.yaml")
    assert cfg.group.batch_size == demo.group.batch_size and cfg.finetune == demo.finetune  # merged, not replaced
    assert load_config(None, overlays=[first]).group.epochs == 3  # over the built-in defaults


@pytest.mark.parametrize("text,fragment", [
    ("group:\n  epoch: 3\n", "unknown key group.epoch (did you mean group.epochs?)"),
    ("scaling:\n  use_gpu: maybe\n", "scaling.use_gpu: expected true or false"),
    ("group: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
])
def test_bad_overlay_names_the_file_and_the_key(tmp_path, text, fragment):
    overlay = tmp_path / "over.yaml"
    overlay.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "pipelines/configs/demo.yaml", overlays=[overlay])
    assert str(err.value).startswith(str(overlay)) and fragment in str(err.value) and "\n" not in str(err.value)


def test_an_overlays_values_are_validated_with_the_rest(tmp_path):
    overlay = tmp_path / "over.yaml"
    overlay.write_text("group:\n  init: pretrained\nmodel:\n  pretrained: ''\n")
    with pytest.raises(ConfigError, match="group.init: pretrained, but model.pretrained names no weights file"):
        load_config(IN22K, overlays=[overlay])


@pytest.mark.integration  # a subprocess run of the CLI
def test_cli_run_takes_overlays_then_overrides(tmp_path):
    r = _cli("run", str(IN22K), str(REHEARSAL), "data.source=/tmp/in22k", "group.max_steps_per_epoch=3", "--print-config")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["data"]["source"] == "/tmp/in22k" and data["group"]["max_steps_per_epoch"] == 3
    assert data["scaling"]["use_gpu"] is False and data["model"]["arch"] == "resnet50"
    r = _cli("run", str(IN22K), "data.source=/tmp/in22k", str(REHEARSAL))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"splitnet: error: {REHEARSAL}: overlay YAML files go before the key=value overrides "
        "(they apply in order, then the overrides)"]
    r = _cli("run", str(IN22K), str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"splitnet: error: {tmp_path / 'missing.yaml'}: no such config file"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("scaling:\n  num_worker: 2\n")
    r = _cli("run", str(IN22K), str(bad))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"splitnet: error: {bad}: unknown key scaling.num_worker (did you mean scaling.num_workers?)"]


def test_the_resolved_config_is_what_the_run_dir_keeps(tmp_path):
    from pipelines.rundir import RunDir
    from pipelines.run import _check_run_dir

    cfg = load_config(IN22K, [f"run_dir={tmp_path / 'run'}", "data.source=/tmp/in22k"], overlays=[REHEARSAL])
    _check_run_dir(RunDir(cfg.run_dir), cfg, lambda _: None)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert from_dict(saved) == cfg and saved["scaling"]["use_gpu"] is False and saved["data"]["image_size"] == 72


def test_group_section_builds_the_librarys_grouping_objects_by_name():
    """group.* is the one source of the grouping settings: every field of the library's GroupingSchedule
    (but the seed) and RegularizerWeights has a config key of the same name, and the objects carry its values."""
    from splitnet.grouping import GroupingSchedule
    from splitnet.regularizers import RegularizerWeights

    cfg = load_config(None, ["group.warmup=0.1", "group.sparsify=0.4", "group.disjoint_hold=0.3", "group.assign=learned",
                             "group.sparsify_strength=50", "group.balance=3"])
    schedule, weights = cfg.group.grouping_schedule(seed=7), cfg.group.regularizer_weights()
    for cls, built in ((GroupingSchedule, schedule), (RegularizerWeights, weights)):
        for f in dataclasses.fields(cls):
            if f.name != "random_seed":
                assert getattr(built, f.name) == getattr(cfg.group, f.name), f.name
    assert schedule.random_seed == 7 and (schedule.assign, weights.balance) == ("learned", 3)
