"""Groups derived from the weights (splitnet/partition.py) and the grouping stage that uses them
(``assign: derived``): balanced partitions, planted blocks recovered in every split layer, the
derivation at the end of the warm-up, thresholds sized by the weights, and a resume that neither
derives again nor changes the thresholds."""
import itertools

import pytest
import torch

from splitnet import build_model, cut
from splitnet.assignment import merge_hard
from splitnet.grouping import Grouping, GroupingSchedule, off_block_energy
from splitnet.models import CLASSES
from splitnet.partition import (_capacities, balanced_labels, classifier_class_groups, derive_groups, random_groups,
                                set_assignment_)
from splitnet.regularizers import RegularizerWeights, parameter_groups
from splitnet.train import train_one_epoch
from splitnet.tree import HardAssignment, mask_off_block_weights_

from test_grouping import _signed_clusters, synthetic


def _best_by_brute_force(score: torch.Tensor) -> float:
    g, d = score.shape
    sizes = _capacities(d, g).tolist()
    best = float("-inf")
    for labels in itertools.product(range(g), repeat=d):
        if [labels.count(k) for k in range(g)] == sizes:
            best = max(best, float(score[list(labels), list(range(d))].sum()))
    return best


@pytest.mark.parametrize("groups,size", [(2, 9), (3, 7), (4, 8)])
def test_balanced_labels_are_balanced_and_optimal_on_small_sets(groups, size):
    for seed in range(5):
        score = torch.randn(groups, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        labels = balanced_labels(score)
        assert sorted(torch.bincount(labels, minlength=groups).tolist()) == sorted(_capacities(size, groups).tolist())
        got = float(score[labels, torch.arange(size)].sum())
        if groups == 2:
            assert got == pytest.approx(_best_by_brute_force(score))  # exact for two groups
        else:
            assert got >= _best_by_brute_force(score) - 0.5  # a 2-exchange local optimum, close to the best


def _planted(arch: str, classes: int, split: str, seed: int = 0):
    """A model whose split layers are block-diagonal under a random balanced assignment (the truth)."""
    torch.manual_seed(seed)
    model = build_model(arch, classes, split)
    graph = model.split_graph()
    g = torch.Generator().manual_seed(seed)
    labels = {}
    for name in model.assignments.names():
        groups, size = model.assignments.groups(name), graph.sets[name].size
        labels[name] = (torch.arange(size) * groups // size)[torch.randperm(size, generator=g)]
    truth = HardAssignment(labels, {n: model.assignments.groups(n) for n in labels},
                           {s.name: s.size for s in graph.sets.values()})
    with torch.no_grad():
        for layer in model.split_layers():  # every weight non-zero before the mask
            layer.module.weight.add_(0.05 * torch.sign(layer.module.weight))
    mask_off_block_weights_(model, truth)
    return model, truth


@pytest.mark.parametrize("split", ["2-2-2", "1-2-4", "2-4-4"])
def test_derived_groups_recover_planted_blocks_in_every_split_layer(split):
    model, truth = _planted("wrn-10-1", 8, split)
    derived = derive_groups(model, truth.labels[CLASSES])
    assert set(derived) == set(model.assignments.names())
    hard = HardAssignment(derived, dict(truth.groups), dict(truth.sizes))
    assert max(off_block_energy(model, hard).values()) == pytest.approx(0.0, abs=1e-9)
    for name, lab in derived.items():  # balanced at the finest level, so also at every merged one
        groups = model.assignments.groups(name)
        assert sorted(torch.bincount(lab, minlength=groups).tolist()) == sorted(_capacities(lab.numel(), groups).tolist())
        if groups == 4:
            assert torch.bincount(merge_hard(lab, 4, 2)).tolist() == [lab.numel() // 2] * 2


def test_set_assignment_writes_labels_the_argmax_gives_back():
    model, truth = _planted("wrn-10-1", 6, "2-2-2")
    set_assignment_(model, truth.labels)
    for name, q in model.assignments.learned():
        assert torch.equal(q.argmax(0), truth.labels[name]) and float(q.detach().max(0).values.min()) > 0.99


def test_classifier_class_groups_scale_to_many_classes():
    """The thin-SVD form never builds a classes x classes matrix: 3,000 classes of 64 features split
    into 4 balanced groups that follow planted sign clusters."""
    weight, truth = _signed_clusters(4, 750, features=64)
    labels = classifier_class_groups(weight, 4)
    assert torch.bincount(labels).tolist() == [750] * 4
    assert bool(torch.equal(labels[:, None] == labels[None, :], truth[:, None] == truth[None, :]))


def _derived_grouping(model, total=12, warmup=0.25):
    return Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", warmup=warmup), total)


def test_derived_grouping_fixes_the_groups_at_the_end_of_the_warm_up():
    model, truth = _planted("wrn-10-1", 12, "2-2-2")
    weight, _ = _signed_clusters(2, 6, features=model.fc.in_features)
    grouping = _derived_grouping(model)
    start = grouping.schedule.assign_start(12)
    before = {k: v.clone() for k, v in model.assignments.state_dict().items()}
    for step in range(start):
        assert grouping.loss(step) == (None, {}) and grouping.prox is None
    assert all(torch.equal(before[k], v) for k, v in model.assignments.state_dict().items())
    with torch.no_grad():  # what the warm-up trained: classes in two signed clusters
        model.fc.weight.copy_(weight * (truth.group_of(model.split_graph().features, 2)[None, :] ==
                                        classifier_class_groups(weight, 2)[:, None]))
    assert grouping.loss(start) == (None, {}) and grouping.derived_at == start
    assert grouping.class_start == classifier_class_groups(weight, 2).tolist()
    assert torch.equal(grouping.hard.labels[CLASSES], torch.tensor(grouping.class_start))
    assert all(not p.requires_grad for p in model.assignments.parameters())
    # the planted blocks (the classes' signed clusters included) were found: nothing lies off them,
    # so the derived thresholds are zero and the sparsify phase removes nothing
    assert set(grouping.fixed_off_block) == {layer.name for layer in model.split_layers()}
    assert max(grouping.fixed_off_block.values()) == pytest.approx(0.0, abs=1e-9)
    assert grouping.peaks and all(x == pytest.approx(0.0, abs=1e-6) for peaks in grouping.peaks for x in peaks)


def test_random_groups_are_the_seeded_balanced_control_of_the_derived_ones():
    """assign: random fixes random balanced groups at the warm-up's end (the tree's shape without groups
    worth having): balanced in every set, the same for a seed, where the planted blocks would be derived."""
    model, truth = _planted("wrn-10-1", 12, "2-2-2")
    labels = random_groups(model, seed=3)
    assert set(labels) == set(model.assignments.names())
    for name, lab in labels.items():
        counts = torch.bincount(lab, minlength=model.assignments.groups(name))
        assert counts.max() - counts.min() <= 1
    assert all(torch.equal(labels[k], random_groups(model, seed=3)[k]) for k in labels)
    assert any(not torch.equal(labels[k], random_groups(model, seed=4)[k]) for k in labels)
    grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", 0.25, assign="random", random_seed=3),
                        12)
    start = grouping.schedule.assign_start(12)
    assert grouping.phase(start) == "sparsify" and grouping.loss(start) == (None, {})
    assert grouping.derived_at == start
    assert all(torch.equal(grouping.hard.labels[k], labels[k]) for k in labels)
    # the planted blocks are not where random groups put them: a lot of energy lies off the random blocks
    assert max(grouping.fixed_off_block.values()) > 0.2


def test_derived_thresholds_empty_the_blocks_and_a_resume_keeps_groups_and_thresholds():
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 4, "2-2-2")
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 5e-4), lr=0.05, momentum=0.9)
    data = synthetic()
    epochs, steps = 4, len(data)
    grouping = _derived_grouping(model, epochs * steps)
    for e in range(2):  # the warm-up (4 steps), then the groups derived at step 4 and sparsifying
        train_one_epoch(model, data, opt, grouping=grouping, global_step=e * steps)
    state = grouping.state()
    assert state["derived_at"] == 4 and state["peaks"] and state["fixed_off_block"]
    energy_fixed = max(state["fixed_off_block"].values())
    logits = {k: v.clone() for k, v in model.assignments.state_dict().items()}
    # resumed: a new Grouping over the checkpointed model and state; the weights have moved since
    resumed = _derived_grouping(model, epochs * steps)
    resumed.load_state(state)
    for e in range(2, epochs):
        train_one_epoch(model, data, opt, grouping=resumed, global_step=e * steps)
        if e == 2:
            assert max(resumed.off_block_energy().values()) < energy_fixed  # emptying
    assert resumed.derived_at == 4 and resumed.peaks == state["peaks"]
    assert all(torch.equal(logits[k], v) for k, v in model.assignments.state_dict().items())
    assert max(resumed.off_block_energy().values()) == 0.0
    model.eval()
    tree = cut(model).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tree(x), model(x), atol=1e-5) and tree.moves == []
