"""Streaming shards into training with Ray Data.

``read_dataset(uri, ...)`` lists the shards of a split under a local path or an ``s3://``-style URI
(pyarrow filesystems), reads them with ``read_parquet`` / ``read_webdataset`` (file order shuffled
per epoch for training), keeps a deterministic train or validation subset (by a hash of each
record's key, so the split never changes between runs or readers), and decodes + augments in
``map_batches`` with bounded concurrency. Images travel as uint8 HWC (4x smaller than floats);
:func:`torch_batches` normalizes on the consumer, e.g. a Ray Train worker reading
``ray.train.get_dataset_shard("train")``.

Bad records are skipped and reported to a named actor (:class:`BadRecordLog`) that counts them
per shard and writes ``bad_records.jsonl``; with ``on_bad_record="fail"`` the job stops with the
shard and key named.

Object stores (``s3://bucket/prefix``; MinIO, Ceph, moto and other S3-compatible servers). The
driver lists the shards; Ray Data's read tasks, in other processes and possibly on other nodes,
open them with the same pyarrow filesystem object, which carries its endpoint, region and any
*explicit* keys along (keys that pyarrow found in the environment are not copied: each worker
looks them up again in its own environment). Three ways to point at a non-AWS endpoint:

1. In the URI: ``s3://bucket/shards?endpoint_override=minio.local:9000&scheme=http``
   (pyarrow also takes ``region=``; it refuses keys in URIs). Credentials then come from the
   standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables or ``~/.aws`` on every
   node.
2. In the environment (pyarrow reads ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``; tested
   with pyarrow 26): export
   ``AWS_ENDPOINT_URL=http://minio.local:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...``
   before ``ray.init()`` / ``ray start`` (a local Ray's workers inherit the driver's
   environment), or hand them to an existing cluster with
   ``ray.init(runtime_env={"env_vars": {...}})`` / ``ray job submit --runtime-env-json``.
3. In code: ``read_dataset(uri, filesystem=pyarrow.fs.S3FileSystem(endpoint_override=...,
   scheme="http", access_key=..., secret_key=..., region=...))``; the keys travel with the
   filesystem to the read tasks (into Ray's task specs: prefer 1 or 2 for real secrets).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from .records import DecodeConfig, decode_batch, pad_crop_flip, to_float_tensor

BAD_LOG_NAME = "splitnet-bad-records"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")


def resolve(uri: str, filesystem=None):
    """(pyarrow filesystem, path) for a local path or a URI such as ``s3://bucket/prefix``.

    With ``filesystem`` given, only the path is taken from ``uri`` (``s3://bucket/prefix?...``
    -> ``bucket/prefix``; a plain path is used as it is).
    """
    if filesystem is not None:
        if "://" not in uri:
            return filesystem, uri

        parts = urlsplit(uri)
        if parts.scheme == "file":
            return filesystem, parts.path
        return filesystem, (parts.netloc + parts.path).rstrip("/")
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def list_shards(uri: str, split: str = "train", filesystem=None) -> tuple[object, list[str], str]:
    """(filesystem, sorted shard paths, format) of ``split`` under ``uri``."""
    fs, root = resolve(uri, filesystem)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such folder of shards") from None
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    parquet = [p for p in names if p.rsplit("/", 1)[-1].startswith(f"{split}-") and p.endswith(".parquet")]
    tars = [p for p in names if p.rsplit("/", 1)[-1].startswith(f"{split}-") and p.endswith(".tar")]
    if parquet:
        return fs, parquet, "parquet"
    if tars:
        return fs, tars, "webdataset"
    raise FileNotFoundError(f"{uri}: no {split}-*.parquet or {split}-*.tar shards")


def has_split(uri: str, split: str = "train") -> bool:
    """Whether ``uri`` holds prepared shards of ``split``."""
    try:
        list_shards(uri, split)
        return True
    except OSError:
        return False


def count_records(uri: str, split: str) -> int:
    """Records in the shards of ``split``: from the ``<shard>.done.json`` that ``prepare`` leaves
    next to each shard when they are all there (a few bytes per shard, also on ``s3://``), else
    from Parquet footers or the image members of each WebDataset tar (reads whole tars)."""
    fs, paths, fmt = list_shards(uri, split)
    try:
        total = 0
        for p in paths:
            with fs.open_input_stream(p + ".done.json") as f:
                total += int(json.loads(f.read())["images"])
        return total
    except (FileNotFoundError, OSError, KeyError, ValueError):
        pass
    total = 0
    for p in paths:
        with fs.open_input_file(p) as f:
            if fmt == "parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                with tarfile.open(fileobj=f, mode="r|") as tf:
                    keys = {m.name.rsplit(".", 1)[0] for m in tf if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_COLUMNS}
                total += len(keys)
    return total


def class_table(uri: str) -> list[dict]:
    """The class table ``prepare`` writes next to the shards (classes.json, or classes.tsv)."""
    fs, root = resolve(uri)
    for name in ("classes.json", "classes.tsv"):
        try:
            with fs.open_input_stream(f"{root.rstrip('/')}/{name}") as f:
                text = f.read().decode()
        except (FileNotFoundError, OSError):
            continue
        if name.endswith(".json"):
            return json.loads(text)
        lines = text.strip().splitlines()
        header = lines[0].split("\t")
        return [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    raise FileNotFoundError(f"{uri}: no classes.json or classes.tsv next to the shards (splitnet prepare writes one)")


def _key_hash(key) -> int:
    return zlib.crc32(str(key).encode())


HASH_END = 2**32  # above every CRC32 key hash: a sample range open at the top


def _in_sample(key, label, ranges: dict) -> bool:
    try:
        bounds = ranges.get(int(label))
    except (TypeError, ValueError):
        return False  # no usable label: not in a per-class sample (the full pass reports it)
    if bounds is None:
        return False
    low, high = bounds
    return low < _key_hash(key) <= high


def class_samples(uri: str, sizes: list[int], split: str = "train", subset: str = "train",
                  val_fraction: float = 0.0, max_share: float = 1.0) -> list[dict[int, list[int]]]:
    """Consecutive disjoint per-class samples of the records of ``split`` (``subset`` of it): sample i
    holds ``sizes[i]`` records of every class (fewer where the class runs out; all together at most
    ``max_share`` of the class), as ``{label: [low, high]}``, the records whose key hash ``h`` has
    ``low < h <= high``. One pass over the keys and labels only (Parquet: two columns; WebDataset: the
    tar headers and ``.cls`` members); a sample is then read with ``read_dataset(..., sample=...)``,
    deterministic and the same every epoch. :func:`rest` is every record of a class after the samples."""
    fs, paths, fmt = list_shards(uri, split)
    hashes: dict[int, list[int]] = {}
    for path in paths:
        for key, label in _keys_and_labels(fs, path, fmt):
            if label is None or (val_fraction > 0 and in_validation(str(key), val_fraction) != (subset == "val")):
                continue
            hashes.setdefault(int(label), []).append(_key_hash(key))
    out: list[dict[int, list[int]]] = [{} for _ in sizes]
    for label, h in hashes.items():
        h.sort()
        taken, low = 0, -1
        budget = int(len(h) * max_share)
        for i, size in enumerate(sizes):
            n = max(0, min(size, budget - taken))
            if n:
                high = h[taken + n - 1]
                out[i][label] = [low, high]
                taken, low = taken + n, high
    return out


def rest(samples: list[dict[int, list[int]]]) -> dict[int, list[int]] | None:
    """Every record not in ``samples`` (as :func:`class_samples` drew them) of the classes they sampled:
    the range above their highest hash (a class no sample holds keeps no record: draw every class). None
    where no class was sampled (read without a sample: every record)."""
    top: dict[int, int] = {}
    for sample in samples:
        for label, (_, high) in sample.items():
            top[label] = max(top.get(label, -1), high)
    return {label: [high, HASH_END] for label, high in top.items()} or None


def _keys_and_labels(fs, path: str, fmt: str):
    with fs.open_input_file(path) as f:
        if fmt == "parquet":
            table = pq.read_table(f, columns=["key", "label"])
            yield from zip(table.column("key").to_pylist(), table.column("label").to_pylist())
            return
        labels: dict[str, int | None] = {}
        with tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                key, _, ext = m.name.rpartition(".")
                if m.isfile() and ext == "cls":
                    labels[key] = _parse_cls(tf.extractfile(m).read())
        yield from labels.items()


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic validation membership from the key alone (CRC32, stable across processes)."""
    return (zlib.crc32(key.encode()) % 100_000) < fraction * 100_000


class BadRecordLog:
    """Actor collecting bad records from every decode task: counts per shard and kind, JSONL rows."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, records: list[dict]) -> int:
        self.records.extend(records)
        return len(self.records)

    def summary(self) -> dict:
        by_kind: dict[str, int] = {}
        by_shard: dict[str, dict[str, int]] = {}
        for r in self.records:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
            shard = by_shard.setdefault(r["shard"], {})
            shard[r["kind"]] = shard.get(r["kind"], 0) + 1
        skipped = sum(v for k, v in by_kind.items() if k != "converted")
        return {"total": len(self.records), "skipped": skipped, "converted": by_kind.get("converted", 0),
                "by_kind": by_kind, "by_shard": by_shard}

    def records_list(self) -> list[dict]:
        return list(self.records)


_LOG_HANDLES: dict[str, object] = {}


def bad_record_log(name: str = BAD_LOG_NAME):
    """Get or create the named :class:`BadRecordLog` actor (kept alive while this driver runs)."""
    import ray

    actor_cls = ray.remote(num_cpus=0)(BadRecordLog)
    handle = actor_cls.options(name=name, get_if_exists=True).remote()
    # a named, non-detached actor lives as long as its creating handle: keep the first one
    _LOG_HANDLES.setdefault(name, handle)
    return handle


class DecodeBatch:
    """``map_batches`` callable: records -> {"image": uint8 [N,S,S,3], "label": int64 [N]}."""

    def __init__(self, cfg: dict, seed: int = 0, subset: str = "train", val_fraction: float = 0.0,
                 log_name: str | None = BAD_LOG_NAME, threads: int = 1, sample: dict | None = None,
                 label_offset: int = 0):
        self.cfg = DecodeConfig(**cfg)
        # sample: {label: [low, high]} keeps the records of those labels whose key hash is in (low, high],
        # before any decoding (a grown tree's replay and calibration samples, class_samples); label_offset
        # is added to every label decoded (a grown tree's new classes come after the old ones)
        self.sample = {int(k): [int(v[0]), int(v[1])] for k, v in sample.items()} if sample is not None else None
        self.label_offset = int(label_offset)
        # Pillow releases the GIL while it decodes and resizes: threads let one actor use more
        # than one core (224 px JPEGs, 2 threads: 1.5-1.9x the images/s of one).
        self.threads = max(1, int(threads))
        self._pool = None
        self.rng = np.random.default_rng([seed, zlib.crc32(str(id(self)).encode())])
        self.subset, self.val_fraction = subset, val_fraction
        self.log_name = log_name
        self._log = None

    def _report(self, bad: list[dict]) -> None:
        if not bad or self.log_name is None:
            return
        import ray

        if self._log is None:
            self._log = ray.get_actor(self.log_name)
        ray.get(self._log.add.remote(bad))  # rare; waiting keeps the counts exact when the stream ends

    def __call__(self, batch: dict) -> dict:
        keys, images, labels, shards = _columns(batch)
        if self.val_fraction > 0:
            keep = np.array([in_validation(str(k), self.val_fraction) == (self.subset == "val") for k in keys], bool)
            keys, images, labels, shards = keys[keep], images[keep], labels[keep], shards[keep]
        if self.sample is not None:
            keep = np.array([_in_sample(k, lab, self.sample) for k, lab in zip(keys, labels)], bool)
            keys, images, labels, shards = keys[keep], images[keep], labels[keep], shards[keep]
        pixels, out_labels, bad = self._decode(keys, images, labels, shards)
        self._report([b.as_dict() for b in bad])
        return {"image": pixels, "label": out_labels + self.label_offset}

    def _decode(self, keys, images, labels, shards):
        if self.threads == 1 or len(keys) < 4 * self.threads:
            return decode_batch(keys, images, labels, shards, self.cfg, self.rng)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        parts = np.array_split(np.arange(len(keys)), self.threads)
        seeds = self.rng.integers(0, 2**63, size=len(parts))  # one generator per chunk: no shared state
        results = list(self._pool.map(
            lambda p, s: decode_batch(keys[p], images[p], labels[p], shards[p], self.cfg, np.random.default_rng(s)),
            parts, seeds))
        pixels = np.concatenate([r[0] for r in results])
        return pixels, np.concatenate([r[1] for r in results]), [b for r in results for b in r[2]]


def _columns(batch: dict):
    """(keys, image bytes, labels, shard names) from a Parquet or a WebDataset batch."""
    n = len(next(iter(batch.values())))
    if "image" in batch:  # Parquet: our layout, or Hugging Face's struct {bytes, path}
        images = batch["image"]
        if len(images) and isinstance(images[0], dict):
            images = np.array([im.get("bytes") if im else None for im in images], dtype=object)
        keys = batch.get("key", np.array([f"row{i}" for i in range(n)], dtype=object))
        labels = batch.get("label", np.array([None] * n, dtype=object))
        shards = batch.get("path", np.array(["?"] * n, dtype=object))
    else:  # WebDataset: one column per extension
        images = np.array([None] * n, dtype=object)
        for col in IMAGE_COLUMNS:
            if col in batch:
                column = batch[col]
                for i in range(n):
                    if images[i] is None and _as_bytes(column[i]) is not None:
                        images[i] = column[i]
        keys = batch.get("__key__", np.array([f"row{i}" for i in range(n)], dtype=object))
        raw = batch.get("cls", np.array([None] * n, dtype=object))
        labels = np.array([_parse_cls(v) for v in raw], dtype=object)
        shards = batch.get("__url__", np.array(["?"] * n, dtype=object))
    shards = np.array([str(s).rsplit("/", 1)[-1] for s in shards], dtype=object)
    images = np.array([_as_bytes(b) or b"" for b in images], dtype=object)
    return np.asarray(keys, dtype=object), images, np.asarray(labels, dtype=object), shards


def _as_bytes(value) -> bytes | None:
    """bytes for a present binary cell; None for a missing one (Arrow gives None or NaN)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


def _parse_cls(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def block_bytes(target_block_mb: float, batch_size: int, decode: DecodeConfig) -> int:
    """Ray Data's target block size: ``target_block_mb``, raised to hold one decoded batch whole.

    One Ray Data setting sizes both the read blocks and ``map_batches``' output blocks. At 224x224
    a batch of 256 decodes to 38 MB; cut into 4 MiB blocks it became ~10 objects per batch, and
    the extra object-store traffic (raylet) plus the consumer re-assembling batches cost ~0.5 ms
    CPU per image (2.4 vs 1.9 ms all told, measured on 2 cores), more than the DataLoader baseline
    spends. Read blocks may then grow to the same size (at 224 px / 256 a batch: 27 MiB of
    encoded images, ~250 ImageNet JPEGs), still well below Ray's 128 MiB default.
    """
    from ray.data.context import MAX_SAFE_BLOCK_SIZE_FACTOR  # Ray cuts a block only past target x this (1.5)

    decoded = batch_size * decode.image_size * decode.image_size * 3
    # the smallest target that leaves a decoded batch whole: larger blocks would only make every
    # reader and consumer hold more (the driver-RSS bound in tests/test_data.py)
    return int(max(target_block_mb * 2**20, decoded / MAX_SAFE_BLOCK_SIZE_FACTOR + 2**20))


def read_dataset(uri: str, *, split: str = "train", subset: str = "train", val_fraction: float = 0.0,
                 decode: DecodeConfig | None = None, seed: int = 0, shuffle_files: bool = True,
                 batch_size: int = 256, concurrency: int | tuple[int, int] = 1, num_cpus: float = 1.0,
                 target_block_mb: float = 4, log_name: str | None = BAD_LOG_NAME, filesystem=None,
                 threads: int = 2, tasks: bool = False, sample: dict | None = None, label_offset: int = 0):
    """A Ray Dataset of decoded, augmented images from the shards of ``split`` under ``uri``.

    subset / val_fraction: "train" or "val" share of the split (deterministic by key hash).
    concurrency: decode actors (an int, or (min, max) to autoscale); num_cpus: CPUs per actor —
    leave CPUs for the read tasks, or the reads wait forever. target_block_mb: read blocks are
    split to about this size (Ray's 128 MiB default turns a whole shard into one block, which
    spills a small object store to disk; measured: 4 MiB streamed 3x the store with no spilling),
    but never below one decoded batch (:func:`block_bytes`): a decoded batch then travels as one
    object instead of being cut into blocks that the consumer glues back together.
    filesystem: a configured ``pyarrow.fs`` filesystem for ``uri`` (see the module notes on
    object stores); by default it is resolved from the URI. threads: decode threads per actor.
    tasks: decode in Ray tasks instead of actors (``concurrency`` of them at a time): for a single
    pass (:func:`cached_decoded`) tasks run in Ray's pooled worker processes, where an actor would
    first start a process of its own (~4 s of a ~6 s pass over a small split, on 2 cores).
    sample / label_offset: see :class:`DecodeBatch` (a grown tree's replay sample and new classes).
    """
    import ray

    decode = decode or DecodeConfig()
    low, high = (concurrency, concurrency) if isinstance(concurrency, int) else concurrency
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    if cpus and high * num_cpus >= cpus:
        raise ValueError(f"{high} decode actors x {num_cpus} CPU take all {cpus:g} CPUs of the cluster and the read "
                         "tasks could never run; lower the concurrency or num_cpus per actor")
    fs, paths, fmt = list_shards(uri, split, filesystem)
    ray.data.DataContext.get_current().target_max_block_size = block_bytes(target_block_mb, batch_size, decode)
    if log_name is not None:
        bad_record_log(log_name)
    # File order: a different permutation every execution (every epoch), reproducible from seed.
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle_files else None
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, shuffle=shuffle)
    else:
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, include_paths=False, shuffle=shuffle)
    decoder = {"cfg": asdict(decode), "seed": seed, "subset": subset, "val_fraction": val_fraction,
               "log_name": log_name, "threads": threads, "sample": sample, "label_offset": label_offset}
    if tasks:
        return ds.map_batches(_decode_task, fn_kwargs=decoder, batch_size=batch_size, batch_format="numpy",
                              num_cpus=num_cpus, concurrency=high)
    return ds.map_batches(DecodeBatch, fn_constructor_kwargs=decoder, batch_size=batch_size, batch_format="numpy",
                          num_cpus=num_cpus, compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high))


