"""Saving and loading a cut tree without pickle.

A tree directory holds:

* ``manifest.yaml`` — the one source of truth about the tree: arch, split config, class names,
  class -> group, the channel indices every group owns in every split channel set, parameter and
  FLOP counts, and the SHA-256 and size of every weight file;
* ``trunk.safetensors`` and ``subtree-<g>.safetensors`` — the weights.

Loading rebuilds the module structure from the manifest on the ``meta`` device (no memory, no
random init), then fills in only the weights it needs: :func:`load_subtree` materializes one
subtree, which is what a serving replica does. Every file is checked against its SHA-256 before
it is read; a tampered or truncated file raises :class:`ArtifactError`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .accounting import default_input_size, reduction, tree_cost
from .models import build_model
from .models.base import CLASSES
from .tree import HardAssignment, SplitTree, build_tree, sibling_copy

FORMAT = "splitnet-tree/1"
MANIFEST = "manifest.yaml"

try:  # the C loader/dumper are ~10x faster on a 21,841-class manifest
    _Loader, _Dumper = yaml.CSafeLoader, yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Loader, _Dumper = yaml.SafeLoader, yaml.SafeDumper


class ArtifactError(ValueError):
    """A tree directory that cannot be loaded (missing, tampered, truncated or inconsistent)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_tree(tree, directory: str | os.PathLike, input_size: int | None = None, dense_cost: dict | None = None,
              reuse: dict[str, tuple[Path, dict]] | None = None) -> Path:
    """Write ``tree`` to ``directory`` (created if needed); returns the manifest path.

    ``dense_cost`` (from :func:`splitnet.accounting.model_cost`) adds the dense model's counts
    and the reduction to the manifest. ``reuse``: weight file name -> (the file, its manifest entry)
    for parts written before (a grown tree's trunk and old subtrees): copied byte for byte and checked
    against the SHA-256 they were saved with, never re-serialized.
    """

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    input_size = input_size or tree.info.get("input_size") or default_input_size(tree.arch)
    cost = tree_cost(tree, input_size)

    def write(name: str, module: torch.nn.Module, meta: dict) -> dict:
        path = directory / name
        tmp = directory / (name + ".tmp")
        if name in (reuse or {}):
            source, entry = reuse[name]
            shutil.copyfile(source, tmp)
            if sha256_file(tmp) != entry["sha256"]:
                tmp.unlink()
                raise ArtifactError(f"{source}: SHA-256 differs from its manifest's; not copied (the file was modified)")
        else:
            save_file(_state(module), str(tmp), metadata={"format": FORMAT, **{k: str(v) for k, v in meta.items()}})
        os.replace(tmp, path)  # never leave a half-written file under the real name
        return {"file": name, "sha256": sha256_file(path), "file_bytes": path.stat().st_size}

    trunk = {**write("trunk.safetensors", tree.trunk, {"part": "trunk"}), **cost["trunk"]}
    subtrees = []
    for g, sub in enumerate(tree.subtrees):
        entry = write(f"subtree-{g}.safetensors", sub, {"part": f"subtree-{g}"})
        subtrees.append({"index": g, "name": f"subtree-{g}", **entry, **cost["subtrees"][g],
                         "groups": [k for k, s in enumerate(tree.group_to_subtree) if s == g],
                         "classes": sub.classes.tolist()})
    class_to_group = tree.class_to_group.tolist()
    groups = [{"group": k, "subtree": tree.group_to_subtree[k],
               "classes": [c for c, gg in enumerate(class_to_group) if gg == k]} for k in range(len(tree.group_to_subtree))]
    graph_layers = getattr(tree, "set_layers", {})
    channel_sets = tree.hard.to_dict()
    for name, entry in channel_sets.items():
        if name in graph_layers:
            entry["layers"] = graph_layers[name]
    info = {k: v for k, v in tree.info.items() if k != "class_names"}
    counts = {"split": {k: cost[k] for k in ("weights", "params", "state_bytes", "flops")}}
    if dense_cost:
        counts["dense"] = {k: dense_cost[k] for k in ("weights", "params", "state_bytes", "flops") if k in dense_cost}
        counts["reduction"] = reduction(dense_cost, cost)
    manifest = {
        "format": FORMAT,
        "arch": tree.arch,
        "split": str(tree.split),
        "num_classes": tree.num_classes,
        "input_size": int(input_size),
        "class_names": list(tree.info.get("class_names") or [str(c) for c in range(tree.num_classes)]),
        "class_to_group": class_to_group,
        "groups": groups,
        "trunk": trunk,
        "subtrees": subtrees,
        "channel_sets": channel_sets,
        "counts": counts,
        "moves": tree.moves,
        "info": info,
    }
    if tree.grown:  # the subtrees splitnet.grow added: rebuilt from their sibling's shape (see _skeleton)
        manifest.update(base_classes=tree.hard.sizes[CLASSES], grown=tree.grown)
    manifest.update(tree.lineage)  # parent, added_classes
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        yaml.dump(manifest, f, Dumper=_Dumper, default_flow_style=None, sort_keys=False, width=120)
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed ``manifest.yaml`` of a tree directory (safe YAML, no Python objects)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; not a tree directory written by tree.save()")
    try:
        with open(path) as f:
            manifest = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ArtifactError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT}")
    return manifest


