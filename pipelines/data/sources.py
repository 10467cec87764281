"""The layouts users hold their images in, and the shard formats ``splitnet prepare`` writes.

Sources (read as they are): a CIFAR-100 folder (``train.npz`` / ``test.npz``), an ImageFolder tree
(``root/<class>/*.jpg``), an ImageFolder tree per split (``root/train/<class>/*.jpg`` next to
``root/val/`` or ``root/validation/`` and/or ``root/test/``), or a folder of per-synset tars
(``n01440764.tar`` holding ``n01440764_<id>.JPEG``, the official ImageNet-22K release), or an
ILSVRC-2012 release as downloaded (the official tars with the devkit, or Kaggle's copy:
:mod:`pipelines.data.ilsvrc`). Each is
listed as :class:`Item` references (no image bytes) so a shard plan can be made and shuffled
before anything is read.

Folder trees are read only when their meaning is clear; anything else is a :class:`LayoutError`
(one line naming the folder) instead of a guess: images next to class folders, class folders
holding folders (nested deeper than one level), an empty class folder, a single class, split
folders next to other folders, a val/test class that train does not have. Hidden entries
(``.DS_Store``, ``.ipynb_checkpoints/``) are skipped; other files without an image extension are
skipped and reported in :attr:`Source.warnings`.

Shards: Parquet (columns ``key``, ``image`` bytes, ``label``) or WebDataset tars
(``<key>.<jpg|png|webp>`` + ``<key>.cls``). Images are stored as they came (JPEGs are never
re-encoded); CIFAR's pixel arrays are encoded as PNG.
"""
from __future__ import annotations

import difflib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from splitnet.datasets import load_cifar100
from splitnet.wordnet import describe, is_wnid

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
    kind: str                 # "cifar100", "imagefolder", "imagefolder-splits", "synset-tars", "ilsvrc2012[-kaggle]"
    root: str
    classes: list[str]        # class names or wnids, index = label
    items: dict[str, list[Item]]  # split -> items
    parents: list[str] | None = None  # e.g. CIFAR superclass names
    warnings: list[str] = field(default_factory=list)  # one line each: what was skipped or is missing
    notes: list[str] = field(default_factory=list)     # one line each: how the layout was read (labels' origin)


class LayoutError(ValueError):
    """A source whose layout is ambiguous or broken (one line naming the folder; exit 2 in the CLI)."""


