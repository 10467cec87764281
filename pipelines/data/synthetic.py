"""Generated ImageNet-style data for rehearsals: real WordNet wnids, JPEGs, the real layouts.

    python -m pipelines.data.synthetic OUT --classes 21841 --per-class 2 --size 48 --layout synset-tars
    python -m pipelines.data.synthetic OUT --classes 21841 --per-class 1 --layout webdataset
    python -m pipelines.data.synthetic OUT --classes 1000 --per-class 2 --layout ilsvrc2012

``synset-tars`` writes the official release layout (DATA.md): ``OUT/nXXXXXXXX.tar`` holding
``nXXXXXXXX_<i>.JPEG``, which ``splitnet prepare OUT --out SHARDS --format webdataset`` converts.
``webdataset`` writes shards as clusters hold them and ``splitnet run`` reads directly:
``OUT/train-00000.tar`` ... (``<key>.jpg`` + ``<key>.cls`` + ``<key>.json``, samples shuffled
over the shards) with ``classes.json`` / ``classes.tsv`` next to them. ``ilsvrc2012`` writes the
ILSVRC-2012 release as downloaded (``ILSVRC2012_img_train.tar`` of per-synset tars,
``ILSVRC2012_img_val.tar``, the devkit with its ground truth and ``meta.mat``); ``ilsvrc2012-kaggle``
Kaggle's copy (``ILSVRC/Data/CLS-LOC/``, ``LOC_val_solution.csv``). The 1,000 classes are chosen as
below (the real ILSVRC list is not on these machines).

Classes. ImageNet-22K's classes are 21,841 WordNet 3.0 noun synsets; the fall11 list itself is
not on these machines, so :func:`choose_wnids` picks real synsets deterministically: the
non-instance hyponyms of ``physical_entity`` (n00001930; ~39.5k synsets, mostly people,
artifacts, plants, animals, places, foods and substances, as in ImageNet-22K), sorted by offset,
``n`` of them evenly spaced. Same ``n`` -> same wnids on every machine with ``wordnet-base``.

Pixels carry a signal that follows WordNet, so grouping has something to find: the hue comes
from the synset's lexicographer file (noun.animal, noun.artifact, ...), the stripe orientation
from its first hypernym, the stripe frequency and colour depth from the synset itself; each image
adds its own phase, shift and noise. Small images (``--size 48``) keep 21,841 x 2 images to
seconds; the pipeline resizes them to ``data.image_size``.
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import os
import sys
import tarfile
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from splitnet.wordnet import DEFAULT_PATH, load_nouns

from .sources import write_class_table

PHYSICAL_ENTITY = "n00001930"
LAYOUTS = ("synset-tars", "webdataset", "ilsvrc2012", "ilsvrc2012-kaggle")


@lru_cache(maxsize=2)
def lexicographer_files(path: str) -> tuple[dict[str, int], set[str]]:
    """wnid -> lexicographer file number, and the wnids that are instances only (``@i`` parents)."""
    lex, instances = {}, set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.partition(" | ")[0].split()
            wnid = "n" + fields[0]
            lex[wnid] = int(fields[1])
            w_cnt = int(fields[3], 16)
            pos = 4 + 2 * w_cnt
            symbols = fields[pos + 1::4][:int(fields[pos])]
            if "@i" in symbols and "@" not in symbols:
                instances.add(wnid)
    return lex, instances


def choose_wnids(n: int, wordnet_path: str | None = None) -> list[str]:
    """``n`` real WordNet 3.0 noun wnids, deterministic: evenly spaced (by offset) over the
    non-instance hyponyms of physical_entity. Raises ValueError when ``n`` is more than there are."""
    path = wordnet_path or DEFAULT_PATH
    nouns = load_nouns(path)
    _, instances = lexicographer_files(path)
    children: dict[str, list[str]] = {}
    for synset in nouns.values():
        for parent in synset.parents:
            children.setdefault(parent, []).append(synset.wnid)
    seen, stack = set(), [PHYSICAL_ENTITY]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    pool = sorted(seen - instances)
    if not 0 < n <= len(pool):
        raise ValueError(f"--classes {n}: choose between 1 and {len(pool)} (hyponyms of physical_entity)")
    return [pool[i] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)]


class Painter:
    """Class-dependent images: hue from the lexicographer file, stripes from the hypernym and the class."""

    def __init__(self, wnids: list[str], size: int, seed: int = 0, wordnet_path: str | None = None):
        path = wordnet_path or DEFAULT_PATH
        nouns = load_nouns(path)
        lex, _ = lexicographer_files(path)
        self.size, self.seed = size, seed
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        self.xx, self.yy = xx, yy
        self.style = []
        for wnid in wnids:
            parent = nouns[wnid].parents[0] if nouns[wnid].parents else wnid
            hue = (lex[wnid] * 0.618034) % 1.0
            h = zlib.crc32(wnid.encode())
            sat, val = 0.45 + 0.5 * ((h >> 8) % 64) / 63, 0.55 + 0.4 * ((h >> 14) % 64) / 63
            colour = np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32) * 255
            angle = np.pi * (zlib.crc32(parent.encode()) % 16) / 16
            freq = 1.5 + (h % 7)
            self.style.append((colour, np.cos(angle), np.sin(angle), freq))

    def pixels(self, label: int, index: int) -> np.ndarray:
        """uint8 [size, size, 3] for image ``index`` of class ``label`` (deterministic)."""
        colour, ca, sa, freq = self.style[label]
        rng = np.random.default_rng([self.seed, label, index])
        phase, shift = rng.uniform(0, 2 * np.pi), rng.uniform(-0.1, 0.1, 2)
        wave = np.cos(2 * np.pi * freq * ((self.xx + shift[0]) * ca + (self.yy + shift[1]) * sa) + phase)
        img = colour * (0.65 + 0.35 * wave)[..., None] + rng.normal(0, 10, (self.size, self.size, 3))
        return np.clip(img, 0, 255).astype(np.uint8)

    def jpeg(self, label: int, index: int, quality: int = 85) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.pixels(label, index)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    tf.addfile(info, io.BytesIO(payload))


def _ilsvrc2012(out: Path, wnids: list[str], painter: "Painter", per_class: int, val_per_class: int, kaggle: bool,
               seed: int) -> tuple[int, int]:
    """An ILSVRC-2012 release as users download it (:mod:`pipelines.data.ilsvrc`); returns (files, bytes).

    Official: ``ILSVRC2012_img_train.tar`` (per-synset tars inside), ``ILSVRC2012_img_val.tar`` (flat),
    ``ILSVRC2012_devkit_t12.tar.gz`` (ground truth by ILSVRC2012_ID, and ``meta.mat`` mapping the IDs,
    given in a shuffled order as in the real devkit, to wnids, with parent synsets among them).
    Kaggle: ``ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/`` and ``LOC_val_solution.csv``."""
    rng = np.random.default_rng([seed, 2012])
    nbytes = 0
    val_labels = rng.permutation(np.repeat(np.arange(len(wnids)), val_per_class)).tolist()
    if kaggle:
        data = out / "ILSVRC" / "Data" / "CLS-LOC"
        for label, wnid in enumerate(wnids):
            folder = data / "train" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                jpeg = painter.jpeg(label, i)
                (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg)
                nbytes += len(jpeg)
        (data / "val").mkdir(parents=True, exist_ok=True)
        rows = ["ImageId,PredictionString"]
        for k, label in enumerate(val_labels, 1):
            jpeg = painter.jpeg(label, per_class + k)
            (data / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg)
            nbytes += len(jpeg)
            rows.append(f"ILSVRC2012_val_{k:08d},{wnids[label]} 10 10 40 40 {wnids[label]} 5 5 20 20")
        (out / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
        (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {w}\n" for w in wnids))
        return len(wnids) * per_class + len(val_labels) + 2, nbytes

    with tarfile.open(out / "ILSVRC2012_img_train.tar.tmp", "w") as outer:
        for label, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tf:
                for i in range(per_class):
                    jpeg = painter.jpeg(label, i)
                    _add(tf, f"{wnid}_{i}.JPEG", jpeg)
                    nbytes += len(jpeg)
            _add(outer, f"{wnid}.tar", inner.getvalue())
    os.replace(out / "ILSVRC2012_img_train.tar.tmp", out / "ILSVRC2012_img_train.tar")
    with tarfile.open(out / "ILSVRC2012_img_val.tar.tmp", "w") as tf:
        for k, label in enumerate(val_labels, 1):
            jpeg = painter.jpeg(label, per_class + k)
            _add(tf, f"ILSVRC2012_val_{k:08d}.JPEG", jpeg)
            nbytes += len(jpeg)
    os.replace(out / "ILSVRC2012_img_val.tar.tmp", out / "ILSVRC2012_img_val.tar")
    ids = rng.permutation(len(wnids)) + 1  # ILSVRC2012_ID of each class: not in wnid order
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
              ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = [(int(ids[label]), wnid, wnid, "", 0, np.zeros((1, 0)), 0, per_class) for label, wnid in enumerate(wnids)]
    synsets += [(len(wnids) + 1, "n00001740", "entity", "", 2, np.array([1, 2]), 18, 0)]  # a parent: not a class
    meta = io.BytesIO()
    savemat(meta, {"synsets": np.array(synsets, dtype=fields).reshape(-1, 1)})
    truth = "".join(f"{ids[label]}\n" for label in val_labels).encode()
    with tarfile.open(out / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(tf, "ILSVRC2012_devkit_t12/readme.txt", b"synthetic development kit\n")
    return 3, nbytes


def generate(out: str | os.PathLike, classes: int = 21841, per_class: int = 2, size: int = 48,
             layout: str = "synset-tars", shard_size: int = 1000, seed: int = 0, wordnet_path: str | None = None,
             log=print, val_per_class: int = 1) -> dict:
    """Write the dataset under ``out`` (created); returns a summary (also ``out/synthetic.json``).
    ``val_per_class``: validation images per class of the ILSVRC-2012 layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if per_class < 1 or size < 8 or shard_size < 1 or val_per_class < 1:
        raise ValueError("--per-class, --val-per-class and --shard-size must be >= 1, --size >= 8")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wnids = choose_wnids(classes, wordnet_path)
    painter = Painter(wnids, size, seed, wordnet_path)
    nbytes = 0
    if layout == "synset-tars":
        for label, wnid in enumerate(wnids):
            with tarfile.open(out / f"{wnid}.tar.tmp", "w") as tf:
                for i in range(per_class):
                    data = painter.jpeg(label, i)
                    _add(tf, f"{wnid}_{i}.JPEG", data)
                    nbytes += len(data)
            os.replace(out / f"{wnid}.tar.tmp", out / f"{wnid}.tar")
        files = len(wnids)
    elif layout.startswith("ilsvrc2012"):
        files, nbytes = _ilsvrc2012(out, wnids, painter, per_class, val_per_class, kaggle=layout.endswith("kaggle"),
                                    seed=seed)
    else:
        order = np.random.default_rng(seed).permutation(len(wnids) * per_class)
        chunks = np.array_split(order, -(-len(order) // shard_size))
        for s, chunk in enumerate(chunks):
            with tarfile.open(out / f"train-{s:05d}.tar.tmp", "w") as tf:
                for sample in chunk.tolist():
                    label, i = divmod(sample, per_class)
                    key = f"{wnids[label]}_{i}"
                    data = painter.jpeg(label, i)
                    _add(tf, f"{key}.jpg", data)
                    _add(tf, f"{key}.cls", str(label).encode())
                    _add(tf, f"{key}.json", json.dumps({"wnid": wnids[label]}).encode())
                    nbytes += len(data)
            os.replace(out / f"train-{s:05d}.tar.tmp", out / f"train-{s:05d}.tar")
        write_class_table(out, wnids)
        files = len(chunks)
    val_images = len(wnids) * val_per_class if layout.startswith("ilsvrc2012") else 0
    summary = {"layout": layout, "classes": len(wnids), "per_class": per_class,
               "images": len(wnids) * per_class + val_images, "val_images": val_images,
               "size": size, "seed": seed, "files": files, "image_bytes": nbytes,
               "selection": "non-instance hyponyms of physical_entity (n00001930), by offset, evenly spaced",
               "seconds": round(time.perf_counter() - t0, 2)}
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1))
    log(f"synthetic: {summary['images']} images of {len(wnids)} WordNet classes ({size}x{size} JPEG, "
        f"{nbytes / 2**20:.1f} MiB) as {files} {layout} files in {out} ({summary['seconds']:.1f} s)")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.data.synthetic",
                                description="Generate ImageNet-22K-style data: real WordNet wnids, small JPEGs.")
    p.add_argument("out", help="output folder")
    p.add_argument("--classes", type=int, default=21841, help="WordNet noun classes (default: ImageNet-22K's 21,841)")
    p.add_argument("--per-class", type=int, default=2, help="images per class")
    p.add_argument("--size", type=int, default=48, help="image side in pixels")
    p.add_argument("--layout", default="synset-tars", choices=LAYOUTS,
                   help="synset-tars: nXXXXXXXX.tar per class (the official ImageNet-22K release); webdataset: "
                        "train-*.tar shards; ilsvrc2012: the ILSVRC-2012 tars and devkit; ilsvrc2012-kaggle: Kaggle's copy")
    p.add_argument("--val-per-class", type=int, default=1, help="ilsvrc2012 layouts: validation images per class")
    p.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        generate(args.out, args.classes, args.per_class, args.size, args.layout, args.shard_size, args.seed,
                 val_per_class=args.val_per_class)
    except (ValueError, FileNotFoundError) as e:
        print(f"synthetic: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
