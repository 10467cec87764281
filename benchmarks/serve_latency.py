"""Serving latency and throughput over HTTP: the tree fanned out over deployments vs the same
tree in one deployment vs the dense model, one run, same model, same CPU budget.

* fanout: ``trunk`` ingress + one deployment per subtree (what ``splitnet serve`` deploys);
* local:  the same SplitTree in a single deployment (trunk + all subtrees in one replica);
* dense:  the grouped dense model the tree was cut from, in a single deployment;
* pinned: fanout with every subtree replica pinned to a core of its own (``--pin-cores``: subtree
  g on core g, one thread; the trunk on all of them), i.e. test-time model parallelism on one
  machine;
* dense-pinned: the dense model in one replica on the same cores, as many threads.

The pinned pair answers "is the tree faster than the model it replaces?" at concurrency 1, next
to the ideal from the accounting: dense FLOPs / (trunk FLOPs + largest subtree FLOPs), the
speedup if the subtrees ran perfectly in parallel and serving cost nothing. Target (issue 13):
pinned p50 below dense-pinned's, a speedup >= 0.7x the ideal. With n cores for n subtrees the
dense model and the trunk get all n cores, so the pair can reach at most (dense / n) / (trunk / n +
largest subtree), reported too: on 2 cores 0.73x of the FLOP ideal for WRN-16-2 and WRN-16-8.

Every app gets the same budget: ``--cpus`` logical CPUs in all (fanout: half for the trunk, the
rest shared by the subtrees; local / dense: one replica with all of it and as many torch
threads). The apps run one at a time. Closed-loop clients (each sends its next request when the
answer arrives, keep-alive connections) at each concurrency, a warm-up, then ``--seconds`` of
measurement: p50 / p99 latency and requests/s. Targets (issue 5, 2 CPU cores): fanout's p50 at
concurrency 1 at most 5 ms above local's; fanout's throughput at concurrency 32 >= 0.8x local's.

    python benchmarks/serve_latency.py [--run-dir runs/demo] [--concurrency 1,8,32] [--seconds 15]
        [--subtree-gpus 0.5 --device cuda]      # subtrees on GPU replicas, where there is a GPU

Without ``--run-dir`` a WRN-16-2 (split 2-2-2, CIFAR-100 size) with random weights is cut and
served: latency does not depend on what the weights learned.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_tree(arch: str, split: str, classes: int, out: Path) -> tuple[str, str]:
    """A random tree + the dense weights it was cut from: (tree dir, dense weights file)."""
    import torch

    from pipelines.checkpoints import save_state
    from splitnet import build_model, cut
    from splitnet.accounting import model_cost

    torch.manual_seed(0)
    model = build_model(arch, classes, split).eval()
    with torch.no_grad():  # non-uniform assignments, so the cut makes real groups
        for name in model.assignments.names():
            model.assignments.logit(name).normal_(0, 3)
    names = [f"class{c}" for c in range(classes)]
    tree = cut(model, info={"class_names": names, "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 32})
    tree.save(out / "tree", dense_cost=model_cost(model, 32))
    save_state(model, out / "dense.safetensors")
    return str(out / "tree"), str(out / "dense.safetensors")


def payload(size: int) -> bytes:
    from PIL import Image

    cifar = ROOT.parent / "shared" / "data" / "cifar100" / "test.npz"
    if cifar.is_file():
        with np.load(cifar, allow_pickle=False) as d:
            image = Image.fromarray(d["x"][0])
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.resize((size, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def closed_loop(port: int, path: str, body: bytes, concurrency: int, seconds: float, warmup: float,
                content_type: str = "image/jpeg") -> dict:
    """``concurrency`` clients, each on its own keep-alive connection, back to back."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start_at = time.perf_counter() + warmup
    stop_at = start_at + seconds

    def client(i: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            conn.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            t1 = time.perf_counter()
            if response.status != 200:
                errors[i] += 1
            elif t0 >= start_at:
                latencies[i].append(t1 - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted(x for per in latencies for x in per)
    if not flat:
        raise RuntimeError(f"no successful request at concurrency {concurrency} ({sum(errors)} errors)")
    return {"concurrency": concurrency, "requests": len(flat), "errors": sum(errors),
            "p50_ms": 1000 * flat[len(flat) // 2], "p99_ms": 1000 * flat[min(len(flat) - 1, int(0.99 * len(flat)))],
            "mean_ms": 1000 * statistics.fmean(flat), "requests_per_s": len(flat) / seconds}


def parallel_ideal(tree: str, dense_weights: str, cores: int = 1) -> float:
    """dense FLOPs / (trunk FLOPs + largest subtree FLOPs), counted on the tree being served.

    ``cores`` > 1: the same with the dense model and the trunk spread perfectly over that many
    cores and each subtree on one, i.e. what the pinned pair can reach at best:
    (dense / n) / (trunk / n + largest subtree)."""
    from splitnet.accounting import tree_cost
    from splitnet.artifacts import load_tree, read_manifest

    manifest = read_manifest(tree)
    cost = tree_cost(load_tree(tree).eval(), int(manifest["input_size"]))
    dense = manifest["counts"]["dense"]["flops"]
    return (dense / cores) / (cost["trunk"]["flops"] / cores + max(s["flops"] for s in cost["subtrees"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="serve this run's tree/ (dense: its group/model.safetensors)")
    ap.add_argument("--arch", default="wrn-16-2")
    ap.add_argument("--split", default="2-2-2")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=32, help="side of the JPEG sent (the app resizes)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--cpus", type=float, default=2.0, help="logical CPUs per app (the same for all three)")
    ap.add_argument("--subtree-gpus", type=float, default=0.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--apps", default="fanout,local,dense,pinned,dense-pinned")
    ap.add_argument("--images", type=int, default=1, help="images per request (> 1: a JSON body of base64 images)")
    ap.add_argument("--out", default="benchmarks/results/serve_latency.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from pipelines.serve.app import tree_location
    from pipelines.serve.deploy import DeployOptions, deploy, serve_config

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.run_dir:
        tree, dense = tree_location(args.run_dir), str(Path(args.run_dir) / "group" / "model.safetensors")
    else:
        tree, dense = make_tree(args.arch, args.split, args.classes, tmp)
    from splitnet.artifacts import read_manifest

    subtrees = len(read_manifest(tree)["subtrees"])
    num_cpus = os.cpu_count() or 2
    ray.init(num_cpus=max(num_cpus, int(args.cpus) + 1), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    with_gpu = bool(args.subtree_gpus)
    port = 8000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body, content_type = payload(args.image_size), "image/jpeg"
    if args.images > 1:
        import base64

        body = json.dumps({"images": [base64.b64encode(body).decode()] * args.images}).encode()
        content_type = "application/json"
    cores = sorted(os.sched_getaffinity(0))[:subtrees] if hasattr(os, "sched_getaffinity") else []
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {}
    for mode in args.apps.split(","):
        limits = {"max_images": max(64, args.images)}
        if mode in ("fanout", "pinned"):
            opts = DeployOptions(app_name=mode, port=port, route_prefix=f"/{mode}", trunk_cpus=args.cpus / 2,
                                 subtree_cpus=args.cpus / 2 / subtrees, subtree_gpus=args.subtree_gpus,
                                 device=args.device, torch_threads=1, limits=limits,
                                 pin_cores=cores if mode == "pinned" else [])
        elif mode == "dense-pinned":
            opts = DeployOptions(app_name=mode, port=port, route_prefix=f"/{mode}", trunk_cpus=args.cpus, mode="dense",
                                 dense_weights=dense, device=args.device, limits=limits, pin_cores=cores)
        else:
            opts = DeployOptions(app_name=mode, port=port, route_prefix=f"/{mode}", trunk_cpus=args.cpus, mode=mode,
                                 dense_weights=dense if mode == "dense" else None, device=args.device,
                                 torch_threads=max(1, int(args.cpus)), limits=limits)
        deploy(serve_config(tree, opts))
        closed_loop(port, f"/{mode}/predict", body, 1, 2.0, 0.0, content_type)  # first requests load lazily
        results[mode] = [closed_loop(port, f"/{mode}/predict", body, c, args.seconds, args.warmup, content_type)
                         for c in levels]
        serve.delete(mode)
        for r in results[mode]:
            print(f"{mode:7} c={r['concurrency']:<3} p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"{r['requests_per_s']:7.1f} req/s  ({r['requests']} ok, {r['errors']} errors)", flush=True)
    serve.shutdown()
    ray.shutdown()

    def at(mode, c, key):
        return next(r[key] for r in results.get(mode, []) if r["concurrency"] == c)

    summary = {}
    if "pinned" in results and "dense-pinned" in results and 1 in levels:
        ideal, reachable = parallel_ideal(tree, dense), parallel_ideal(tree, dense, max(1, len(cores)))
        speedup = at("dense-pinned", 1, "p50_ms") / at("pinned", 1, "p50_ms")
        summary.update(pinned_speedup_c1=speedup, pinned_ideal_speedup=ideal, pinned_share_of_ideal=speedup / ideal,
                       pinned_ideal_on_these_cores=reachable, pinned_share_of_ideal_on_these_cores=speedup / reachable)
    if "fanout" in results and "local" in results:
        if 1 in levels:
            summary["fanout_p50_overhead_ms_c1"] = at("fanout", 1, "p50_ms") - at("local", 1, "p50_ms")
        if 32 in levels:
            summary["fanout_throughput_ratio_c32"] = at("fanout", 32, "requests_per_s") / at("local", 32, "requests_per_s")
    record = {"tree": tree, "subtrees": subtrees, "cpus_per_app": args.cpus, "subtree_gpus": args.subtree_gpus,
              "with_gpu": with_gpu, "machine": {"cpus": num_cpus, "platform": platform.platform()},
              "payload_bytes": len(body), "results": results, "summary": summary,
              "cores_pinned": cores, "images_per_request": args.images, "arch": args.arch if not args.run_dir else None,
              "targets": {"fanout_p50_overhead_ms_c1": "<= 5", "fanout_throughput_ratio_c32": ">= 0.8",
                          "pinned_speedup_c1": "> 1", "pinned_share_of_ideal": ">= 0.7"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print()
    print(f"{'app':8}" + "".join(f"{'c=' + str(c) + ' p50/p99 ms':>22}{'req/s':>8}" for c in levels))
    for mode, rows in results.items():
        print(f"{mode:8}" + "".join(f"{r['p50_ms']:>12.1f}/{r['p99_ms']:<9.1f}{r['requests_per_s']:>8.1f}" for r in rows))
    for key, value in summary.items():
        target = record["targets"].get(key)
        print(f"{key}: {value:.2f}" + (f" (target {target})" if target else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
