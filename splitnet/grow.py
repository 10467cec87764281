"""Growing a cut tree by new classes without retraining it.

A new top-level subtree, shaped as one of the existing ones (its blocks, the trunk channels it reads,
its branches), answers the new classes; the trunk and the old subtrees are frozen, so every old
weight stays as it was and the old subtrees' logits do not change by a bit. The new subtree learns
against the old subtrees' logits in one softmax over all the classes (:class:`GrowingTree`): on
images of the new classes it must outscore the old subtrees, on a replay sample of old-class images it
must not, which is what calibrates its logits against theirs.

    grown = grow(tree, ["new class", ...], like=most_similar(tree, new_batches))
    model = GrowingTree(grown)                                 # trains only grown.subtrees[-1]
    opt = torch.optim.SGD(parameter_groups(model.new, lr, wd), lr=lr, momentum=0.9)
    train_one_epoch(model, new_and_replay_batches, opt)
    calibrate(grown, held_out_batches)                         # the new logits' scale and shift, fitted
    save_grown(grown, parent_dir, out_dir)                     # old files copied byte for byte

A grown tree's manifest records its parent (directory and manifest SHA-256), the added classes and,
per added subtree, the sibling it was shaped as (:mod:`splitnet.artifacts` rebuilds it from that).

**Calibration.** Trained on the new classes' images against a small replay of the old ones, the new
subtree outscores the old subtrees on old-class images it never saw (CIFAR-100, 80 classes grown by
20, 20 replayed per class: a third of the old classes' test images lost to the new classes).
:func:`calibrate` fits one scale and one shift of the new logits (``scale * z + shift``, as BiC, Wu et
al. 2019) by class-balanced cross-entropy over held-out images of every class, the old logits fixed,
and folds them into the new classifiers' weights and biases: the tree stays a tree, the old subtrees
stay untouched, and fitting again on the same images gives back (1, 0).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .artifacts import MANIFEST, read_manifest, save_tree, sha256_file
from .tree import SplitTree, leaves, sibling_copy

INITS = ("sibling", "fresh")


def grow(tree: SplitTree, class_names: list[str], like: int, init: str = "sibling") -> SplitTree:
    """``tree`` with one more top-level subtree, shaped as subtree ``like``, for the classes
    ``class_names`` (ids ``tree.num_classes`` on, spread over the sibling's leaves in order). The trunk
    and the old subtrees are the same modules as ``tree``'s (not copies): freeze them while training
    the new one (:class:`GrowingTree` does). ``init``: the new subtree starts from the sibling's
    weights (``sibling``) or re-initialised (``fresh``); its classifiers are new either way."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: use {' or '.join(INITS)}")
    if not 0 <= like < len(tree.subtrees):
        raise ValueError(f"like: subtree {like} does not exist; this tree has {len(tree.subtrees)}")
    old_names = list(tree.info.get("class_names") or [])
    clash = sorted(set(class_names) & set(old_names))
    if clash:
        raise ValueError(f"class {clash[0]!r} is already in the tree ({len(clash)} new class names clash)")
    if len(set(class_names)) != len(class_names) or not class_names:
        raise ValueError("the new classes need distinct names, at least one")
    first, count = tree.num_classes, len(class_names)
    sibling = tree.subtrees[like]
    n_leaves = len(leaves(sibling))
    if count < n_leaves:
        raise ValueError(f"{count} new classes cannot fill the {n_leaves} leaves of subtree {like}")
    ids = torch.arange(first, first + count)
    leaf_classes = list(torch.tensor_split(ids, n_leaves))  # contiguous, ascending: the new logits are in class order
    new = sibling_copy(sibling, leaf_classes, fresh=init == "fresh")
    new.to(next(sibling.parameters()).device)
    subtree = len(tree.subtrees)
    groups = len(tree.group_to_subtree)
    class_to_group = torch.cat([tree.class_to_group.cpu(),
                                torch.cat([torch.full((len(c),), groups + k) for k, c in enumerate(leaf_classes)])])
    entry = {"subtree": subtree, "like": like, "init": init, "leaf_classes": [c.tolist() for c in leaf_classes]}
    info = {**tree.info, "class_names": old_names + list(class_names)}
    grown = SplitTree(tree.trunk, [*tree.subtrees, new], arch=tree.arch, split=tree.split, num_classes=first + count,
                      hard=tree.hard, class_to_group=class_to_group, info=info,
                      group_to_subtree=tree.group_to_subtree + [subtree] * n_leaves, grown=tree.grown + [entry],
                      lineage={"added_classes": list(class_names)})
    grown.set_layers = getattr(tree, "set_layers", {})
    return grown


