"""The report's accuracy verdict: the tree against the dense model of its own budget, or plainly not."""
from pipelines.config import load_config, to_dict
from pipelines.report import _checks, _verdict, budgets, comparison

from conftest import ROOT

DEMO = ROOT / "pipelines/configs/demo.yaml"


def _cfg(*overrides):
    return to_dict(load_config(DEMO, list(overrides)))


def _metrics(**top1):
    return {k: {"top1": v, "top5": v} for k, v in top1.items()}


def _check(c, metrics):
    counts = {"reduction": {"params": 0.5}}
    return _checks(metrics, counts, {}, None, comparison(c, metrics))["tree_vs_dense"]


def test_the_demo_counts_the_trees_epochs_from_scratch():
    bud = budgets(_cfg())  # 5 baseline + 3 group + 2 finetune
    assert (bud["tree"], bud["baseline"], bud["equal"]) == (10, 5, False)
    assert bud["tree_parts"] == "5 + 3 + 2"


def test_with_a_control_the_check_is_on_the_same_budget_gap():
    c = _cfg()
    metrics = _metrics(baseline=0.48, control=0.60, grouped=0.4, cut=0.4, tree=0.556)
    check = _check(c, metrics)
    assert check["value"] == 0.556 - 0.60 and check["equal_budget"] and check["ok"] is False
    assert "same budget (5 + 3 + 2 = 10 epochs)" in check["what"]
    assert _check(c, _metrics(baseline=0.48, control=0.57, grouped=0.4, cut=0.4, tree=0.556))["ok"] is True
    line = _verdict(c, metrics)
    assert "against 0.600 for the dense model trained for the same budget (5 + 3 + 2 = 10 epochs), -4.4 points" in line
    assert "the dense baseline (5 epochs) reached 0.480" in line


def test_without_a_control_the_report_says_it_is_not_equal_budget_and_checks_nothing():
    c = _cfg("control.enabled=false")
    metrics = _metrics(baseline=0.48, grouped=0.4, cut=0.4, tree=0.556)  # the demo's old +7.6 points
    check = _check(c, metrics)
    assert check["ok"] is None and check["equal_budget"] is False
    assert check["value"] == 0.556 - 0.48
    assert "NOT at equal budget" in check["what"] and "(+5)" in check["what"]
    line = _verdict(c, metrics)
    assert "NOT an equal budget: the baseline trained 5 epochs, the tree 5 + 3 + 2 = 10" in line
    assert "no check is passed on the difference" in line


def test_a_baseline_that_trained_as_long_as_the_tree_is_the_yardstick():
    c = _cfg("control.enabled=false", "group.init=scratch", "group.warmup=0.2", "baseline.epochs=5")
    assert budgets(c)["equal"]  # 3 group + 2 finetune from scratch = 5 baseline epochs
    metrics = _metrics(baseline=0.50, grouped=0.4, cut=0.4, tree=0.49)
    check = _check(c, metrics)
    assert check["ok"] is True and check["equal_budget"]
    assert "trained for the same budget (5 epochs)" in _verdict(c, metrics)


def test_no_dense_model_no_check():
    c = _cfg("control.enabled=false", "baseline.enabled=false", "group.init=scratch", "group.warmup=0.2")
    check = _check(c, _metrics(grouped=0.4, cut=0.4, tree=0.49))
    assert check["ok"] is None and check["value"] is None
