import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_plan_prints_dense_vs_split():
    r = run("plan", "--arch", "wrn-16-8", "--split", "2-2-2", "--num-classes", "100")
    assert r.returncode == 0, r.stderr
    assert "11.00M" in r.stdout and "5.73M" in r.stdout and "47.9%" in r.stdout
    assert "counting rule" in r.stdout


def test_plan_json():
    r = run("plan", "--arch", "wrn-16-8", "--split", "2-4-4", "--num-classes", "100", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["split_tree"]["weights"] == pytest.approx(3.62e6, rel=0.02)
    assert len(data["split_tree"]["subtrees"]) == 2
    assert data["ideal_speedup"] > 1.5


@pytest.mark.parametrize("args,fragment", [
    (["plan", "--arch", "vgg", "--split", "2", "--num-classes", "10"], "unknown arch 'vgg'"),
    (["plan", "--arch", "wrn-16-8", "--split", "2-3-2", "--num-classes", "10"], "invalid split '2-3-2'"),
    (["plan", "--arch", "wrn-16-8", "--split", "2-2", "--num-classes", "0"], "--num-classes"),
    (["plan", "--arch", "wrn-16-8", "--num-classes", "10"], "--split"),
    (["prepare", "/nonexistent", "--out", "/tmp/x"], "/nonexistent"),
    (["run"], "config"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(args, fragment):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
