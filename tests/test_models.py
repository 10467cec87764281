import pytest
import torch
import torchvision

from splitnet import build_model, list_models
from splitnet.models import CLASSES
from splitnet.regularizers import regularization_loss, RegularizerWeights

# every registered model (as timm's tests do), and the WRN pattern at two depths and a fractional width
ARCHS = [name for name in list_models() if not name.startswith("wrn-<")] + ["wrn-10-2", "wrn-16-8", "wrn-16-1.5"]
INPUT = {"alexnet": 64}  # AlexNet's stride-4 stem and three max-pools need >= 63 px


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_no_nan_and_gradients(arch):
    split = "2-2-2" if arch.startswith("wrn") else "2-4-4"
    model = build_model(arch, 10, split)
    size = INPUT.get(arch, 32)
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    reg, _ = regularization_loss(model, RegularizerWeights())
    (torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])) + reg).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ValueError, match="unknown arch 'vgg'.*resnet50"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model("wrn-15-2", 10)


def test_fractional_wrn_width_builds_cuts_and_reloads(tmp_path):
    """wrn-16-1.5 (24 / 48 / 96 channels): the width between the Pareto benchmark's dense WRN-16-1 and -2;
    its tree saves and loads back to the same function."""
    from splitnet import cut
    from splitnet.artifacts import load_tree

    model = build_model("wrn-16-1.5", 10, "2-4-4").eval()
    assert model.arch == "wrn-16-1.5" and model.fc.in_features == 96
    tree = cut(model).eval()
    tree.save(tmp_path / "tree", input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_tree(tmp_path / "tree").eval()(x), tree(x), atol=1e-5)
    with pytest.raises(ValueError, match="not a whole number"):
        build_model("wrn-16-1.3", 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_and_matches(arch):
    ref = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    model = build_model(arch, 10, "4-4").eval()
    skipped = model.load_backbone_state_dict(ref.state_dict())
    assert skipped == []
    assert set(ref.state_dict()) == set(model.backbone_state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ref(x), model(x), atol=1e-5)


def test_torchvision_1k_checkpoint_into_22k_model_skips_only_fc():
    ref = torchvision.models.resnet18(weights=None)  # 1000 classes
    model = build_model("resnet18", 37, "4-4")
    skipped = model.load_backbone_state_dict(ref.state_dict())
    assert skipped == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(ValueError, match="missing key"):
        model.load_backbone_state_dict({k: v for k, v in ref.state_dict().items() if k != "conv1.weight"})


def test_alexnet_is_torchvisions_in_names_shapes_and_function():
    """torchvision's AlexNet weights load as they are, a baseline trained here loads into
    torchvision's AlexNet, and the two compute the same logits (fc6 and fc7, held as
    convolutions over their whole input, are the same weights reshaped)."""
    ref = torchvision.models.alexnet(weights=None).eval()
    model = build_model("alexnet", 1000, "2-2-2").eval()
    assert {k: tuple(v.shape) for k, v in model.backbone_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert model.load_backbone_state_dict(ref.state_dict()) == []
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ref(x), model(x), atol=1e-5)
    assert torch.equal(model.fc6[0].fc.weight.flatten(1), ref.classifier[1].weight)
    back = torchvision.models.alexnet(weights=None).eval()
    back.load_state_dict(model.backbone_state_dict())
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5)
    # ImageNet-1K weights into a 37-class model: only the classifier (fc8) is skipped
    small = build_model("alexnet", 37, "2-2-2")
    assert small.load_backbone_state_dict(ref.state_dict()) == ["classifier.6.weight", "classifier.6.bias"]
    assert torch.equal(small.fc7[0].fc.weight.flatten(1), ref.classifier[4].weight)
    with pytest.raises(ValueError, match="classifier.1.weight: shape"):
        small.load_backbone_state_dict({**ref.state_dict(), "classifier.1.weight": torch.zeros(4096, 9215)})


def test_alexnet_split_levels_are_fc8_fc7_fc6_then_conv5():
    """fc6 reads conv5's 256 channels (6 x 6 positions each) grouped by channel; ``2-2-2``
    splits fc6, fc7 and fc8 and leaves conv5 in the trunk, ``2-2-2-2`` splits conv5 too."""
    layers = {layer.name: layer for layer in build_model("alexnet", 10, "2-2-2").split_graph().layers}
    assert layers["fc6.0.fc"].module.weight.shape == (4096, 256, 6, 6)
    assert layers["fc6.0.fc"].in_set == "conv5.0.out" and layers["fc6.0.fc"].groups == 2
    assert layers["fc7.0.fc"].in_set == "fc6.0.out" and layers["fc"].in_set == "fc7.0.out"
    assert layers["conv5.0.conv"].groups == 1 and layers["conv5.0.conv"].in_set == "stem"
    deeper = {layer.name: layer.groups for layer in build_model("alexnet", 10, "2-2-2-2").split_graph().layers}
    assert deeper == {"conv5.0.conv": 2, "fc6.0.fc": 2, "fc7.0.fc": 2, "fc": 2}
    with pytest.raises(ValueError, match="only 3 stages"):
        build_model("alexnet", 10, "2-2-2-2-2")


def test_split_graph_ties_identity_shortcuts_and_splits_projections():
    model = build_model("wrn-16-8", 100, "2-4-4")
    graph = model.split_graph()
    layers = {layer.name: layer for layer in graph.layers}
    # identity block: input and output are the same channel set
    assert layers["layer3.1.conv1"].in_set == layers["layer3.1.conv2"].out_set
    # projection shortcut: split from block input to block output
    assert layers["layer3.0.shortcut"].in_set == layers["layer3.0.conv1"].in_set == "layer2.0.out"
    assert layers["layer3.0.shortcut"].out_set == "layer3.0.out"
    # chain rule: the classifier reads the last stage's output
    assert layers["fc"].in_set == "layer3.0.out" and layers["fc"].out_set == CLASSES
    # the boundary between a 2-group and a 4-group level is learned at 4 groups
    assert graph.sets["layer2.0.out"].groups == 4 and layers["layer2.0.conv2"].groups == 2
    assert model.assignments.groups("layer1.0.out") == 2
    assert "stem" not in model.assignments
