"""ILSVRC-2012 (ImageNet-1K) as users download it, listed without unpacking anything.

Two layouts besides the common ``train/<wnid>/`` + ``val/<wnid>/`` folders (an ImageFolder tree
with splits, :mod:`pipelines.data.sources`):

* **the official release** (image-net.org), a folder holding
  ``ILSVRC2012_img_train.tar`` (1,000 per-synset tars inside, ``n01440764.tar`` holding
  ``n01440764_10026.JPEG`` ...), ``ILSVRC2012_img_val.tar`` (50,000 flat
  ``ILSVRC2012_val_00000001.JPEG`` ...) and the development kit, ``ILSVRC2012_devkit_t12.tar.gz`` or
  its unpacked folder, whose ``data/ILSVRC2012_validation_ground_truth.txt`` gives the
  ILSVRC2012_ID of every validation image (line i: image i) and ``data/meta.mat`` the WNID of every
  ILSVRC2012_ID (the IDs are not in wnid order). Images are read in place: an item is an offset into
  the outer tar, the nested tars included.
* **the Kaggle copy** (``imagenet-object-localization-challenge``): ``ILSVRC/Data/CLS-LOC/train/<wnid>/``,
  a flat ``ILSVRC/Data/CLS-LOC/val/`` and ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the
  first word of the prediction string is the wnid). Its unlabeled ``test/`` is left out.

Either way the classes are the train split's wnids, sorted (the order torchvision's ImageNet
weights use), and named with their WordNet lemmas in the class table. Validation labels come
from ``LOC_val_solution.csv`` or the devkit, whichever is there; a validation set whose labels
cannot be found is refused in one line (never guessed from the file order).
"""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

from .sources import IMAGE_EXTENSIONS, Item, LayoutError, Source, _items_of, list_class_folders

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"


