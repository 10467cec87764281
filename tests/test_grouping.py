"""The grouping stage's mechanism (splitnet/grouping.py) on tiny models: the phases, the proximal
step that empties the off-block weights, the off-block energy, a cut that then costs nothing, the
reference method still selectable, and a training step that never waits for the device."""
import math

import pytest
import torch

from splitnet import build_model, cut, hard_assignment, mask_off_block_weights_
from splitnet.grouping import BlockProx, Grouping, GroupingSchedule, off_block_energy
from splitnet.regularizers import RegularizerWeights, parameter_groups
from splitnet.train import train_one_epoch

from conftest import randomize


def synthetic(n=64, classes=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g) * 0.1 + y.float().view(-1, 1, 1, 1) / classes
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_phases_follow_the_fractions_and_reference_is_always_the_objective():
    s = GroupingSchedule("staged", warmup=0.25, sparsify=0.25, assign="learned")
    assert [s.phase(i, 8) for i in range(8)] == ["warmup"] * 2 + ["assign"] * 4 + ["sparsify"] * 2
    derived = GroupingSchedule("staged", warmup=0.25, sparsify=0.25)  # the default: groups derived, then sparsify
    assert [derived.phase(i, 8) for i in range(8)] == ["warmup"] * 2 + ["sparsify"] * 6
    assert derived.assign_start(8) == derived.sparsify_start(8) == 2 and s.sparsify_start(8) == 6
    ref = GroupingSchedule("reference", warmup=0.25, sparsify=0.25)
    assert {ref.phase(i, 8) for i in range(8)} == {"assign"} and ref.disjoint_factor(0, 8) == 1.0
    # disjoint coefficient: held at 0 for the first half of the assign phase, then ramped to 1
    s = GroupingSchedule("staged", warmup=0.2, sparsify=0.2, disjoint_hold=0.5, sparsify_strength=100, assign="learned")
    factors = [s.disjoint_factor(i, 100) for i in range(100)]
    assert factors[20:50] == [0.0] * 30 and 0 < factors[60] < 1 and factors[80] == 1.0
    assert s.strength(80, 100) == pytest.approx(1.0) and s.strength(100, 100) == pytest.approx(100.0)
    for bad in (dict(method="magic"), dict(warmup=0.6, sparsify=0.5), dict(sparsify_strength=0.5), dict(assign="magic")):
        with pytest.raises(ValueError):
            GroupingSchedule(**bad)


def test_off_block_energy_is_the_share_of_w2_between_groups():
    model = randomize(build_model("wrn-10-1", 6, "2-2-2"))
    hard = hard_assignment(model)
    energy = off_block_energy(model, hard)
    assert set(energy) == {layer.name for layer in model.split_layers()}
    fc = next(layer for layer in model.split_layers() if layer.name == "fc")
    gin, gout = hard.group_of(fc.in_set, 2), hard.group_of(fc.out_set, 2)
    w2 = model.fc.weight.detach().pow(2)
    expected = float(w2[gout[:, None] != gin[None, :]].sum() / w2.sum())
    assert energy["fc"] == pytest.approx(expected, rel=1e-5) and 0.2 < energy["fc"] < 0.8
    mask_off_block_weights_(model, hard)
    assert max(off_block_energy(model, hard).values()) == 0.0


def test_per_epoch_energy_measures_an_empty_group_quietly_and_the_cut_still_says_it(caplog):
    """An argmax with an empty group mid-grouping is measured, not moved: the per-epoch off-block
    energy logs nothing (it ran every epoch, on every worker, as "cut: ... moved" lines while no
    cut happened); fixing the groups for good, at the sparsify phase or the cut, still warns."""
    model = randomize(build_model("wrn-10-1", 4, "2-2-2"))
    name = next(n for n in model.assignments.names() if n != "classes")
    with torch.no_grad():
        logit = model.assignments.logit(name)
        logit.zero_()
        logit[0] = 5.0  # every channel of this set prefers group 0: group 1 is empty
    grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", 0.2, 0.4), 10)
    with caplog.at_level("INFO", logger="splitnet"):
        energy = grouping.off_block_energy()
        assert set(energy) == {layer.name for layer in model.split_layers()}
        assert caplog.records == []
        assert hard_assignment(model, quiet=True).moves == hard_assignment(model).moves != []
        assert any("1 members moved" in r.getMessage() for r in caplog.records)  # the second, loud call


