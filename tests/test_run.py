"""``splitnet run``: the staged Ray Train pipeline end to end, on a slice of real CIFAR-100 and a
tiny WRN — a worker killed mid-stage, the driver interrupted and re-run, a 2-node cluster, the
way users run it. (``ray job submit`` against a ``ray start`` cluster: the ILSVRC-2012 rehearsal,
tests/test_rehearsal_ilsvrc.py, launches its run that way.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import CIFAR, ROOT
from rehearse import wait_for
from pipelines.config import load_config

pytestmark = pytest.mark.integration  # real components: Ray clusters, whole pipelines, subprocess runs of the CLI

FAST_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "SPLITNET_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    from datagen import make_cifar_slice

    return make_cifar_slice(CIFAR, tmp_path_factory.mktemp("cifar") / "cifar100", train=640, test=200)


def tiny(run_dir, source, **extra) -> list[str]:
    """Overrides for a few-step run of a tiny WRN (stage epochs as given in ``extra``)."""
    values = {
        "run_dir": str(run_dir), "data.source": str(source), "data.shard_size": 160,
        "model.arch": "wrn-10-1", "model.split": "2-2-2",
        "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.25, "scaling.torch_threads": 1,
        "baseline.epochs": 1, "group.epochs": 2, "finetune.epochs": 1,
        "evaluate.max_batches": 2,
        "control.enabled": "false",  # one Ray Train stage less; the killed-worker test runs it
    }
    for stage in ("baseline", "group", "finetune"):
        values[f"{stage}.batch_size"] = 32
        values[f"{stage}.max_steps_per_epoch"] = 4
        values[f"{stage}.lr"] = 0.05
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def _checkpoints(run_dir: Path, stage: str) -> list[str]:
    """Checkpoints Ray Train has registered for ``stage`` (a folder on disk alone may not be yet)."""
    snapshot = run_dir / "checkpoints" / stage / "checkpoint_manager_snapshot.json"
    try:
        return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def _train_worker_pids() -> list[int]:
    """PIDs of the Ray Train workers of this session's cluster (descendants of its raylet, from /proc)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    parent, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue

    def under_raylet(pid: int) -> bool:
        while pid > 1:
            if pid == raylet:
                return True
            pid = parent.get(pid, 0)
        return False

    return sorted(pid for pid, c in cmd.items() if "RayTrainWorker" in c and under_raylet(pid))


