"""splitnet.grow: a cut tree grown by new classes, the old parts frozen bit for bit (issue 29)."""
from pathlib import Path

import pytest
import torch

from conftest import randomize
from splitnet import build_model, cut
from splitnet.accounting import model_cost
from splitnet.artifacts import ArtifactError, load_subtree, load_tree, read_manifest, sha256_file
from splitnet.grow import (GrowingTree, calibrate, calibration_logits, fit_calibration, fold_calibration, grow,
                           most_similar, save_grown, sibling_affinity)
from splitnet.regularizers import parameter_groups
from splitnet.train import train_one_epoch

NAMES = [f"old{i}" for i in range(8)]


def _saved_tree(tmp_path: Path, split: str = "2-2-2") -> Path:
    torch.manual_seed(0)
    model = randomize(build_model("wrn-10-1", 8, split)).eval()
    cut(model, info={"class_names": NAMES}).save(tmp_path / "tree", input_size=16, dense_cost=model_cost(model, 16))
    return tmp_path / "tree"


def _batches(labels, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(len(labels), 3, 16, 16, generator=g), torch.tensor(labels)) for _ in range(n)]


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("split", ["2-2-2", "1-2-4"])
def test_training_the_new_subtree_leaves_every_old_weight_and_logit_as_it_was(tmp_path, split):
    tree = load_tree(_saved_tree(tmp_path, split))
    x = torch.randn(5, 3, 16, 16)
    before_logits = tree(x)
    before = {"trunk": _state(tree.trunk), **{f"subtree-{g}": _state(s) for g, s in enumerate(tree.subtrees)}}
    grown = grow(tree, ["new0", "new1", "new2"], like=0)
    new_before = _state(grown.subtrees[-1])
    model = GrowingTree(grown)
    opt = torch.optim.SGD(parameter_groups(model.new, 0.1, 5e-4), lr=0.1, momentum=0.9)
    train_one_epoch(model, _batches([8, 9, 10, 0, 5]), opt)  # new images and a replayed old one
    after = {"trunk": _state(grown.trunk), **{f"subtree-{g}": _state(s) for g, s in enumerate(grown.subtrees[:-1])}}
    for part, state in before.items():  # weights and BatchNorm statistics, bit for bit
        for key, value in state.items():
            assert torch.equal(after[part][key], value), f"{part}.{key} moved"
    assert any(not torch.equal(v, new_before[k]) for k, v in _state(grown.subtrees[-1]).items())
    grown.eval()
    logits = grown(x)
    assert logits.shape == (5, 11)
    assert torch.equal(logits[:, :8], before_logits)  # the old subtrees' logits, unchanged
    assert torch.equal(model.eval()(x), logits)  # the training view answers as the tree does


def test_a_grown_tree_saves_its_lineage_copies_the_old_files_and_loads_back(tmp_path):
    parent = _saved_tree(tmp_path)
    parent_files = {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in parent.iterdir()}
    tree = load_tree(parent)
    grown = grow(tree, ["new0", "new1"], like=1, init="fresh")
    GrowingTree(grown)  # freezes; nothing trained: the file layout is what is tested
    save_grown(grown, parent, tmp_path / "grown")
    m = read_manifest(tmp_path / "grown")
    assert m["parent"] == {"tree": str(parent.resolve()), "manifest_sha256": parent_files["manifest.yaml"][0]}
    assert m["added_classes"] == ["new0", "new1"] and m["class_names"] == NAMES + ["new0", "new1"]
    assert (m["num_classes"], m["base_classes"]) == (10, 8)
    assert m["grown"] == [{"subtree": 2, "like": 1, "init": "fresh", "leaf_classes": [[8, 9]]}]
    assert m["class_to_group"][8:] == [2, 2] and m["groups"][2] == {"group": 2, "subtree": 2, "classes": [8, 9]}
    for entry in [m["trunk"], *m["subtrees"][:2]]:  # byte for byte the parent's
        assert sha256_file(tmp_path / "grown" / entry["file"]) == entry["sha256"] == parent_files[entry["file"]][0]
    assert {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in parent.iterdir()} == parent_files  # untouched
    x = torch.randn(4, 3, 16, 16)
    loaded = load_tree(tmp_path / "grown")
    assert torch.equal(loaded(x), grown.eval()(x))
    sub, entry = load_subtree(tmp_path / "grown", 2)  # what the new subtree's serving replica loads
    assert entry["classes"] == [8, 9] and torch.equal(sub(loaded.trunk(x)), loaded(x)[:, 8:])