def _decode_task(batch: dict, **decoder) -> dict:
    """:class:`DecodeBatch` as a task, one decoder per batch (``cached_decoded`` decodes without
    augmentation: nothing random)."""
    return DecodeBatch(**decoder)(batch)


def torch_batches(source, batch_size: int, mean, std, device: str = "cpu", drop_last: bool = False,
                  prefetch_batches: int = 4, augment: np.random.Generator | None = None,
                  shuffle_buffer: int | None = None) -> Iterator[tuple[object, object]]:
    """(normalized float images [B,3,S,S], labels [B]) from a Dataset or a Ray Train dataset shard.

    The uint8 batch moves to ``device`` first and is normalized there (4x fewer bytes to copy
    than float32, and the normalization runs on the accelerator when there is one). Fetching 4
    batches ahead (Ray's default is 1) keeps the decode actors busy while the step runs: measured
    Ray/DataLoader at 224 px 0.99 -> 1.10 on 2 cores.

    ``augment``: pad, random-crop and flip each batch here with this generator (the images come
    decoded but not augmented: :func:`cached_decoded`); ``shuffle_buffer``: rows shuffled
    locally in a buffer of that many (Ray Data's ``local_shuffle_buffer_size``).
    """
    for batch in source.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, prefetch_batches=prefetch_batches,
                                           dtypes={"image": None, "label": None}, local_shuffle_buffer_size=shuffle_buffer):
        images = batch["image"]
        if augment is not None:
            images = torch.from_numpy(pad_crop_flip(images.numpy(), augment))
        yield to_float_tensor(images.to(device), mean, std), batch["label"].to(device)


