#!/usr/bin/env bash
# GPU check, one script, run from the repo root on the GPU machine after the Ray bundle is unpacked:
#
#   bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
#
# (a) benchmarks/train_step.py on cuda, fp32 and --amp bf16: wrn-16-8 (CIFAR, 32px, batch 128,
#     split 2-2-2) and resnet50 with 21841 classes (224px, batch 64, layer4 + fc in 4 groups: 4-4);
#     dense vs grouping vs split, few steps each (wrn bf16 also with the forward compiled: scaling.compile);
# (b) benchmarks/split_forward.py on cuda, if it has a --device option (skipped otherwise);
# (c) a Ray smoke test: ray.init(num_gpus=1); TorchTrainer (1 GPU worker, NCCL) training a splitnet
#     model 20 steps on random tensors under bf16 autocast and reporting a checkpoint; a Ray Serve
#     deployment, 2 replicas x num_gpus 0.5, serving SplitTree subtree forwards.
# Each part runs under its own `timeout` and a failure does not stop the others; the whole script
# keeps to GPU_CHECK_BUDGET seconds (default 330). Everything goes to $OUT (at most 8 files):
# gpu_check.log, env.txt, train_step-*.json (4), ray_smoke.json.
# GPU_CHECK_DEVICE=cpu runs the same pieces on CPU (gloo, no GPUs, small models) for a local try;
# GPU_CHECK_PARTS="train_step split_forward ray" (default: all) picks parts, e.g. for a rerun.
set -u
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BUDGET="${GPU_CHECK_BUDGET:-330}"
PARTS=" ${GPU_CHECK_PARTS:-train_step split_forward ray} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# Ray not importable yet: unpack the carried bundle now (same as running .gpu/install.sh first).
if ! "$PY" -c "import ray" >/dev/null 2>&1 && [[ -f .gpu/install.sh ]]; then
  eval "$(bash .gpu/install.sh)" || echo "gpu_check: .gpu/install.sh failed; Ray parts will fail" >&2
fi
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" ;; esac
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
declare -a SUMMARY=()

remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# part NAME LIMIT RESERVE CMD...: run CMD under timeout min(LIMIT, remaining - RESERVE) seconds,
# RESERVE being what later parts still need; record the outcome, never abort the script.
part() {
  local name="$1" limit="$2" reserve="$3"; shift 3
  local left=$(( $(remaining) - reserve ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    echo "=== [$name] SKIPPED: budget spent ($(remaining)s left, $reserve s reserved)"
    SUMMARY+=("$name: skipped (budget)"); return 0
  fi
  echo "=== [$name] start (timeout ${limit}s, $(remaining)s left of ${BUDGET}s)"
  local t=$(date +%s) rc=0
  timeout -k 10 "$limit" "$@" || rc=$?
  local dt=$(( $(date +%s) - t )) status="ok"
  (( rc == 124 || rc == 137 )) && status="TIMEOUT" || { (( rc != 0 )) && status="FAILED rc=$rc"; }
  echo "=== [$name] $status in ${dt}s"
  SUMMARY+=("$name: $status (${dt}s)")
}

# -- environment ------------------------------------------------------------------------------
{
  date; uname -a; nproc; free -g 2>/dev/null | head -2
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  "$PY" - <<'EOF' 2>&1
import sys, importlib
print("python", sys.version.split()[0], sys.executable)
for m in ("torch", "ray", "pydantic", "fastapi", "starlette", "uvicorn", "grpc", "google.protobuf", "pyarrow", "pandas", "aiohttp"):
    try:
        mod = importlib.import_module(m); print(f"{m:16} {getattr(mod, '__version__', '?'):12} {mod.__file__}")
    except Exception as e:
        print(f"{m:16} MISSING: {type(e).__name__}: {e}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- (a) train_step ---------------------------------------------------------------------------
if [[ "$DEVICE" == cuda ]]; then
  WRN=(--arch wrn-16-8 --classes 100 --split 2-2-2 --size 32 --batch 128 --steps 20 --rounds 4 --warmup 3)
  R50=(--arch resnet50 --classes 21841 --split 4-4 --size 224 --batch 64 --steps 12 --rounds 3 --warmup 3)
else
  WRN=(--arch wrn-16-2 --classes 100 --split 2-2-2 --size 32 --batch 16 --steps 2 --rounds 2 --warmup 1)
  R50=(--arch resnet50 --classes 1000 --split 4-4 --size 64 --batch 2 --steps 1 --rounds 1 --warmup 1)
fi
TS=("$PY" benchmarks/train_step.py --device "$DEVICE" --out-dir "$OUT")
if want train_step; then
  part "train_step wrn fp32"       70 210 "${TS[@]}" "${WRN[@]}" --tag wrn-fp32
  part "train_step wrn bf16"      110 180 "${TS[@]}" "${WRN[@]}" --amp bf16 --compile --tag wrn-bf16  # + each step compiled
  part "train_step resnet50 bf16"  80 150 "${TS[@]}" "${R50[@]}" --amp bf16 --channels-last --tag resnet50-bf16-cl
  part "train_step resnet50 fp32"  80 130 "${TS[@]}" "${R50[@]}" --channels-last --tag resnet50-fp32-cl
fi

# -- (b) split_forward ------------------------------------------------------------------------
if ! want split_forward; then
  :
elif grep -q -- '"--device"' benchmarks/split_forward.py; then
  part "split_forward" 60 120 "$PY" benchmarks/split_forward.py --device "$DEVICE" --rounds 5 --out "$OUT/split_forward.json"
else
  echo "=== [split_forward] SKIPPED: benchmarks/split_forward.py has no --device option (CPU only)"
  SUMMARY+=("split_forward: skipped (no --device option)")
fi

# -- (c) Ray: TorchTrainer (NCCL, bf16) + Serve (2 replicas x 0.5 GPU) ------------------------
RAY_SMOKE="$(mktemp -d)/ray_smoke.py"
cat > "$RAY_SMOKE" <<'EOF'
"""Ray smoke test: TorchTrainer on one GPU worker (NCCL) + a Serve deployment of SplitTree subtrees."""
import json, os, sys, tempfile, time, traceback

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
OUT = os.environ["OUT"]
CUDA = DEVICE == "cuda"
ARCH, SPLIT, BATCH = ("wrn-16-8", "2-2-2", 128) if CUDA else ("wrn-16-2", "2-2-2", 8)
result = {"device": DEVICE, "arch": ARCH, "split": SPLIT}
t0 = time.time()


def save():
    result["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(OUT, "ray_smoke.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)


def train_loop(config):
    import torch
    import torch.nn.functional as F
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model
    from splitnet import build_model
    from splitnet.regularizers import RegularizerWeights, parameter_groups, regularization_loss

    device = get_device()
    dist = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    model = build_model(config["arch"], 100, config["split"])
    ddp = prepare_model(model)  # moves to the worker's GPU (DDP when more than one worker)
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 5e-4), lr=0.05, momentum=0.9)
    weights = RegularizerWeights()
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    t = time.time()
    for step in range(config["steps"]):
        x = torch.randn(config["batch"], 3, 32, 32, device=device)
        y = torch.randint(0, 100, (config["batch"],), device=device)
        with amp:
            ce = F.cross_entropy(ddp(x), y)
        reg, terms = regularization_loss(model, weights)
        loss = ce.float() + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss_value = loss.item()
    elapsed = time.time() - t
    with tempfile.TemporaryDirectory() as d:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(d, "model.pt"))
        ray.train.report({"loss": loss_value, **terms, "steps": config["steps"], "device": str(device),
                          "backend": dist, "train_seconds": elapsed,
                          "gpu_name": torch.cuda.get_device_name() if device.type == "cuda" else None},
                         checkpoint=Checkpoint.from_directory(d))


def run_train():
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    trainer = TorchTrainer(
        train_loop, train_loop_config={"arch": ARCH, "split": SPLIT, "batch": BATCH, "steps": 20},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=CUDA),
        torch_config=TorchConfig(backend="nccl" if CUDA else "gloo"),
        run_config=RunConfig(name="gpu_check", storage_path=tempfile.mkdtemp(prefix="ray_results_")))
    t = time.time()
    res = trainer.fit()
    ckpt_files = sorted(os.listdir(res.checkpoint.path)) if res.checkpoint else []
    result["train"] = {"ok": res.checkpoint is not None and "model.pt" in ckpt_files, "metrics": res.metrics,
                       "checkpoint": res.checkpoint.path if res.checkpoint else None, "checkpoint_files": ckpt_files,
                       "fit_seconds": round(time.time() - t, 1)}
    print("TRAIN", json.dumps(result["train"], default=str))