def test_a_grown_tree_grows_again(tmp_path):
    first = grow(load_tree(_saved_tree(tmp_path, "1-2-4")), ["a0", "a1", "a2"], like=0)
    save_grown(first, tmp_path / "tree", tmp_path / "g1")
    second = grow(load_tree(tmp_path / "g1"), ["b0", "b1"], like=2)  # shaped as the first grown subtree
    save_grown(second, tmp_path / "g1", tmp_path / "g2")
    m = read_manifest(tmp_path / "g2")
    assert [e["subtree"] for e in m["grown"]] == [2, 3] and m["added_classes"] == ["b0", "b1"]
    assert m["parent"]["tree"] == str((tmp_path / "g1").resolve())
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(load_tree(tmp_path / "g2")(x), second.eval()(x))


def test_refused_growth(tmp_path):
    tree = load_tree(_saved_tree(tmp_path, "1-2-4"))
    with pytest.raises(ValueError, match="'old3' is already in the tree"):
        grow(tree, ["new", "old3"], like=0)
    with pytest.raises(ValueError, match="subtree 5 does not exist"):
        grow(tree, ["new"], like=5)
    with pytest.raises(ValueError, match="cannot fill the 2 leaves"):
        grow(tree, ["only"], like=0)
    with pytest.raises(ValueError, match="distinct names"):
        grow(tree, ["x", "x"], like=0)
    with pytest.raises(ValueError, match="init 'zeros'"):
        grow(tree, ["x", "y"], like=0, init="zeros")


def test_a_modified_parent_file_is_not_copied(tmp_path):
    parent = _saved_tree(tmp_path)
    grown = grow(load_tree(parent), ["new0"], like=0)
    with open(parent / "subtree-1.safetensors", "r+b") as f:  # after loading: the copy must notice
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(ArtifactError, match="subtree-1.safetensors: SHA-256 differs"):
        save_grown(grown, parent, tmp_path / "grown")


def test_the_most_similar_sibling_is_the_one_the_new_images_are_taken_for(tmp_path):
    tree = load_tree(_saved_tree(tmp_path))
    batches = _batches([0, 1, 2, 3])
    affinity = sibling_affinity(tree, batches)
    assert sum(affinity) == pytest.approx(1.0) and len(affinity) == 2
    assert most_similar(tree, batches) == max(range(2), key=affinity.__getitem__)
    with torch.no_grad():  # make subtree 1's classes win every image: it becomes the most similar
        for leaf_fc in [tree.subtrees[1].fc]:
            leaf_fc.bias.add_(50.0)
    assert most_similar(tree, batches) == 1 and sibling_affinity(tree, batches)[1] > 0.99


