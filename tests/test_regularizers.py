import math

import pytest
import torch

from splitnet import build_model
from splitnet.regularizers import (RegularizerWeights, balance_term, disjoint_term, group_weight_term,
                                   parameter_groups, regularization_loss, regularizer_terms)


def one_hot(labels, groups):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), groups).t().float()


def test_disjoint_is_one_at_uniform_and_zero_at_one_hot():
    assert disjoint_term(torch.full((4, 12), 0.25)).item() == pytest.approx(1.0)
    assert disjoint_term(one_hot([0, 1, 2, 3] * 3, 4)).item() == pytest.approx(0.0)


def test_balance_is_one_when_balanced_and_larger_otherwise():
    assert balance_term(one_hot([0, 1, 2, 3] * 3, 4)).item() == pytest.approx(1.0)
    assert balance_term(torch.full((3, 9), 1 / 3)).item() == pytest.approx(1.0)
    assert balance_term(one_hot([0] * 9 + [1, 2, 3], 4)).item() > 2.0


@pytest.mark.parametrize("shape", [(64, 32), (64, 32, 3, 3)])
def test_weight_term_is_about_one_for_random_dense_and_zero_for_block_diagonal(shape):
    torch.manual_seed(0)
    dout, din = shape[:2]
    sigma = math.sqrt(1.0 / (din * (shape[2] * shape[3] if len(shape) == 4 else 1)))
    w = torch.randn(shape) * sigma
    groups = 4
    uniform_in, uniform_out = torch.full((groups, din), 1 / groups), torch.full((groups, dout), 1 / groups)
    assert group_weight_term(w, uniform_in, uniform_out).item() == pytest.approx(1.0, rel=0.1)
    gin, gout = torch.arange(din) % groups, torch.arange(dout) % groups
    mask = (gout[:, None] == gin[None, :]).float()
    w_block = w * (mask if w.dim() == 2 else mask[:, :, None, None])
    assert group_weight_term(w_block, one_hot(gin, groups), one_hot(gout, groups)).item() < 1e-4
    # off-block energy is penalized
    assert group_weight_term(w, one_hot(gin, groups), one_hot(gout, groups)).item() > 0.5


def test_weight_term_matches_formula_by_loops():
    torch.manual_seed(1)
    w = torch.randn(5, 4)  # linear [Dout, Din]
    p = torch.softmax(torch.randn(2, 4), 0)
    q = torch.softmax(torch.randn(2, 5), 0)
    W = w.t()  # [Din, Dout]
    din, dout, G = 4, 5, 2
    total = 0.0
    for g in range(G):
        row = sum(torch.linalg.norm((1 - p[g, i]) * q[g] * W[i]) for i in range(din)) / (din * math.sqrt(dout))
        col = sum(torch.linalg.norm((1 - q[g, j]) * p[g] * W[:, j]) for j in range(dout)) / (math.sqrt(din) * dout)
        total += row + col
    expected = total / (2 * (G - 1) * math.sqrt(1 / din) / G)
    assert group_weight_term(w, p, q).item() == pytest.approx(float(expected), rel=1e-5)


def test_cross_entropy_does_not_reach_assignments_but_regularizers_do():
    model = build_model("wrn-10-2", 10, "2-2-2")
    ce = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    ce.backward()
    assert all(p.grad is None for p in model.assignments.parameters())
    model.zero_grad()
    loss, terms = regularization_loss(model, RegularizerWeights())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.assignments.parameters())
    assert set(terms) == {"weight", "disjoint", "balance"}


def test_self_weighted_combination():
    model = build_model("wrn-10-2", 10, "2-2-2")
    terms = regularizer_terms(model)
    s = terms["per_layer"]
    assert terms["weight"].item() == pytest.approx(float((s * s).sum() / s.sum()), rel=1e-5)
    assert len(s) == len(model.split_layers())


def test_parameter_groups_separate_assignments_and_split_layers():
    model = build_model("wrn-10-2", 10, "2-2-2")
    groups = {g["name"]: g for g in parameter_groups(model, 0.1, 5e-4, split_lr_mult=10, assignment_lr_mult=3)}
    assert groups["assignments"]["weight_decay"] == 0 and groups["assignments"]["lr"] == pytest.approx(0.3)
    assert groups["split_weights"]["lr"] == pytest.approx(1.0)
    assert groups["weights"]["weight_decay"] == 5e-4
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))
