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
    """Heatmap of a soft assignment q [G, D], columns sorted by hard group then confidence."""
    plt = _plt()
    q = q.detach().float().cpu().numpy()
    hard = q.argmax(0)
    order = np.lexsort((-q.max(0), hard))
    fig, ax = plt.subplots(figsize=(min(16, 2 + q.shape[1] * 0.12), 1.2 + 0.4 * q.shape[0]))
    im = ax.imshow(q[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_ylabel("group")
    ax.set_yticks(range(q.shape[0]))
    if names is not None and len(order) <= 120:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=5)
    else:
        ax.set_xlabel("member (sorted by group)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_block_diagonal(weight: torch.Tensor, in_groups: torch.Tensor, out_groups: torch.Tensor,
                        path: str | os.PathLike, title: str = "|W| reordered by group") -> str:
    """|W| of a split layer (conv: mean |W| over taps) with rows/cols sorted by group: the blocks."""
    plt = _plt()
    w = weight.detach().float().abs().cpu()
    if w.dim() > 2:
        w = w.flatten(2).mean(2)
    rows = torch.argsort(out_groups.cpu(), stable=True)
    cols = torch.argsort(in_groups.cpu(), stable=True)
    w = w[rows][:, cols].numpy()
    fig, ax = plt.subplots(figsize=(6, 6 * w.shape[0] / max(w.shape[1], 1) + 0.8))
    ax.imshow(w, aspect="auto", cmap="magma", interpolation="nearest", vmax=np.quantile(w, 0.99) or None)
    for boundaries, line in ((torch.bincount(out_groups).cumsum(0)[:-1], ax.axhline),
                             (torch.bincount(in_groups).cumsum(0)[:-1], ax.axvline)):
        for b in boundaries.tolist():
            line(b - 0.5, color="cyan", lw=0.8)
    ax.set_xlabel("input channel (by group)")
    ax.set_ylabel("output (by group)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
