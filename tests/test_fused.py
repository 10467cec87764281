"""The fused tree (sibling subtrees as grouped ops) computes and trains exactly like the tree."""
import copy

import pytest
import torch

from splitnet import build_model, cut
from splitnet.fused import FusedTree
from splitnet.profiling import count_ops
from splitnet.regularizers import parameter_groups

from conftest import randomize

CASES = [
    ("wrn-10-2", "2-2-2", 32), ("wrn-10-2", "1-2-4", 32), ("wrn-10-2", "2-4-4", 32), ("wrn-10-2", "4", 32),
    ("resnet18", "4-4", 64), ("resnet18", "1-2-4", 64), ("resnet50", "2-2-4-4", 64), ("alexnet", "2-2-4-4", 64),
]


def _unbalanced_tree(arch: str, split: str, classes: int = 21):
    """A cut of a randomized model: argmax of random assignments, so groups differ in size."""
    torch.manual_seed(0)
    return cut(randomize(build_model(arch, classes, split)))


@pytest.mark.parametrize("arch,split,size", CASES)
def test_fused_tree_equals_the_tree(arch, split, size):
    tree = _unbalanced_tree(arch, split).eval()
    sizes = [int(s.classes.numel()) for s in tree.subtrees]
    fused = FusedTree(tree).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected, got = tree(x), fused(x)
    assert got.shape == expected.shape == (3, 21)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert len(set(sizes)) > 1 or split == "4", "the case should exercise padding"


def _padding_masks(fused: FusedTree) -> dict[str, torch.Tensor]:
    """True where a fused parameter is padding (found by fusing an all-ones copy of the tree)."""
    ones = copy.deepcopy(fused.tree)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    probe = FusedTree(ones)
    return {name: p == 0 for name, p in probe.named_parameters() if not name.startswith("trunk.")}


def test_fused_training_matches_the_tree_and_keeps_padding_at_zero():
    """SGD with momentum and weight decay, train-mode BatchNorm: after write_back the tree holds
    what training the tree itself gives, padded entries stay exactly zero."""
    tree = _unbalanced_tree("wrn-10-2", "1-2-4").train()
    reference = copy.deepcopy(tree)
    fused = FusedTree(tree).train()
    masks = _padding_masks(fused)
    assert any(bool(m.any()) for m in masks.values())
    opts = [torch.optim.SGD(parameter_groups(m, 0.05, 5e-4), lr=0.05, momentum=0.9, nesterov=True)
            for m in (reference, fused)]
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 21, (8,))
        for model, opt in zip((reference, fused), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for name, p in fused.named_parameters():
        if name in masks:
            assert bool((p[masks[name]] == 0).all()), name
    fused.write_back()
    got, want = tree.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), atol=1e-5, rtol=1e-4), key
    tree.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tree(x), reference(x), atol=1e-5)


def test_fused_state_dict_round_trips_through_a_saved_tree(tmp_path):
    """What a finetune checkpoint holds (the fused state) loads into a fused tree rebuilt from
    the saved cut, key for key: a resumed finetune continues with the same layout."""
    from splitnet.artifacts import load_tree

    tree = _unbalanced_tree("wrn-10-2", "1-2-4").eval()
    tree.save(tmp_path / "cut", input_size=32)
    fused = FusedTree(tree)
    rebuilt = FusedTree(load_tree(tmp_path / "cut")).eval()
    rebuilt.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), tree(x), atol=1e-5)


def test_finetune_split_lr_mult_reaches_the_subtrees():
    """``finetune.split_lr_mult`` (the ImageNet recipe's 10x) scales every weight above the trunk,
    fused or not; the trunk keeps the base rate."""
    tree = _unbalanced_tree("wrn-10-2", "2-2-2")
    for model in (tree, FusedTree(tree)):
        groups = {g["name"]: g for g in parameter_groups(model, 0.01, 5e-4, split_lr_mult=10.0)}
        split = {id(p) for name in ("split_weights", "split_bias") for p in groups[name]["params"]}
        above = {id(p) for p in model.subtree_parameters()}
        assert split == above and groups["split_weights"]["lr"] == pytest.approx(0.1)
        assert not split & {id(p) for p in model.trunk.parameters()}


@pytest.mark.parametrize("split,fewer", [("2-2-2", 1.5), ("2-4-4", 2.3)])
def test_fused_training_step_dispatches_fewer_ops(split, fewer):
    """One forward + backward of the tree dispatches about G times the ops of its split levels;
    fused, the whole step costs what the dense model's does plus a handful (the zero pad and
    gather of each level, the classifiers' batched matmul, the class-order gather)."""
    torch.manual_seed(0)
    dense = randomize(build_model("wrn-10-2", 21, split)).train()
    tree = cut(dense).train()
    fused = FusedTree(copy.deepcopy(tree)).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 21, (4,))

    def step(model):
        def run():
            torch.nn.functional.cross_entropy(model(x), y).backward()
        return run

    ops = {name: count_ops(step(m))["compute"] for name, m in (("dense", dense), ("tree", tree), ("fused", fused))}
    assert ops["tree"] >= fewer * ops["fused"], ops
    assert ops["fused"] <= ops["dense"] + 15, ops
