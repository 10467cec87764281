"""Generated ImageNet-22K-style data for rehearsals: real WordNet wnids, JPEGs, the real layouts.

    python -m pipelines.data.synthetic OUT --classes 21841 --per-class 2 --size 48 --layout synset-tars
    python -m pipelines.data.synthetic OUT --classes 21841 --per-class 1 --layout webdataset

``synset-tars`` writes the official release layout (DATA.md): ``OUT/nXXXXXXXX.tar`` holding
``nXXXXXXXX_<i>.JPEG``, which ``splitnet prepare OUT --out SHARDS --format webdataset`` converts.
``webdataset`` writes shards as clusters hold them and ``splitnet run`` reads directly:
``OUT/train-00000.tar`` ... (``<key>.jpg`` + ``<key>.cls`` + ``<key>.json``, samples shuffled
over the shards) with ``classes.json`` / ``classes.tsv`` next to them.

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

PHYSICAL_ENTITY = "n00001930"
LAYOUTS = ("synset-tars", "webdataset")


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
    from splitnet.wordnet import DEFAULT_PATH, load_nouns

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
        from splitnet.wordnet import DEFAULT_PATH, load_nouns

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
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.pixels(label, index)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    tf.addfile(info, io.BytesIO(payload))


def generate(out: str | os.PathLike, classes: int = 21841, per_class: int = 2, size: int = 48,
             layout: str = "synset-tars", shard_size: int = 1000, seed: int = 0, wordnet_path: str | None = None,
             log=print) -> dict:
    """Write the dataset under ``out`` (created); returns a summary (also ``out/synthetic.json``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if per_class < 1 or size < 8 or shard_size < 1:
        raise ValueError("--per-class and --shard-size must be >= 1, --size >= 8")
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
    else:
        from .sources import write_class_table

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
    summary = {"layout": layout, "classes": len(wnids), "per_class": per_class, "images": len(wnids) * per_class,
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
                   help="synset-tars: nXXXXXXXX.tar per class (the official release); webdataset: train-*.tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        generate(args.out, args.classes, args.per_class, args.size, args.layout, args.shard_size, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"synthetic: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