def test_a_collapsing_group_is_said_while_grouping_not_first_by_the_cut():
    """The argmax of the soft assignments as they are, every epoch: a set whose smallest group fell
    under a quarter of its balanced size shows in the epoch line and in one warning line, whether
    the minimum-size rule would later hide it by moving members."""
    from splitnet.grouping import MIN_GROUP_SHARE, collapse_warning, collapsing
    from splitnet.train import format_epoch

    model = randomize(build_model("wrn-10-1", 4, "2-2-2"))
    name = next(n for n in model.assignments.names() if n != "classes")
    grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", 0.2, 0.4, assign="learned"), 10)
    with torch.no_grad():
        logit = model.assignments.logit(name)
        size = logit.shape[1]
        logit.zero_()
        logit[0] = 5.0
        logit[1, :size // 10] = 10.0  # a tenth of the channels in group 1: ~20% of its balanced half
    shares = grouping.group_shares()
    assert set(shares) == set(model.assignments.names())
    assert shares[name] == pytest.approx((size // 10) / (size / 2)) and shares[name] < MIN_GROUP_SHARE
    assert name in collapsing(shares)
    assert collapsing(shares, phase="warmup") == {}  # init noise in the warm-up: not a collapse
    line = collapse_warning("group", 2, collapsing(shares), "assign")
    assert line.startswith(f"[group] warning: epoch 2: groups collapsing, the smallest group of {name} "
                           f"{shares[name]:.0%} of its balanced size (floor 25%); still learning")
    stats = {"loss": 1.0, "ce": 1.0, "acc": 0.5, "images_per_s": 10.0, "smallest_group": shares[name],
             "smallest_group_set": name}
    assert f"| smallest group {shares[name]:.0%} ({name}) |" in format_epoch("group", 2, 3, stats)
    assert "smallest group" not in format_epoch("group", 2, 3, {**stats, "smallest_group": 0.9})
    # once the sparsify phase fixed the groups, the shares are theirs (the minimum-size rule applied)
    grouping._fix_hard(6)
    assert grouping.group_shares()[name] == smallest_group_share_of(grouping.hard, name)
    assert "the cut will move members" in collapse_warning("group", 3, {name: 0.1}, "sparsify")


def smallest_group_share_of(hard, name):
    from splitnet.tree import smallest_group_share

    return smallest_group_share({name: hard.group_sizes()[name]})[0]


def _row_segments(w, gin, gout):
    """Norm of every input's off-block row segment (its weights to the other group's outputs): [Din]."""
    e = w.detach().pow(2)
    return torch.stack([e[gout != gin[i], i].sum().sqrt() for i in range(w.shape[1])])


def test_proximal_step_is_block_soft_thresholding():
    """A row segment below its threshold becomes exactly zero, a larger one loses exactly the
    threshold from its norm, and the diagonal blocks are untouched."""
    model = randomize(build_model("wrn-10-1", 4, "1-1-2"))  # only the classifier is split, 2 groups
    hard = hard_assignment(model)
    gin, gout = hard.group_of(model.split_graph().features, 2), hard.group_of("classes", 2)
    w = model.fc.weight
    before, norms = w.detach().clone(), _row_segments(w, gin, gout)
    prox = BlockProx(model, hard)
    (cls,) = prox.classes
    row_c = float(cls["row_c"][0])
    tau = float(norms.median())
    cls["col_c"].zero_()  # the row step alone (one layer: its self-weight is 1)
    prox.step(lr=tau / row_c, coefficient=1.0)
    after = _row_segments(w, gin, gout)
    small = norms <= tau
    assert small.any() and (~small).any()
    assert (after[small] == 0).all()
    assert torch.allclose(after[~small], norms[~small] - tau, atol=1e-5)
    off = gout[:, None] != gin[None, :]
    assert torch.equal(w.detach()[~off], before[~off])
    prox.project()
    assert (w.detach()[off] == 0).all() and torch.equal(w.detach()[~off], before[~off])


def test_fused_regularizers_equal_the_formulas_and_cost_few_ops():
    """The batched RegularizerPlan computes the reference's values and gradients (every arch and
    split shape: merged levels, projections, bottlenecks), with >= 5x fewer compute ops."""
    from splitnet.profiling import count_ops
    from splitnet.regularizers import regularizer_terms, regularizer_terms_reference

    for arch, split, classes in (("wrn-10-1", "2-2-2", 10), ("wrn-10-1", "1-2-4", 10), ("resnet18", "2-4", 20),
                                 ("resnet50", "4-4", 30)):
        model = randomize(build_model(arch, classes, split))
        fused, ref = regularizer_terms(model), regularizer_terms_reference(model)
        for k in ("weight", "disjoint", "balance", "per_layer"):
            assert torch.allclose(fused[k], ref[k], rtol=1e-5, atol=1e-7), (arch, split, k)
        params = [p for p in model.parameters()]
        g_fused = torch.autograd.grad(sum(fused[k] for k in ("weight", "disjoint", "balance")), params, allow_unused=True)
        g_ref = torch.autograd.grad(sum(ref[k] for k in ("weight", "disjoint", "balance")), params, allow_unused=True)
        for a, b in zip(g_fused, g_ref):
            a = torch.zeros(()) if a is None else a
            b = torch.zeros(()) if b is None else b
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), arch

    model = build_model("wrn-16-4", 100, "2-2-2")

    def compute_ops(fn) -> int:
        def step():
            t = fn(model)
            (t["disjoint"] + t["weight"] + 10 * t["balance"]).backward()
        return count_ops(step)["compute"]

    before, after = compute_ops(regularizer_terms_reference), compute_ops(regularizer_terms)
    assert after * 5 <= before, (before, after)


@pytest.mark.parametrize("schedule", [dict(assign="learned", sparsify_strength=100), dict(assign="derived"),
                                      dict(assign="learned"), dict(assign="random")],
                         ids=["learned", "derived", "learned-derived-strength", "random"])
def test_sparsify_phase_empties_the_blocks_and_the_cut_equals_the_grouped_model(schedule):
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 4, "2-2-2")
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 5e-4, assignment_lr_mult=100), lr=0.05, momentum=0.9)
    data = synthetic()
    epochs, steps = 6, len(data)
    grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", 0.2, 0.4, **schedule),
                        epochs * steps)
    energies, assignments = [], []
    for e in range(epochs):
        train_one_epoch(model, data, opt, grouping=grouping, global_step=e * steps)
        energies.append(max(grouping.off_block_energy().values()))
        assignments.append({k: v.detach().clone() for k, v in model.assignments.state_dict().items()})
    assert grouping.phase(epochs * steps - 1) == "sparsify" and grouping.hard is not None
    # assignments frozen once the hard assignment is fixed
    assert all(torch.equal(assignments[-1][k], assignments[-2][k]) for k in assignments[-1])
    assert energies[0] > 0.2 and energies[-1] == 0.0  # off-block weights exactly zero after the stage
    model.eval()
    tree = cut(model).eval()
    assert tree.moves == [] or len(tree.moves) == len(grouping.hard.moves)
    assert all(torch.equal(tree.hard.labels[k], grouping.hard.labels[k]) for k in tree.hard.labels)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tree(x), model(x), atol=1e-5)


