"""Small generated datasets in every layout users bring, with planted bad records of every kind."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n02084071", "n02121808"]  # tench, dog, domestic cat


def jpeg(size=(48, 40), mode="RGB", seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    im = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(size=(48, 40), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def bad_samples() -> dict[str, bytes]:
    """One planted record per kind; 'too_large' exceeds max_pixels=100_000 (use that limit)."""
    good = jpeg(seed=99)
    return {
        "empty": b"",
        "not_image": b"this is not an image at all" * 10,
        "truncated": good[: len(good) // 2],
        "too_large": jpeg(size=(400, 300), seed=5),
        "grayscale": jpeg(mode="L", seed=6),
        "cmyk": jpeg(mode="CMYK", seed=7),
        "rgba": png(mode="RGBA", seed=8),
        "png_named_jpeg": png(seed=9),
    }


SKIPPED = {"empty", "not_image", "truncated", "too_large"}
CONVERTED = {"grayscale", "cmyk", "rgba"}
MAX_PIXELS = 100_000


def make_imagefolder(root: Path, per_class=6, with_bad=True) -> dict:
    """root/<wnid>/<wnid>_<i>.JPEG; bad samples planted in the first class."""
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for c, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(exist_ok=True)
        for i in range(per_class):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(seed=c * 100 + i))
            n += 1
    if with_bad:
        for kind, data in bad_samples().items():
            (root / WNIDS[0] / f"{WNIDS[0]}_{kind}.JPEG").write_bytes(data)
    return {"good": n}


def make_synset_tars(root: Path, per_class=6, with_bad=True) -> dict:
    """root/<wnid>.tar holding <wnid>_<i>.JPEG (the official ImageNet-22K release layout)."""
    root.mkdir(parents=True, exist_ok=True)
    for c, wnid in enumerate(WNIDS):
        members = {f"{wnid}_{i}.JPEG": jpeg(seed=c * 100 + i) for i in range(per_class)}
        if with_bad and c == 0:
            members.update({f"{wnid}_{k}.JPEG": v for k, v in bad_samples().items()})
        with tarfile.open(root / f"{wnid}.tar", "w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return {"good": per_class * len(WNIDS)}


def make_user_webdataset(root: Path, shards=2, per_shard=8) -> dict:
    """WebDataset shards as users hold them: .jpg/.jpeg/.png/.webp members, .cls labels, .json meta;
    plus every bad kind and one sample without a .cls (missing label)."""
    root.mkdir(parents=True, exist_ok=True)
    exts = ["jpg", "jpeg", "png", "webp"]
    n = 0
    for s in range(shards):
        with tarfile.open(root / f"train-{s:05d}.tar", "w") as tf:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            for i in range(per_shard):
                ext = exts[i % len(exts)]
                if ext == "png":
                    data = png(seed=s * 100 + i)
                elif ext == "webp":
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(jpeg(seed=s * 100 + i))).save(buf, format="WEBP")
                    data = buf.getvalue()
                else:
                    data = jpeg(seed=s * 100 + i)
                key = f"s{s}_{i:04d}"
                add(f"{key}.{ext}", data)
                add(f"{key}.cls", str(i % 3).encode())
                add(f"{key}.json", json.dumps({"i": i}).encode())
                n += 1
            if s == 0:
                for kind, data in bad_samples().items():
                    add(f"bad_{kind}.jpg", data)
                    add(f"bad_{kind}.cls", b"1")
                add("nolabel_0.jpg", jpeg(seed=77))
    return {"good": n}


def make_user_parquet(root: Path, per_shard=10) -> dict:
    """Hugging Face layout: column image = struct{bytes, path}, integer label; bad kinds planted,
    plus a null label and an out-of-range label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    images, labels, keys = [], [], []
    for i in range(per_shard):
        images.append({"bytes": jpeg(seed=500 + i), "path": f"img{i}.jpg"})
        labels.append(i % 3)
        keys.append(f"good{i}")
    for kind, data in bad_samples().items():
        images.append({"bytes": data, "path": f"{kind}.jpg"})
        labels.append(1)
        keys.append(f"bad_{kind}")
    images += [{"bytes": jpeg(seed=600), "path": "nolabel.jpg"}, {"bytes": jpeg(seed=601), "path": "badlabel.jpg"}]
    labels += [None, 17]
    keys += ["missing_label", "label_out_of_range"]
    table = pa.table({"key": keys, "image": images, "label": pa.array(labels, pa.int64())})
    pq.write_table(table, root / "train-00000.parquet")
    return {"good": per_shard}


def make_cifar_slice(src: Path, dst: Path, train=300, test=100) -> Path:
    """A small CIFAR-100 folder in the same .npz layout, cut from the real copy (in a temp dir)."""
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        with np.load(src / f"{split}.npz", allow_pickle=False) as d:
            idx = np.random.default_rng(0).permutation(len(d["fine"]))[:n]
            np.savez(dst / f"{split}.npz", x=d["x"][idx], fine=d["fine"][idx], coarse=d["coarse"][idx],
                     rank_in_class=d["rank_in_class"][idx], fine_names=d["fine_names"], coarse_names=d["coarse_names"])
    return dst


def write_images(folder: Path, count: int, fmt: str = "png", seed: int = 0, size=(16, 12)) -> list[Path]:
    """``count`` small real images (Pillow-encoded PNG or JPEG) in ``folder``: img0.png, img1.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.{fmt}"
        path.write_bytes(png(size=size, seed=seed + i) if fmt == "png" else jpeg(size=size, seed=seed + i))
        paths.append(path)
    return paths


def make_split_imagefolder(root: Path, classes, per_split: dict[str, int], fmt: str = "png",
                           missing: dict[str, list[str]] | None = None) -> dict[str, int]:
    """root/<split folder>/<class>/img<i>.<fmt> (torchvision's / the ImageNet release's layout),
    ``per_split`` = {split folder name: images per class}; ``missing`` = {split folder: classes it
    leaves out}. Returns the image count per split folder."""
    counts = {}
    for s, (split, n) in enumerate(per_split.items()):
        left_out = set((missing or {}).get(split, []))
        kept = [c for c in classes if c not in left_out]
        for c, name in enumerate(kept):
            write_images(root / split / name, n, fmt, seed=1000 * s + 10 * c)
        counts[split] = n * len(kept)
    return counts
