"""Ray Data: prepare every source layout into shards, stream them back, count every bad record."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import CIFAR, ROOT
from datagen import (CONVERTED, MAX_PIXELS, SKIPPED, WNIDS, make_cifar_slice, make_imagefolder, make_synset_tars,
                     make_user_parquet, make_user_webdataset)
from pipelines.data.prepare import PrepareError, prepare
from pipelines.data.records import BadRecordError, DecodeConfig
from pipelines.data.stream import bad_record_log, in_validation, list_shards, read_dataset


def stream(uri, log_name, **kw):
    ds = read_dataset(uri, log_name=log_name, **kw)
    images, labels = [], []
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    import ray
    summary = ray.get(bad_record_log(log_name).summary.remote())
    return np.concatenate(images), np.concatenate(labels), summary


def test_wordnet_names_and_parents():
    from splitnet.wordnet import describe
    rows = describe(WNIDS)
    assert [r["lemma"] for r in rows] == ["tench", "dog", "domestic cat"]
    assert rows[1]["parent_lemma"] == "canine"


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_prepare_imagefolder_with_wordnet_classes_and_bad_records(ray_cluster, tmp_path, fmt):
    info = make_imagefolder(tmp_path / "src")
    out = tmp_path / "shards"
    summary = prepare(str(tmp_path / "src"), str(out), fmt=fmt, shard_size=7, max_pixels=MAX_PIXELS, log=lambda s: None)
    # header checks catch empty / not an image / too large at prepare time; the rest pass through
    assert summary["bad_by_kind"] == {"empty": 1, "not_image": 1, "too_large": 1}
    kept = info["good"] + 5  # truncated, grayscale, cmyk, rgba, png-named-jpeg travel on to decode
    assert summary["images"] == kept
    rows = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in rows) == ["empty", "not_image", "too_large"]
    # evenly sized shards
    _, paths, detected = list_shards(str(out))
    assert detected == fmt and len(paths) == -(-(kept + 3) // 7)
    done = [json.loads((out / (p.rsplit("/", 1)[-1] + ".done.json")).read_text()) for p in paths]
    planned = [d["planned"] for d in done]
    assert max(planned) - min(planned) <= 1  # even plan; a shard is short only by its counted bad records
    assert all(d["images"] + len(d["bad"]) == d["planned"] for d in done)
    table = (out / "classes.tsv").read_text().splitlines()
    assert table[0].split("\t")[:4] == ["index", "name", "lemma", "parent"]
    assert table[2].split("\t")[:3] == ["1", "n02084071", "dog"] and table[2].split("\t")[3] == "n02083346"


def test_prepare_synset_tars_and_stream_labels(ray_cluster, tmp_path):
    make_synset_tars(tmp_path / "tars")
    out = tmp_path / "wds"
    prepare(str(tmp_path / "tars"), str(out), fmt="webdataset", shard_size=5, max_pixels=MAX_PIXELS, log=lambda s: None)
    images, labels, bad = stream(str(out), "bad-tars", decode=DecodeConfig(image_size=32, num_classes=3,
                                                                          max_pixels=MAX_PIXELS))
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    # 18 good + 3 converted + png-named-jpeg; truncated skipped at decode
    assert len(labels) == 18 + len(CONVERTED) + 1
    assert np.bincount(labels).tolist() == [6 + 4, 6, 6]
    assert bad["by_kind"] == {"truncated": 1, "converted": 3}


def test_prepare_resumes_and_refuses_a_different_plan(ray_cluster, tmp_path):
    make_imagefolder(tmp_path / "src", with_bad=False)
    out = tmp_path / "shards"
    first = prepare(str(tmp_path / "src"), str(out), shard_size=4, log=lambda s: None)
    assert first["written_now"] == 5
    victim = out / "train-00003.parquet"
    victim.unlink()
    (out / "train-00003.parquet.done.json").unlink()
    untouched = (out / "train-00001.parquet").stat().st_mtime_ns
    again = prepare(str(tmp_path / "src"), str(out), shard_size=4, log=lambda s: None)
    assert again["written_now"] == 1 and victim.exists() and again["images"] == first["images"]
    assert (out / "train-00001.parquet").stat().st_mtime_ns == untouched
    with pytest.raises(PrepareError, match="different plan"):
        prepare(str(tmp_path / "src"), str(out), shard_size=4, seed=1, log=lambda s: None)


def test_prepare_fail_mode_names_the_record(ray_cluster, tmp_path):
    make_imagefolder(tmp_path / "src")
    with pytest.raises(BadRecordError, match=r"key n01440764/n01440764_(empty|not_image|too_large): "):
        prepare(str(tmp_path / "src"), str(tmp_path / "out"), on_bad_record="fail", max_pixels=MAX_PIXELS,
                log=lambda s: None)


def test_real_cifar_slice_prepare_and_deterministic_split(ray_cluster, tmp_path):
    src = make_cifar_slice(CIFAR, tmp_path / "cifar")
    out = tmp_path / "shards"
    summary = prepare(str(src), str(out), shard_size=128, log=lambda s: None)
    assert summary["images"] == 400 and summary["bad_records"] == 0
    assert sorted(p.name for p in out.glob("test-*.parquet")) == ["test-00000.parquet"]
    table = json.loads((out / "classes.json").read_text())
    assert table[0]["name"] == "apple" and table[0]["parent"] == "fruit_and_vegetables"
    cfg = DecodeConfig(image_size=32, train=False, num_classes=100)
    _, val1, _ = stream(str(out), "bad-c1", decode=cfg, subset="val", val_fraction=0.2, shuffle_files=False)
    _, train1, _ = stream(str(out), "bad-c2", decode=cfg, subset="train", val_fraction=0.2, shuffle_files=False)
    assert len(val1) + len(train1) == 300 and 30 < len(val1) < 90
    # the same keys land in validation every time (hash of the key, not of the order)
    _, val2, _ = stream(str(out), "bad-c3", decode=cfg, subset="val", val_fraction=0.2)
    assert sorted(val1.tolist()) == sorted(val2.tolist())
    # pixels survive the PNG round trip exactly
    import pyarrow.parquet as pq
    from PIL import Image
    import io
    row = pq.read_table(out / "train-00000.parquet").slice(0, 1).to_pylist()[0]
    with np.load(src / "train.npz", allow_pickle=False) as d:
        index = int(row["key"].rsplit("-", 1)[1])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), d["x"][index])


def test_user_webdataset_read_as_is_with_every_bad_kind(ray_cluster, tmp_path):
    info = make_user_webdataset(tmp_path / "wds")
    images, labels, bad = stream(str(tmp_path / "wds"), "bad-wds",
                                 decode=DecodeConfig(image_size=64, num_classes=3, max_pixels=MAX_PIXELS))
    assert images.shape[1:] == (64, 64, 3)
    assert len(labels) == info["good"] + len(CONVERTED) + 1
    assert bad["by_kind"] == {**{k: 1 for k in SKIPPED}, "missing_label": 1, "converted": 3}
    assert set(bad["by_shard"]) == {"train-00000.tar"}


def test_user_parquet_hf_layout_every_bad_kind_and_jsonl(ray_cluster, tmp_path):
    info = make_user_parquet(tmp_path / "pq")
    log = "bad-pq"
    images, labels, bad = stream(str(tmp_path / "pq"), log,
                                 decode=DecodeConfig(image_size=32, num_classes=3, max_pixels=MAX_PIXELS))
    assert len(labels) == info["good"] + len(CONVERTED) + 1
    assert bad["by_kind"] == {**{k: 1 for k in SKIPPED}, "missing_label": 2, "converted": 3}
    assert bad["skipped"] == 6 and bad["by_shard"]["train-00000.parquet"]["missing_label"] == 2
    import ray
    records = ray.get(bad_record_log(log).records_list.remote())
    assert len(records) == 9
    keys = {r["key"] for r in records}
    assert {"bad_empty", "bad_truncated", "missing_label", "label_out_of_range"} <= keys


def test_stream_fail_mode_names_shard_and_key(ray_cluster, tmp_path):
    make_user_parquet(tmp_path / "pq")
    with pytest.raises(Exception, match=r"shard train-00000.parquet: key bad_\w+"):
        stream(str(tmp_path / "pq"), "bad-fail", decode=DecodeConfig(image_size=32, on_bad_record="fail"))


def test_validation_membership_is_stable():
    keys = [f"k{i}" for i in range(2000)]
    frac = np.mean([in_validation(k, 0.1) for k in keys])
    assert 0.07 < frac < 0.13
    assert [in_validation(k, 0.1) for k in keys[:50]] == [in_validation(k, 0.1) for k in keys[:50]]


@pytest.mark.integration  # a subprocess run of the CLI
def test_prepare_cli_bad_input_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", str(tmp_path), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not a CIFAR-100 folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _count_in_train_worker(config):
    """Ray Train loop: read this worker's shard as torch batches and count (runs on a worker)."""
    import tempfile

    import ray.train
    import torch

    from pipelines.data.stream import torch_batches

    shard = ray.train.get_dataset_shard("train")
    seen, checksum = 0, 0.0
    for x, y in torch_batches(shard, batch_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        seen += len(y)
        checksum += float(y.sum())
    with tempfile.TemporaryDirectory() as d:
        ray.train.report({"images": seen, "label_sum": checksum},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


@pytest.mark.timeout(400)
def test_ray_train_worker_reads_its_dataset_shard(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    make_synset_tars(tmp_path / "tars", with_bad=False)
    prepare(str(tmp_path / "tars"), str(tmp_path / "pq"), shard_size=6, log=lambda s: None)
    ds = read_dataset(str(tmp_path / "pq"), decode=DecodeConfig(image_size=32, num_classes=3), num_cpus=0.5,
                      log_name="bad-train")
    trainer = TorchTrainer(_count_in_train_worker, datasets={"train": ds},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="feed", storage_path=str(tmp_path / "runs")))
    result = trainer.fit()
    assert result.metrics["images"] == 18 and result.metrics["label_sum"] == 6 * (0 + 1 + 2)


def _object_store_mib() -> tuple[float, float]:
    """(MiB in this cluster's object store now, MiB spilled to disk since it started)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)  # this cluster, by address
    used = re.search(r"Plasma memory usage (\d+) MiB", summary)
    spilled = re.search(r"Spilled (\d+) MiB", summary)
    return float(used.group(1)) if used else 0.0, float(spilled.group(1)) if spilled else 0.0


@pytest.mark.timeout(400)
def test_streaming_more_bytes_than_the_object_store(ray_cluster, tmp_path):
    """Memory stays bounded: 3x the object store's capacity (6x once decoded) streams through
    without being materialized, in the driver or in the object store."""
    import gc
    import io
    import resource
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    import ray

    capacity = ray.cluster_resources()["object_store_memory"]
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    image = buf.getvalue()
    per_shard = 200
    shards = int(np.ceil(3 * capacity / (len(image) * per_shard)))
    out = tmp_path / "big"
    out.mkdir()
    for s in range(shards):
        pq.write_table(pa.table({"key": [f"s{s}_{i}" for i in range(per_shard)], "image": [image] * per_shard,
                                 "label": [i % 3 for i in range(per_shard)]}), out / f"train-{s:05d}.parquet",
                       row_group_size=50, use_dictionary=False, compression="none")
    shard_bytes = sum(p.stat().st_size for p in out.iterdir())
    assert shard_bytes > 3 * capacity
    decoded_bytes = shards * per_shard * 224 * 224 * 3

    def private_rss() -> int:
        """Resident pages the driver owns: object-store blocks it maps are shared pages and count
        against the store, not here (a full rss rises to the store's size just by reading it)."""
        with open("/proc/self/statm") as f:
            _, resident, shared = (int(v) for v in f.read().split()[:3])
        return (resident - shared) * resource.getpagesize()

    # earlier tests' blocks are freed lazily: start from a drained store, so that what spills is ours
    gc.collect()
    deadline = time.monotonic() + 60
    while _object_store_mib()[0] > 0.1 * capacity / 2**20 and time.monotonic() < deadline:
        time.sleep(0.5)
    used_before, spilled_before = _object_store_mib()
    assert used_before <= 0.1 * capacity / 2**20, f"{used_before:.0f} MiB still in the object store before the test"
    rss_before, rss_peak = private_rss(), 0
    # 2 actors x 0.5 CPU leave a CPU for the read tasks (actors holding every CPU would deadlock the reads)
    ds = read_dataset(str(out), decode=DecodeConfig(image_size=224, num_classes=3), num_cpus=0.5, concurrency=2,
                      batch_size=50, log_name="bad-big")
    seen = 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        seen += len(batch["label"])
        rss_peak = max(rss_peak, private_rss())
    assert seen == shards * per_shard
    grown = rss_peak - rss_before
    # the consumer holds a few batches at a time (measured: ~15 MiB), never the dataset (1.2 GB decoded)
    assert grown < capacity / 2, f"driver memory grew {grown / 2**20:.0f} MiB for {decoded_bytes / 2**20:.0f} MiB streamed"
    # Ray Data's backpressure keeps the blocks in flight to about the store's size (measured: up to
    # 90% full, no spill from a drained store); materializing would spill > 5x the store
    spilled = _object_store_mib()[1] - spilled_before
    assert spilled < capacity / 2**20, f"spilled {spilled:.0f} MiB of {decoded_bytes / 2**20:.0f} MiB streamed"


def test_uri_paths_and_bad_record_counts(ray_cluster, tmp_path):
    """Shards addressed by URI go through pyarrow's filesystem layer (the s3:// code path)."""
    make_user_parquet(tmp_path / "pq")
    images, labels, bad = stream(f"file://{tmp_path / 'pq'}", "bad-uri",
                                 decode=DecodeConfig(image_size=32, num_classes=3, max_pixels=MAX_PIXELS))
    assert len(labels) == 14
    assert (bad["skipped"], bad["converted"], len(bad["by_shard"])) == (6, 3, 1)
    with pytest.raises(FileNotFoundError, match="no train-"):
        read_dataset(str(tmp_path), log_name=None)
    with pytest.raises(ValueError, match="take all 2 CPUs"):
        read_dataset(str(tmp_path / "pq"), concurrency=2, num_cpus=1.0, log_name=None)


@pytest.mark.integration  # a subprocess run of the CLI
def test_prepare_cli_end_to_end(tmp_path):
    make_imagefolder(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", str(tmp_path / "src"), "--out",
                        str(tmp_path / "out"), "--format", "webdataset", "--shard-size", "5", "--max-pixels", str(MAX_PIXELS)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prepare: 23 images in 6 shards" in r.stdout and "3 bad records" in r.stdout
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert summary["shards"] == 6 and summary["bad_by_kind"]["empty"] == 1


def test_to_float_tensor_matches_torchvision_normalize():
    """The fused uint8 -> normalized float path equals ToTensor + Normalize, laid out NCHW contiguous."""
    import torch
    from torchvision.transforms.functional import normalize

    from pipelines.data.records import IMAGENET_MEAN, IMAGENET_STD, to_float_tensor

    pixels = np.random.default_rng(0).integers(0, 256, (4, 7, 5, 3), dtype=np.uint8)
    pixels.setflags(write=False)  # Ray hands batches over read-only
    x = to_float_tensor(pixels, IMAGENET_MEAN, IMAGENET_STD)
    expected = normalize(torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (4, 3, 7, 5) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(to_float_tensor(torch.from_numpy(pixels.copy()), IMAGENET_MEAN, IMAGENET_STD), x)


def test_a_decoded_batch_travels_as_one_block(ray_cluster, tmp_path):
    """64 images at 224x224 decode to 9.6 MB, well over the 4 MiB read-block target: blocks must
    still hold whole batches (cut into pieces, a batch costs object-store traffic and a
    re-assembling copy on the consumer)."""
    from datagen import jpeg
    from pipelines.data.sources import write_parquet_shard

    (tmp_path / "pq").mkdir()
    write_parquet_shard(str(tmp_path / "pq" / "train-00000.parquet"), [f"k{i}" for i in range(128)],
                        [jpeg(seed=i) for i in range(128)], [i % 3 for i in range(128)])
    ds = read_dataset(str(tmp_path / "pq"), decode=DecodeConfig(image_size=224, num_classes=3), batch_size=64,
                      num_cpus=0.5, log_name=None)
    sizes = [len(b["label"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(sizes) == 128 and all(n % 64 == 0 for n in sizes), sizes  # whole batches only, never pieces


def test_decode_threads_give_the_same_images_and_bad_records_as_one_thread():
    """DecodeBatch splits a batch over threads: same images (evaluation view), same labels, the
    same bad records counted — nothing lost or duplicated at the chunk edges."""
    import io

    from PIL import Image

    from pipelines.data.stream import DecodeBatch

    rng = np.random.default_rng(0)
    images = []
    for i in range(37):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format="JPEG")
        images.append(buf.getvalue())
    images[5], images[20] = b"", b"not an image"          # two bad records, in different chunks
    images[33] = images[33][: len(images[33]) // 3]       # and a truncated one
    batch = {"image": np.array(images, dtype=object), "key": np.array([f"k{i}" for i in range(37)], dtype=object),
             "label": np.arange(37) % 7, "path": np.array(["shard-0"] * 37, dtype=object)}
    cfg = {"image_size": 32, "train": False, "num_classes": 7}
    one = DecodeBatch(cfg, log_name=None, threads=1)
    three = DecodeBatch(cfg, log_name=None, threads=3)
    a = one._decode(batch["key"], batch["image"], batch["label"], batch["path"])
    b = three._decode(batch["key"], batch["image"], batch["label"], batch["path"])
    assert len(a[0]) == 34 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert sorted((r.key, r.kind) for r in a[2]) == sorted((r.key, r.kind) for r in b[2]) == [
        ("k20", "not_image"), ("k33", "truncated"), ("k5", "empty")]


def test_file_order_is_reshuffled_every_epoch_and_reproducible_from_the_seed(ray_cluster, tmp_path):
    """Each execution of the training stream (each epoch) reads the shards in a new order; the same
    seed gives the same sequence of orders. Shard i holds only label i, so with order preserved
    the labels spell the file order."""
    import io

    from PIL import Image
    from ray.data import DataContext

    from pipelines.data.sources import write_parquet_shard

    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(buf, format="PNG")
        write_parquet_shard(str(tmp_path / f"train-{i:05d}.parquet"), [f"s{i}-{j}" for j in range(4)],
                            [buf.getvalue()] * 4, [i] * 4)
    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        def orders(seed, epochs):
            # decode tasks, not an actor per execution: the order is the read's (FileShuffleConfig) either way
            ds = read_dataset(str(tmp_path), decode=DecodeConfig(image_size=32, train=False), seed=seed,
                              batch_size=4, concurrency=1, num_cpus=0.25, log_name=None, tasks=True)
            out = []
            for _ in range(epochs):
                labels = [int(x) for b in ds.iter_batches(batch_size=4) for x in b["label"]]
                assert sorted(labels) == sorted(list(range(6)) * 4)
                out.append(list(dict.fromkeys(labels)))  # file order
            return out

        first = orders(seed=7, epochs=3)
        assert len({tuple(o) for o in first}) > 1, f"the same file order every epoch: {first}"
        assert orders(seed=7, epochs=3) == first
    finally:
        ctx.execution_options.preserve_order = old


def test_wordnet_categories_are_the_lexicographer_files():
    from splitnet.wordnet import categories

    assert categories(["n01440764", "n02958343"]) == ["noun.animal", "noun.artifact"]  # tench, car
    assert categories(["n01440764", "n99999999"]) is None


def test_select_classes_by_superclass_and_name_relabelled(tmp_path):
    """data.classes / prepare --classes: superclass names stand for their classes, labels become 0..K-1,
    the parents stay with their classes; an unknown name is one line naming it (exit 2 in the CLI)."""
    from pipelines.data.prepare import select_classes
    from pipelines.data.sources import list_source

    src_dir = make_cifar_slice(CIFAR, tmp_path / "cifar", train=2000, test=400)
    full = list_source(src_dir)
    src = list_source(src_dir)
    select_classes(src, ["vehicles_1", "apple"])
    assert src.classes == ["apple", "bicycle", "bus", "motorcycle", "pickup_truck", "train"]
    assert src.parents == ["fruit_and_vegetables"] + ["vehicles_1"] * 5
    for split, items in src.items.items():
        old = [it for it in full.items[split] if full.classes[it.label] in src.classes]
        assert [it.key for it in items] == [it.key for it in old] and len(items) > 0
        assert [src.classes[it.label] for it in items] == [full.classes[it.label] for it in old]
    with pytest.raises(ValueError, match=r"'vehicles_3' is neither a class nor a parent .*did you mean 'vehicles_[12]'"):
        select_classes(list_source(src_dir), ["vehicles_3"])
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", str(src_dir), "--out", str(tmp_path / "o"),
                        "--classes", "vehicles_1,fishh"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "'fishh' is neither a class nor a parent" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_decoded_once_then_reshuffled_and_augmented_in_the_consumer(ray_cluster, tmp_path):
    """``data.cache``: the decoded images of a small-image split are held in the object store (not
    augmented); every epoch the block order changes, and torch_batches pads/crops/flips per batch.
    Image i is a flat colour with value 8*i in red, so what reaches the consumer can be checked."""
    import io

    import torch
    from PIL import Image

    from pipelines.data.sources import write_parquet_shard
    from pipelines.data.stream import cached_decoded, torch_batches

    for shard in range(4):
        keys, images = [], []
        for j in range(8):
            i = shard * 8 + j
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (8 * i, 100, 200)).save(buf, format="PNG")
            keys.append(f"k{i}")
            images.append(buf.getvalue())
        write_parquet_shard(str(tmp_path / f"train-{shard:05d}.parquet"), keys, images, [shard] * 8)
    decode = DecodeConfig(image_size=32, train=True, num_classes=4)
    cached = cached_decoded(str(tmp_path), split="train", subset="train", val_fraction=0.0, decode=decode,
                            batch_size=8, concurrency=1, num_cpus=0.25, log_name=None, rows_per_block=8)
    assert cached.num_blocks() == 4
    stored = np.concatenate([b["image"] for b in cached.iter_batches(batch_size=8, batch_format="numpy")])
    assert stored.shape == (32, 32, 32, 3) and (stored[:, :, :, 1] == 100).all()  # decoded, not padded or cropped

    import ray

    ds = cached.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=3, reseed_after_execution=True))
    orders = [[int(b["image"][0, 0, 0, 0]) // 8 for b in ds.iter_batches(batch_size=8, batch_format="numpy")]
              for _ in range(4)]
    assert all(sorted(o) == [0, 8, 16, 24] for o in orders) and len({tuple(o) for o in orders}) > 1, orders

    rng = np.random.default_rng(0)
    mean, std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # x = the uint8 values
    batches = list(torch_batches(cached, 8, mean, std, augment=rng, shuffle_buffer=16))
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (32, 3, 32, 32) and sum(len(b[1]) for b in batches) == 32
    # pad-and-crop shifts zero borders in: every image is still its colour inside, some have a black band
    green = x[:, 1]
    assert ((green == 100) | (green == 0)).all() and (green == 0).any(dim=(1, 2)).sum() > 16
    plain = torch.cat([b[0] for b in torch_batches(cached, 8, mean, std)])
    assert (plain[:, 1] == 100).all()


def test_decoded_cache_only_for_small_images_that_fit_the_object_store(monkeypatch):
    """``data.cache``: on for images <= 64 px whose decoded copy fits a quarter of the store."""
    import ray

    from pipelines.config import load_config
    from pipelines.run import DataInfo, DecodedCache

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2, "object_store_memory": 200 * 2**20})

    def cache(records: int, *overrides: str) -> bool:
        cfg = load_config(ROOT / "pipelines/configs/demo.yaml", list(overrides))
        info = DataInfo(shards="unused", class_names=["a", "b"], parents=["", ""], train_records=records,
                        eval_split="train", eval_subset="val", mean=[0.5] * 3, std=[0.25] * 3)
        return DecodedCache(cfg, info).enabled

    assert cache(10_000)                           # 29 MiB of 32 px images: fits 50 MiB
    assert not cache(100_000)                      # 293 MiB: streams, decoded every epoch
    assert not cache(10_000, "data.cache=false")
    assert not cache(100, "data.image_size=96")     # larger images: augmented while decoding (random-resized crop)


def test_class_samples_are_disjoint_sized_and_the_rest_is_everything_else(tmp_path):
    """A grown tree's replay, calibration and held-out samples: drawn from the keys alone, disjoint,
    ``sizes`` per class (capped by ``max_share``), and DecodeBatch keeps exactly their records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.stream import DecodeBatch, _in_sample, class_samples, rest

    counts = {0: 30, 1: 12, 2: 4}  # class 2 runs out
    keys = [f"c{c}-{i}" for c, n in counts.items() for i in range(n)]
    labels = [c for c, n in counts.items() for _ in range(n)]
    for part in (0, 1):  # two shards: a class spread over both
        pq.write_table(pa.table({"key": keys[part::2], "image": [b""] * len(keys[part::2]), "label": labels[part::2]}),
                       tmp_path / f"train-{part:05d}.parquet")
    replay, held = class_samples(str(tmp_path), [5, 3])
    def members(sample):  # the records the decoder keeps, the sample as it holds it (from JSON)
        held = DecodeBatch({"image_size": 8, "num_classes": 3}, log_name=None, sample=sample).sample
        return {k for k, lab in zip(keys, labels) if _in_sample(k, lab, held)}

    r, h, other = members(replay), members(held), members(rest([replay, held]))
    assert [sum(k.startswith(f"c{c}-") for k in r) for c in counts] == [5, 5, 4]
    assert [sum(k.startswith(f"c{c}-") for k in h) for c in counts] == [3, 3, 0]
    assert not (r & h) and not (r & other) and not (h & other) and r | h | other == set(keys)
    assert class_samples(str(tmp_path), [5, 3]) == [replay, held]  # deterministic
    [capped] = class_samples(str(tmp_path), [10], max_share=0.2)  # at most a fifth of each class
    assert [sum(k.startswith(f"c{c}-") for k in members(capped)) for c in counts] == [6, 2, 0]
    assert rest([{}]) is None


def test_image_arrays_split_per_class_is_disjoint_and_its_first_part_is_subset():
    """The in-memory twin of class_samples (benchmarks' replay / calibration / training parts)."""
    from splitnet.datasets import ImageArrays

    labels = np.repeat(np.arange(3), [10, 6, 2])
    data = ImageArrays(np.arange(18)[:, None], labels, ["a", "b", "c"], labels // 2, ["x", "y"])
    first, second, left = data.split_per_class([3, 2], seed=4)
    assert [np.bincount(p.labels, minlength=3).tolist() for p in (first, second, left)] == [[3, 3, 2], [2, 2, 0], [5, 1, 0]]
    ids = [set(p.images[:, 0].tolist()) for p in (first, second, left)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2]) and set.union(*ids) == set(range(18))
    sub = data.subset(3, seed=4)
    assert np.array_equal(sub.images, first.images) and np.array_equal(sub.coarse_labels, first.coarse_labels)
    assert np.array_equal(first.labels, labels[first.images[:, 0]])  # images and labels stay paired
