"""Serving soak: minutes of closed-loop HTTP load on the trunk + subtrees app, watching latency
drift, errors and replica memory.

``--concurrency`` clients (16), each on its own keep-alive connection, send their next request
when the answer arrives, for ``--minutes`` (10) after a warm-up. The mix, drawn per request:

* 60% good: one JPEG as the body (``?top_k=5``), or JSON with 1-3 base64 images;
* 15% class-filtered: ``?classes=...`` of one subtree, or JSON ``"groups": [g]``;
* 25% bad input, each with the 4xx it must get: empty body, not an image, truncated JPEG, GIF,
  wrong Content-Type, bad base64, bad JSON, unknown class, too many images, a body over the byte
  limit (sent with ``Connection: close``, as urllib does: the ingress reads it to its end first).

Per minute: p50 / p99 of the good and filtered requests, answers counted by status, answers
that were not what the request should get, lost requests (no HTTP answer: reset, timeout), and
the RSS (VmRSS) of every Serve replica (PIDs from Ray's state API) and of the proxy. Targets
(issue 15): zero 5xx, zero lost, p99 of the last minute <= 1.5x the first, every replica's RSS
grows < 5% from the end of the first minute to the end. Writes benchmarks/results/serve_soak.json
and prints a table.

    python benchmarks/serve_soak.py [--minutes 10] [--concurrency 16] [--run-dir runs/demo]
        [--trunk-replicas 1] [--bucket-seconds 60]

Without ``--run-dir`` a WRN-16-2 (split 2-2-2, 100 classes, CIFAR size) with random weights is
cut and served: what is measured does not depend on what the weights learned.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = Path(os.environ.get("SPLITNET_CIFAR100", ROOT.parent / "shared" / "data" / "cifar100"))
LIMITS = {"max_body_bytes": 1 * 2**20, "max_images": 4}  # small byte limit: over-limit bodies stay cheap


def make_tree(out: Path) -> str:
    """A random WRN-16-2 tree (split 2-2-2, 100 classes, 32 px) -> its directory."""
    import torch

    from splitnet import build_model, cut
    from splitnet.accounting import model_cost

    torch.manual_seed(0)
    model = build_model("wrn-16-2", 100, "2-2-2").eval()
    with torch.no_grad():  # non-uniform assignments, so the cut makes real groups
        for name in model.assignments.names():
            model.assignments.logit(name).normal_(0, 3)
    info = {"class_names": [f"class{c}" for c in range(100)], "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 32}
    cut(model, info=info).save(out / "tree", dense_cost=model_cost(model, 32))
    return str(out / "tree")


def photos(n: int = 32) -> list[bytes]:
    """JPEGs of CIFAR-100 test images (random pixels without the data), at a few sizes."""
    from PIL import Image

    if (CIFAR / "test.npz").is_file():
        with np.load(CIFAR / "test.npz", allow_pickle=False) as d:
            pixels = d["x"][:n]
    else:
        pixels = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    out = []
    for i, x in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(x).resize((32 * (1 + i % 4),) * 2).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Mix:
    """Draws the next request: (kind, path suffix, body, headers, statuses it may get)."""

    def __init__(self, manifest: dict, images: list[bytes]):
        from PIL import Image

        self.images = images
        names = manifest["class_names"]
        self.subtree_classes = [[names[c] for c in s["classes"]] for s in manifest["subtrees"]]
        self.groups = sorted({g["group"] for g in manifest["groups"]})
        gif = io.BytesIO()
        Image.new("RGB", (8, 8)).save(gif, format="GIF")
        b64 = base64.b64encode(images[0]).decode()
        self.bad = [  # (name, body, content type, expected status)
            ("empty body", b"", "image/jpeg", 400),
            ("not an image", b"this is not an image" * 20, "image/jpeg", 400),
            ("truncated jpeg", images[5][: len(images[5]) // 2], "image/jpeg", 400),
            ("gif", gif.getvalue(), "image/jpeg", 415),
            ("wrong content type", images[1], "text/plain", 415),
            ("bad base64", json.dumps({"images": ["%%%"]}).encode(), "application/json", 400),
            ("bad json", b'{"images": [', "application/json", 400),
            ("unknown class", json.dumps({"images": [b64], "classes": ["unicorn"]}).encode(), "application/json", 400),
            ("too many images", json.dumps({"images": [b64] * 5}).encode(), "application/json", 413),
            ("over the byte limit", b"\xff" * (LIMITS["max_body_bytes"] * 3 // 2), "image/jpeg", 413),
        ]

    def draw(self, rng: random.Random):
        r = rng.random()
        if r < 0.60:
            if rng.random() < 0.5:
                return "good", "/predict?top_k=5", rng.choice(self.images), {"Content-Type": "image/jpeg"}, (200,)
            chosen = [base64.b64encode(rng.choice(self.images)).decode() for _ in range(rng.randint(1, 3))]
            return "good", "/predict", json.dumps({"images": chosen}).encode(), {"Content-Type": "application/json"}, (200,)
        if r < 0.75:
            if rng.random() < 0.5:
                owned = rng.choice(self.subtree_classes)
                names = rng.sample(owned, min(3, len(owned)))
                return ("filtered", "/predict?classes=" + ",".join(names), rng.choice(self.images),
                        {"Content-Type": "image/jpeg"}, (200,))
            body = json.dumps({"images": [base64.b64encode(rng.choice(self.images)).decode()],
                               "groups": [rng.choice(self.groups)]}).encode()
            return "filtered", "/predict", body, {"Content-Type": "application/json"}, (200,)
        name, body, content_type, status = rng.choice(self.bad)
        headers = {"Content-Type": content_type}
        if name == "over the byte limit":
            headers["Connection"] = "close"
        return "bad:" + name, "/predict", body, headers, (status,)


def client(i: int, port: int, prefix: str, mix: Mix, stop_at: float, records: list, lost: list):
    rng = random.Random(i)
    conn = None
    while time.time() < stop_at:
        kind, path, body, headers, expected = mix.draw(rng)
        t0 = time.time()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
            status = response.status
            if headers.get("Connection") == "close" or response.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:  # no HTTP answer: the request is lost
            lost.append((t0, kind, f"{type(e).__name__}: {e}"))
            if conn is not None:
                conn.close()
            conn = None
            continue
        ok = status in expected and (status == 200 or _is_json_error(answer))
        records.append((t0, time.time() - t0, kind, status, ok))
    if conn is not None:
        conn.close()


def _is_json_error(answer: bytes) -> bool:
    try:
        return set(json.loads(answer)) == {"error"}
    except ValueError:
        return False


def serve_processes(app: str, gcs_address: str) -> dict[str, int]:
    """{"trunk#1": pid, "subtree-0#1": pid, ..., "proxy": pid} of the live replicas and the proxy."""
    from ray.util.state import list_actors

    out, seen = {}, Counter()
    actors = list_actors(address=gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    for actor in sorted(actors, key=lambda a: (a.class_name, a.pid)):
        if actor.class_name.startswith(f"ServeReplica:{app}:"):
            name = actor.class_name.split(":")[-1]
            seen[name] += 1
            out[f"{name}#{seen[name]}"] = actor.pid
        elif actor.class_name == "ProxyActor":
            out["proxy"] = actor.pid
    return out


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--run-dir", default=None, help="serve this run's tree/ (default: a random WRN-16-2 tree)")
    ap.add_argument("--trunk-replicas", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=20, help="seconds of load before the first minute")
    ap.add_argument("--bucket-seconds", type=float, default=60, help="length of one reported 'minute'")
    ap.add_argument("--out", default="benchmarks/results/serve_soak.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from pipelines.serve.app import read_tree_manifest, tree_location
    from pipelines.serve.deploy import DeployOptions, deploy, proxy_failover_active, serve_config

    tree = tree_location(args.run_dir) if args.run_dir else make_tree(Path(tempfile.mkdtemp(prefix="serve-soak-")))
    manifest = read_tree_manifest(tree)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, 2), include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=_free_port(), log_to_driver=False, configure_logging=False)
    gcs = ray.get_runtime_context().gcs_address
    port = _free_port()
    opts = DeployOptions(app_name="soak", port=port, route_prefix="/soak", trunk_replicas=args.trunk_replicas,
                         limits=dict(LIMITS))
    url = deploy(serve_config(tree, opts))
    failover = proxy_failover_active(url)
    mix = Mix(manifest, photos())
    buckets = max(1, round(args.minutes * 60 / args.bucket_seconds))
    print(f"soak: {url}, {args.concurrency} clients, {buckets} x {args.bucket_seconds:g} s after "
          f"{args.warmup:g} s warm-up (proxy hook: {failover})", flush=True)

    records: list = []
    lost: list = []
    start = time.time() + args.warmup
    stop_at = start + buckets * args.bucket_seconds
    threads = [threading.Thread(target=client, args=(i, port, "/soak", mix, stop_at, records, lost), daemon=True)
               for i in range(args.concurrency)]
    for t in threads:
        t.start()
    samples, loads = [], []  # per bucket edge: {process: (pid, rss MiB)}, 1-min load average
    for b in range(buckets + 1):  # RSS at the start and at the end of every bucket
        time.sleep(max(0.0, start + b * args.bucket_seconds - time.time()))
        procs = serve_processes("soak", gcs)
        samples.append({name: (pid, rss_mib(pid)) for name, pid in procs.items()})
        loads.append(os.getloadavg()[0])  # other work on the machine moves latency too
        if b:
            print(f"  minute {b}/{buckets}: {sum(1 for r in records if r[0] >= start)} answers, {len(lost)} lost",
                  flush=True)
    for t in threads:
        t.join()
    serve.shutdown()
    ray.shutdown()

    rows = []
    for b in range(buckets):
        lo, hi = start + b * args.bucket_seconds, start + (b + 1) * args.bucket_seconds
        here = [r for r in records if lo <= r[0] < hi]
        timed = [r[1] for r in here if r[2] in ("good", "filtered") and r[3] == 200]
        rows.append({
            "minute": b + 1, "answers": len(here), "requests_per_s": len(here) / args.bucket_seconds,
            "p50_ms": percentile(timed, 0.50), "p99_ms": percentile(timed, 0.99),
            "by_status": dict(sorted(Counter(str(r[3]) for r in here).items())),
            "by_kind": dict(sorted(Counter(r[2].split(":")[0] for r in here).items())),
            "unexpected": sum(1 for r in here if not r[4]),
            "lost": sum(1 for x in lost if lo <= x[0] < hi),
            "rss_mib": {name: rss for name, (pid, rss) in samples[b + 1].items()},
            "pids": {name: pid for name, (pid, rss) in samples[b + 1].items()},
            "loadavg_1m": loads[b + 1],
        })
    measured = [r for r in records if r[0] >= start]
    five_xx = sum(1 for r in measured if r[3] >= 500)
    first, last = rows[0], rows[-1]
    growth = {}
    for name, (pid, rss) in samples[-1].items():
        before = samples[1].get(name)
        if name != "proxy" and before and before[0] == pid and before[1] and rss:
            growth[name] = 100 * (rss / before[1] - 1)
    restarted = sorted(n for n, (pid, _) in samples[-1].items() if n in samples[0] and samples[0][n][0] != pid)
    p99_ratio = (last["p99_ms"] / first["p99_ms"]) if first["p99_ms"] and last["p99_ms"] else None
    summary = {
        "answers": len(measured), "five_xx": five_xx, "lost": sum(1 for x in lost if x[0] >= start),
        "unexpected": sum(1 for r in measured if not r[4]),
        "by_status": dict(sorted(Counter(str(r[3]) for r in measured).items())),
        "bad_inputs": dict(sorted(Counter(r[2][4:] for r in measured if r[2].startswith("bad:")).items())),
        "p99_last_over_first": p99_ratio, "rss_growth_pct_after_first_minute": growth,
        "replicas_restarted": restarted, "lost_examples": [x[2] for x in lost[:5]],
    }
    targets = {
        "zero 5xx": five_xx == 0,
        "zero lost": summary["lost"] == 0,
        "p99 last minute <= 1.5x first": p99_ratio is not None and p99_ratio <= 1.5,
        "replica RSS growth < 5% after the first minute": bool(growth) and max(growth.values()) < 5,
    }
    record = {"url": url, "tree": tree, "subtrees": len(manifest["subtrees"]), "concurrency": args.concurrency,
              "minutes": buckets, "bucket_seconds": args.bucket_seconds, "warmup_s": args.warmup,
              "trunk_replicas": args.trunk_replicas, "limits": LIMITS, "proxy_hook": failover,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_end": os.getloadavg()},
              "minutes_table": rows, "summary": summary, "targets": targets}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))

    names = [n for n in samples[-1] if n != "proxy"] + ["proxy"]
    print()
    print(f"{'min':>3} {'load':>5} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'2xx':>6} {'4xx':>6} {'5xx':>4} {'lost':>4} {'unexp':>5}  "
          + " ".join(f"{n[:12]:>12}" for n in names) + "  (RSS MiB)")
    for r in rows:
        st = r["by_status"]
        count = lambda c: sum(v for k, v in st.items() if k.startswith(c))  # noqa: E731
        print(f"{r['minute']:>3} {r['loadavg_1m']:>5.1f} {r['requests_per_s']:>6.1f} {r['p50_ms'] or 0:>7.1f} {r['p99_ms'] or 0:>7.1f} "
              f"{count('2'):>6} {count('4'):>6} {count('5'):>4} {r['lost']:>4} {r['unexpected']:>5}  "
              + " ".join(f"{(r['rss_mib'].get(n) or 0):>12.0f}" for n in names))
    print(f"p99 last/first: {p99_ratio:.2f}" if p99_ratio else "p99 last/first: n/a")
    print("RSS growth after minute 1: " + ", ".join(f"{n} {g:+.1f}%" for n, g in growth.items()))
    for name, ok in targets.items():
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    print(f"wrote {out}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