def _assert_complete_run(run_dir: Path, class_start: str | None = "baseline") -> dict:
    """Every stage the config has ran and wrote its outputs. ``class_start``: which classifier the
    class groups came from (``group.assign: derived``, the default), which the report describes
    (``baseline``: the demo's; ``warm-up``: a grouping from scratch; None: learned from a random init)."""
    from splitnet.artifacts import load_tree

    state = json.loads((run_dir / "state.json").read_text())
    stages = ("prepare", "baseline", "group", "cut", "finetune", "control", "evaluate", "report")
    assert [s for s in stages if state["stages"].get(s, {}).get("status") == "done"] == \
        [s for s in stages if s in state["stages"]]
    report = json.loads((run_dir / "report.json").read_text())
    tree = load_tree(run_dir / "tree")
    # the demo's 20 classes: the CIFAR-100 classes of its four superclasses, relabelled 0..19
    assert tree.num_classes == 20 and len(tree.subtrees) == 2
    assert {"dolphin", "lion", "bus", "tank"} <= set(tree.info["class_names"])
    # wrn-10-1 2-2-2 on 20 classes: ~28% fewer parameters (the trunk's share is larger than in WRN-16-2)
    assert report["reduction"]["params"] > 0.25 and report["models"]["tree"]["params"] < report["models"]["grouped"]["params"]
    for key in ("grouped", "cut", "tree"):
        assert 0 <= report["models"][key]["top1"] <= 1 and report["models"][key]["images"] > 0
    assert report["semantic"]["num_groups"] == 2 and 0 <= report["semantic"]["purity"] <= 1
    if class_start:  # the class groups started from a classifier; the report says which and how far they moved
        start = report["semantic"]["start"]
        assert (start["assign"], start["from"]) == ("derived", class_start)
        assert start["classes_moved"] == 0 and 0 <= start["nmi"] <= 1  # derived: the classes are the classifier's split
        # the off-block energy the derived groups left in every split layer, before the proximal step emptied it
        assert set(start["fixed_off_block"]) == set(report["cut"]["off_block_energy"])
        assert all(0 <= v < 1 for v in start["fixed_off_block"].values())
        where = {"baseline": "the dense baseline's classifier", "warm-up": "the classifier the warm-up trained"}
        assert f"They are the similarity split of {where[class_start]} (group.assign: derived" in \
            (run_dir / "report.md").read_text()
    else:
        assert "start" not in report["semantic"]
    md = (run_dir / "report.md").read_text()
    assert "| tree finetuned" in md and "Reduction of the tree" in md and "NMI" in md and "## Checks" in md
    # the method's own verdict: what the cut dropped, per split layer, and the grouping epoch by epoch
    energy = report["cut"]["off_block_energy"]
    assert set(energy) >= {"fc"} and all(0 <= v <= 1 for v in energy.values())
    assert {"off_block_energy", "cut_cost", "semantic_groups", "balanced_groups"} <= set(report["checks"])
    assert "## Grouping, epoch by epoch" in md and "off-block" in md
    # every grouping epoch measured each learned set's smallest group (a collapse is said then, not at the cut)
    history = state["stages"]["group"]["result"]["history"]
    assert all(len(h["group_shares"]) >= 4 and all(0 <= v <= 1 for v in h["group_shares"].values()) for h in history)
    for pic in report["pictures"].values():
        assert (run_dir / pic).stat().st_size > 1000
    assert (run_dir / "bad_records.jsonl").exists() and (run_dir / "config.yaml").exists()
    assert (run_dir / "cut" / "manifest.yaml").exists() and (run_dir / "group" / "model.safetensors").exists()
    return state


def _collapse_said_before_the_cut(run_dir: Path, output: str) -> None:
    """Where the cut had to move members into a group (these tiny runs often collapse a channel
    set), the grouping had said so in a warning line before the cut ran."""
    moves = json.loads((run_dir / "report.json").read_text())["cut"]["moves"]
    if moves:
        assert "groups collapsing" in output.split("[cut]")[0], output[-3000:]


