import subprocess
import sys

import pytest
import torch
from torch import nn

from splitnet import build_model, cut, hard_assignment, mask_off_block_weights_, register_model
from splitnet.assignment import SplitConfig
from splitnet.models import SplitModel, WideBasic
from splitnet.regularizers import freeze_split_bn_scale
from splitnet.tree import build_tree

from conftest import ROOT, randomize


class TinyNet(SplitModel):
    """A user's own backbone: two stages of pre-activation blocks."""

    stage_names = ("stage_a", "stage_b")
    head_norm_name = "norm"

    def __init__(self, num_classes, split="1", **kw):
        super().__init__()
        self.arch = "tiny-test"
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stage_a = nn.Sequential(WideBasic(8, 16, 16, 2))
        self.stage_b = nn.Sequential(WideBasic(16, 24, 24, 2), WideBasic(24, 24, 24))
        self.norm = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, num_classes)
        self._finish_init(num_classes, SplitConfig.parse(split), kw.get("split_dropout", 0.0))

    def stem_modules(self):
        return [self.stem]


@pytest.fixture
def tiny_registered():
    from splitnet.models import _REGISTRY
    register_model("tiny-test", TinyNet)
    yield
    _REGISTRY.pop("tiny-test", None)


def test_custom_backbone_registers_cuts_and_keeps_equivalence(tiny_registered):
    model = randomize(build_model("tiny-test", 6, "2-2-2"))
    hard = hard_assignment(model)
    mask_off_block_weights_(model, hard)
    model.eval()
    tree = build_tree(model, hard).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), tree(x), atol=1e-5)


def test_split_dropout_only_on_split_stages_and_not_in_eval():
    model = build_model("wrn-10-2", 10, "1-2-2", split_dropout=0.5)
    assert model.layer3[0].drop is not None and model.layer2[0].drop is None and model.layer1[0].drop is None
    assert model.fc_drop is not None
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_freeze_split_bn_scale():
    model = build_model("wrn-10-2", 10, "1-2-2")
    frozen = freeze_split_bn_scale(model)
    assert frozen == 6  # bn1 and bn2 of every residual block, split (layer3) or not, as the reference's bn_no_scale
    assert not model.layer3[0].bn1.weight.requires_grad and model.layer3[0].bn1.bias.requires_grad
    assert not model.layer1[0].bn2.weight.requires_grad
    assert model.bn.weight.requires_grad  # the head's BatchNorm keeps its scale (the reference's unit_last)


def test_splitnet_imports_no_ray():
    # every module of the package, found as it stands (a new one is covered without editing this list)
    code = ("import importlib, pkgutil, sys, splitnet; "
            "names = [m.name for m in pkgutil.walk_packages(splitnet.__path__, 'splitnet.')]; "
            "[importlib.import_module(n) for n in names]; "
            "assert len(names) > 20 and 'splitnet.distill' in names, names; "
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cut_tree_can_be_finetuned():
    model = randomize(build_model("wrn-10-1", 4, "2-2-2"))
    tree = cut(model).train()
    opt = torch.optim.SGD(tree.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    before = [p.detach().clone() for p in tree.parameters()]
    loss = torch.nn.functional.cross_entropy(tree(x), y)
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in tree.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tree.parameters()))