@torch.no_grad()
def sibling_affinity(tree: SplitTree, batches, device="cpu", max_batches: int | None = None) -> list[float]:
    """Per top-level subtree, the mean probability the tree puts on its classes for the images of
    ``batches`` (the new classes'): the subtree whose classes the new ones are mistaken for most."""
    tree.eval()
    mass = torch.zeros(len(tree.subtrees), dtype=torch.float64)
    n = 0
    for i, (x, _) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        probs = tree(x.to(device)).float().softmax(1).cpu()
        mass += torch.stack([probs[:, sub.classes.cpu()].sum(1).sum() for sub in tree.subtrees]).double()
        n += len(x)
    return (mass / max(n, 1)).tolist()


def most_similar(tree: SplitTree, batches, device="cpu", max_batches: int | None = None) -> int:
    """The subtree :func:`sibling_affinity` ranks first."""
    affinity = sibling_affinity(tree, batches, device, max_batches)
    return max(range(len(affinity)), key=affinity.__getitem__)


class GrowingTree(nn.Module):
    """A grown tree as it trains: the trunk and every subtree but the last frozen (eval mode, no
    gradient, so neither their weights nor their BatchNorm statistics move), the last one trainable.
    ``forward(x)`` returns logits over all the classes in class order (the old subtrees' combined, then
    the new subtree's, whose class ids come after every old one)."""

    def __init__(self, tree: SplitTree):
        super().__init__()
        self.tree = tree
        self.old = list(tree.subtrees)[:-1]
        self._old_position = torch.argsort(torch.cat([s.classes for s in self.old]))
        for p in list(tree.trunk.parameters()) + [p for s in self.old for p in s.parameters()]:
            p.requires_grad_(False)
        self.train()

    @property
    def new(self) -> nn.Module:
        """The subtree being trained (not registered twice: the state dict is the tree's)."""
        return self.tree.subtrees[-1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.tree.trunk.eval()
        for s in self.old:
            s.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.tree.trunk(x)
            old = torch.cat([s(features) for s in self.old], dim=1).index_select(1, self._old_position.to(x.device))
        return torch.cat([old, self.new(features)], dim=1)


@torch.no_grad()
def calibration_logits(tree: SplitTree, batches, device="cpu") -> dict:
    """What :func:`fit_calibration` needs of ``tree``'s logits on ``batches`` (images of old and new
    classes), per image: the log-sum-exp of the old logits, the label's old logit (0 for a new class),
    the new subtree's logits and the label: O(images x new classes) memory, whatever the old classes."""
    tree.eval()
    first = int(tree.subtrees[-1].classes.min())  # the new subtree's ids come after every old one
    parts = {"old_lse": [], "old_target": [], "new": [], "label": []}
    for x, y in batches:
        z = tree(x.to(device)).float().cpu()
        y = torch.as_tensor(y).long().cpu()
        old = z[:, :first]
        parts["old_lse"].append(old.logsumexp(1))
        parts["old_target"].append(torch.where(y < first, old.gather(1, y.clamp(max=first - 1)[:, None])[:, 0], 0.0))
        parts["new"].append(z[:, first:])
        parts["label"].append(y)
    if not parts["label"]:
        raise ValueError("calibration: no images")
    return {k: torch.cat(v) for k, v in parts.items()} | {"first": first}


def _loss_terms(logits: dict) -> dict:
    """What the loss reads on every L-BFGS step, computed once: float64 logits, which images are of a
    new class and their column, and the class-balanced weights (every class present weighs the same)."""
    y, first = logits["label"], logits["first"]
    w = 1.0 / torch.bincount(y)[y].double()
    return {"old_lse": logits["old_lse"].double(), "old_target": logits["old_target"].double(),
            "new": logits["new"].double(), "is_new": y >= first, "column": (y - first).clamp(min=0)[:, None],
            "weight": w / w.sum()}


def _calibrated_loss(terms: dict, scale, shift) -> torch.Tensor:
    """Class-balanced cross-entropy with the new logits ``scale * z + shift`` and the old ones as they are."""
    new = scale * terms["new"] + shift
    lse = torch.logaddexp(terms["old_lse"], new.logsumexp(1))
    target = torch.where(terms["is_new"], new.gather(1, terms["column"])[:, 0], terms["old_target"])
    return ((lse - target) * terms["weight"]).sum()


def fit_calibration(logits: dict) -> dict:
    """The scale (> 0) and shift of the new logits that minimise :func:`_calibrated_loss` (convex in
    both: the logits are affine in them), by L-BFGS in float64; with the loss before and after."""
    y, first = logits["label"], logits["first"]
    if not (y < first).any() or not (y >= first).any():
        raise ValueError("calibration needs held-out images of both old and new classes")
    terms = _loss_terms(logits)
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # log scale, shift
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _calibrated_loss(terms, p[0].exp(), p[1])
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    scale, shift = float(p[0].detach().exp()), float(p[1].detach())
    before = float(_calibrated_loss(terms, 1.0, 0.0))
    after = float(_calibrated_loss(terms, scale, shift))
    if not after <= before:  # never worse than leaving the logits alone
        scale, shift, after = 1.0, 0.0, before
    return {"scale": scale, "shift": shift, "loss_before": before, "loss_after": after, "images": int(len(y)),
            "classes": int(torch.unique(y).numel())}


@torch.no_grad()
def fold_calibration(subtree: nn.Module, scale: float, shift: float) -> None:
    """``subtree``'s logits become ``scale * logits + shift``: every leaf classifier's weight and bias
    scaled, the shift added to the bias."""
    for leaf in leaves(subtree):
        fc = leaf.fc
        if fc.bias is None:
            raise ValueError("calibration: the new classifiers have no bias")
        fc.weight.mul_(scale)
        fc.bias.mul_(scale).add_(shift)


def calibrate(tree: SplitTree, batches, device="cpu") -> dict:
    """Fit the new subtree's logit scale and shift on ``batches`` (held-out images of old and new
    classes: not the ones it trained on) and fold them into its classifiers. Returns the fit (also
    recorded in the manifest's entry for the subtree). The old subtrees are not touched."""
    if not tree.grown:
        raise ValueError("calibration: not a grown tree (no subtree added)")
    fit = fit_calibration(calibration_logits(tree, batches, device))
    fold_calibration(tree.subtrees[-1], fit["scale"], fit["shift"])
    entry = tree.grown[-1]
    previous = entry.get("calibration")
    if previous:  # calibrated again: the folded transform composes
        fit = {**fit, "scale": previous["scale"] * fit["scale"], "shift": previous["shift"] * fit["scale"] + fit["shift"]}
    entry["calibration"] = {k: fit[k] for k in ("scale", "shift", "images", "classes", "loss_before", "loss_after")}
    return fit


def save_grown(tree: SplitTree, parent: str | Path, directory: str | Path, input_size: int | None = None,
               parent_uri: str | None = None) -> Path:
    """Write the grown ``tree`` to ``directory``: the trunk's and the old subtrees' files copied from the
    tree directory ``parent`` byte for byte (checked against the SHA-256 the parent's manifest holds),
    the new subtree's file written, the manifest recording the parent (``parent_uri``, where it is read
    from a local copy) and the added classes."""
    parent = Path(parent)
    manifest = read_manifest(parent)
    old = [manifest["trunk"]] + list(manifest["subtrees"])
    reuse = {entry["file"]: (parent / entry["file"], entry) for entry in old}
    tree.lineage = {"parent": {"tree": parent_uri or str(parent.resolve()), "manifest_sha256": sha256_file(parent / MANIFEST)},
                    "added_classes": tree.lineage.get("added_classes", [])}
    return save_tree(tree, directory, input_size=input_size or manifest["input_size"],
                     dense_cost=manifest["counts"].get("dense"), reuse=reuse)