# split folder name (any case) -> split name of the shards (``val-00000.parquet``, ``data.eval_split: val``)
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def _entries(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(subfolders, image files, other files) directly inside ``folder``, sorted; hidden ones skipped."""
    dirs, images, other = [], [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            dirs.append(p)
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        elif p.is_file():
            other.append(p)
    return dirs, images, other


def _split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} when ``root`` holds split folders (a train/val/validation/test folder that
    holds folders, not images), else {}. Refuses a mix of split folders and other folders."""
    dirs, images, _ = _entries(root)
    named = [d for d in dirs if d.name.lower() in SPLIT_FOLDERS]
    if not any(_entries(d)[0] for d in named):
        return {}
    others = [d.name for d in dirs if d.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise LayoutError(f"{root}: split folders ({', '.join(d.name + '/' for d in named)}) next to other folders "
                          f"({', '.join(n + '/' for n in others[:3])}): use either {root}/<split>/<class>/ with splits "
                          f"train, val (or validation), test, or {root}/<class>/, not both")
    if images:
        raise LayoutError(f"{root}: images ({images[0].name}) next to the split folders: every image goes in "
                          f"{root}/<split>/<class>/")
    splits: dict[str, Path] = {}
    for d in named:
        split = SPLIT_FOLDERS[d.name.lower()]
        if split in splits:
            raise LayoutError(f"{root}: both {splits[split].name}/ and {d.name}/ are the {split} split: keep one")
        splits[split] = d
    if "train" not in splits:
        raise LayoutError(f"{root}: split folders {', '.join(d.name + '/' for d in named)} but no train/: "
                          "the classes are learned from train/<class>/")
    return splits


def detect(root: str | os.PathLike) -> str:
    """Which layout ``root`` holds; raises ValueError naming what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if (root / "train.npz").is_file():
        return "cifar100"
    from .ilsvrc import is_kaggle, is_release  # ilsvrc reads sources' helpers: imported when needed

    if is_release(root):
        return "ilsvrc2012"
    if is_kaggle(root):
        return "ilsvrc2012-kaggle"
    names = sorted(p.name for p in root.iterdir())
    if any(n.endswith(".tar") and n[:1] == "n" and n[1:9].isdigit() for n in names):
        return "synset-tars"
    dirs, images, _ = _entries(root)
    if dirs:
        return "imagefolder-splits" if _split_folders(root) else "imagefolder"
    if images:
        raise LayoutError(f"{root}: images ({images[0].name}) but no class folders: an ImageFolder tree holds "
                          f"{root}/<class>/*.jpg (or {root}/train/<class>/*.jpg)")
    raise ValueError(f"{root}: not a CIFAR-100 folder (train.npz), an ImageFolder tree (<class>/ subfolders), "
                     "a folder of per-synset nXXXXXXXX.tar files or an ILSVRC2012 release (ILSVRC2012_img_train.tar, "
                     "or Kaggle's ILSVRC/Data/CLS-LOC)")


def source_splits(root: str | os.PathLike) -> list[str]:
    """The splits ``root`` holds (``train``, ``val``, ``test``), from folder and file names only (cheap:
    no image listed, no tar read), so a run can check ``data.eval_split`` before converting."""
    kind = detect(root)
    root = Path(root)
    if kind == "cifar100":
        return [s for s in ("train", "test") if (root / f"{s}.npz").is_file()]
    if kind == "imagefolder-splits":
        return list(_split_folders(root))
    if kind.startswith("ilsvrc2012"):
        from .ilsvrc import release_splits

        return release_splits(root)
    return ["train"]


def list_class_folders(folder: Path, split: str | None = None) -> tuple[dict[str, list[Path]], list[Path]]:
    """({class name: its image files}, non-image files skipped in them) of ``folder``/<class>/*.<image ext>.

    ``split``: the split ``folder`` is (for messages), None for a plain ``root/<class>/`` tree.
    Raises :class:`LayoutError` for images next to class folders, a class folder holding folders,
    an empty class folder, or a folder without class folders.
    """
    dirs, images, _ = _entries(folder)  # a README or LICENSE next to the class folders is no image
    skipped = []
    what = f"split folder {folder}" if split else str(folder)
    if not dirs:
        detail = f"images ({images[0].name}) directly" if images else "nothing"
        raise LayoutError(f"{what}: holds {detail}, no class folders: images go in {folder}/<class>/")
    if images:
        raise LayoutError(f"{what}: images ({images[0].name}) mixed with class folders ({dirs[0].name}/) at the same "
                          f"level: put every image in its class folder")
    classes = {}
    for d in dirs:
        sub_dirs, sub_images, sub_skipped = _entries(d)
        if sub_dirs:
            layout = f"{folder}/<class>/*.jpg" + ("" if split else f" or {folder}/train/<class>/*.jpg")
            raise LayoutError(f"{d}: class folder holding a folder ({sub_dirs[0].name}/): class folders are one level "
                              f"deep and hold their images directly ({layout})")
        if not sub_images:
            raise LayoutError(f"{d}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files): remove it or add "
                              "its images")
        classes[d.name] = sub_images
        skipped += sub_skipped
    return classes, skipped


def _check_class_count(root: Path, classes: list[str], min_classes: int = 2) -> None:
    if len(classes) < min_classes:
        raise LayoutError(f"{root}: a single class ({classes[0] if classes else 'none'}): a classifier needs at least "
                          "2; point at the folder that holds the class folders" if classes else
                          f"{root}: no class folders with images")


def _items_of(split: str, classes: list[str], files: dict[str, list[Path]], prefix: str) -> list[Item]:
    """Items of one split; keys ``<prefix><class>/<stem>``, unique within the split (a stem shared by
    two files, ``1.jpg`` and ``1.png``, keeps its extension in the key of the second)."""
    label_of = {c: i for i, c in enumerate(classes)}
    items = []
    for name, paths in files.items():
        seen = set()
        for path in paths:
            stem = path.stem if path.stem not in seen else f"{path.stem}_{path.suffix[1:].lower()}"
            seen.add(stem)
            items.append(Item(f"{prefix}{name}/{stem}", label_of[name], "file", str(path), 0, path.stat().st_size, split))
    return items


def _skipped_warning(root: Path, skipped: list[Path]) -> list[str]:
    if not skipped:
        return []
    return [f"{len(skipped)} file(s) without an image extension skipped (e.g. {skipped[0].relative_to(root)})"]


def _list_split_folders(root: Path, min_classes: int = 2) -> Source:
    """``root/<split>/<class>/*``: one class table for every split (train's classes, sorted)."""
    per_split, skipped = {}, []
    folders = _split_folders(root)
    for split, folder in folders.items():
        per_split[split], extra = list_class_folders(folder, split)
        skipped += extra
    train = set(per_split["train"])
    classes = sorted(train)
    warnings = _skipped_warning(root, skipped)
    for split, files in per_split.items():
        unknown = sorted(set(files) - train)
        if unknown:
            close = difflib.get_close_matches(unknown[0], classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LayoutError(f"{folders[split]}: class folder(s) {', '.join(repr(u) for u in unknown[:5])} not in "
                              f"train/{hint}: every class of val/test must be one that train/ teaches")
        missing = [c for c in classes if c not in files]
        if missing:
            warnings.append(f"{split}: {len(missing)} of train's {len(classes)} classes have no images there "
                            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); they are not scored on it")
    _check_class_count(root, classes, min_classes)
    items = {split: _items_of(split, classes, files, f"{split}/") for split, files in per_split.items()}
    return Source("imagefolder-splits", str(root), classes, items, warnings=warnings)


def list_source(root: str | os.PathLike, min_classes: int = 2) -> Source:
    """List every image of ``root`` (any supported layout) without reading pixels. ``min_classes``: a
    training source needs 2 classes; the classes a tree grows by may be one (``splitnet grow``)."""
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
    if kind == "imagefolder-splits":
        return _list_split_folders(root, min_classes)
    if kind in ("ilsvrc2012", "ilsvrc2012-kaggle"):
        from .ilsvrc import list_kaggle, list_release

        return list_release(root) if kind == "ilsvrc2012" else list_kaggle(root)
    if kind == "imagefolder":
        files, skipped = list_class_folders(root)
        classes = sorted(files)
        if all(c.lower() in SPLIT_FOLDERS for c in classes):  # mydata/train/*.png, mydata/test/*.png
            raise LayoutError(f"{root}: the folders {', '.join(c + '/' for c in classes)} are named like splits but "
                              f"hold images directly: use {root}/<split>/<class>/*.jpg (or, for a single split, "
                              f"{root}/<class>/*.jpg)")
        _check_class_count(root, classes, min_classes)
        return Source(kind, str(root), classes, {"train": _items_of("train", classes, files, "")},
                      warnings=_skipped_warning(root, skipped))
    tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.name[:1] == "n")
    classes = [p.stem for p in tars]
    _check_class_count(root, classes, min_classes)
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


def read_parents(path: str | os.PathLike, classes: list[str]) -> list[str]:
    """The parent of each class (index = label; "" = none) from a ``class<TAB>parent`` TSV file.

    One line per class, two tab-separated fields. The first line is a header, and skipped, when
    its first field is ``class`` or ``name`` and no class has that name. Blank lines and lines
    starting with ``#`` are skipped; an empty parent field means no parent. Classes the file does
    not list get no parent (the report leaves them out of the semantic score). Raises ValueError
    (one line with the file and line number) for a line without exactly two fields, a class the
    dataset does not have, or a class listed twice with different parents.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    except FileNotFoundError:
        raise ValueError(f"{path}: no such parents file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the parents file ({e})") from None
    index = {c: i for i, c in enumerate(classes)}
    parents = [""] * len(classes)
    listed: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 2 tab-separated fields (class<TAB>parent), got {len(fields)}: "
                             f"{line[:60]!r}")
        name, parent = fields[0].strip(), fields[1].strip()
        if not listed and name.lower() in ("class", "name") and name not in index:
            listed[""] = number  # the header
            continue
        if name not in index:
            close = difflib.get_close_matches(name, classes, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{path}:{number}: unknown class {name!r} (the dataset has {len(classes)} classes{hint})")
        if name in listed and parents[index[name]] != parent:
            raise ValueError(f"{path}:{number}: class {name!r} already has parent {parents[index[name]]!r} "
                             f"(line {listed[name]})")
        listed[name] = number
        parents[index[name]] = parent
    return parents


def write_class_table(out: Path, classes: list[str], parents: list[str] | None = None) -> list[dict]:
    """``classes.tsv`` and ``classes.json``: index, name, lemma, parent (WordNet when names are wnids).

    ``parents`` (one per class, "" = none): the source's own (CIFAR superclasses) or a user's
    table (:func:`read_parents`); for wnids it replaces WordNet's parents, the lemmas stay.
    """
    if classes and all(is_wnid(c) for c in classes):
        rows = [{"index": i, "name": r["wnid"], "lemma": r["lemma"], "parent": r["parent"], "parent_name": r["parent_lemma"]}
                for i, r in enumerate(describe(classes))]
        if parents is not None:
            for row, parent in zip(rows, parents):
                row["parent"] = row["parent_name"] = parent
    else:
        rows = [{"index": i, "name": c, "lemma": c.replace("_", " "), "parent": (parents or [""] * len(classes))[i],
                 "parent_name": (parents or [""] * len(classes))[i]} for i, c in enumerate(classes)]
    with open(out / "classes.tsv", "w") as f:
        f.write("index\tname\tlemma\tparent\tparent_name\n")
        for r in rows:
            f.write(f"{r['index']}\t{r['name']}\t{r['lemma']}\t{r['parent']}\t{r['parent_name']}\n")
    (out / "classes.json").write_text(json.dumps(rows, indent=1))
    return rows


def download_cifar(root: str, log) -> None:
    """torchvision's downloader (online users), then the .npz layout the rest reads."""
    os.makedirs(root, exist_ok=True)
    for split in ("train", "test"):
        data = load_cifar100(root, split, download=True)
        coarse_names = data.coarse_names or [f"superclass-{i}" for i in range(int(data.coarse_labels.max()) + 1)]
        np.savez(os.path.join(root, f"{split}.npz"), x=data.images, fine=data.labels, coarse=data.coarse_labels,
                 fine_names=np.array(data.class_names, dtype=str), coarse_names=np.array(coarse_names, dtype=str))
    log(f"data: downloaded CIFAR-100 into {root}")
