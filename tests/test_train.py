import torch

from splitnet import build_model
from splitnet.regularizers import RegularizerWeights, parameter_groups, regularizer_terms
from splitnet.train import evaluate, train_one_epoch


def synthetic(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.1 + y.float().view(-1, 1, 1, 1) / classes
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_grouping_makes_assignments_more_disjoint():
    model = build_model("wrn-10-1", 4, "2-2-2")
    before = {k: v.item() for k, v in regularizer_terms(model).items() if k != "per_layer"}
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 0.0, assignment_lr_mult=1000), momentum=0.9)
    for _ in range(4):
        stats = train_one_epoch(model, synthetic(), opt, reg_weights=RegularizerWeights(1, 1, 10))
    after = {k: v.item() for k, v in regularizer_terms(model).items() if k != "per_layer"}
    assert after["disjoint"] < before["disjoint"] - 0.05
    assert {"weight", "disjoint", "balance", "ce", "acc", "images_per_s"} <= set(stats)


def test_plain_training_learns_and_evaluate_counts():
    model = build_model("wrn-10-1", 4, "1")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = train_one_epoch(model, synthetic(), opt)
    for _ in range(5):
        last = train_one_epoch(model, synthetic(), opt)
    assert "weight" not in last and last["ce"] < first["ce"]
    result = evaluate(model, synthetic(seed=1))
    assert result["images"] == 64 and 0 <= result["top1"] <= result["top5"] <= 1
