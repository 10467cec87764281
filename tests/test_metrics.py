import itertools

import pytest
import torch

from splitnet.metrics import nmi_ceiling, normalized_mutual_info, purity, semantic_quality, topk_correct


def test_purity_and_nmi_known_values():
    assert purity([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert purity([0, 0, 1, 1], ["a", "b", "a", "b"]) == 0.5
    assert normalized_mutual_info([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 0, 1, 1], ["a", "b", "a", "b"]) == pytest.approx(0.0, abs=1e-12)


def test_grouping_by_superclass_scores_above_random():
    supers = [c // 5 for c in range(100)]       # 20 superclasses of 5
    groups = [s // 10 for s in supers]          # 2 groups, each a union of whole superclasses
    q = semantic_quality(groups, supers, num_random=100)
    assert q["purity"] == pytest.approx(0.1)    # each group: 10 whole superclasses, majority holds 5 of 50
    assert q["nmi"] > q["random_nmi_mean"] + 5 * q["random_nmi_std"]
    assert q["num_groups"] == 2 and q["num_superclasses"] == 20


def test_random_grouping_is_near_random_expectation():
    import random
    rnd = random.Random(0)
    supers = [c // 5 for c in range(100)]
    groups = [rnd.randrange(4) for _ in range(100)]
    q = semantic_quality(groups, supers, num_random=100)
    assert abs(q["nmi"] - q["random_nmi_mean"]) < 5 * q["random_nmi_std"] + 0.02


def _best_nmi(sizes, labels):
    """The most NMI over every grouping with these group sizes, by enumeration (small cases only)."""
    layout = [g for g, n in enumerate(sizes) for _ in range(n)]
    return max(normalized_mutual_info(list(p), labels) for p in set(itertools.permutations(layout)))


@pytest.mark.parametrize("sizes,labels", [
    ([3, 3, 2, 2], [0] * 5 + [1] * 5),              # 10 classes, 2 superclasses, 4 groups: groups fit inside
    ([4, 4], [0, 0, 1, 1, 2, 2, 3, 4]),              # 2 groups: superclasses fit whole into them
    ([3, 3, 2], [0, 0, 0, 0, 1, 1, 1, 2]),           # neither fits: the ceiling is a bound, not reached
])
def test_the_nmi_ceiling_bounds_every_grouping_of_those_sizes_and_is_reached_where_the_labels_fit(sizes, labels):
    best, ceiling = _best_nmi(sizes, labels), nmi_ceiling(sizes, labels)
    assert best <= ceiling + 1e-12
    fits = sizes != [3, 3, 2]
    assert (best == pytest.approx(ceiling)) == fits
    if sizes == [3, 3, 2, 2]:
        assert ceiling == pytest.approx(0.6732, abs=1e-4)  # issue 26's 10-class 4-group cells: every group pure
    q = semantic_quality([g for g, n in enumerate(sizes) for _ in range(n)], labels, num_random=20)
    assert q["nmi_ceiling"] == pytest.approx(ceiling) and q["nmi"] <= q["nmi_ceiling"] + 1e-12


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    assert topk_correct(logits, torch.tensor([1, 2]), (1, 2)) == {1: 1, 2: 1}
    assert topk_correct(logits, torch.tensor([1, 2]), (1, 5)) == {1: 1, 5: 2}