def test_pipeline_end_to_end_survives_a_killed_worker(ray_cluster, tiny_cifar, tmp_path, monkeypatch):
    from pipelines.run import run

    monkeypatch.chdir(tmp_path)  # a relative run_dir, as in the shipped configs: workers run elsewhere
    run_dir = tmp_path / "run"
    # with the control (the dense model of the tree's budget) and the tree distilled from its grouped parent
    cfg = load_config(ROOT / "pipelines/configs/demo.yaml", tiny("run", tiny_cifar, group__epochs=3, control__enabled="true",
                                                                finetune__distill="grouped"))
    logs: list[str] = []
    outcome: dict = {}

    def target():
        try:
            outcome["report"] = run(cfg, log=logs.append)
        except BaseException as e:  # surfaced below
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    # the first grouping checkpoint (end of epoch 1): kill a worker while epoch 2 runs
    wait_for(lambda: _checkpoints(run_dir, "group"), "a grouping checkpoint", alive=thread.is_alive)
    pids = _train_worker_pids()
    assert pids, "no Ray Train worker found"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish"
    assert "error" not in outcome, repr(outcome.get("error"))
    state = _assert_complete_run(run_dir)
    group = state["stages"]["group"]["result"]
    # restarted from the checkpoint of epoch 1 (or later), not from scratch; epochs not repeated
    assert group["resumed"] and group["resumed"][0]["epoch"] >= 1, group["resumed"]
    assert [h["epoch"] for h in group["history"]] == [1, 2, 3]
    # derived groups (the default, from the baseline: no warm-up): every epoch sparsifies, measured
    assert all(h["phase"] == "sparsify" and "off_block_energy" in h for h in group["history"])
    assert len({w["rank"] for w in group["workers"]}) == 2
    assert not state["stages"]["baseline"]["result"]["resumed"]
    assert any(line.startswith("done in") for line in logs)
    _collapse_said_before_the_cut(run_dir, "\n".join(logs))
    # small images: decoded once for the whole run, the workers augment (data.cache, the default)
    assert sum("decoded once into Ray's object store" in line for line in logs) == 1
    # the finetuned tree learned from its grouped parent's soft targets as well as the labels
    assert any(line.startswith("[finetune] distilling from the grouped model: T 4, weight 0.5") for line in logs)
    # the control: from the baseline's weights, the group's 3 epochs then the finetune's 1, on the tree's own
    # learning-rate curve; the report's accuracy check is against it, at the same budget (1 + 3 + 1 = 5 epochs)
    control = state["stages"]["control"]["result"]["history"]
    tree_epochs = state["stages"]["group"]["result"]["history"] + state["stages"]["finetune"]["result"]["history"]
    assert [h["epoch"] for h in control] == [1, 2, 3, 4]
    assert [h["lr"] for h in control] == pytest.approx([h["lr"] for h in tree_epochs])
    report = json.loads((run_dir / "report.json").read_text())
    check = report["checks"]["tree_vs_dense"]
    assert check["equal_budget"] and check["ok"] is not None
    assert check["value"] == pytest.approx(report["models"]["tree"]["top1"] - report["models"]["control"]["top1"])
    assert "the same budget (1 + 3 + 1 = 5 epochs)" in check["what"]
    assert "| dense, the tree's budget (1 + 3 + 1 = 5 epochs) |" in (run_dir / "report.md").read_text()

    # a re-run of a finished run skips every stage and changes nothing
    before = (run_dir / "tree" / "manifest.yaml").read_bytes()
    logs.clear()
    run(cfg, log=logs.append)
    assert sum("done earlier, skipped" in line for line in logs) >= 5
    assert (run_dir / "tree" / "manifest.yaml").read_bytes() == before
    # and another config in the same run dir is refused with the keys named
    from pipelines.run import PipelineError

    other = load_config(ROOT / "pipelines/configs/demo.yaml", tiny("run", tiny_cifar, group__epochs=4))
    with pytest.raises(PipelineError, match="group.epochs"):
        run(other, log=logs.append)


def _cli_env(**extra) -> dict:
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}
    return env


