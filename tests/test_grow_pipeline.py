"""``splitnet grow``: a finished run's tree grown by new classes on Ray Train, as users run it (issue 29)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CIFAR, ROOT
from test_run import FAST_ENV, tiny

pytestmark = pytest.mark.integration  # a Ray cluster, whole pipelines, subprocess runs of the CLI

GROW = ["data.eval_split=", "data.val_fraction=0.25", "grow.epochs=2", "grow.batch_size=16", "grow.max_steps_per_epoch=3",
        "grow.lr=0.05", "scaling.num_workers=2"]


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def parent_run(ray_cluster, tmp_path_factory):
    """A finished tiny run (CIFAR-100 slice, WRN-10-1 2-2-2) to grow."""
    from datagen import make_cifar_slice

    from pipelines.config import load_config
    from pipelines.run import run

    tmp = tmp_path_factory.mktemp("parent")
    source = make_cifar_slice(CIFAR, tmp / "cifar100", train=640, test=200)
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml",  # no baseline stage: one Ray Train stage less
                      tiny(tmp / "run", source, baseline__enabled="false", group__init="scratch", group__warmup=0.25))
    run(cfg, log=lambda line: None)
    return tmp / "run"


@pytest.fixture(scope="module")
def new_source(tmp_path_factory):
    from datagen import make_imagefolder

    import shutil

    root = tmp_path_factory.mktemp("new") / "images"
    make_imagefolder(root, per_class=16, with_bad=False)  # ImageNet synsets CIFAR-100 does not have
    for extra in sorted(p for p in root.iterdir() if p.name != "n01440764"):
        shutil.rmtree(extra)  # one class: a tree grows by as few as one (a training source needs two)
    return root


def test_grow_adds_a_subtree_and_leaves_the_parent_as_it_was(parent_run, new_source, tmp_path, monkeypatch):
    from pipelines.grow import grow_run
    from splitnet.artifacts import load_tree, read_manifest, sha256_file

    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    before = _files(parent_run)
    lines = []
    result = grow_run(str(parent_run), str(new_source), str(tmp_path / "grown"), GROW + ["grow.replay=2"],
                      log=lines.append)
    assert _files(parent_run) == before  # nothing in the parent run dir was written
    tree_dir = tmp_path / "grown" / "tree"
    m, parent_m = read_manifest(tree_dir), read_manifest(parent_run / "tree")
    assert m["parent"] == {"tree": str(parent_run / "tree"), "manifest_sha256": sha256_file(parent_run / "tree" / "manifest.yaml")}
    assert m["added_classes"] == ["n01440764"] == result["added_classes"]
    assert m["class_names"] == parent_m["class_names"] + m["added_classes"] and len(m["subtrees"]) == 3
    for old, new in zip([parent_m["trunk"], *parent_m["subtrees"]], [m["trunk"], *m["subtrees"][:2]]):
        assert new["sha256"] == old["sha256"] == sha256_file(tree_dir / new["file"])  # byte for byte
    x = torch.randn(4, 3, 32, 32)
    grown, parent = load_tree(tree_dir), load_tree(parent_run / "tree")
    assert torch.equal(grown(x)[:, :parent_m["num_classes"]], parent(x))  # the old classes' logits, bit for bit
    # the stage trained against the replay and the new images, epoch by epoch, and said what it did
    state = json.loads((tmp_path / "grown" / "state.json").read_text())
    history = state["stages"]["grow"]["result"]["history"]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["steps"] == 3 for h in history)
    assert state["grow_plan"]["like"] == result["like"] in (0, 1)
    metrics = json.loads((tmp_path / "grown" / "grow.json").read_text())["metrics"]
    assert set(metrics) == {"old", "old_before", "new", "all", "images"} and 0 < metrics["images"]["new"] < 16
    assert any("[grow] 1 class added as subtree 2" in line for line in lines)
    # the new logits were calibrated on held-out images of every class, recorded in the run and the manifest
    fit = state["stages"]["calibrate"]["result"]
    assert fit["scale"] > 0 and fit["loss_after"] <= fit["loss_before"] and fit == result["calibration"]
    assert m["grown"][0]["calibration"]["shift"] == fit["shift"]
    assert any("[grow] calibrated the new logits on" in line for line in lines)
    samples = state["grow_plan"]["samples"]  # every class with an image left after the replay, and the new one
    assert set(samples) == {"replay", "calibrate_old", "calibrate_new"} and list(samples["calibrate_new"]) == ["0"]
    assert fit["classes"] == len(samples["calibrate_old"]) + 1 and len(samples["calibrate_old"]) >= parent_m["num_classes"] - 2
    # re-running the command resumes: nothing trains again, the same tree is there
    lines.clear()
    again = grow_run(str(parent_run), str(new_source), str(tmp_path / "grown"), GROW + ["grow.replay=2"], log=lines.append)
    assert any("[grow] done earlier, skipped" in line for line in lines)
    assert again == json.loads((tmp_path / "grown" / "grow.json").read_text())
    assert read_manifest(tree_dir)["subtrees"][2]["sha256"] == m["subtrees"][2]["sha256"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "grow", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_refused_inputs_are_one_line_exit_2(parent_run, tmp_path, ray_cluster):
    import os

    from datagen import jpeg

    env = {**os.environ, **FAST_ENV, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    before = _files(parent_run)
    (tmp_path / "empty-run").mkdir()
    from splitnet.artifacts import read_manifest

    taken = read_manifest(parent_run / "tree")["class_names"][0]  # a class the tree has
    for name in (taken, "n09999999"):  # one new class, one the tree has
        (tmp_path / "clash" / name).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "clash" / name / f"{i}.jpg").write_bytes(jpeg(seed=i))
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    cases = [((str(tmp_path / "empty-run"), str(tmp_path / "clash")), "no tree in it"),
             ((str(parent_run), str(tmp_path / "nothing"), "--out", str(tmp_path / "g1"), *GROW), "empty class folder"),
             ((str(parent_run), str(tmp_path / "clash"), "--out", str(tmp_path / "g2"), *GROW),
              f"class {taken!r} is already in the tree")]
    for args, expected in cases:
        r = _cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        errors = [line for line in r.stderr.strip().splitlines() if line.startswith("splitnet: error:")]
        assert len(errors) == 1 and expected in errors[0], r.stderr[-1500:]
    assert _files(parent_run) == before
