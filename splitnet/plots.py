"""Pictures for reports (matplotlib, PNG): the class assignment, the block-diagonal weight, the tree."""
from __future__ import annotations

import os

import numpy as np
import torch


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_assignment(q: torch.Tensor, path: str | os.PathLike, title: str = "class assignment",
                    names: list[str] | None = None) -> str:
    """Soft assignment q [G, D] as G stacked bars, members sorted by hard group then confidence.

    Names are printed (one column each, rotated) only up to 60 members: beyond that they cannot be
    read at any page width, and the report lists the classes of each group as text instead.
    """
    plt = _plt()
    q = q.detach().float().cpu().numpy()
    hard = q.argmax(0)
    order = np.lexsort((-q.max(0), hard))
    with_names = names is not None and len(order) <= 60
    width = 10 if not with_names else max(6, 0.22 * len(order))
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.45 * q.shape[0] + (1.6 if with_names else 0)))
    im = ax.imshow(q[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_ylabel("group")
    ax.set_yticks(range(q.shape[0]))
    for b in np.flatnonzero(np.diff(hard[order])):
        ax.axvline(b + 0.5, color="white", lw=1.2)
    if with_names:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=8)
    else:
        ax.set_xlabel(f"{len(order)} members, sorted by group (white lines) then confidence")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.02, label="probability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _block_energy(weight: torch.Tensor, in_groups: torch.Tensor, out_groups: torch.Tensor) -> tuple[np.ndarray, float]:
    """sum over taps of W^2, rows/cols sorted by group: ([Dout, Din], off-block fraction)."""
    w2 = weight.detach().float().cpu().pow(2)
    if w2.dim() > 2:
        w2 = w2.flatten(2).sum(2)
    in_groups, out_groups = in_groups.cpu(), out_groups.cpu()
    off = out_groups[:, None] != in_groups[None, :]
    total = float(w2.sum())
    frac = float(w2[off].sum()) / total if total > 0 else 0.0
    rows = torch.argsort(out_groups, stable=True)
    cols = torch.argsort(in_groups, stable=True)
    return w2[rows][:, cols].numpy(), frac


def _draw_blocks(ax, w2: np.ndarray, in_groups: torch.Tensor, out_groups: torch.Tensor, title: str):
    """log10 of the energy; exact zeros drawn in the lowest colour. Returns the image (for a colorbar)."""
    positive = w2[w2 > 0]
    top = float(np.log10(positive.max())) if positive.size else 0.0
    low = top - 6  # six decades: the off-block weights of a finished grouping sit at exactly 0
    img = np.log10(np.maximum(w2, 10.0 ** low))
    im = ax.imshow(img, aspect="auto", cmap="magma", vmin=low, vmax=top, interpolation="nearest")
    for boundaries, line in ((torch.bincount(out_groups.cpu()).cumsum(0)[:-1], ax.axhline),
                             (torch.bincount(in_groups.cpu()).cumsum(0)[:-1], ax.axvline)):
        for b in boundaries.tolist():
            line(b - 0.5, color="cyan", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_split_layers(layers: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
                      path: str | os.PathLike, title: str = "split layers, W^2 by group (log scale)") -> str:
    """Split layers side by side: each one's weight energy (conv: summed over taps), rows = outputs and
    columns = inputs sorted by group, on a log scale (six decades): the diagonal blocks are what the
    cut keeps, everything else it drops; each panel's title gives its off-block share of the energy.

    layers: (name, weight, input group ids [Din], output group ids [Dout]) per panel.
    """
    plt = _plt()
    n = len(layers)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.3 * rows + 0.4), squeeze=False, layout="constrained")
    im = None
    for ax, (name, weight, gin, gout) in zip(axes.flat, layers):
        w2, frac = _block_energy(weight, gin, gout)
        im = _draw_blocks(ax, w2, gin, gout, f"{name}\n{tuple(w2.shape[::-1])} in x out, off-block {frac:.2%}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, label="log10 W^2 (relative; bottom = 0)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_group_semantics(class_to_group: list[int], class_to_super: list[str], path: str | os.PathLike,
                         title: str = "classes of each group, by superclass") -> str:
    """Counts of every superclass (rows) in every group (columns): a semantic grouping puts each
    superclass's classes into one column; random groups spread them evenly."""
    plt = _plt()
    supers = sorted(set(class_to_super))
    groups = sorted(set(int(g) for g in class_to_group))
    counts = np.zeros((len(supers), len(groups)), dtype=int)
    for g, s in zip(class_to_group, class_to_super):
        counts[supers.index(s), groups.index(int(g))] += 1
    order = np.lexsort((-counts.max(1), counts.argmax(1)))
    counts = counts[order]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(groups), 1.0 + 0.3 * len(supers)))
    ax.imshow(counts, aspect="auto", cmap="Blues", interpolation="nearest")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_yticks(range(len(supers)))
    ax.set_yticklabels([supers[i] for i in order], fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"group {g}" for g in groups], fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_tree(manifest: dict, path: str | os.PathLike) -> str:
    """The tree of a manifest: trunk, subtrees, leaf groups with class counts and parameters."""
    plt = _plt()
    subtrees, groups = manifest["subtrees"], manifest["groups"]
    branching = any(len(sub["groups"]) > 1 for sub in subtrees)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4 if branching else 2.6))
    ax.axis("off")
    box = dict(boxstyle="round", fc="#e8f0fe", ec="#1a73e8")
    trunk = manifest["trunk"]
    ax.text(0.5, 0.9, f"trunk\n{trunk['weights'] / 1e6:.2f}M weights", ha="center", va="center", bbox=box)
    for s, sub in enumerate(subtrees):
        xs = (s + 0.5) / len(subtrees)
        ax.plot([0.5, xs], [0.83, 0.6], color="gray")
        ax.text(xs, 0.55, f"{sub['name']}\n{sub['weights'] / 1e6:.2f}M, {len(sub['classes'])} classes",
                ha="center", va="center", bbox=dict(boxstyle="round", fc="#fef7e0", ec="#f9ab00"))
        if len(sub["groups"]) > 1:
            for g in sub["groups"]:
                xg = (g + 0.5) / len(groups)
                ax.plot([xs, xg], [0.48, 0.25], color="gray")
                ax.text(xg, 0.2, f"group {g}\n{len(groups[g]['classes'])} classes", ha="center", va="center",
                        bbox=dict(boxstyle="round", fc="#e6f4ea", ec="#34a853"), fontsize=8)
    ax.set_title(f"{manifest['arch']} split {manifest['split']}: "
                 f"{manifest['counts']['split']['weights'] / 1e6:.2f}M weights")
    ax.set_xlim(0, 1)
    ax.set_ylim(0 if branching else 0.4, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