def cached_decoded(uri: str, *, split: str, subset: str, val_fraction: float, decode: DecodeConfig, seed: int = 0,
                   rows_per_block: int = 256, **read_kwargs):
    """The records of ``split`` decoded once (not augmented) and held in Ray's object store: a
    ``MaterializedDataset`` that every epoch and stage re-reads without decoding again.

    For small images (<= 64 px, CIFAR-style), where the training augmentation (pad, crop, flip)
    works on decoded arrays and can run in the training workers (``torch_batches(augment=...)``).
    Decoding every epoch costs a decode actor's start-up (a Python process and its imports) plus
    the decoding itself, per epoch and per split, on the CPUs the training shares: measured on 2
    cores (demo, WRN-16-1) ~10 s of every ~50 s epoch.

    The result is cut into blocks of ``rows_per_block`` rows, so that ``randomize_block_order``
    (a new order every epoch) and the consumer's local shuffle buffer together mix the whole split:
    left as decoded, a block holds a whole shard.
    """
    plain = dataclasses.replace(decode, train=False)  # resize only; augmentation happens per epoch in the workers
    ds = read_dataset(uri, split=split, subset=subset, val_fraction=val_fraction, decode=plain, seed=seed,
                      shuffle_files=False, tasks=True, **read_kwargs).materialize()
    blocks = -(-ds.count() // rows_per_block)
    if ds.num_blocks() < blocks:
        ds = ds.repartition(blocks).materialize()
    return ds


def decoded_bytes(records: int, image_size: int) -> int:
    """What ``records`` decoded uint8 images take in the object store (labels and keys aside)."""
    return records * image_size * image_size * 3
