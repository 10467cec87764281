"""What the pipeline costs: a ``splitnet run`` training stage against a plain PyTorch loop.

Both train the same model on the same images (the demo's 20 CIFAR-100 classes, read back from the
shards the pipeline prepared), with the same batch, augmentation (pad 4, random crop, flip),
normalization, channels-last, precision (``--amp``, resolved as the pipeline resolves it) and the
same CPU cores, in one run:

* **plain**: one process, ``--cores`` torch threads, the decoded images in memory, augmented on the
  fly in the loop (numpy), ``splitnet.train.train_one_epoch``;
* **pipeline** variants (``--variants``): the baseline stage of ``splitnet run`` (Ray Data decode
  actors streaming the shards into a Ray Train ``TorchTrainer``), e.g. ``2x1`` (two DDP workers over
  gloo, one thread each) and ``1x2`` (one worker, two threads).

The steady-state rate is the median over epochs 2.. of each epoch's training images/s (what the
epoch line prints: the steps' wall time, without validation); the pipeline's ratio is that rate
over the plain loop's. Where the rest of a stage's wall time goes is in the JSON: start-up (the
trainer and the data stream until the first epoch begins), validation, and the training steps.

    python benchmarks/pipeline_overhead.py                               # wrn-16-2, 3 epochs, 2x1 and 1x2
    python benchmarks/pipeline_overhead.py --arch wrn-16-1 --epochs 4 --variants 1x2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/pipeline_overhead.py   # as on an AVX2-only CPU

Writes ``--out`` (JSON) and prints a table. Target (issue 24): >= 0.85x on 2 cores.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_shards(shards: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Every record of ``split`` in the prepared Parquet shards, decoded once: uint8 [N, S, S, 3], labels."""
    import pyarrow.parquet as pq
    from PIL import Image

    images, labels = [], []
    for path in sorted(Path(shards).glob(f"{split}-*.parquet")):
        table = pq.read_table(path, columns=["image", "label"]).to_pydict()
        for data, label in zip(table["image"], table["label"]):
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(int(label))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def plain_loop(images, labels, args, mean, std, num_classes: int) -> dict:
    """The same training in one process: in-memory images, numpy augmentation, one optimizer."""
    from pipelines.data.records import pad_crop_flip, to_float_tensor
    from splitnet import build_model
    from splitnet.precision import choose_precision
    from splitnet.train import train_one_epoch

    torch.set_num_threads(args.cores)
    torch.manual_seed(0)
    precision = choose_precision(args.amp, "cpu")
    model = build_model(args.arch, num_classes, "1").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    steps = len(images) // args.batch

    def batches():
        order = rng.permutation(len(images))
        for i in range(steps):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x = to_float_tensor(torch.from_numpy(pad_crop_flip(images[idx], rng)), mean, std)
            yield x, torch.from_numpy(labels[idx])

    rates = []
    for epoch in range(args.epochs):
        stats = train_one_epoch(model, batches(), opt, amp_dtype=precision.dtype, channels_last=True)
        rates.append(stats["images_per_s"])
        print(f"  plain epoch {epoch + 1}/{args.epochs}: {stats['images_per_s']:.0f} img/s", flush=True)
    return {"name": "plain", "threads": args.cores, "epoch_images_per_s": rates,
            "images_per_s": statistics.median(rates[1:] or rates), "precision": precision.line()}


class CpuShares:
    """Where the machine's CPU time goes while a stage runs: samples ``/proc`` (Linux) every second
    and splits the CPU seconds by process kind (the training workers, Ray Data's decode/read
    workers, the driver, Ray's own processes, everything else) plus idle."""

    KINDS = (("train workers", ("RayTrainWorker",)), ("data workers", ("MapWorker", "ReadParquet", "ReadWebDataset",
                                                                         "MapBatches", "split")),
             ("driver", ("pipeline_overhead",)), ("ray system", ("ray", "raylet", "gcs_server", "dashboard")))

    def __init__(self):
        import threading

        self.totals: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _snapshot() -> tuple[dict[int, tuple[int, str]], int, int]:
        procs = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = open(f"/proc/{pid}/stat").read()
                cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ") or stat.split("(", 1)[1].split(")")[0]
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            procs[int(pid)] = (int(fields[11]) + int(fields[12]), cmd)
        cpu = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return procs, sum(cpu), cpu[3] + cpu[4]  # all ticks, idle + iowait

    def _kind(self, cmd: str) -> str:
        for kind, marks in self.KINDS:
            if any(m in cmd for m in marks):
                return kind
        return "other"

    def _run(self) -> None:
        before = self._snapshot()
        while not self.stop.wait(1.0):
            after = self._snapshot()
            for pid, (ticks, cmd) in after[0].items():
                delta = ticks - before[0].get(pid, (ticks, ""))[0] if pid in before[0] else ticks
                if delta > 0:
                    kind = self._kind(cmd)
                    self.totals[kind] = self.totals.get(kind, 0) + delta
            self.totals["idle"] = self.totals.get("idle", 0) + after[2] - before[2]
            self.totals["_all"] = self.totals.get("_all", 0) + after[1] - before[1]
            before = after

    def __enter__(self):
        if os.path.isdir("/proc") and os.path.exists("/proc/stat"):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def shares(self) -> dict[str, float]:
        total = self.totals.get("_all", 0)
        return {k: v / total for k, v in sorted(self.totals.items()) if k != "_all"} if total else {}