def test_interrupted_driver_resumes_on_rerun_and_prints_its_own_lines_only(ray_cluster, tiny_cifar, tmp_path):
    """Ctrl-C during grouping, then the same command again: the finished stage (prepare) is not
    redone and the interrupted one continues from its last checkpoint. (No baseline: one Ray Train
    start-up less; the in-process re-run of the killed-worker test skips finished training stages.)
    The grouping from scratch derives its groups from the classifier and weights its warm-up trained
    (``group.assign: derived``, at step 3 of 12, in both workers from rank 0's): where the classes
    started and the derived thresholds survive the interruption, and the report says where.

    The resumed run is also what a user sees from a successful `splitnet run`: a header, one line
    per epoch per stage (rank 0 only), progress statuses inside an epoch, the stage lines and the
    verdict; Ray's own output (Train's TrainingReport lines, Data's deprecation warnings,
    core-worker errors, background tracebacks) is in RUN_DIR/logs."""
    import re

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "pipelines/configs/demo.yaml"),
            *tiny(run_dir, tiny_cifar, group__epochs=3, baseline__enabled="false", group__init="scratch",
                  group__warmup=0.25)]
    env = _cli_env(RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _checkpoints(run_dir, "group"), "a grouping checkpoint", alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["prepare"]["status"] == "done" and "group" not in state["stages"]
    assert "parquet shards" in (tmp_path / "first.log").read_text()
    # the same command again, with the defaults a user has: no Ray Data progress bars either, and
    # rank 0's progress inside an epoch every 0.2 s here (30 s by default to a log like this one)
    env = {**env, "SPLITNET_PROGRESS_EVERY_S": "0.2"}
    env.pop("SPLITNET_PROGRESS")
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "parquet shards" not in out  # the shards of the first run are read, not written again
    assert "[group] resuming from the checkpoint at epoch" in out
    state = _assert_complete_run(run_dir, class_start="warm-up")
    group = state["stages"]["group"]["result"]
    resumed = group["resumed"][0]["epoch"]
    assert resumed >= 1
    assert sorted(set(group["class_start"])) == [0, 1] and len(group["class_start"]) == 20
    assert [h["epoch"] for h in state["stages"]["group"]["result"]["history"]] == [1, 2, 3]
    assert "| phase sparsify | off-block" in out  # the progress lines reach the driver
    # derived once, at step 3, before the interrupt: every later checkpoint carries the same groups' start and thresholds
    saved = [json.loads(p.read_text()).get("grouping") or {} for p in (run_dir / "checkpoints" / "group").glob("*/progress.json")]
    derived = [g for g in saved if g.get("derived_at") is not None]
    assert derived and {g["derived_at"] for g in derived} == {3} and all(g["peaks"] == derived[0]["peaks"] for g in derived)
    _collapse_said_before_the_cut(run_dir, (tmp_path / "first.log").read_text() + out)

    # only its own lines
    for noise in ("Traceback", "Warning", "TrainingReport(", "RayTrainWorker", "core_worker", "(pid=", "Running Dataset"):
        assert noise not in out, f"{noise!r} in the output of a successful run:\n{out[-4000:]}"
    assert second.stderr == "", second.stderr[-2000:]
    lines = second.stdout.splitlines()
    epochs = [line.split(" | ")[0] for line in lines if re.match(r"\[(baseline|group|finetune)\] epoch \d+/\d+ ", line)]
    assert epochs == [f"[group] epoch {e}/3" for e in range(resumed + 1, 4)] + ["[finetune] epoch 1/1"], epochs
    assert lines[0].startswith("splitnet run") and f"Ray's output: {run_dir / 'logs'}" in lines[0], lines[0]
    # a resumed run says so, then which precision the workers compute in, and why (the tests force "no native bf16")
    assert lines[1] == f"run dir {run_dir}: resuming; finished stages prepare are skipped", lines[1]
    assert lines[2] == "precision fp32: auto, SPLITNET_NATIVE_BF16=0", lines[2]
    statuses = [line for line in lines if re.match(r"\[(group|finetune)\] epoch \d+/\d+: ", line)]
    assert statuses, "no progress status inside an epoch"
    for line in statuses:
        assert re.match(r"\[(group|finetune)\] epoch \d/\d: step \d+/\d+( \||$)", line), line
    assert any(line.startswith("done in") and "Checks:" in line for line in lines) and lines[-1].startswith("report:")
    group_line = next(line for line in lines if line.startswith("[group] epoch 3/3 |"))
    assert "off-block" in group_line and "img/s" in group_line
    assert (run_dir / "logs" / "driver.log").stat().st_size > 0 and (run_dir / "logs" / "ray").is_symlink()


MULTINODE = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from pipelines.config import load_config
from pipelines.run import run


cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2
cfg = load_config(sys.argv[1], sys.argv[2:])
run(cfg, stop_after="group")  # placement is the same code for every training stage
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_cluster_spreads_the_workers(tiny_cifar, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-c", MULTINODE, str(ROOT / "pipelines/configs/demo.yaml"),
            *tiny(run_dir, tiny_cifar, baseline__enabled="false", group__init="scratch", group__assign_init="random",
                  group__assign="learned", group__assignment_lr_mult=1000,  # the paper's learned assignments
                  group__epochs=1, scaling__placement_strategy="STRICT_SPREAD",
                  data__cache="false",  # decode actors stream every epoch, as large images do on clusters
                  scaling__compile="true")]  # the DDP forward compiled in each worker, gradients over gloo between nodes
    r = subprocess.run(args, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch.compile failed" not in r.stdout and "[group] epoch 1/1 |" in r.stdout, r.stdout[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    workers = state["stages"]["group"]["result"]["workers"]
    assert state["stages"]["group"]["status"] == "done" and len({w["node_id"] for w in workers}) == 2, workers
    assert len({w["rank"] for w in workers}) == 2
    assert "decoded once" not in r.stdout  # data.cache=false: nothing held in the object store


def test_gpu_request_without_gpus_fails_fast_with_a_clear_line(ray_cluster, tiny_cifar, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "pipelines/configs/demo.yaml"),
                        *tiny(tmp_path / "run", tiny_cifar, scaling__use_gpu="true")],
                       cwd=ROOT, env=_cli_env(RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("splitnet: error: scaling.use_gpu:") and "the cluster has 0" in last and "use_gpu=false" in last


def test_a_split_with_more_class_groups_than_classes_is_refused_before_training(ray_cluster, tiny_cifar, tmp_path):
    """5 classes (one superclass) into a 2-2-8 split: one line after prepare, exit 2, nothing trained."""
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "pipelines/configs/demo.yaml"),
                        *tiny(tmp_path / "run", tiny_cifar, model__split="2-2-8", data__classes="[vehicles_1]")],
                       cwd=ROOT, env=_cli_env(RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "splitnet: error: model.split: 2-2-8 puts the classes into 8 groups of at least 1 (cut.min_classes_per_group), "
        "but the data has 5 classes; choose a split with at most 5 groups at its last level, or more classes")
    assert (tmp_path / "run" / "shards").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_missing_source_is_one_line_before_ray_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(ROOT / "pipelines/configs/demo.yaml"),
                        f"data.source={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"splitnet: error: data.source: {tmp_path / 'nope'}: no such folder "
                                             "(set data.source, or data.download=true to fetch CIFAR-100 with "
                                             "torchvision when online)"]


