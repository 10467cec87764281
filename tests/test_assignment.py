import pytest
import torch

from splitnet.assignment import Assignments, SplitConfig, SplitConfigError, merge_groups, merge_hard


@pytest.mark.parametrize("text,groups", [("2-2-2", (2, 2, 2)), ("1-2-4", (1, 2, 4)), ("2-4-4", (2, 4, 4)), ("4", (4,)),
                                         (" 1-4-4 ", (1, 4, 4))])
def test_parse_valid(text, groups):
    cfg = SplitConfig.parse(text)
    assert cfg.groups == groups
    assert str(cfg) == "-".join(map(str, groups))
    assert cfg.num_groups == groups[-1]


@pytest.mark.parametrize("text,fragment", [("2-3-2", "divide"), ("4-2", "divide"), ("2-x", "integers"),
                                           ("0-2", "at least 1"), ("", "integers")])
def test_parse_invalid_names_the_problem(text, fragment):
    with pytest.raises(SplitConfigError, match=fragment):
        SplitConfig.parse(text)


def test_stage_groups_and_too_many_levels():
    assert SplitConfig.parse("2-4-4").stage_groups(3) == [1, 2, 4]
    assert SplitConfig.parse("1-2-2").stage_groups(3) == [1, 1, 2]
    assert SplitConfig.parse("4-4").stage_groups(4) == [1, 1, 1, 4]
    with pytest.raises(SplitConfigError, match="only 3 stages"):
        SplitConfig.parse("2-2-2-2-2").stage_groups(3)


def test_merge_adjacent_fine_groups():
    q = torch.softmax(torch.randn(4, 7), 0)
    merged = merge_groups(q, 2)
    assert torch.allclose(merged[0], q[0] + q[1]) and torch.allclose(merged[1], q[2] + q[3])
    assert torch.allclose(merged.sum(0), torch.ones(7))
    assert merge_hard(torch.tensor([0, 1, 2, 3]), 4, 2).tolist() == [0, 0, 1, 1]


def test_assignments_are_softmax_over_groups_with_small_init():
    a = Assignments({"classes": (4, 10), "layer3.0.mid": (2, 6)})
    assert a.logit("classes").shape == (4, 10)
    assert a.logit("classes").std() < 0.05  # N(0, 0.01^2)
    assert torch.allclose(a.probs("classes").sum(0), torch.ones(10))
    assert a.probs("classes", 2).shape == (2, 10)
    assert set(a.names()) == {"classes", "layer3.0.mid"}
