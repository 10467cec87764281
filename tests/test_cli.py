import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.integration  # a subprocess run of the CLI
def test_plan_prints_dense_vs_split():
    r = run("plan", "--arch", "wrn-16-8", "--split", "2-2-2", "--num-classes", "100")
    assert r.returncode == 0, r.stderr
    assert "11.00M" in r.stdout and "5.73M" in r.stdout and "47.9%" in r.stdout
    assert "counting rule" in r.stdout


@pytest.mark.integration  # a subprocess run of the CLI
def test_plan_json():
    r = run("plan", "--arch", "wrn-16-8", "--split", "2-4-4", "--num-classes", "100", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["split_tree"]["weights"] == pytest.approx(3.62e6, rel=0.02)
    assert len(data["split_tree"]["subtrees"]) == 2
    assert data["ideal_speedup"] > 1.5


def _alexnet_counts(groups: int, classes: int = 1000) -> dict:
    """AlexNet's parameters and FLOPs at 224 px derived by hand: conv1..conv5 in the trunk, then
    fc6 (256 channels x 36 positions -> 4096), fc7 (4096 -> 4096) and fc8 (4096 -> classes), each
    cut into ``groups`` balanced diagonal blocks (weights + biases)."""
    convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    conv_params = sum(o * i * k * k + o for i, o, k in convs)
    fcs = [(256 * 36, 4096), (4096, 4096), (4096, classes)]
    dense = conv_params + sum(i * o + o for i, o in fcs)
    split = conv_params + sum(groups * ((i // groups) * (o // groups) + o // groups) for i, o in fcs)
    fc_macs = sum(i * o for i, o in fcs)
    return {"dense": dense, "split": split, "fc_flops_saved": 2 * fc_macs * (1 - 1 / groups)}


@pytest.mark.parametrize("split,groups,params,reduction", [("2-2-2", 2, 31_789_864, 0.480),
                                                            ("4-4-4", 4, 17_134_376, 0.720)])
@pytest.mark.integration  # a subprocess run of the CLI
def test_plan_alexnet_is_exact_to_the_parameter(split, groups, params, reduction):
    r = run("plan", "--arch", "alexnet", "--split", split, "--num-classes", "1000", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    want = _alexnet_counts(groups)
    assert data["dense"]["params"] == want["dense"] == 61_100_840  # torchvision's alexnet, to the parameter
    assert data["split_tree"]["params"] == want["split"] == params
    assert round(data["reduction"]["params"], 3) == reduction
    assert data["input_size"] == 224
    assert data["dense"]["flops"] - data["split_tree"]["flops"] == want["fc_flops_saved"]


@pytest.mark.parametrize("args,fragment", [
    (["plan", "--arch", "vgg", "--split", "2", "--num-classes", "10"], "unknown arch 'vgg'"),
    (["plan", "--arch", "wrn-16-8", "--split", "2-3-2", "--num-classes", "10"], "invalid split '2-3-2'"),
    (["plan", "--arch", "wrn-16-8", "--split", "2-2", "--num-classes", "0"], "--num-classes"),
    (["plan", "--arch", "wrn-16-8", "--num-classes", "10"], "--split"),
    (["plan", "--arch", "alexnet", "--split", "2-2-2", "--num-classes", "10", "--input-size", "32"],
     "--input-size 32: alexnet takes images of at least 63 px"),
    (["prepare", "/nonexistent", "--out", "/tmp/x"], "/nonexistent"),
    (["run"], "config"),
    (["frobnicate"], "invalid choice"),
])
@pytest.mark.integration  # a subprocess run of the CLI
def test_bad_input_one_line_exit_2(args, fragment):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_grow_flags_become_the_grow_settings(tmp_path, monkeypatch):
    """``splitnet grow RUN_DIR NEW --replay K --calibrate C --init I key=value``: the flags reach the
    grown run's config as grow.replay / grow.calibrate / grow.init, after the overrides."""
    import shutil

    from pipelines import cli, grow
    from pipelines.rundir import RunDir

    parent = tmp_path / "run"
    (parent / "tree").mkdir(parents=True)
    (parent / "tree" / "manifest.yaml").write_text("{}")
    shutil.copy(ROOT / "pipelines/configs/demo.yaml", parent / "config.yaml")
    seen = {}
    monkeypatch.setattr(cli, "_pipeline", lambda out, name, verbose, job: seen.update(out=out) or 0)
    monkeypatch.setattr(grow, "grow_config", lambda rd, source, out, overrides: seen.update(overrides=overrides))
    argv = ["grow", str(parent), str(tmp_path / "new"), "--replay", "7", "--calibrate", "0", "--init", "fresh", "grow.epochs=2"]
    assert cli.main(argv) == 0
    assert seen == {"out": str(parent) + "-grown",
                    "overrides": ["grow.epochs=2", "grow.replay=7", "grow.calibrate=0", "grow.init=fresh"]}
    monkeypatch.undo()  # the real grow_config: the overrides make the grown run's config
    cfg = grow.grow_config(RunDir(str(parent)), str(tmp_path / "new"), str(tmp_path / "out"), seen["overrides"])
    assert (cfg.grow.replay, cfg.grow.calibrate, cfg.grow.init, cfg.grow.epochs) == (7, 0, "fresh", 2)