def run_serve():
    import torch
    import ray
    from ray import serve
    from splitnet import build_model, cut

    torch.manual_seed(0)
    tree = cut(build_model(ARCH, 100, SPLIT)).eval()
    if CUDA:  # the Train worker's GPU must be back before two 0.5-GPU replicas can be placed
        deadline = time.time() + 60
        while ray.available_resources().get("GPU", 0) < 1 and time.time() < deadline:
            time.sleep(1)
        result["gpu_free_before_serve"] = ray.available_resources().get("GPU", 0)

    @serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 0.5} if CUDA else {"num_cpus": 0.5})
    class SubtreeForward:
        def __init__(self, tree):
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.tree = tree.to(self.device).eval()
            self.replica = ray.get_runtime_context().get_actor_id()

        def __call__(self, g: int, features: torch.Tensor):
            with torch.inference_mode():
                logits = self.tree.forward_subtree(g, features.to(self.device)).float().cpu()
            return {"logits": logits, "replica": self.replica, "device": str(self.device),
                    "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    t = time.time()
    handle = serve.run(SubtreeForward.bind(tree), name="subtrees", route_prefix=None)
    deploy_s = time.time() - t
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.inference_mode():
        features = tree.trunk(x)
        expected = tree(x)
    t = time.time()
    rounds = 4
    replicas, devices = set(), set()
    for _ in range(rounds):
        outs = [handle.remote(g, features) for g in range(tree.num_subtrees)]
        outs = [o.result(timeout_s=120) for o in outs]
        replicas |= {o["replica"] for o in outs}
        devices |= {f'{o["device"]} CUDA_VISIBLE_DEVICES={o["cuda_visible"]}' for o in outs}
    serve_s = time.time() - t
    got = tree.combine([o["logits"] for o in outs])
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    result["serve"] = {"ok": diff <= 2e-2 * max(scale, 1.0), "max_abs_diff_vs_cpu_tree": diff, "logit_scale": scale,
                       "replicas_seen": len(replicas), "devices": sorted(devices), "deploy_seconds": round(deploy_s, 1),
                       "requests": rounds * tree.num_subtrees, "request_seconds": round(serve_s, 2)}
    print("SERVE", json.dumps(result["serve"]))
    serve.shutdown()


def main():
    import ray
    import torch
    result["versions"] = {"ray": ray.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    ray.init(num_gpus=1 if CUDA else 0, num_cpus=min(8, os.cpu_count() or 2) if CUDA else 2,
             include_dashboard=False, object_store_memory=2 * 1024**3 if CUDA else 300 * 1024**2)
    result["cluster_resources"] = ray.cluster_resources()
    result["init_seconds"] = round(time.time() - t0, 1)
    print("RAY", ray.__version__, result["cluster_resources"])
    save()
    ok = True
    for name, fn in (("train", run_train), ("serve", run_serve)):
        try:
            fn()
        except Exception as e:  # keep going: the other half still tells something
            ok = False
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            print(f"{name.upper()} FAILED", result[name]["error"], file=sys.stderr)
            traceback.print_exc()
        save()
    ok = ok and all(result.get(k, {}).get("ok") for k in ("train", "serve"))
    result["ok"] = ok
    save()
    ray.shutdown()
    print("RAY SMOKE", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
EOF
export GPU_CHECK_DEVICE="$DEVICE" OUT
want ray && part "ray smoke (train + serve)" 170 0 "$PY" "$RAY_SMOKE"
# A driver killed by its timeout leaves raylet/gcs behind. `ray stop --force` ends EVERY Ray process
# on the machine, so only then, and only on the dedicated GPU machine (a GPU is visible), never on a
# shared CPU box.
if [[ "$DEVICE" == cuda && "${SUMMARY[*]: -1}" == *"ray smoke"*TIMEOUT* ]] && nvidia-smi -L >/dev/null 2>&1; then
  timeout 20 "$PY" -c "import sys; sys.argv=['ray','stop','--force']; from ray.scripts.scripts import main; main()" >/dev/null 2>&1 || true
fi

echo "=== summary ($(( $(date +%s) - T0 ))s total; $DEVICE)"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
for f in "$OUT"/train_step-*.json; do
  [[ -f "$f" ]] && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"  {r['arch']:9} {r['amp']:5} {r['memory_format']:14} \" + '  '.join(f\"{x['variant']} {x['images_per_s']:.0f} img/s\" for x in r['rows']) + f\"  grouping/dense {r['grouping_over_dense']:.3f}\" + (f\"  split/dense {r['split_over_dense']:.3f}\" if r['split_over_dense'] else ''))" "$f"
done
ls -la "$OUT"
sleep 1  # let tee flush the log