def test_reference_method_regularizes_every_step_and_leaves_blocks_nonzero():
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 4, "2-2-2")
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 5e-4, assignment_lr_mult=100), lr=0.05, momentum=0.9)
    data = synthetic()
    grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("reference"), 2 * len(data))
    stats = [train_one_epoch(model, data, opt, grouping=grouping, global_step=e * len(data)) for e in range(2)]
    assert all(math.isfinite(s["disjoint"]) and math.isfinite(s["weight"]) for s in stats)
    assert grouping.prox is None and max(grouping.off_block_energy().values()) > 0.05


def test_grouping_step_never_waits_for_the_device(monkeypatch):
    """No .item() / .cpu() / .tolist() / float() / int() / bool() on a tensor per step: the loop reads
    its sums once at the end (issue 13). Checked in the assign and in the sparsify phase."""
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 4, "2-2-2")
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 5e-4, assignment_lr_mult=100), lr=0.05, momentum=0.9)
    steps = 12
    data = [b for _ in range(3) for b in synthetic()]  # 12 batches
    grouping = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", 0.0, 0.5, assign="learned"),
                        2 * steps)
    derived = Grouping(model, RegularizerWeights(1, 1, 10), GroupingSchedule("staged", 0.0), 2 * steps)
    derived._fix_hard(0)  # derived groups and thresholds: computed once, on the host
    calls = {"n": 0}
    for name in ("item", "cpu", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, __original=original, **k):
            calls["n"] += 1
            return __original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train_one_epoch(model, data, opt, grouping=grouping, global_step=0)           # assign phase, 12 steps
    assign_calls = calls["n"]
    grouping._fix_hard(steps)  # the hard assignment is fixed once (argmax on the host) when sparsify starts
    calls["n"] = 0
    train_one_epoch(model, data, opt, grouping=grouping, global_step=steps)       # sparsify phase, 12 steps
    assert assign_calls <= 1 and calls["n"] <= 1, (assign_calls, calls["n"])      # the one read at the end
    calls["n"] = 0
    train_one_epoch(model, data, opt, grouping=derived, global_step=0)           # derived thresholds, 12 steps
    assert calls["n"] <= 1, calls["n"]