def _planted(n_per_class=200, old=6, new=3, scale=0.5, shift=-2.0, seed=0) -> dict:
    """Logits of a calibrated model (the labels drawn from its softmax), then the new ones distorted:
    ``z_new = (true - shift) / scale``; the fit must find (scale, shift) back."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(old + new).repeat_interleave(n_per_class)
    true = torch.randn(len(labels), old + new, generator=g) * 2.0
    true[torch.arange(len(labels)), labels] += 3.0
    labels = torch.multinomial(true.softmax(1), 1, generator=g)[:, 0]  # a calibrated model's labels
    old_logits, new_logits = true[:, :old], (true[:, old:] - shift) / scale
    return {"old_lse": old_logits.logsumexp(1),
            "old_target": torch.where(labels < old, old_logits.gather(1, labels.clamp(max=old - 1)[:, None])[:, 0], 0.0),
            "new": new_logits, "label": labels, "first": old}


def test_calibration_finds_a_planted_scale_and_shift_back():
    fit = fit_calibration(_planted(scale=0.5, shift=-2.0))
    assert fit["scale"] == pytest.approx(0.5, rel=0.1) and fit["shift"] == pytest.approx(-2.0, abs=0.3)
    assert fit["loss_after"] < fit["loss_before"]
    again = fit_calibration(_planted(scale=1.0, shift=0.0))  # already calibrated: left (nearly) alone
    assert again["scale"] == pytest.approx(1.0, abs=0.1) and again["shift"] == pytest.approx(0.0, abs=0.3)
    with pytest.raises(ValueError, match="both old and new"):
        fit_calibration({**_planted(), "label": torch.zeros(len(_planted()["label"]), dtype=torch.long)})


def test_calibration_is_class_balanced():
    """A class with ten times the held-out images weighs as much as any other: duplicating one class's
    images leaves the fit where it was."""
    logits = _planted(n_per_class=60, seed=3)
    extra = logits["label"] == 7  # a new class
    tenfold = {k: (torch.cat([v] + [v[extra]] * 9) if torch.is_tensor(v) else v) for k, v in logits.items()}
    a, b = fit_calibration(logits), fit_calibration(tenfold)
    assert a["scale"] == pytest.approx(b["scale"], rel=1e-4) and a["shift"] == pytest.approx(b["shift"], abs=1e-4)


def test_calibrating_a_grown_tree_moves_only_the_new_logits_and_is_recorded(tmp_path):
    parent = _saved_tree(tmp_path, "1-2-4")  # the new subtree has two leaves: both classifiers fold
    tree = load_tree(parent)
    grown = grow(tree, ["new0", "new1", "new2"], like=0).eval()
    with torch.no_grad():  # a new subtree that claims too much
        for leaf in grown.subtrees[-1].branches:
            leaf.fc.bias.add_(4.0)
    old_state = {k: v.clone() for k, v in grown.state_dict().items() if not k.startswith("subtrees.2.")}
    x = torch.randn(6, 3, 16, 16)
    before = grown(x)
    batches = [(torch.randn(11, 3, 16, 16, generator=torch.Generator().manual_seed(s)), torch.arange(11)) for s in range(3)]
    fit = calibrate(grown, batches)
    after = grown(x)
    assert torch.equal(after[:, :8], before[:, :8])  # the old logits, bit for bit
    assert torch.allclose(after[:, 8:], fit["scale"] * before[:, 8:] + fit["shift"], atol=1e-4)
    assert fit["shift"] < 0 and fit["images"] == 33 and fit["classes"] == 11 and fit["loss_after"] < fit["loss_before"]
    for k, v in grown.state_dict().items():
        if k in old_state:
            assert torch.equal(v, old_state[k]), k
    refit = fit_calibration(calibration_logits(grown, batches))  # fitting again on the same images: the identity
    assert refit["scale"] == pytest.approx(1.0, abs=1e-3) and refit["shift"] == pytest.approx(0.0, abs=1e-3)
    save_grown(grown, parent, tmp_path / "grown")
    m = read_manifest(tmp_path / "grown")
    assert m["grown"][0]["calibration"]["scale"] == pytest.approx(fit["scale"])
    assert torch.equal(load_tree(tmp_path / "grown")(x), after)
    for entry in [m["trunk"], *m["subtrees"][:2]]:  # the old files still the parent's, byte for byte
        assert sha256_file(tmp_path / "grown" / entry["file"]) == sha256_file(parent / entry["file"])
    with pytest.raises(ValueError, match="not a grown tree"):
        calibrate(tree, batches)


def test_fold_calibration_scales_every_leaf_classifier(tmp_path):
    grown = grow(load_tree(_saved_tree(tmp_path, "1-2-4")), ["a", "b", "c"], like=1).eval()
    features = grown.trunk(torch.randn(2, 3, 16, 16))
    before = grown.subtrees[-1](features)
    fold_calibration(grown.subtrees[-1], 2.0, -1.5)
    assert torch.allclose(grown.subtrees[-1](features), 2.0 * before - 1.5, atol=1e-5)