def _read_weights(directory: Path, entry: dict) -> dict[str, torch.Tensor]:
    path = directory / entry["file"]
    if not path.is_file():
        raise ArtifactError(f"{path}: missing weight file")
    size = path.stat().st_size
    if size != entry["file_bytes"]:
        raise ArtifactError(f"{path}: {size} bytes, manifest says {entry['file_bytes']} (truncated or replaced)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ArtifactError(f"{path}: SHA-256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}... "
                            "(the file was modified)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: unreadable safetensors file ({e})") from None


def _meta_model(manifest: dict):
    """The dense model the tree was cut from (its classes only, ``base_classes`` in a grown tree)."""
    with torch.device("meta"):  # the structure only: no memory
        return build_model(manifest["arch"], int(manifest.get("base_classes", manifest["num_classes"])), manifest["split"])


def hard_assignment(manifest: dict, model=None):
    """The group of every member of every channel set (and of every class), from the manifest alone:
    no weight file is read or hashed."""
    model = model if model is not None else _meta_model(manifest)
    return HardAssignment.from_dict(manifest["channel_sets"], {s.name: s.size for s in model.split_graph().sets.values()})


def _skeleton(manifest: dict):
    """The tree's structure on the meta device (no memory), from the manifest alone."""
    model = _meta_model(manifest)
    info = dict(manifest.get("info") or {})
    info["class_names"] = manifest["class_names"]
    tree = build_tree(model, hard_assignment(manifest, model), info)
    grown = manifest.get("grown") or []
    if grown:  # each added subtree is shaped as the sibling it was copied from
        subtrees = list(tree.subtrees)
        for entry in grown:
            subtrees.append(sibling_copy(subtrees[int(entry["like"])], [torch.tensor(c) for c in entry["leaf_classes"]]))
        tree = SplitTree(tree.trunk, subtrees, arch=tree.arch, split=tree.split, num_classes=int(manifest["num_classes"]),
                         hard=tree.hard, class_to_group=torch.tensor(manifest["class_to_group"]), info=info,
                         group_to_subtree=[int(g["subtree"]) for g in manifest["groups"]], grown=grown,
                         lineage={k: manifest[k] for k in ("parent", "added_classes") if k in manifest})
    if len(tree.subtrees) != len(manifest["subtrees"]):
        raise ArtifactError(f"manifest lists {len(manifest['subtrees'])} subtrees, its split {manifest['split']} gives {len(tree.subtrees)}")
    return tree


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, device) -> None:
    module.to_empty(device=device)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{what}: weights do not match the manifest's structure ({str(e).splitlines()[0]})") from None
    module.eval()


def load_tree(directory: str | os.PathLike, device: str | torch.device = "cpu", manifest: dict | None = None):
    """Rebuild the whole :class:`~splitnet.tree.SplitTree` from a tree directory (eval mode); ``manifest``:
    its manifest when the caller has read it already."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    tree = _skeleton(manifest)
    _fill(tree.trunk, _read_weights(directory, manifest["trunk"]), "trunk", device)
    for g, entry in enumerate(manifest["subtrees"]):
        _fill(tree.subtrees[g], _read_weights(directory, entry), f"subtree-{g}", device)
    tree.class_position = tree.class_position.to(device)
    return tree.eval()


def load_subtree(directory: str | os.PathLike, g: int, device: str | torch.device = "cpu"):
    """Load subtree ``g`` alone: returns (module, manifest entry). Only its weight file is read.

    The module maps trunk features [B, C, H, W] to logits [B, len(entry["classes"])] of the
    classes ``entry["classes"]``, in that order.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not 0 <= g < len(manifest["subtrees"]):
        raise ArtifactError(f"subtree {g} does not exist; this tree has {len(manifest['subtrees'])} (0..{len(manifest['subtrees']) - 1})")
    tree = _skeleton(manifest)
    sub = tree.subtrees[g]
    _fill(sub, _read_weights(directory, manifest["subtrees"][g]), f"subtree-{g}", device)
    return sub, manifest["subtrees"][g]


def subtree_inputs(manifest: dict) -> list[list[int] | None]:
    """For every subtree, the trunk channels it reads, in its order (None: all of them), from the
    manifest alone: what an ingress slices the trunk's features with before sending them."""
    return [None if sub.input_index is None else sub.input_index.tolist() for sub in _skeleton(manifest).subtrees]


def load_trunk(directory: str | os.PathLike, device: str | torch.device = "cpu", manifest: dict | None = None):
    """Load the trunk alone: returns (module, manifest); ``manifest`` as for :func:`load_tree`."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    tree = _skeleton(manifest)
    _fill(tree.trunk, _read_weights(directory, manifest["trunk"]), "trunk", device)
    return tree.trunk, manifest
