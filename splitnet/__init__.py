"""SplitNet (Kim et al., ICML 2017) in plain PyTorch: learn to split a classifier into a tree.

    from splitnet import build_model, cut
    model = build_model("wrn-16-8", num_classes=100, split="2-2-2")
    ...  # train with splitnet.regularizers.regularization_loss added to the loss
    tree = cut(model)            # shared trunk + G subtrees, logits in the original class order
    tree.save("runs/x/tree")     # manifest.yaml + safetensors; splitnet.load_tree(...) reloads

Imports no Ray.
"""
from .assignment import Assignments, SplitConfig, SplitConfigError
from .models import build_model, list_models, register_model, SplitModel
from .tree import SplitTree, HardAssignment, build_tree, cut, hard_assignment, balanced_assignment, mask_off_block_weights_

__all__ = ["Assignments", "SplitConfig", "SplitConfigError", "build_model", "list_models", "register_model",
           "SplitModel", "SplitTree", "HardAssignment", "build_tree", "cut", "hard_assignment",
           "balanced_assignment", "mask_off_block_weights_"]
__version__ = "0.1.0"
