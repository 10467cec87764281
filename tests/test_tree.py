import logging

import pytest
import torch

from splitnet import build_model, cut, hard_assignment, mask_off_block_weights_
from pipelines.plan import plan
from splitnet.accounting import count_weights
from splitnet.models import CLASSES
from splitnet.tree import build_tree, enforce_minimum

from conftest import randomize

CASES = [
    ("wrn-10-2", "2-2-2", 32), ("wrn-10-2", "1-2-4", 32), ("wrn-10-2", "2-4-4", 32), ("wrn-10-2", "4", 32),
    ("wrn-16-8", "2-2-2", 32),
    ("resnet18", "4-4", 64), ("resnet18", "1-2-4", 64), ("resnet34", "2-2-2", 64),
    ("resnet50", "4-4", 64), ("resnet50", "2-2-4-4", 64), ("resnet101", "1-4-4", 64), ("resnet152", "4-4", 64),
    ("alexnet", "2-2-2", 64), ("alexnet", "2-2-4-4", 64), ("alexnet", "1-2-4", 64),
]


@pytest.mark.parametrize("arch,split,size", CASES)
def test_tree_equals_dense_when_off_block_weights_are_zero(arch, split, size):
    model = randomize(build_model(arch, 20, split))
    hard = hard_assignment(model)
    mask_off_block_weights_(model, hard)
    model.eval()
    tree = build_tree(model, hard).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        dense, split_logits = model(x), tree(x)
    scale = dense.abs().max()
    assert (dense - split_logits).abs().max() <= 1e-5 * max(1.0, scale)
    assert count_weights(tree) < count_weights(model)


def test_tree_differs_when_off_block_weights_are_not_zero():
    model = randomize(build_model("wrn-10-2", 20, "2-2-2")).eval()
    tree = cut(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - tree(x)).abs().max() > 1e-3


def test_logits_are_in_original_class_order_and_subtrees_own_disjoint_classes():
    model = randomize(build_model("wrn-10-2", 12, "1-2-4"))
    tree = cut(model).eval()
    owned = torch.cat([s.classes for s in tree.subtrees])
    assert sorted(owned.tolist()) == list(range(12))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = tree.trunk(x)
        full = tree(x)
        for g, sub in enumerate(tree.subtrees):
            assert torch.allclose(full[:, sub.classes], tree.forward_subtree(g, features))
    for c, g in enumerate(tree.class_to_group.tolist()):
        assert c in tree.subtrees[tree.group_to_subtree[g]].classes.tolist()


def test_batchnorm_statistics_are_sliced_not_reinitialized():
    model = randomize(build_model("wrn-10-2", 10, "2-2-2"))
    tree = cut(model)
    hard = tree.hard
    block = model.layer3[0]
    for g, sub in enumerate(tree.subtrees):
        mid = hard.members("layer3.0.mid", 2, g)
        sliced = sub.blocks[-1].bn2  # layer2 block, then layer3 block: the last block is layer3.0
        assert torch.equal(sliced.running_mean, block.bn2.running_mean[mid])
        assert torch.equal(sliced.running_var, block.bn2.running_var[mid])
        assert torch.equal(sliced.weight.data, block.bn2.weight.data[mid])


def test_no_empty_group_moves_least_confident_and_logs(caplog):
    model = build_model("wrn-10-2", 10, "2-2-4")
    with torch.no_grad():
        logit = model.assignments.logit(CLASSES)
        logit.zero_()
        logit[0] = 5.0            # every class prefers group 0 ...
        logit[1, 7] = 4.9         # ... class 7 only barely: it is the one to move to group 1
    with caplog.at_level(logging.INFO, logger="splitnet"):
        tree = cut(model, min_classes_per_group=1)
    counts = torch.bincount(tree.class_to_group, minlength=4)
    assert (counts >= 1).all()
    assert tree.class_to_group[7] == 1
    class_moves = [m for m in tree.moves if m["set"] == CLASSES]
    assert len(class_moves) == 3
    assert any("moved classes[7]" in r.message for r in caplog.records)
    assert any("classes is badly unbalanced" in r.message for r in caplog.records)


def test_minimum_group_size_is_configurable_and_validated():
    q = torch.softmax(torch.tensor([[3.0] * 10, [0.0] * 10]), 0)
    labels, moves = enforce_minimum(q, q.argmax(0), 4, "x")
    assert torch.bincount(labels, minlength=2).min() == 4 and len(moves) == 4
    with pytest.raises(ValueError, match="cannot fill 2 groups with at least 6"):
        enforce_minimum(q, q.argmax(0), 6, "x")


@pytest.mark.parametrize("split,reference", [("1", 11.0e6), ("1-2-2", 6.78e6), ("2-2-2", 5.73e6), ("2-4-4", 3.62e6)])
def test_wrn_16_8_weight_counts_match_reference(split, reference):
    result = plan("wrn-16-8", split, 100)
    assert abs(result["split_tree"]["weights"] - reference) / reference < 0.02
    assert result["dense"]["weights"] == 11_000_240


@pytest.mark.parametrize("split,flops_cut", [("1-2-2", 0.17), ("2-2-2", 0.35), ("2-4-4", 0.43)])
def test_wrn_16_8_flop_reduction_matches_reference(split, flops_cut):
    result = plan("wrn-16-8", split, 100)
    assert result["dense"]["flops"] == pytest.approx(3.10e9, rel=0.01)
    assert result["reduction"]["flops"] == pytest.approx(flops_cut, abs=0.01)


def test_group_sizes_and_smallest_share():
    """The sizes the report and the method benchmark score: members per group, and the smallest
    group as a share of its balanced size (which set it is in)."""
    import torch

    from splitnet.tree import HardAssignment, smallest_group_share

    hard = HardAssignment(labels={"classes": torch.tensor([0, 0, 0, 1]), "layer3.0.out": torch.tensor([0, 1, 2, 0, 1, 2])},
                          groups={"classes": 2, "layer3.0.out": 4}, sizes={"classes": 4, "layer3.0.out": 6})
    sizes = hard.group_sizes()
    assert sizes == {"classes": [3, 1], "layer3.0.out": [2, 2, 2, 0]}
    assert smallest_group_share(sizes) == (0.0, "layer3.0.out")
    assert smallest_group_share({"classes": [3, 1]}) == (0.5, "classes")
    assert smallest_group_share({"classes": [2, 2]}) == (1.0, "")