def pipeline_stage(args, variant: str, run_root: Path, log) -> dict:
    """The baseline stage of ``splitnet run`` with ``variant`` = WORKERSxTHREADS; its epoch rates and timings."""
    from pipelines.config import load_config
    from pipelines.run import run

    workers, threads = (int(v) for v in variant.split("x"))
    run_dir = run_root / f"run-{variant}"
    # the decode actor and Ray Data's read tasks get the CPUs the workers leave (as in the demo)
    overrides = [f"run_dir={run_dir}", f"data.source={args.data}", f"model.arch={args.arch}",
                 f"scaling.num_workers={workers}", f"scaling.torch_threads={threads}",
                 f"scaling.cpus_per_worker={0.5 / workers}", f"scaling.amp={args.amp}",
                 f"baseline.epochs={args.epochs}", f"baseline.batch_size={args.batch}"]
    cfg = load_config(DEMO, overrides + args.override)
    t0 = time.perf_counter()
    with CpuShares() as cpu:
        run(cfg, log=log, stop_after="baseline")
    wall = time.perf_counter() - t0
    state = json.loads((run_dir / "state.json").read_text())
    stage = state["stages"]["baseline"]
    history = stage["result"]["history"]
    rates = [h["images_per_s"] for h in history]
    train_s = sum(h["images"] / h["images_per_s"] for h in history)
    return {"name": f"pipeline {variant}", "workers": workers, "threads": threads, "epoch_images_per_s": rates,
            "images_per_s": statistics.median(rates[1:] or rates), "stage_s": stage["seconds"],
            "train_s": train_s, "prepare_s": state["stages"]["prepare"]["seconds"], "run_s": wall,
            "cpu_shares": cpu.shares(),
            "shards": str(run_dir / "shards")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"))
    ap.add_argument("--arch", default="wrn-16-2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cores", type=int, default=2, help="CPUs of the local Ray and threads of the plain loop")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    ap.add_argument("--variants", default="2x1,1x2", help="pipeline WORKERSxTHREADS, comma-separated")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_overhead.json"))
    args = ap.parse_args(argv)

    import ray

    from pipelines.progress import QuietRun

    from splitnet.datasets import CIFAR100_MEAN, CIFAR100_STD

    run_root = Path(tempfile.mkdtemp(prefix="splitnet-overhead-"))
    logs = QuietRun(run_root / "logs")  # Ray's own output; our lines go to the terminal
    say = lambda line: print(line, file=logs.user_out, flush=True)  # noqa: E731
    rows = []
    try:
        ray.init(num_cpus=args.cores, log_to_driver=False)
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            say(f"pipeline {variant} ...")
            rows.append(pipeline_stage(args, variant, run_root, lambda line: say("  " + line)))
        ray.shutdown()
    finally:
        logs.restore()
    images, labels = load_shards(rows[0]["shards"])
    print(f"plain loop ({len(images)} images in memory, {args.cores} threads) ...", flush=True)
    plain = plain_loop(images, labels, args, CIFAR100_MEAN, CIFAR100_STD, int(labels.max()) + 1)
    for r in rows:
        r["ratio"] = r["images_per_s"] / plain["images_per_s"]
        r["startup_and_validation_s"] = r["stage_s"] - r["train_s"]
    result = {"benchmark": "pipeline_overhead", "arch": args.arch, "batch": args.batch, "epochs": args.epochs,
              "images": int(len(images)), "cores": args.cores, "cpu": cpu_name(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ},
              "precision": plain["precision"], "plain": plain, "pipeline": rows, "target_ratio": 0.85,
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{args.arch}, batch {args.batch}, {len(images)} images, {args.cores} cores, {result['cpu']} "
          f"({result['cpu_capability']}{', ' + ' '.join(f'{k}={v}' for k, v in result['caps'].items()) if result['caps'] else ''}), "
          f"{plain['precision']}")
    print(f"{'route':<16} {'img/s (steady)':>15} {'ratio':>7} {'stage s':>8} {'train s':>8} {'start+val s':>12}")
    print(f"{'plain loop':<16} {plain['images_per_s']:>15.0f} {1.0:>7.2f}")
    for r in rows:
        print(f"{r['name']:<16} {r['images_per_s']:>15.0f} {r['ratio']:>7.2f} {r['stage_s']:>8.0f} {r['train_s']:>8.0f} "
              f"{r['startup_and_validation_s']:>12.0f}")
    for r in rows:
        if r["cpu_shares"]:
            print(f"{r['name']}: the machine's CPU over the run: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in sorted(r["cpu_shares"].items(), key=lambda kv: -kv[1])))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
