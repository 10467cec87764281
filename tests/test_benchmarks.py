"""benchmarks/pareto.py: every route at the same budget, resumable — a run killed mid-route continues from its
last epoch and ends where an uninterrupted run ends."""
import json
import sys

import pytest

from conftest import CIFAR, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import pareto  # noqa: E402

pytestmark = pytest.mark.integration  # a whole benchmark, run twice (about a minute)

TINY = ["--data", str(CIFAR), "--superclasses", "aquatic_mammals,vehicles_1", "--per-class", "16", "--widths", "1",
        "--tree-widths", "1", "--splits", "2-2-2", "--epochs", "3", "--base-epochs", "1", "--group-epochs", "1",
        "--distill", "grouped:4:0.5", "--distill-seeds", "0", "--random", "all", "--threads", "1"]


def _top1(work):
    return {r["route"]: r["top1"] for r in json.loads((work / "pareto.json").read_text())["routes"]}


def test_a_killed_run_resumes_mid_route_and_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert pareto.main([*TINY, "--work", str(whole), "--docs", str(tmp_path / "docs")]) == 0
    expected = _top1(whole)
    assert set(expected) == {"dense-k1", "splitnet-k1-2-2-2", "random-k1-2-2-2", "plain-k1-2-2-2-s0",
                             "distill-grouped-t4-w0.5-k1-2-2-2-s0"}
    assert (tmp_path / "docs" / "pareto.png").stat().st_size > 1000
    assert "| splitnet-k1-2-2-2 | splitnet | 1 | 2-2-2 |" in (tmp_path / "docs" / "pareto.md").read_text()

    killed = tmp_path / "killed"
    real = pareto.train_one_epoch
    calls = {"n": 0}

    def dies_in_the_third_epoch(*args, **kwargs):  # dense-k1: the baseline's 1 epoch, then the rest's 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pareto, "train_one_epoch", dies_in_the_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        pareto.main([*TINY, "--work", str(killed)])
    assert (killed / "dense-k1-baseline.safetensors").exists() and not (killed / "dense-k1.json").exists()
    assert json.loads((killed / "dense-k1-rest" / "state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(pareto, "train_one_epoch", real)
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert pareto.main([*TINY, "--work", str(killed)]) == 0
    assert "[dense-k1-rest] resuming after epoch 1" in lines
    assert not any(line.startswith("[dense-k1-baseline]") for line in lines)  # finished, read back
    assert [line.split(" |")[0] for line in lines if line.startswith("[dense-k1-rest] epoch")] == ["[dense-k1-rest] epoch 2/2"]
    assert _top1(killed) == expected
