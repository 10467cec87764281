"""The pipeline config: YAML -> dataclasses, validation with one-line errors, overrides."""
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from pipelines.config import ConfigError, PipelineConfig, differences, from_dict, load_config, to_dict
from pipelines.stages import lr_factor

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
    assert demo.baseline.enabled and demo.baseline.epochs == demo.group.epochs + demo.finetune.epochs  # same budget
    ref = load_config(ROOT / "pipelines/configs/cifar100-wrn16-8.yaml")
    assert (ref.model.arch, ref.model.split, ref.scaling.use_gpu) == ("wrn-16-8", "2-2-2", True)
    assert (ref.group.epochs, ref.group.milestones, ref.group.batch_size) == (400, [240, 300], 90)
    big = load_config(ROOT / "pipelines/configs/imagenet22k-resnet50.yaml")
    assert (big.model.arch, big.model.split, big.group.init, big.group.balance) == ("resnet50", "4-4", "pretrained", 3.0)
    assert big.data.source.startswith("s3://") and big.data.image_size == 224


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml",
                      ["group.epochs=7", "run_dir=s3://bucket/x", "scaling.use_gpu=false", "data.mean=[0.5,0.5,0.5]",
                       "group.lr=0.2"])
    assert cfg.group.epochs == 7 and cfg.run_dir == "s3://bucket/x" and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.group.lr == 0.2 and cfg.baseline.lr == 0.05  # the rest untouched
    assert load_config(None, ["model.split=4"]).model.split == "4"  # an int in YAML is still a split string


@pytest.mark.parametrize("overrides,fragment", [
    (["group.epoch=3"], "unknown key group.epoch (did you mean group.epochs?)"),
    (["nonsense=1"], "unknown key nonsense"),
    (["group.epochs=three"], "group.epochs: expected an integer, got 'three'"),
    (["group.epochs=0"], "group.epochs: must be > 0"),
    (["scaling.use_gpu=maybe"], "scaling.use_gpu: expected true or false"),
    (["scaling.backend=mpi"], "scaling.backend: 'mpi' is not one of"),
    (["model.arch=vgg"], "model.arch: unknown arch 'vgg'"),
    (["model.split=2-3-2"], "model.split:"),
    (["data.val_fraction=1.5"], "data.val_fraction: must be in [0, 1)"),
    (["group.init=baseline", "baseline.enabled=false"], "group.init: baseline, but baseline.enabled is false"),
    (["model.pretrained=/no/such/weights.pth"], "model.pretrained: /no/such/weights.pth: no such file"),
    (["scaling.backend=nccl"], "nccl needs scaling.use_gpu=true"),
    (["group.schedule=step"], "group.milestones"),
    (["data=3"], "data: expected a mapping"),
    (["group.epochs"], "expected key=value"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "pipelines/configs/demo.yaml", overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_differences_lists_dotted_keys():
    a = to_dict(PipelineConfig())
    b = to_dict(load_config(None, ["group.epochs=9", "seed=3"]))
    assert differences(a, b) == ["group.epochs", "seed"]


def test_lr_schedules():
    cfg = load_config(None, ["group.epochs=10", "group.schedule=step", "group.milestones=[5,8]", "group.gamma=0.1",
                             "finetune.epochs=4", "finetune.warmup_epochs=1"])
    assert lr_factor(cfg.group, 0, 100) == 1.0
    assert lr_factor(cfg.group, 500, 100) == pytest.approx(0.1)
    assert lr_factor(cfg.group, 850, 100) == pytest.approx(0.01)
    ft = cfg.finetune  # cosine with one warm-up epoch
    assert lr_factor(ft, 0, 10) == pytest.approx(0.1)
    assert lr_factor(ft, 9, 10) == pytest.approx(1.0)
    assert lr_factor(ft, 10, 10) == pytest.approx(1.0)
    assert lr_factor(ft, 25, 10) == pytest.approx(0.5)
    assert lr_factor(ft, 40, 10) == pytest.approx(0.0, abs=1e-9)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_run_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("group:\n  epochs: 3\n  learning_rate: 0.1\n")
    r = _cli("run", str(bad))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "splitnet: error: unknown key group.learning_rate (known: enabled, epochs, lr, weight_decay, momentum, batch_size, "
        "schedule, milestones, gamma, warmup_epochs, max_steps_per_epoch, checkpoint_every_steps, init, disjoint, weight, "
        "balance, assignment_lr_mult, split_lr_mult, freeze_split_bn_scale)"], r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("group: [1, 2\n")
    r = _cli("run", str(broken))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not valid YAML" in r.stderr
    r = _cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such config file" in r.stderr
    r = _cli("run", str(ROOT / "pipelines/configs/demo.yaml"), "group.epochs=-1")
    assert r.returncode == 2 and "group.epochs: must be > 0" in r.stderr


def test_cli_print_config_shows_the_resolved_config():
    r = _cli("run", str(ROOT / "pipelines/configs/demo.yaml"), "group.epochs=5", "--print-config")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["group"]["epochs"] == 5 and data["model"]["arch"] == "wrn-16-2"
