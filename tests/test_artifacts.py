import pytest
import torch
import yaml

from splitnet import build_model, cut
from splitnet.accounting import model_cost
from splitnet.artifacts import (ArtifactError, load_subtree, load_tree, load_trunk, read_manifest, sha256_file,
                                subtree_inputs)

from conftest import randomize


@pytest.fixture
def saved(tmp_path):
    model = randomize(build_model("wrn-10-2", 12, "1-2-4")).eval()
    names = [f"class{i}" for i in range(12)]
    tree = cut(model, info={"class_names": names, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}).eval()
    tree.save(tmp_path / "tree", dense_cost=model_cost(model, 32))
    return tree, model, tmp_path / "tree"


def test_manifest_describes_the_tree(saved):
    tree, model, directory = saved
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["manifest.yaml", "subtree-0.safetensors", "subtree-1.safetensors", "trunk.safetensors"]
    m = read_manifest(directory)
    assert m["arch"] == "wrn-10-2" and m["split"] == "1-2-4" and m["num_classes"] == 12
    assert m["class_names"][3] == "class3"
    assert m["class_to_group"] == tree.class_to_group.tolist()
    assert [g["subtree"] for g in m["groups"]] == [0, 0, 1, 1]
    for g, entry in enumerate(m["subtrees"]):
        assert entry["classes"] == tree.subtrees[g].classes.tolist()
        assert entry["sha256"] == sha256_file(directory / entry["file"])
    assert m["counts"]["dense"]["weights"] == model_cost(model, 32)["weights"]
    assert 0 < m["counts"]["reduction"]["weights"] < 1
    # channel indices per split set, with the layers that use them
    stage3 = m["channel_sets"]["layer3.0.mid"]
    assert stage3["groups"] == 2 and sorted(sum(stage3["members"], [])) == list(range(128))
    assert "layer3.0.conv1" in stage3["layers"]
    assert m["info"]["mean"] == [0.5, 0.5, 0.5]
    # plain YAML: the safe loader reads it
    yaml.safe_load((directory / "manifest.yaml").read_text())


def test_load_tree_and_subtree_reproduce_logits(saved):
    tree, _, directory = saved
    x = torch.randn(3, 3, 32, 32)
    loaded = load_tree(directory)
    with torch.no_grad():
        assert torch.equal(tree(x), loaded(x))
        features = tree.trunk(x)
        trunk, _ = load_trunk(directory)
        assert torch.equal(trunk(x), features)
        for g in range(2):
            sub, entry = load_subtree(directory, g)
            assert torch.equal(sub(features), tree.forward_subtree(g, features))
            assert entry["classes"] == tree.subtrees[g].classes.tolist()


def test_a_subtree_sent_only_its_channels_answers_the_same(saved):
    """What the serving ingress does: the manifest alone says which trunk channels each subtree
    reads; a subtree given just those (``inputs_selected=True``) returns the same logits."""
    tree, _, directory = saved
    inputs = subtree_inputs(read_manifest(directory))
    features = tree.trunk(torch.randn(3, 3, 32, 32)).detach()
    for g, index in enumerate(inputs):
        sub, _ = load_subtree(directory, g)
        assert index == tree.subtrees[g].input_index.tolist() and len(index) < features.shape[1]
        assert sub.input_channels == len(index)
        with torch.no_grad():
            sliced = features[:, index]
            assert torch.equal(sub(sliced, inputs_selected=True), tree.forward_subtree(g, features))
            assert torch.equal(sub.select_inputs(features), sliced)


def test_load_subtree_reads_only_its_own_file(saved):
    tree, _, directory = saved
    (directory / "subtree-0.safetensors").unlink()
    sub, _ = load_subtree(directory, 1)  # still fine: subtree-0 is not needed, and it answers as the tree's own
    features = tree.trunk(torch.randn(2, 3, 32, 32)).detach()
    with torch.no_grad():
        assert torch.equal(sub(features), tree.forward_subtree(1, features))
    with pytest.raises(ArtifactError, match="missing weight file"):
        load_subtree(directory, 0)
    with pytest.raises(ArtifactError, match="subtree 5 does not exist"):
        load_subtree(directory, 5)


def test_tampered_weight_file_is_refused(saved):
    _, _, directory = saved
    path = directory / "subtree-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_tree(directory)


def test_truncated_weight_file_is_refused(saved):
    _, _, directory = saved
    path = directory / "trunk.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_trunk(directory)


def test_not_a_tree_directory(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest"):
        load_tree(tmp_path)
    (tmp_path / "manifest.yaml").write_text("format: something-else\n")
    with pytest.raises(ArtifactError, match="unknown format"):
        load_tree(tmp_path)
