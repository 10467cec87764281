"""The ImageNet-22K recipe rehearsed at its full class count on CPU (issue 6), as the README runs it:

    python -m pipelines.data.synthetic TARS --classes 21841 ...          (real WordNet wnids, JPEGs)
    splitnet prepare TARS --out WDS --format webdataset                  (21,841 per-synset tars)
    splitnet run pipelines/configs/imagenet22k-resnet50.yaml pipelines/configs/rehearsal-cpu.yaml data.source=WDS
    splitnet serve RUN_DIR ...

trimmed for CI (one image per class, a few steps per stage), against the session's Ray. Every
stage runs; ResNet-50 with its 2048 x 21,841 classifier is cut into 4 subtrees and served. The
direct WebDataset layout (shards as clusters hold them, with .json members) is read too.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import yaml

from conftest import ROOT
from rehearse import env as _env, post as _post, served, splitnet as _splitnet, vm_hwm_bytes as _vm_hwm_bytes

pytestmark = pytest.mark.integration  # real components: Ray, Ray Serve over HTTP, subprocess runs

CLASSES = 21841
IN22K = ROOT / "pipelines/configs/imagenet22k-resnet50.yaml"
REHEARSAL = ROOT / "pipelines/configs/rehearsal-cpu.yaml"
STAGES = ("prepare", "group", "cut", "finetune", "evaluate", "report")  # baseline: disabled in the recipe


@pytest.fixture(scope="module")
def rehearsal(ray_cluster, tmp_path_factory):
    """Generate 21,841 per-synset tars, prepare them into WebDataset shards, run the recipe
    (~4 min of the module's ~6 on 2 busy cores)."""
    from pipelines.data.synthetic import generate

    root = tmp_path_factory.mktemp("in22k")
    t0 = time.perf_counter()
    synth = generate(root / "tars", classes=CLASSES, per_class=1, size=48, layout="synset-tars", log=print)
    generate_s = time.perf_counter() - t0
    env = _env(ray_cluster)
    t0 = time.perf_counter()
    _splitnet("prepare", root / "tars", "--out", root / "wds", "--format", "webdataset", "--shard-size", 2000,
              env=env, timeout=900)
    prepare_s = time.perf_counter() - t0
    run_dir = root / "run"
    t0 = time.perf_counter()
    r = _splitnet("run", IN22K, REHEARSAL, f"data.source={root / 'wds'}", f"run_dir={run_dir}", env=env, timeout=2400)
    run_s = time.perf_counter() - t0
    (root / "run.log").write_text(r.stdout + r.stderr)
    print(f"\nrehearsal at {CLASSES} classes: generate {generate_s:.1f} s ({synth['files']} tars), "
          f"splitnet prepare {prepare_s:.1f} s, splitnet run {run_s:.1f} s")
    yield {"root": root, "run_dir": run_dir, "log": r.stdout + r.stderr, "synthetic": synth,
           "prepare": json.loads((root / "wds" / "prepare.json").read_text())}
    # ~1.5 GB of checkpoints and 21,841 small tars: keep the tree, the report and the logs only
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(root / "tars", ignore_errors=True)


def test_synthetic_tars_are_the_release_layout(rehearsal):
    from splitnet.wordnet import is_wnid, load_nouns

    tars = sorted((rehearsal["root"] / "tars").glob("n*.tar"))
    assert len(tars) == CLASSES and all(is_wnid(t.stem) for t in tars)
    nouns = load_nouns()
    assert all(t.stem in nouns for t in tars)  # real WordNet 3.0 noun synsets
    with tarfile.open(tars[123]) as tf:
        assert tf.getnames() == [f"{tars[123].stem}_0.JPEG"]
        assert tf.extractfile(tf.getmembers()[0]).read(3) == b"\xff\xd8\xff"
    prep = rehearsal["prepare"]
    assert (prep["images"], prep["classes"], prep["bad_records"], prep["layout"]) == (CLASSES, CLASSES, 0, "synset-tars")


def test_every_stage_ran_and_the_tree_has_every_class(rehearsal):
    from splitnet.wordnet import load_nouns

    run_dir = rehearsal["run_dir"]
    state = json.loads((run_dir / "state.json").read_text())
    assert {s for s, v in state["stages"].items() if v["status"] == "done"} == set(STAGES), state["stages"].keys()
    assert "reading the shards at" in rehearsal["log"]  # the prepared WebDataset shards, read as they are
    assert "[group] epoch 1/1" in rehearsal["log"] and "[finetune] epoch 1/1" in rehearsal["log"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: saved["model"][k] for k in ("arch", "split", "pretrained")} == {"arch": "resnet50", "split": "4-4", "pretrained": ""}
    assert saved["scaling"]["use_gpu"] is False
    assert state["stages"]["group"]["result"]["history"][0]["steps"] == saved["group"]["max_steps_per_epoch"]
    manifest = yaml.load((run_dir / "tree" / "manifest.yaml").read_text(), Loader=yaml.CSafeLoader)
    assert manifest["num_classes"] == CLASSES and len(manifest["subtrees"]) == 4 and manifest["split"] == "4-4"
    assert sorted(c for s in manifest["subtrees"] for c in s["classes"]) == list(range(CLASSES))
    assert all(len(s["classes"]) > 0 for s in manifest["subtrees"])
    # class names: the wnids, in the class table's order, each a WordNet noun whose lemma the table holds
    table = json.loads((rehearsal["root"] / "wds" / "classes.json").read_text())
    nouns = load_nouns()
    assert manifest["class_names"] == [row["name"] for row in table]
    assert all(row["lemma"] == nouns[row["name"]].lemma and row["parent"] in nouns for row in table)
    assert nouns[manifest["class_names"][0]].lemma == table[0]["lemma"]


def test_counts_are_what_splitnet_plan_says(rehearsal):
    manifest = yaml.load((rehearsal["run_dir"] / "tree" / "manifest.yaml").read_text(), Loader=yaml.CSafeLoader)
    counts = manifest["counts"]
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--arch", "resnet50", "--split", "4-4",
                        "--num-classes", str(CLASSES), "--input-size", str(manifest["input_size"]), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    # dense: exactly the same model; the classifier alone is 2048 x 21,841 + 21,841
    for key in ("weights", "params", "flops"):
        assert counts["dense"][key] == plan["dense"][key], key
    assert counts["dense"]["params"] > 2048 * CLASSES + 23_000_000
    # split: plan assumes balanced groups, the cut has the learned (near-balanced) ones
    for key in ("weights", "params"):
        assert abs(counts["split"][key] / plan["split_tree"][key] - 1) < 0.05, (key, counts["split"], plan["split_tree"])
    assert abs(counts["reduction"]["params"] - plan["reduction"]["params"]) < 0.05
    print(f"\ndense {counts['dense']['params'] / 1e6:.2f}M params, tree {counts['split']['params'] / 1e6:.2f}M "
          f"(plan, balanced: {plan['split_tree']['params'] / 1e6:.2f}M), reduction {counts['reduction']['params']:.1%}")


def test_report_scores_the_groups_against_wordnet_as_recomputed(rehearsal):
    """The report's semantic scores of the 4 groups over 21,841 classes (random data: no coherence to find)
    are what the tree's manifest and WordNet give when recomputed, and its check reads them."""
    from splitnet.metrics import semantic_quality
    from splitnet.wordnet import categories

    report = json.loads((rehearsal["run_dir"] / "report.json").read_text())
    sem = report["semantic"]
    manifest = yaml.load((rehearsal["run_dir"] / "tree" / "manifest.yaml").read_text(), Loader=yaml.CSafeLoader)
    again = semantic_quality(manifest["class_to_group"], categories(manifest["class_names"]))
    assert sem["vs_wordnet_category"] == pytest.approx(again)
    check = report["checks"]["semantic_groups"]
    assert check["ok"] == (again["nmi"] > again["random_nmi_mean"] + 3 * again["random_nmi_std"])
    assert sem["classes_with_parent"] == CLASSES and sem["num_groups"] == 4
    assert 0 < sem["purity"] <= 1 and 0 <= sem["nmi"] <= 1
    assert sem["random_purity_std"] >= 0 and 0 < sem["random_purity_mean"] < 1
    assert report["data"]["classes"] == CLASSES and len(report["subtrees"]) == 4
    # the coarse yardstick for 4 groups over 21,841 classes: WordNet's ~26 lexicographer files
    cat = sem["vs_wordnet_category"]
    assert cat["num_groups"] == 4 and 10 <= cat["num_superclasses"] <= 26 and 0 < cat["purity"] <= 1
    for key in ("grouped", "cut", "tree"):
        assert report["models"][key]["images"] > 0
    print(f"\ngroups vs WordNet parents: purity {sem['purity']:.4f} (random {sem['random_purity_mean']:.4f} ± "
          f"{sem['random_purity_std']:.4f}), NMI {sem['nmi']:.4f} (random {sem['random_nmi_mean']:.4f} ± "
          f"{sem['random_nmi_std']:.4f})")


def test_splitnet_serve_answers_with_wnids(rehearsal, ray_cluster):
    from ray.util.state import list_actors

    from splitnet.wordnet import is_wnid

    with served(ray_cluster, rehearsal["run_dir"], "in22k") as url:
        with tarfile.open(sorted((rehearsal["root"] / "tars").glob("n*.tar"))[7]) as tf:
            jpeg = tf.extractfile(tf.getmembers()[0]).read()
        status, answer = _post(f"{url}/predict?top_k=5", jpeg)
        assert status == 200, answer
        top = answer["predictions"][0]["top_k"]
        assert len(top) == 5 and all(is_wnid(p["name"]) for p in top)
        assert answer["subtrees_called"] == [f"subtree-{g}" for g in range(4)] and answer["scored_classes"] == CLASSES
        manifest = yaml.load((rehearsal["run_dir"] / "tree" / "manifest.yaml").read_text(), Loader=yaml.CSafeLoader)
        owned = manifest["subtrees"][2]["classes"][:2]  # a narrower question: only their subtree runs
        names = ",".join(manifest["class_names"][c] for c in owned)
        status, answer = _post(f"{url}/predict?classes={names}", jpeg)
        assert status == 200 and answer["subtrees_called"] == ["subtree-2"], answer
        assert {p["name"] for p in answer["predictions"][0]["top_k"]} == set(names.split(","))
        replicas = {}
        for g in range(4):
            actors = list_actors(address=ray_cluster.get_runtime_context().gcs_address,
                                 filters=[("class_name", "=", f"ServeReplica:in22k:subtree-{g}"), ("state", "=", "ALIVE")])
            assert len(actors) == 1, actors
            replicas[g] = _vm_hwm_bytes(actors[0].pid)
        files = {s["index"]: s["file_bytes"] for s in manifest["subtrees"]}
        for g, peak in replicas.items():
            assert files[g] < peak < 3 * 2**30, (g, peak)
        print("\nsubtree replica peak RSS (VmHWM): " + ", ".join(
            f"subtree-{g} {peak / 2**20:.0f} MiB (weights {files[g] / 2**20:.0f} MiB)" for g, peak in replicas.items()))


def test_a_direct_webdataset_source_is_read_as_it_is(ray_cluster, tmp_path, monkeypatch):
    """Shards as clusters hold them (train-*.tar with .jpg/.cls/.json, classes.json): the run's
    prepare stage takes them as they are, and the stream decodes them with their labels."""
    import numpy as np

    from pipelines.config import load_config
    from pipelines.data.records import DecodeConfig
    from pipelines.data.stream import read_dataset
    from pipelines.data.synthetic import generate
    from pipelines.run import run

    monkeypatch.setenv("SPLITNET_PROGRESS", "0")
    wds = tmp_path / "wds"
    generate(wds, classes=CLASSES, per_class=1, size=48, layout="webdataset", shard_size=4000, log=print)
    cfg = load_config(IN22K, [f"data.source={wds}", f"run_dir={tmp_path / 'run'}"], overlays=[REHEARSAL])
    lines: list[str] = []
    run(cfg, log=lines.append, stop_after="baseline")  # prepare, then the (disabled) baseline
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    data = state["stages"]["prepare"]["result"]["data"]
    assert data["shards"] == str(wds) and len(data["class_names"]) == CLASSES
    assert abs(data["train_records"] - CLASSES * (1 - cfg.data.val_fraction)) <= 1
    assert any(f"reading the shards at {wds}" in line for line in lines)
    ds = read_dataset(str(wds), split="train", subset="val", val_fraction=cfg.data.val_fraction,
                      decode=DecodeConfig(image_size=cfg.data.image_size, train=False, num_classes=CLASSES),
                      shuffle_files=False, num_cpus=0.25, log_name=None)
    batch = ds.take_batch(64)
    size = cfg.data.image_size
    assert batch["image"].shape == (64, size, size, 3) and batch["image"].dtype == np.uint8
    assert ((0 <= batch["label"]) & (batch["label"] < CLASSES)).all() and len(set(batch["label"].tolist())) == 64