def test_download_fallback_writes_the_npz_layout(tmp_path, monkeypatch):
    """Users online without a copy: torchvision's downloader (faked here: these machines are
    offline), then the same .npz layout as the shared copy, readable without pickle."""
    import numpy as np
    import torchvision.datasets

    from pipelines.data.sources import download_cifar, list_source

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            assert download
            n = 30 if train else 10
            self.data = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 100 for i in range(n)]
            self.classes = [f"class{i}" for i in range(100)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    lines = []
    download_cifar(str(tmp_path / "cifar"), lines.append)
    src = list_source(tmp_path / "cifar")
    assert src.kind == "cifar100" and len(src.items["train"]) == 30 and len(src.items["test"]) == 10
    assert src.classes[:2] == ["class0", "class1"] and src.parents[0].startswith("superclass-")
    with np.load(tmp_path / "cifar" / "train.npz", allow_pickle=False) as d:
        assert d["x"].shape == (30, 32, 32, 3)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_record_count_from_prepare_markers_or_the_shards(ray_cluster, tmp_path, fmt):
    """Steps per epoch come from the record count: prepare's per-shard markers when present (no
    shard read), else the shards themselves (user-made shards) — the same number either way."""
    from datagen import MAX_PIXELS, make_imagefolder

    from pipelines.data.prepare import prepare
    from pipelines.data.stream import count_records

    make_imagefolder(tmp_path / "src", per_class=5, with_bad=True)
    out = tmp_path / "shards"
    summary = prepare(str(tmp_path / "src"), str(out), fmt=fmt, shard_size=4, max_pixels=MAX_PIXELS, log=lambda _: None)
    from_markers = count_records(str(out), "train")
    assert from_markers == summary["images"] > 0
    for marker in out.glob("*.done.json"):
        marker.unlink()
    assert count_records(str(out), "train") == from_markers
