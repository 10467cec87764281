"""Model and optimizer state on disk without pickle: weights as safetensors, the optimizer's tensors as
safetensors and the rest as JSON. Used by the training workers' checkpoints, the report, serving and
the benchmarks; ``torch.load`` only with ``weights_only=True`` (torchvision-style ``.pth`` weights).
The dense models a run's stages wrote are read back here too (:func:`load_dense_output`, :func:`load_grouped`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitnet import build_model

from .rundir import RunDir


def save_state(module_or_state, path: Path) -> None:
    """A module's state dict (or a state dict) as safetensors."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors``, or a torchvision-style ``.pth`` read with ``weights_only=True``."""
    path = str(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def save_optimizer(opt: torch.optim.Optimizer, directory: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (hyper-parameters, steps)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def load_optimizer(opt: torch.optim.Optimizer, directory: Path, device) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in load_file(str(directory / "optimizer.safetensors"), device=str(device)).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_dense_output(model, rd: RunDir, stage: str):
    """``model`` with the dense weights a stage wrote (``baseline/`` or ``control/``), classifier included."""
    with rd.local_copy(stage) as d:
        model.load_backbone_state_dict(load_state_file(Path(d) / "model.safetensors"), skip_fc_mismatch=False)
    return model


def load_grouped(arch: str, split: str, num_classes: int, rd: RunDir):
    """The grouping stage's output (``group/``): the split-aware dense model with its assignments."""
    model = build_model(arch, num_classes, split)
    with rd.local_copy("group") as d:
        model.load_state_dict(load_state_file(Path(d) / "model.safetensors"))
    return model
