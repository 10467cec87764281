"""Shards in an S3-compatible object store: a local moto server on 127.0.0.1 stands in for MinIO /
Ceph / AWS. The same shards are streamed from disk and from the bucket and must match record for
record (pixels, labels, bad-record counts)."""
import hashlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from datagen import MAX_PIXELS, make_imagefolder
from pipelines.data.prepare import prepare
from pipelines.data.records import DecodeConfig
from pipelines.data.stream import bad_record_log, list_shards, read_dataset, resolve

pytestmark = pytest.mark.integration  # real components: Ray, Ray Serve over HTTP, subprocess runs

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        # never ask the EC2 metadata address for credentials or a region: only the loopback is reachable
        "AWS_EC2_METADATA_DISABLED": "true"}
CFG = DecodeConfig(image_size=32, train=False, num_classes=3, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port; yields its 'host:port'."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


def s3fs(endpoint, **kw):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                             endpoint_override=endpoint, **kw)


@pytest.fixture(scope="module")
def shards(s3, ray_cluster, tmp_path_factory):
    """Parquet and WebDataset shards (with planted bad records) on disk and uploaded to s3://shards/."""
    import pyarrow.fs as pafs

    tmp = tmp_path_factory.mktemp("s3src")
    make_imagefolder(tmp / "src", per_class=10)
    admin = s3fs(s3, allow_bucket_creation=True)
    admin.create_dir("shards")
    local = {}
    for fmt in ("parquet", "webdataset"):
        out = tmp / fmt
        prepare(str(tmp / "src"), str(out), fmt=fmt, shard_size=8, max_pixels=MAX_PIXELS, log=lambda s: None)
        pafs.copy_files(str(out), f"shards/{fmt}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=admin)
        local[fmt] = out
    return local


def stream(uri, log_name, **kw):
    """(sorted per-image digests, sorted labels, bad-record summary) of the whole stream."""
    import ray

    ds = read_dataset(uri, decode=CFG, log_name=log_name, num_cpus=0.5, **kw)
    digests, labels = [], []
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        digests += [hashlib.sha1(im.tobytes()).hexdigest() for im in batch["image"]]
        labels += batch["label"].tolist()
    summary = ray.get(bad_record_log(log_name).summary.remote())
    return sorted(digests), sorted(labels), summary


def test_endpoint_in_the_uri_travels_with_the_filesystem(s3, shards, monkeypatch):
    """``?endpoint_override=...&scheme=http`` is kept by the filesystem object that read tasks get."""
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    fs, root = resolve(f"s3://shards/parquet?endpoint_override={s3}&scheme=http")
    assert root == "shards/parquet"
    worker_fs = pickle.loads(pickle.dumps(fs))  # what a Ray read task receives
    _, paths, fmt = list_shards("s3://shards/parquet", filesystem=worker_fs)
    assert fmt == "parquet" and paths and all(p.startswith("shards/parquet/train-") for p in paths)
    with pytest.raises(FileNotFoundError, match="no such folder of shards"):
        list_shards(f"s3://shards/nothing-here?endpoint_override={s3}&scheme=http")


def test_read_dataset_streams_every_record_from_s3(s3, shards):
    """The session's Ray workers have no AWS variables: the endpoint and keys ride on the filesystem."""
    local = stream(str(shards["parquet"]), "bad-s3-local")
    remote = stream("s3://shards/parquet", "bad-s3-remote", filesystem=s3fs(s3))
    digests, labels, bad = remote
    assert len(labels) == 30 + 5 - 1  # 30 good + 3 converted + png-named-jpeg; truncated skipped at decode
    assert np.bincount(labels).tolist() == [10 + 4, 10, 10]
    assert digests == local[0] and labels == local[1]
    assert bad["by_kind"] == local[2]["by_kind"] == {"truncated": 1, "converted": 3}
    assert bad["by_shard"] == local[2]["by_shard"]


@pytest.mark.timeout(300)
def test_plain_s3_uri_with_endpoint_and_keys_from_the_environment(s3, shards):
    """The user's way: export AWS_ENDPOINT_URL + keys, start Ray, read ``s3://bucket/prefix``
    (a fresh process, so that its Ray workers inherit the environment)."""
    script = textwrap.dedent("""
        import json, sys
        import ray
        from pipelines.data.records import DecodeConfig
        from pipelines.data.stream import bad_record_log, read_dataset
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = read_dataset("s3://shards/webdataset", decode=DecodeConfig(image_size=32, train=False, num_classes=3,
                          max_pixels=int(sys.argv[1])), num_cpus=0.5)
        labels = [int(x) for b in ds.iter_batches(batch_size=16, batch_format="numpy") for x in b["label"]]
        print(json.dumps({"labels": sorted(labels), "bad": ray.get(bad_record_log().summary.remote())["by_kind"]}))
    """)
    env = {**os.environ, **KEYS, "AWS_ENDPOINT_URL": f"http://{s3}", "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, "-c", script, str(MAX_PIXELS)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    _, local_labels, _ = stream(str(shards["webdataset"]), "bad-s3-wds-local")
    assert out["labels"] == local_labels and len(local_labels) == 34
    assert out["bad"] == {"truncated": 1, "converted": 3}
