"""CIFAR-100 from the offline copy (``.npz``, no pickle), and fast in-memory batches for CPU runs.

The default root is ``../shared/data/cifar100`` (``train.npz`` / ``test.npz``, see its README).
Where no copy is on disk and ``download=True``, torchvision's downloader fetches the official
archive (users online); nothing in this project's tests or demo needs that path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# The standard CIFAR-100 superclass of every fine class (fine id -> coarse id).
CIFAR100_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3,
                   15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17,
                   4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6,
                   19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


@dataclass
class ImageArrays:
    """Images uint8 [N, H, W, 3] (HWC, RGB), labels int64 [N], class names, optional superclasses."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    coarse_labels: np.ndarray | None = None
    coarse_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, per_class: int | None, seed: int = 0) -> "ImageArrays":
        """At most ``per_class`` images of every class (deterministic for a seed)."""
        if per_class is None:
            return self
        return self.split_per_class([per_class], seed)[0]

    def split_per_class(self, sizes: list[int], seed: int = 0) -> list["ImageArrays"]:
        """Consecutive disjoint per-class samples: ``sizes[i]`` images of every class (fewer where a class
        runs out), then every image left, ``len(sizes) + 1`` parts in all (deterministic for a seed; the
        first is ``subset(sizes[0], seed)``)."""
        rng = np.random.default_rng(seed)
        parts: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
        for c in range(len(self.class_names)):
            perm = rng.permutation(np.flatnonzero(self.labels == c))
            for i, part in enumerate(np.split(perm, np.cumsum(sizes))):
                parts[i].append(part)
        return [self._take(np.sort(np.concatenate(p))) for p in parts]

    def _take(self, keep: np.ndarray) -> "ImageArrays":
        return ImageArrays(self.images[keep], self.labels[keep], self.class_names,
                           None if self.coarse_labels is None else self.coarse_labels[keep], self.coarse_names)

    def select(self, classes: list[int]) -> "ImageArrays":
        """The images of ``classes`` (label ids), relabelled ``0..len(classes)-1`` in that order."""
        index = np.full(len(self.class_names), -1, dtype=np.int64)
        index[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes))
        keep = np.flatnonzero(index[self.labels] >= 0)
        return ImageArrays(self.images[keep], index[self.labels[keep]], [self.class_names[c] for c in classes],
                           None if self.coarse_labels is None else self.coarse_labels[keep], self.coarse_names)


def load_cifar100(root: str | os.PathLike = "../shared/data/cifar100", split: str = "train",
                  download: bool = False) -> ImageArrays:
    """CIFAR-100 ``split`` ("train" or "test") from ``root``.

    Reads ``root/<split>.npz`` (with ``allow_pickle=False``). Without it and with ``download``,
    falls back to ``torchvision.datasets.CIFAR100(root, download=True)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"invalid split {split!r}: use 'train' or 'test'")
    path = Path(root) / f"{split}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as d:
            return ImageArrays(d["x"], d["fine"].astype(np.int64), [str(n) for n in d["fine_names"]],
                               d["coarse"].astype(np.int64), [str(n) for n in d["coarse_names"]])
    if not download:
        raise FileNotFoundError(f"no CIFAR-100 at {path}; point --data at the folder holding train.npz/test.npz "
                                "(or allow the torchvision download when online)")
    from torchvision.datasets import CIFAR100  # users online: the official archive

    ds = CIFAR100(str(root), train=split == "train", download=True)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return ImageArrays(np.asarray(ds.data), labels, list(ds.classes), np.asarray(CIFAR100_COARSE)[labels], None)


def normalize(x: torch.Tensor, mean=CIFAR100_MEAN, std=CIFAR100_STD) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], normalized."""
    x = x.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched CIFAR augmentation on uint8 [B, H, W, C]: random crop after zero padding, random flip."""
    b, h, w, _ = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = dx[:, None] + torch.arange(w)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    return padded[torch.arange(b)[:, None, None], rows, cols]


def iterate_batches(data: ImageArrays, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
                    mean=CIFAR100_MEAN, std=CIFAR100_STD) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images [B, 3, H, W] float, labels [B]) batches; shuffled and augmented when ``train``."""
    n = len(data)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=gen) if train else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if train and len(idx) < 2:
            continue  # BatchNorm needs more than one sample
        x = images[idx]
        if train:
            x = random_crop_flip(x, generator=gen)
        yield normalize(x, mean, std), labels[idx]