def _signed_clusters(groups: int, per_group: int, features: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier [C, F] whose classes fall in ``groups`` (2 or 4) planted, nested clusters that
    W**2 cannot see: cluster centers +-c (+-d for 4 groups, |d| < |c|) differ only in their signs.
    Returns (weight, true labels); true labels 0,1 | 2,3 form the coarse clusters."""
    g = torch.Generator().manual_seed(seed)
    c, d = torch.randn(features, generator=g), 0.6 * torch.randn(features, generator=g)
    centers = [c, -c] if groups == 2 else [c + d, c - d, -c + d, -c - d]
    rows, truth = [], []
    for k, center in enumerate(centers):
        for _ in range(per_group):
            rows.append(center + 0.2 * torch.randn(features, generator=g))
            truth.append(k)
    perm = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[perm], torch.tensor(truth)[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs_a = a[:, None] == a[None, :]
    pairs_b = b[:, None] == b[None, :]
    return bool(torch.equal(pairs_a, pairs_b))


@pytest.mark.parametrize("groups", [2, 4])
def test_classifier_class_groups_find_signed_clusters_balanced_and_nested(groups):
    from splitnet.assignment import merge_hard
    from splitnet.grouping import classifier_class_groups

    weight, truth = _signed_clusters(groups, 6)
    labels = classifier_class_groups(weight, groups)
    assert torch.bincount(labels, minlength=groups).tolist() == [6] * groups
    assert _same_partition(labels, truth)
    if groups == 4:  # fine groups 0,1 | 2,3 merge into the coarse split (the reference's merge rule)
        coarse = merge_hard(labels, 4, 2)
        assert torch.bincount(coarse).tolist() == [12, 12]
        assert _same_partition(coarse, merge_hard(truth, 4, 2))
    # the magnitudes alone carry nothing here: W**2 of the two members of a pair is the same
    assert torch.equal(classifier_class_groups(weight, groups), labels)  # deterministic


def test_class_assignment_init_leans_the_classes_and_the_class_matrix_has_its_own_rate():
    from splitnet.grouping import classifier_class_groups, init_class_assignment_
    from splitnet.models import CLASSES

    torch.manual_seed(0)
    model = build_model("wrn-10-1", 12, "2-2-2")
    weight, truth = _signed_clusters(2, 6, features=model.fc.in_features)
    with torch.no_grad():
        model.fc.weight.copy_(weight)
    labels = classifier_class_groups(model.fc.weight, 2)
    init_class_assignment_(model, labels, margin=1.0)
    q = model.assignments.probs(CLASSES)
    assert torch.equal(q.argmax(0), labels)
    assert float(q.max(0).values.min()) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.02)  # a lean, not a decision
    groups = {g["name"]: g for g in parameter_groups(model, 0.1, 5e-4, assignment_lr_mult=600, class_assignment_lr_mult=6)}
    assert [p is model.assignments.logit(CLASSES) for p in groups["class_assignment"]["params"]] == [True]
    assert groups["class_assignment"]["lr"] == pytest.approx(0.6) and groups["assignments"]["lr"] == pytest.approx(60)
    assert all(p is not model.assignments.logit(CLASSES) for p in groups["assignments"]["params"])


def test_classifier_init_at_the_end_of_the_warm_up():
    """Grouping from scratch with the classifier init: the class logits are untouched through the
    warm-up, leaned towards the classifier's split at the first assign step, and not again after."""
    from splitnet.grouping import classifier_class_groups
    from splitnet.models import CLASSES

    torch.manual_seed(0)
    model = build_model("wrn-10-1", 12, "2-2-2")
    schedule = GroupingSchedule("staged", warmup=0.3, sparsify=0.2, assign="learned")
    total = 10
    start = schedule.assign_start(total)
    assert start == 3 and schedule.phase(start - 1, total) == "warmup" and schedule.phase(start, total) == "assign"
    assert GroupingSchedule("reference").assign_start(total) == 0 and GroupingSchedule("staged", warmup=0).assign_start(7) == 0
    grouping = Grouping(model, RegularizerWeights(), schedule, total, classifier_init_margin=2.0)
    weight, _ = _signed_clusters(2, 6, features=model.fc.in_features)
    logits = model.assignments.logit(CLASSES)
    before = logits.detach().clone()
    for step in range(start):
        assert grouping.loss(step)[0] is None
    assert torch.equal(logits, before) and grouping.class_start is None
    with torch.no_grad():
        model.fc.weight.copy_(weight)  # what the warm-up trained
    grouping.loss(start)
    labels = classifier_class_groups(weight, 2)
    assert grouping.class_start == labels.tolist()
    assert torch.equal(model.assignments.probs(CLASSES).argmax(0), labels)
    leaned = logits.detach().clone()
    grouping.loss(start + 1)
    assert torch.equal(logits, leaned)
    # a grouping resumed past that step (a new Grouping, the logits from the checkpoint) does not apply it again
    resumed = Grouping(model, RegularizerWeights(), schedule, total, classifier_init_margin=2.0)
    resumed.loss(start + 2)
    assert torch.equal(logits, leaned) and resumed.class_start is None
