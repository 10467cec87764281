"""benchmarks/pareto.py: every route at the same budget, resumable — a run killed mid-epoch continues from the
step it last saved and ends where an uninterrupted run ends; two worker processes share the routes."""
import json
import sys

import pytest

from conftest import CIFAR, ROOT
from splitnet.train import train_one_epoch

sys.path.insert(0, str(ROOT / "benchmarks"))
import pareto  # noqa: E402

pytestmark = pytest.mark.integration  # a whole benchmark, run four times (about a minute and a half)

# 10 classes x 16 images, batch 16: 10 steps an epoch, a checkpoint every 3 (after steps 3, 6, 9 and 10)
TINY = ["--data", str(CIFAR), "--superclasses", "aquatic_mammals,vehicles_1", "--per-class", "16", "--widths", "1",
        "--tree-widths", "1", "--splits", "2-2-2", "--epochs", "3", "--base-epochs", "1", "--group-epochs", "1",
        "--distill", "grouped:4:0.5", "--distill-seeds", "0", "--random", "all", "--threads", "1",
        "--batch", "16", "--checkpoint-every-steps", "3"]
ROUTES = {"dense-k1", "splitnet-k1-2-2-2", "random-k1-2-2-2", "plain-k1-2-2-2-s0", "distill-grouped-t4-w0.5-k1-2-2-2-s0"}


def _top1(work):
    return {r["route"]: r["top1"] for r in json.loads((work / "pareto.json").read_text())["routes"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pareto")
    assert pareto.main([*TINY, "--work", str(tmp / "whole"), "--docs", str(tmp / "docs")]) == 0
    return tmp


def test_one_run_writes_every_route_the_table_and_the_picture(uninterrupted):
    assert set(_top1(uninterrupted / "whole")) == ROUTES
    assert (uninterrupted / "docs" / "pareto.png").stat().st_size > 1000
    assert "| splitnet-k1-2-2-2 | splitnet | 1 | 2-2-2 |" in (uninterrupted / "docs" / "pareto.md").read_text()
    history = json.loads((uninterrupted / "whole" / "dense-k1.json").read_text())["history"]
    assert [h["steps"] for h in history] == [10, 10, 10] and [h["images"] for h in history] == [160, 160, 160]


def _killed_at(monkeypatch, call: int):
    """train_one_epoch (one call per checkpointed part of an epoch) raising at its ``call``-th call."""
    real, calls = pareto.train_one_epoch, {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "train_one_epoch", dies)


def test_a_run_killed_mid_epoch_resumes_at_its_last_step_and_ends_where_an_uninterrupted_one_does(
        uninterrupted, tmp_path, monkeypatch):
    work = tmp_path / "killed"
    # calls 1-4: the baseline's epoch (3 + 3 + 3 + 1 steps), 5-12: the rest's two; the 6th is its 2nd part
    _killed_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        pareto.main([*TINY, "--work", str(work)])
    assert (work / "dense-k1-baseline.safetensors").exists() and not (work / "dense-k1.json").exists()
    state = json.loads((work / "dense-k1-rest" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, 3)

    # resumed: the rest's remaining 3 + 4 parts, then the grouping's epoch; killed in its 2nd part
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    _killed_at(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        pareto.main([*TINY, "--work", str(work)])
    assert "[dense-k1-rest] resuming after step 3 of epoch 1" in lines
    assert not any(line.startswith("[dense-k1-baseline]") for line in lines)  # finished, read back
    state = json.loads((work / "splitnet-k1-2-2-2" / "group" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, 3) and state["grouping"]

    lines.clear()
    monkeypatch.setattr(pareto, "train_one_epoch", train_one_epoch)
    assert pareto.main([*TINY, "--work", str(work)]) == 0
    assert "[splitnet-k1-2-2-2/group] resuming after step 3 of epoch 1" in lines
    assert not any(line.startswith("[dense-k1-rest]") for line in lines)
    assert _top1(work) == _top1(uninterrupted / "whole")  # bit for bit: same weights, batches and crops
    history = json.loads((work / "dense-k1.json").read_text())["history"]
    assert [h["steps"] for h in history] == [10, 10, 10]  # the epoch's parts merged into one entry


def test_two_workers_share_the_routes_each_trained_once(uninterrupted, tmp_path, capfd):
    work = tmp_path / "two"
    assert pareto.main([*TINY, "--work", str(work), "--workers", "2"]) == 0
    out = capfd.readouterr().out
    assert "2 worker processes" in out
    for route in ("dense-k1-baseline", "dense-k1-rest", "splitnet-k1-2-2-2/group", "random-k1-2-2-2/group",
                  "plain-k1-2-2-2-s0", "distill-grouped-t4-w0.5-k1-2-2-2-s0"):
        assert out.count(f"[{route}] epoch 1/") == 1, route  # trained by one worker, not both
    assert _top1(work) == _top1(uninterrupted / "whole")
    assert "| dense-k1 | dense | 1 | 1 |" in out  # the parent's table, after both workers
