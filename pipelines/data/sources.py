"""The layouts users hold their images in, and the shard formats ``splitnet prepare`` writes.

Sources (read as they are): a CIFAR-100 folder (``train.npz`` / ``test.npz``), an ImageFolder tree
(``root/<class>/*.jpg``), or a folder of per-synset tars (``n01440764.tar`` holding
``n01440764_<id>.JPEG``, the official ImageNet-22K release). Each is listed as :class:`Item`
references (no image bytes) so a shard plan can be made and shuffled before anything is read.

Shards: Parquet (columns ``key``, ``image`` bytes, ``label``) or WebDataset tars
(``<key>.<jpg|png|webp>`` + ``<key>.cls``). Images are stored as they came (JPEGs are never
re-encoded); CIFAR's pixel arrays are encoded as PNG.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Item:
    """Where one image lives: ``kind`` is "cifar", "file" or "tar"; ``ref`` and ``offset/size`` locate it."""

    key: str
    label: int
    kind: str
    ref: str
    offset: int = 0
    size: int = 0
    split: str = "train"

    def to_row(self) -> list:
        return [self.key, self.label, self.kind, self.ref, self.offset, self.size, self.split]

    @classmethod
    def from_row(cls, row) -> "Item":
        return cls(*row)


@dataclass
class Source:
    kind: str                 # "cifar100", "imagefolder", "synset-tars"
    root: str
    classes: list[str]        # class names or wnids, index = label
    items: dict[str, list[Item]]  # split -> items
    parents: list[str] | None = None  # e.g. CIFAR superclass names


def detect(root: str | os.PathLike) -> str:
    """Which layout ``root`` holds; raises ValueError naming what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if (root / "train.npz").is_file():
        return "cifar100"
    names = sorted(p.name for p in root.iterdir())
    if any(n.endswith(".tar") and n[:1] == "n" and n[1:9].isdigit() for n in names):
        return "synset-tars"
    if any((root / n).is_dir() for n in names):
        return "imagefolder"
    raise ValueError(f"{root}: not a CIFAR-100 folder (train.npz), an ImageFolder tree (<class>/ subfolders) "
                     "or a folder of per-synset nXXXXXXXX.tar files")


def list_source(root: str | os.PathLike) -> Source:
    """List every image of ``root`` (any supported layout) without reading pixels."""
    kind = detect(root)
    root = Path(root)
    if kind == "cifar100":
        items, classes, parents = {}, None, None
        for split in ("train", "test"):
            path = root / f"{split}.npz"
            if not path.is_file():
                continue
            with np.load(path, allow_pickle=False) as d:
                labels = d["fine"].astype(np.int64)
                if classes is None:
                    classes = [str(n) for n in d["fine_names"]]
                    coarse_names = [str(n) for n in d["coarse_names"]]
                    coarse_of = {}
                    for f, c in zip(labels.tolist(), d["coarse"].tolist()):
                        coarse_of.setdefault(f, coarse_names[c])
                    parents = [coarse_of.get(i, "") for i in range(len(classes))]
            items[split] = [Item(f"cifar100-{split}-{i:05d}", int(lab), "cifar", str(path), i, 0, split)
                            for i, lab in enumerate(labels.tolist())]
        return Source(kind, str(root), classes, items, parents)
    if kind == "imagefolder":
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        items = []
        for label, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    key = f"{name}/{path.relative_to(root / name).with_suffix('').as_posix()}"
                    items.append(Item(key, label, "file", str(path), 0, path.stat().st_size))
        return Source(kind, str(root), classes, {"train": items})
    tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.name[:1] == "n")
    classes = [p.stem for p in tars]
    items = []
    for label, tar_path in enumerate(tars):
        with tarfile.open(tar_path, "r:") as tf:  # headers only: offsets let writers seek straight to the bytes
            for info in tf:
                if info.isfile() and Path(info.name).suffix.lower() in IMAGE_EXTENSIONS:
                    items.append(Item(Path(info.name).stem, label, "tar", str(tar_path), info.offset_data, info.size))
    return Source(kind, str(root), classes, {"train": items})


def read_item(item: Item, cifar_cache: dict | None = None) -> bytes:
    """The image bytes of one item (CIFAR pixels are PNG-encoded here)."""
    if item.kind == "file":
        return Path(item.ref).read_bytes()
    if item.kind == "tar":
        with open(item.ref, "rb") as f:
            f.seek(item.offset)
            return f.read(item.size)
    cache = cifar_cache if cifar_cache is not None else {}
    if item.ref not in cache:
        with np.load(item.ref, allow_pickle=False) as d:
            cache[item.ref] = d["x"]
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(cache[item.ref][item.offset]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_extension(data: bytes) -> str:
    """File extension matching the bytes' real format (PNGs named .JPEG exist in the wild)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def write_parquet_shard(path: str, keys: list[str], images: list[bytes], labels: list[int], filesystem=None) -> int:
    """Write one Parquet shard (key, image, label); returns bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.binary()),
                      "label": pa.array(labels, pa.int64())})
    # one row group per ~256 images keeps Ray Data's read blocks small enough to stream
    pq.write_table(table, path, row_group_size=256, compression="none", filesystem=filesystem)
    return sum(len(b) for b in images)


def write_webdataset_shard(path: str, keys: list[str], images: list[bytes], labels: list[int]) -> int:
    """Write one WebDataset tar (<key>.<ext> + <key>.cls); returns bytes written."""
    total = 0
    with tarfile.open(path, "w") as tf:
        for key, data, label in zip(keys, images, labels):
            safe = key.replace("/", "__")
            for name, payload in ((f"{safe}.{image_extension(data)}", data), (f"{safe}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0
                tf.addfile(info, io.BytesIO(payload))
            total += len(data)
    return total


def write_class_table(out: Path, classes: list[str], parents: list[str] | None = None) -> list[dict]:
    """``classes.tsv`` and ``classes.json``: index, name, lemma, parent (WordNet when names are wnids)."""
    from splitnet.wordnet import describe, is_wnid

    if classes and all(is_wnid(c) for c in classes):
        rows = [{"index": i, "name": r["wnid"], "lemma": r["lemma"], "parent": r["parent"], "parent_name": r["parent_lemma"]}
                for i, r in enumerate(describe(classes))]
    else:
        rows = [{"index": i, "name": c, "lemma": c.replace("_", " "), "parent": (parents or [""] * len(classes))[i],
                 "parent_name": (parents or [""] * len(classes))[i]} for i, c in enumerate(classes)]
    with open(out / "classes.tsv", "w") as f:
        f.write("index\tname\tlemma\tparent\tparent_name\n")
        for r in rows:
            f.write(f"{r['index']}\t{r['name']}\t{r['lemma']}\t{r['parent']}\t{r['parent_name']}\n")
    (out / "classes.json").write_text(json.dumps(rows, indent=1))
    return rows