def is_release(root: Path) -> bool:
    return (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file()


def is_kaggle(root: Path) -> bool:
    return (root / KAGGLE_DATA).is_dir()


# -- validation labels ---------------------------------------------------------------------------
def _read_meta(data: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the 1,000 leaf synsets of the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - a dependency
        raise LayoutError(f"{where}: reading meta.mat needs scipy (pip install scipy)") from None
    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise LayoutError(f"{where}: not the devkit's meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID, "
                            f"num_children): {e}") from None
    return {int(i): str(w) for i, w, c in zip(ids.tolist(), wnids.tolist(), children.tolist()) if int(c) == 0}


def _devkit_files(root: Path) -> tuple[bytes, bytes, str] | None:
    """(ground truth, meta.mat, where) from the devkit next to the images: unpacked, as a .tar.gz,
    or the two files themselves in ``root``."""
    for gt, meta in ((root / DEVKIT / GROUND_TRUTH, root / DEVKIT / META),
                     (root / Path(GROUND_TRUTH).name, root / Path(META).name)):
        if gt.is_file() and meta.is_file():
            return gt.read_bytes(), meta.read_bytes(), str(gt.parent)
    packed = root / f"{DEVKIT}.tar.gz"
    if not packed.is_file():
        return None
    found = {}
    with tarfile.open(packed, "r:gz") as tf:
        for info in tf:
            for want in (GROUND_TRUTH, META):
                if info.isfile() and (info.name == want or info.name.endswith("/" + want)):
                    found[want] = tf.extractfile(info).read()
    missing = [w for w in (GROUND_TRUTH, META) if w not in found]
    if missing:
        raise LayoutError(f"{packed}: no {' or '.join(missing)} inside: not the ILSVRC2012 development kit")
    return found[GROUND_TRUTH], found[META], str(packed)


def _from_devkit(gt: bytes, meta: bytes, where: str) -> dict[str, str]:
    wnid_of = _read_meta(meta, where)
    labels = {}
    for number, line in enumerate(gt.decode().split(), 1):
        try:
            labels[f"ILSVRC2012_val_{number:08d}"] = wnid_of[int(line)]
        except (ValueError, KeyError):
            raise LayoutError(f"{where}: {Path(GROUND_TRUTH).name} line {number}: {line!r} is not an ILSVRC2012_ID "
                                "of meta.mat's 1,000 classes") from None
    return labels


def _from_csv(path: Path) -> dict[str, str]:
    labels = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise LayoutError(f"{path}: expected the header ImageId,PredictionString (Kaggle's {KAGGLE_CSV})")
        for number, row in enumerate(rows, 2):
            words = row[1].split() if len(row) > 1 else []
            if not row or not words:
                raise LayoutError(f"{path}:{number}: no wnid in {','.join(row)[:60]!r}")
            labels[row[0].strip()] = words[0]
    return labels


def val_labels(root: Path) -> tuple[dict[str, str], str]:
    """{``ILSVRC2012_val_00000001``: wnid} and where they came from: ``LOC_val_solution.csv``, or
    the devkit's ground truth + meta.mat, in ``root``."""
    if (root / KAGGLE_CSV).is_file():
        return _from_csv(root / KAGGLE_CSV), str(root / KAGGLE_CSV)
    devkit = _devkit_files(root)
    if devkit is not None:
        return _from_devkit(*devkit), devkit[2]
    raise LayoutError(
        f"{root}: validation images without labels: put the development kit ({DEVKIT}.tar.gz, or its "
        f"{GROUND_TRUTH} and {META}) or Kaggle's {KAGGLE_CSV} next to them")


def _val_items(names: list[tuple[str, object]], labels: dict[str, str], label_of: dict[str, int], where: str,
               make) -> list:
    """Items of the validation images ``names`` [(stem, location)], labelled; unknown wnids refused."""
    items, unlabelled = [], []
    for stem, location in names:
        wnid = labels.get(stem)
        if wnid is None:
            unlabelled.append(stem)
            continue
        if wnid not in label_of:
            raise LayoutError(f"{where}: {stem} is labelled {wnid}, a class the train split does not have")
        items.append(make(stem, label_of[wnid], location))
    if unlabelled:
        raise LayoutError(f"{where}: {len(unlabelled)} of {len(names)} validation images have no label "
                            f"(e.g. {unlabelled[0]}): the labels belong to another copy of the validation set")
    return items


# -- the layouts ------------------------------------------------------------------------------------
def _image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_release(root: Path):
    """The official tars: train from ILSVRC2012_img_train.tar (nested per-synset tars), val from
    ILSVRC2012_img_val.tar labelled by the devkit or the Kaggle CSV."""
    train_tar, val_tar = root / TRAIN_TAR, root / VAL_TAR
    if not train_tar.is_file():
        raise LayoutError(f"{root}: {VAL_TAR} without {TRAIN_TAR}: the classes are learned from the train split")
    per_class: dict[str, list[tuple[str, int, int]]] = {}
    with open(train_tar, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
        inner_tars = [m for m in outer if m.isfile()]
        for member in inner_tars:
            name = Path(member.name).name
            if not (name.endswith(".tar") and name[:1] == "n" and name[1:9].isdigit()):
                raise LayoutError(f"{train_tar}: {member.name} is not a per-synset tar (nXXXXXXXX.tar)")
            f.seek(member.offset_data)  # member offsets of the inner tar are then offsets in the file
            with tarfile.open(fileobj=f, mode="r:") as inner:
                per_class[name[:-4]] = [(Path(m.name).stem, m.offset_data, m.size) for m in inner
                                        if m.isfile() and _image(m.name)]
    classes = sorted(per_class)
    if len(classes) < 2:
        raise LayoutError(f"{train_tar}: {len(classes)} per-synset tar(s) inside: not the ILSVRC2012 train set")
    label_of = {w: i for i, w in enumerate(classes)}
    items = {"train": [Item(key, label_of[w], "tar", str(train_tar), offset, size, "train")
                       for w in classes for key, offset, size in per_class[w]]}
    warnings = [f"train: {w}.tar holds no image" for w in classes if not per_class[w]][:5]
    notes = []
    if val_tar.is_file():
        labels, where = val_labels(root)
        with tarfile.open(val_tar, "r:") as tf:
            names = [(Path(m.name).stem, (m.offset_data, m.size)) for m in tf if m.isfile() and _image(m.name)]
        items["val"] = _val_items(names, labels, label_of, str(val_tar),
                                  lambda stem, label, loc: Item(stem, label, "tar", str(val_tar), loc[0], loc[1], "val"))
        notes.append(f"val labels from {where}")
    return Source("ilsvrc2012", str(root), classes, items, warnings=warnings, notes=notes)


def list_kaggle(root: Path):
    """Kaggle's copy: ILSVRC/Data/CLS-LOC/train/<wnid>/, a flat val/ labelled by LOC_val_solution.csv."""
    data = root / KAGGLE_DATA
    if not (data / "train").is_dir():
        raise LayoutError(f"{data}: no train/ folder (ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG)")
    files, skipped = list_class_folders(data / "train", "train")
    classes = sorted(files)
    items = {"train": _items_of("train", classes, files, "")}
    warnings = [f"{len(skipped)} file(s) without an image extension skipped"] if skipped else []
    notes = []
    val = data / "val"
    if val.is_dir():
        labels, where = val_labels(root)
        paths = sorted(p for p in val.iterdir() if p.is_file() and _image(p.name))
        label_of = {w: i for i, w in enumerate(classes)}
        items["val"] = _val_items([(p.stem, p) for p in paths], labels, label_of, str(val),
                                  lambda stem, label, p: Item(f"val/{stem}", label, "file", str(p), 0,
                                                              p.stat().st_size, "val"))
        notes.append(f"val labels from {where}")
    if (data / "test").is_dir():
        notes.append("test/ left out: the challenge's test images have no public labels")
    return Source("ilsvrc2012-kaggle", str(root), classes, items, warnings=warnings, notes=notes)


def release_splits(root: Path) -> list[str]:
    """The splits a release or Kaggle folder holds, from names only."""
    if is_release(root):
        return [s for s, name in (("train", TRAIN_TAR), ("val", VAL_TAR)) if (root / name).is_file()]
    data = root / KAGGLE_DATA
    return [s for s in ("train", "val") if (data / s).is_dir()]
