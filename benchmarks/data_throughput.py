"""Images/s delivered to a training loop: Ray Data path vs torch DataLoader(num_workers=2).

Both read the same Parquet shards and run the same decode + augment code
(``pipelines.data.records.decode_batch``), then hand normalized float batches to the loop. Two
workloads: 32x32 PNG-in-Parquet (CIFAR-100 images) and 224x224 random-resized-crop from JPEGs
(CIFAR images upscaled to 320x320, so decoding does real work). Also peak RSS of each path's
whole process tree. Targets (issue 3): Ray >= 1.0x DataLoader at 224, >= 0.8x at 32.

    python benchmarks/data_throughput.py [--images32 20000] [--images224 2000] [--out benchmarks/results/data_throughput.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.data.records import DecodeConfig, decode_batch, to_float_tensor
from pipelines.data.sources import write_parquet_shard

ROOT = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("SPLITNET_CIFAR100", ROOT.parent / "shared" / "data" / "cifar100"))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tree_rss(root: int) -> int:
    """RSS bytes of ``root`` and all its descendants, from /proc (Ray's raylet, GCS and workers
    started by ``ray.init`` descend from the driver; so do DataLoader workers)."""
    parents, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += [c for c, p in parents.items() if p == pid]
    return total


class PeakRSS:
    """Samples the RSS of this process tree while a path runs."""

    def __init__(self, interval: float = 0.2):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()

    def _sample(self) -> int:
        return tree_rss(os.getpid())

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def make_shards(out: Path, size: int, count: int, per_shard: int) -> Path:
    """Parquet shards of CIFAR images: PNG at 32x32, JPEG of the image upscaled to 320x320 otherwise."""
    from PIL import Image

    with np.load(CIFAR / "train.npz", allow_pickle=False) as d:
        x, y = d["x"][:count], d["fine"][:count].astype(np.int64)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, per_shard):
        images = []
        for arr in x[start:start + per_shard]:
            buf = io.BytesIO()
            if size <= 32:
                Image.fromarray(arr).save(buf, format="PNG")
            else:
                Image.fromarray(arr).resize((320, 320), Image.BICUBIC).save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
        keys = [f"img{start + i}" for i in range(len(images))]
        write_parquet_shard(str(out / f"train-{start // per_shard:05d}.parquet"), keys, images,
                            y[start:start + per_shard].tolist())
    return out


class ShardBatches(torch.utils.data.IterableDataset):
    """DataLoader baseline: each worker reads every k-th shard's row groups and decodes them in batches."""

    def __init__(self, paths: list[str], cfg: DecodeConfig, batch_size: int):
        self.paths, self.cfg, self.batch_size = paths, cfg, batch_size

    def __iter__(self):
        import pyarrow.parquet as pq

        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(wid)
        for path in self.paths[wid::workers]:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=["key", "image", "label"]):
                cols = batch.to_pydict()
                shard = [os.path.basename(path)] * len(cols["key"])
                pixels, labels, _ = decode_batch(cols["key"], cols["image"], cols["label"], shard, self.cfg, rng)
                yield torch.from_numpy(pixels), torch.from_numpy(labels)


def run_dataloader(shards: Path, cfg: DecodeConfig, batch_size: int) -> dict:
    paths = sorted(str(p) for p in shards.glob("train-*.parquet"))
    loader = torch.utils.data.DataLoader(ShardBatches(paths, cfg, batch_size), batch_size=None, num_workers=2,
                                         persistent_workers=False, prefetch_factor=4)
    with PeakRSS() as rss:
        stats = consume(((pixels, labels) for pixels, labels in loader))
    return {**stats, "peak_rss_mib": rss.peak / 2**20}


def consume(batches) -> dict:
    """Run the 'training loop' (normalize to float, count). Steady-state images/s are counted
    from the first batch on; the time to that first batch (workers/actors starting) is separate."""
    start = time.perf_counter()
    first_at, seen, after_first = None, 0, 0
    for pixels, labels in batches:
        to_float_tensor(pixels, MEAN, STD)
        seen += len(labels)
        if first_at is None:
            first_at = time.perf_counter()
        else:
            after_first += len(labels)
    end = time.perf_counter()
    return {"images": seen, "seconds": end - start, "first_batch_s": first_at - start,
            "images_per_s": after_first / max(end - first_at, 1e-9), "images_per_s_incl_startup": seen / (end - start)}


def run_ray(shards: Path, cfg: DecodeConfig, batch_size: int, concurrency: int, num_cpus: float) -> dict:
    from pipelines.data.stream import read_dataset

    ds = read_dataset(str(shards), decode=cfg, batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus,
                      log_name="bench-bad")
    with PeakRSS() as rss:
        stats = consume((b["image"], b["label"]) for b in ds.iter_torch_batches(
            batch_size=batch_size, dtypes={"image": None, "label": None}))
    return {**stats, "peak_rss_mib": rss.peak / 2**20, "concurrency": concurrency, "num_cpus_per_actor": num_cpus}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images32", type=int, default=20000)
    ap.add_argument("--images224", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=2, help="Ray decode actors")
    ap.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per Ray decode actor")
    ap.add_argument("--out", default="benchmarks/results/data_throughput.json")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, count, per_shard, target in ((32, args.images32, 2000, 0.8), (224, args.images224, 250, 1.0)):
            shards = make_shards(Path(tmp) / f"s{size}", size, count, per_shard)
            cfg = DecodeConfig(image_size=size, train=True, num_classes=100)
            run_dataloader(shards, cfg, args.batch)  # warm the page cache for both
            dl = run_dataloader(shards, cfg, args.batch)
            rd = run_ray(shards, cfg, args.batch, args.concurrency, args.num_cpus)
            rows.append({"image_size": size, "images": count, "dataloader": dl, "ray_data": rd,
                         "ratio": rd["images_per_s"] / dl["images_per_s"], "target": target,
                         "target_met": rd["images_per_s"] / dl["images_per_s"] >= target})
    result = {"benchmark": "data_throughput", "cores": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'size':>5} {'DataLoader img/s':>17} {'Ray Data img/s':>15} {'ratio':>6} {'target':>7} "
          f"{'DL 1st batch s':>15} {'Ray 1st batch s':>16} {'DL peak MiB':>12} {'Ray peak MiB':>13}")
    for r in rows:
        dl, rd = r["dataloader"], r["ray_data"]
        print(f"{r['image_size']:>5} {dl['images_per_s']:>17.0f} {rd['images_per_s']:>15.0f} {r['ratio']:>6.2f} "
              f"{r['target']:>7.1f} {dl['first_batch_s']:>15.1f} {rd['first_batch_s']:>16.1f} "
              f"{dl['peak_rss_mib']:>12.0f} {rd['peak_rss_mib']:>13.0f}")
    print("images/s are steady state (from the first batch on); peak RSS covers each path's whole process tree "
          "(for Ray: driver, raylet, GCS, workers)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
