"""The cut tree on Ray Serve: an ingress deployment that runs the trunk, and one deployment per
subtree (``subtree-0``, ``subtree-1``, ...), each on its own replicas and loading only its own
weights.

    client --HTTP--> trunk (ingress: parse, decode, trunk forward, batched)
                       |--handle--> subtree-0 (batched) --\\
                       |--handle--> subtree-1 (batched) ---+--> logits of its classes
                       '--handle--> subtree-G-1        ---/
                     <- one softmax over the classes asked about, in the original class order

``build(args)`` is the application builder that ``serve deploy`` and ``splitnet serve`` both
use (``import_path: pipelines.serve.app:build``). ``args``: ``tree`` (a run dir or tree dir,
local path or ``s3://``-style URI; required), ``mode`` (``fanout``, the default; ``local``: the
whole tree in the ingress; ``dense``: a dense model from ``dense_weights`` — the last two are the
benchmark's baselines), ``device`` (``auto``/``cpu``/``cuda``), ``amp`` (``auto``, the default:
bf16 autocast where the replica's device computes bf16 natively, fp32 elsewhere; ``bf16``; ``none``;
each replica resolves it on its own device, ``splitnet.precision``), ``torch_threads``, ``cpu_cores`` (pin: subtree g on core ``cpu_cores[g mod n]`` with one
thread, the ingress on all of them). Per-request limits, batching and retries are ``user_config`` of the
deployments: changing them re-configures running replicas without restarting them.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request), and
# @serve.ingress keeps only the globals the code names, so string annotations would not resolve.
import asyncio
import logging
import os
import posixpath
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pipelines.checkpoints import load_state_file
from pipelines.data.records import to_float_tensor
from pipelines.serve.deploy import MAX_ONGOING_REQUESTS, SUBTREE_USER_CONFIG, TRUNK_USER_CONFIG, DeployOptions
from pipelines.serve.inputs import Limits, RequestError, decode_images, parse_predict, resolve_classes
from splitnet.artifacts import load_subtree, load_tree, load_trunk, read_manifest, subtree_inputs
from splitnet.models import build_model
from splitnet.precision import choose_precision
from splitnet.tree import class_order

log = logging.getLogger("ray.serve")
MODES = ("fanout", "local", "dense")
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


# -- where the tree lives ------------------------------------------------------------------------
def tree_location(location: str) -> str:
    """A run dir (holding ``tree/``) or a tree dir -> the tree dir, local path or URI."""
    if "://" in location:
        fs, root = pafs.FileSystem.from_uri(location)
        if fs.get_file_info(posixpath.join(root, "manifest.yaml")).type == pafs.FileType.File:
            return location
        if fs.get_file_info(posixpath.join(root, "tree", "manifest.yaml")).type == pafs.FileType.File:
            return location.rstrip("/") + "/tree"
    else:
        path = Path(location).expanduser().resolve()
        if (path / "manifest.yaml").is_file():
            return str(path)
        if (path / "tree" / "manifest.yaml").is_file():
            return str(path / "tree")
    raise FileNotFoundError(f"{location}: neither a tree directory (manifest.yaml) nor a run directory with tree/ "
                            "(has `splitnet run` finished its finetune stage?)")


def fetch_tree(location: str, files: list[str]) -> str:
    """A local directory holding ``manifest.yaml`` and ``files`` of the tree at ``location``: the
    directory itself when local, else a private copy of just those files (a subtree replica of
    ImageNet-22K's tree downloads its own weights, not the others')."""
    if "://" not in location:
        return location

    fs, root = pafs.FileSystem.from_uri(location)
    local = tempfile.mkdtemp(prefix="splitnet-tree-")
    for name in ["manifest.yaml", *files]:
        pafs.copy_files(posixpath.join(root, name), os.path.join(local, name), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return local


def read_tree_manifest(tree: str) -> dict:
    """A tree's manifest, from a local directory or a URI (only ``manifest.yaml`` is read)."""
    if "://" not in tree:
        return read_manifest(tree)

    fs, root = pafs.FileSystem.from_uri(tree)
    with fs.open_input_stream(posixpath.join(root, "manifest.yaml")) as f:
        return yaml.safe_load(f.read())


class _NotAssigned(Exception):
    """No replica took a handle call in time."""


async def _call_assigned(method, args: tuple, assign_timeout_s: float):
    """``await method.remote(*args)``, but give up after ``assign_timeout_s`` if no replica has
    taken the call: Serve's router otherwise holds a call while a deployment has no live replica
    (all of them restarting), and the HTTP client would wait the whole restart."""
    response = method.remote(*args)
    assigned = getattr(response, "_fetch_future_result_async", None)  # DeploymentResponse, Ray 2.60
    if assigned is not None:
        try:
            await asyncio.wait_for(asyncio.shield(assigned()), assign_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise _NotAssigned() from None
    return await response


def pick_device(device: str) -> torch.device:
    """``auto`` -> the GPU Ray gave this replica, else CPU."""
    if device == "auto":
        import ray

        return torch.device("cuda") if torch.cuda.is_available() and ray.get_gpu_ids() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but this replica sees no GPU "
                           "(give the deployment ray_actor_options.num_gpus on a node with GPUs)")
    return torch.device(device)


def _precision(device: torch.device, amp: str | None):
    """``amp`` resolved on this replica's device; a bf16 it only emulates is logged once."""
    precision = choose_precision(amp or "none", device)
    if precision.warning():
        log.warning("%s", precision.warning())
    return precision


def _autocast(device: torch.device, precision):
    if precision.dtype is not None:
        return torch.autocast(device.type, dtype=precision.dtype)
    return torch.autocast("cpu", enabled=False)


def _images_in(items: list) -> int:
    return sum(len(x) for x in items)


def _closes_after_answer(request: Request) -> bool:
    """Whether the HTTP server closes this connection once it has answered (the client asked
    for ``Connection: close``, or spoke HTTP/1.0 without keep-alive)."""
    connection = request.headers.get("connection", "").lower()
    if request.scope.get("http_version") == "1.0":
        return "keep-alive" not in connection
    return "close" in connection


# -- a subtree -----------------------------------------------------------------------------------
def check_cores(cpu_cores: list[int] | None, index: int | None = None) -> list[int] | None:
    """The cores a replica pins its compute to: all of ``cpu_cores`` (the ingress), or core
    ``cpu_cores[index mod n]`` (subtree ``index``). ``None``: not pinned. A core this process may
    not run on (outside its affinity mask) is refused, naming the ones it may use."""
    if not cpu_cores:
        return None
    cores = [int(c) for c in cpu_cores]
    if index is not None:
        cores = [cores[index % len(cores)]]
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if allowed is None:
        raise ValueError("cpu_cores: pinning needs Linux (os.sched_setaffinity)")
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise ValueError(f"cpu_cores: core {missing[0]} is not available to this replica (cores {allowed})")
    return cores


def pin_thread(cores: list[int] | None) -> list[int]:
    """Pin the calling (compute) thread to ``cores``; the cores it may run on afterwards. Torch's
    intra-op threads, started from a pinned thread, inherit the mask."""
    if cores:
        os.sched_setaffinity(0, cores)
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@serve.deployment(name="subtree", max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  ray_actor_options={"num_cpus": DeployOptions.subtree_cpus})
class Subtree:
    """Subtree ``index``: trunk features [B, C, H, W] -> logits [B, n_g] of its classes.

    Requests are batched (``@serve.batch``, counted in images). Each replica reads the manifest and
    ``subtree-<index>.safetensors`` only."""

    def __init__(self, tree: str, index: int, device: str = DeployOptions.device, amp: str | None = DeployOptions.amp,
                 torch_threads: int = DeployOptions.torch_threads, cpu_cores: list[int] | None = None):
        from ray.serve.metrics import Counter, Histogram

        # pinned: subtree g computes on core cpu_cores[g mod n] alone, one thread (model parallelism
        # on one machine: the subtrees of a request run at the same time on different cores)
        self.cores = check_cores(cpu_cores, index)
        torch.set_num_threads(len(self.cores) if self.cores else max(1, int(torch_threads)))
        self.ran_on: list[int] = []  # the cores the last forward was allowed on
        self.name = f"subtree-{index}"
        self.device = pick_device(device)
        self.precision = _precision(self.device, amp)
        self.served = 0  # requests answered by this replica
        local = fetch_tree(tree, [f"subtree-{index}.safetensors"])
        self.module, self.entry = load_subtree(local, index, self.device)
        self.received_channels: int | None = None  # channels of the last features the ingress sent
        self.requests = Counter("splitnet_subtree_requests", description="requests answered by a subtree",
                                tag_keys=("subtree",))
        self.images = Counter("splitnet_subtree_images", description="images scored by a subtree", tag_keys=("subtree",))
        self.latency = Histogram("splitnet_subtree_latency_ms", description="subtree batch compute time (ms)",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("subtree",))
        for metric in (self.requests, self.images, self.latency):
            metric.set_default_tags({"subtree": self.name})

    def reconfigure(self, config: dict) -> None:
        """user_config: ``max_batch_images``, ``batch_wait_timeout_s`` (no restart needed)."""
        config = {**SUBTREE_USER_CONFIG, **(config or {})}
        self.logits.set_max_batch_size(int(config["max_batch_images"]))
        self.logits.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=SUBTREE_USER_CONFIG["max_batch_images"],
                 batch_wait_timeout_s=SUBTREE_USER_CONFIG["batch_wait_timeout_s"], batch_size_fn=_images_in)
    async def logits(self, features: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(f) for f in features]
        start = time.perf_counter()
        out = await asyncio.to_thread(self._forward, np.concatenate(features))
        self.latency.observe(1000 * (time.perf_counter() - start))
        self.served += len(sizes)
        self.requests.inc(len(sizes))
        self.images.inc(sum(sizes))
        return np.split(out, np.cumsum(sizes)[:-1])

    @torch.inference_mode()
    def _forward(self, features: np.ndarray) -> np.ndarray:
        """Its channels of the trunk's features (the ingress selects them) -> logits."""
        self.ran_on = pin_thread(self.cores)
        expected = self.module.input_channels
        if expected is not None and features.shape[1] != expected:
            raise ValueError(f"{self.name} reads {expected} trunk channels, got features with {features.shape[1]}")
        self.received_channels = int(features.shape[1])
        x = torch.from_numpy(features).to(self.device, non_blocking=True)
        with _autocast(self.device, self.precision):
            return self.module(x, inputs_selected=True).float().cpu().numpy()

    def info(self) -> dict:
        """Who answers: for health probes and for tests that check which replica survived what."""
        return {"subtree": self.name, "pid": os.getpid(), "device": str(self.device), "precision": self.precision.name,
                "classes": len(self.entry["classes"]), "requests_served": self.served, "cores": self.ran_on,
                "received_channels": self.received_channels}


# -- the ingress ---------------------------------------------------------------------------------
api = FastAPI(title="SplitNet tree", description="POST /predict, GET /metadata, GET /healthz")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):  # 404 / 405 as {"error"}
    return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": str(exc)}, status_code=400)


class SubtreeUnavailable(Exception):
    """No replica of a subtree answers (it is restarting): 503 with the reason."""


class _Model:
    """What the ingress runs on a batch of images, in one of three modes. ``forward(x)`` runs in a
    worker thread on the batch; ``finish(out, subtrees)`` runs per request and returns (class ids
    scored, logits [n, k])."""

    def __init__(self, mode: str, local_tree: str, manifest: dict, device: torch.device, amp, dense_weights=None,
                 cores: list[int] | None = None):
        self.mode, self.device, self.cores = mode, device, cores
        self.precision = _precision(device, amp)
        if mode == "fanout":
            self.net, _ = load_trunk(local_tree, device, manifest)
        elif mode == "local":
            self.net = load_tree(local_tree, device, manifest)
        else:
            if not dense_weights:
                raise ValueError("mode 'dense' needs dense_weights (a model.safetensors of the dense model)")
            net = build_model(manifest["arch"], int(manifest["num_classes"]), manifest["split"])
            net.load_state_dict(load_state_file(dense_weights))
            self.net = net.to(device).eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        pin_thread(self.cores)
        with _autocast(self.device, self.precision):
            return self.net(x.to(self.device, non_blocking=True)).float().cpu().numpy()


class _Tables:
    """What the ingress answers from, all read from one manifest: class names and groups, each
    subtree's classes and trunk channels, the handles to call. Replaced whole, never edited, when the
    tree grows (a request reads one snapshot from start to end)."""

    def __init__(self, manifest: dict, handles: list, fanout: bool):
        self.manifest, self.handles = manifest, handles
        self.class_names = list(manifest["class_names"])
        self.class_to_group = list(manifest["class_to_group"])
        self.subtree_classes = [np.asarray(s["classes"], dtype=np.int64) for s in manifest["subtrees"]]
        self.class_to_subtree = np.empty(len(self.class_names), dtype=np.int64)
        for g, classes in enumerate(self.subtree_classes):
            self.class_to_subtree[classes] = g
        # each subtree is sent only the trunk channels it reads (half of them at a 2-way split):
        # half the bytes serialized and moved per call (benchmarks/serve_latency.py)
        self.subtree_inputs = ([None if ix is None else np.asarray(ix, dtype=np.int64) for ix in subtree_inputs(manifest)]
                               if fanout else [])
        self._orders: dict[tuple, tuple] = {}

    def class_order(self, needed: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The classes the ``needed`` subtrees cover, ascending, and their positions in the subtrees'
        concatenated logits (:func:`splitnet.tree.class_order`), kept per set of subtrees."""
        if needed not in self._orders:
            classes, position = class_order([self.subtree_classes[g] for g in needed])
            self._orders[needed] = classes.numpy(), position.numpy()
        return self._orders[needed]


class TreeRegistry:
    """Which tree an app serves now, for its ingress replicas (one detached named actor per app,
    ``splitnet-tree-<app>``): ``splitnet serve-grow`` publishes a grown tree and the Serve apps of its
    new subtrees; every ingress replica waits on :meth:`wait`, switches, and acks. A replica that
    starts later (a restart) reads :meth:`current` first, so it serves the grown tree too."""

    def __init__(self):
        self.gen, self.state, self.acks = 0, None, {}
        self._changed = asyncio.Condition()

    def current(self) -> tuple[int, dict | None]:
        return self.gen, self.state

    async def publish(self, state: dict) -> int:
        async with self._changed:
            self.gen += 1
            self.state = state
            self._changed.notify_all()
        return self.gen

    async def wait(self, gen: int, timeout_s: float = 30.0) -> tuple[int, dict | None]:
        """The state once it is newer than ``gen`` (or as it is after ``timeout_s``)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.gen > gen), timeout_s)
            except asyncio.TimeoutError:
                pass
            return self.gen, self.state

    def ack(self, replica: str, gen: int) -> None:
        self.acks[replica] = gen

    def acked(self, gen: int) -> list[str]:
        return sorted(r for r, g in self.acks.items() if g >= gen)


def registry_name(app: str) -> str:
    return f"splitnet-tree-{app}"


def tree_registry(app: str):
    """The app's :class:`TreeRegistry` (created on first use; detached: it outlives any replica)."""
    import ray

    return ray.remote(num_cpus=0)(TreeRegistry).options(name=registry_name(app), namespace="splitnet",
                                                         lifetime="detached", get_if_exists=True).remote()


# NOTE: @serve.ingress snapshots the module's globals when the class is defined: every module-level
# name the class uses must be defined above this line.
@serve.deployment(name="trunk", max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": DeployOptions.trunk_cpus})
@serve.ingress(api)
class TreeIngress:
    """HTTP in front of the tree: ``POST /predict``, ``GET /metadata``, ``GET /healthz``."""

    def __init__(self, tree: str, subtrees: list[DeploymentHandle] | None = None, mode: str = "fanout",
                 device: str = DeployOptions.device, amp: str | None = DeployOptions.amp,
                 torch_threads: int = DeployOptions.torch_threads, dense_weights: str | None = None,
                 cpu_cores: list[int] | None = None):
        from ray.serve.metrics import Counter, Histogram

        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        cores = check_cores(cpu_cores)  # pinned: the trunk (or the whole model) on all of them
        torch.set_num_threads(len(cores) if cores else max(1, int(torch_threads)))
        self.mode = mode
        self.device = pick_device(device)
        manifest = read_tree_manifest(tree)
        files = [manifest["trunk"]["file"]]
        if mode == "local":
            files += [entry["file"] for entry in manifest["subtrees"]]
        local = fetch_tree(tree, files)
        m = manifest  # read once: a 21,841-class manifest takes a while to parse
        info = m.get("info") or {}
        self.size = int(m["input_size"])
        self.mean, self.std = info.get("mean", (0.5, 0.5, 0.5)), info.get("std", (0.25, 0.25, 0.25))
        self.model = _Model(mode, local, m, self.device, amp, dense_weights, cores)
        # _by_reference=False: trunk -> subtree calls go replica to replica over gRPC instead of
        # through Ray's actor-task path and object store (the features of one image are ~128 KB,
        # over Ray's inline limit). Measured on 2 CPUs: p50 at concurrency 1 25.2 -> 19.6 ms,
        # throughput at concurrency 32 48.9 -> 85.1 req/s (benchmarks/serve_latency.py).
        handles = [h.options(_by_reference=False) for h in subtrees or []]
        if mode == "fanout" and len(handles) != len(m["subtrees"]):
            raise ValueError(f"the tree has {len(m['subtrees'])} subtrees, the app passed {len(handles)} handles")
        self.t = _Tables(m, handles, mode == "fanout")
        self.down: dict[int, str] = {}          # subtree -> why it is unavailable
        self._probes: dict[int, asyncio.Task] = {}
        self.requests = Counter("splitnet_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("splitnet_request_latency_ms", description="/predict latency in the ingress (ms)",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))
        self.reconfigure({})
        if mode == "fanout":  # follow the tree's growth (splitnet serve-grow) without a restart
            self._base = tree
            threading.Thread(target=self._follow, name="tree-growth", daemon=True).start()

    def _follow(self) -> None:
        """Wait on the app's TreeRegistry; on a grown tree of this base, switch to it and ack."""
        import ray

        context = serve.get_replica_context()
        me = context.replica_id.unique_id
        registry, gen = None, -1
        while True:
            try:
                registry = registry or tree_registry(context.app_name)
                new_gen, state = ray.get(registry.current.remote() if gen < 0 else registry.wait.remote(gen))
            except Exception:  # noqa: BLE001 - no registry reachable: serve what we have, try again
                registry = None
                time.sleep(1.0)
                continue
            if new_gen != gen:
                if state and state.get("base") == self._base:
                    try:
                        self._grow_to(state)
                    except Exception as e:  # noqa: BLE001 - a bad publish must not take the replica down
                        log.error("could not switch to the grown tree %s: %s", state.get("tree"), e)
                gen = new_gen
                registry.ack.remote(me, gen)

    def _grow_to(self, state: dict) -> None:
        """Serve ``state["tree"]`` (a tree grown from the one served: the same trunk), calling each
        subtree the tree had before through its handle and each new one in its own Serve app."""
        manifest = read_tree_manifest(state["tree"])
        current = self.t
        if manifest["trunk"]["sha256"] != current.manifest["trunk"]["sha256"]:
            raise ValueError("its trunk is not the served trunk")
        if len(manifest["subtrees"]) <= len(current.handles):
            return
        handles = list(current.handles)
        for g in range(len(handles), len(manifest["subtrees"])):
            app = state["apps"][str(g)]
            handles.append(serve.get_deployment_handle(f"subtree-{g}", app_name=app).options(_by_reference=False))
        self.t = _Tables(manifest, handles, fanout=True)
        log.warning("serving the grown tree %s: %d classes, %d subtrees", state["tree"], len(self.t.class_names),
                    len(handles))

    def reconfigure(self, config: dict) -> None:
        """user_config: ``limits`` (see :class:`Limits`), ``max_batch_images``,
        ``batch_wait_timeout_s``, ``retries`` (subtree calls whose replica died) and
        ``assign_timeout_s`` (how long a subtree call may wait for a replica to take it before the
        subtree counts as unavailable). Applied to running replicas, no restart."""
        config = {**TRUNK_USER_CONFIG, **(config or {})}
        self.limits = Limits(**(config.get("limits") or {}))
        self.retries = int(config["retries"])
        self.assign_timeout_s = float(config["assign_timeout_s"])
        self._batched.set_max_batch_size(max(int(config["max_batch_images"]), self.limits.max_images))
        self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        subtrees = {f"subtree-{g}": ("unavailable: " + self.down[g]) if g in self.down else "ok"
                    for g in range(len(self.t.subtree_classes))}
        status = "ok" if not self.down else "degraded"
        return JSONResponse({"status": status, "mode": self.mode, "subtrees": subtrees})

    @api.get("/metadata")
    async def metadata(self) -> JSONResponse:
        t = self.t
        m = t.manifest
        groups = [{"group": k["group"], "subtree": f"subtree-{k['subtree']}", "classes": k["classes"]} for k in m["groups"]]
        classes = [{"index": c, "name": name, "group": t.class_to_group[c],
                    "subtree": f"subtree-{int(t.class_to_subtree[c])}"} for c, name in enumerate(t.class_names)]
        subtrees = [{"name": s["name"], "classes": len(s["classes"]), "params": s.get("params"),
                     "flops": s.get("flops"), "weight_bytes": s.get("file_bytes")} for s in m["subtrees"]]
        return JSONResponse({"arch": m["arch"], "split": m["split"], "num_classes": m["num_classes"],
                             "input_size": m["input_size"], "mode": self.mode,
                             "precision": {"name": self.model.precision.name, "reason": self.model.precision.reason},
                             "classes": classes, "groups": groups,
                             "trunk": {"params": m["trunk"].get("params"), "flops": m["trunk"].get("flops"),
                                       "weight_bytes": m["trunk"].get("file_bytes")},
                             "subtrees": subtrees, "counts": m.get("counts", {}),
                             "grown": {k: m[k] for k in ("parent", "added_classes") if k in m},
                             "limits": vars(self.limits)})

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            body = await self._read_body(request)
            answer = await self._predict(body, request.headers.get("content-type"), dict(request.query_params))
            status, payload = 200, answer
        except RequestError as e:
            status, payload = e.status, {"error": e.message}
        except SubtreeUnavailable as e:
            status, payload = 503, {"error": str(e)}
        self.requests.inc(tags={"route": "/predict", "status": str(status)})
        self.latency.observe(1000 * (time.perf_counter() - start), tags={"route": "/predict"})
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(payload, status_code=status, headers=headers)

    # -- the work --------------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes:
        """The body, or a 413 once it passes ``limits.max_body_bytes`` (a declared Content-Length
        over the limit is refused before reading anything).

        A refusal is answered only after the rest of the body has arrived and been thrown away
        (streamed, never kept), when the connection closes after the answer (``Connection:
        close``, as urllib sends, or HTTP/1.0): closing a socket with unread data makes the
        kernel reset the connection, and a client that writes its whole body before reading
        (urllib, http.client) then sees ``ConnectionResetError`` instead of the 413. On a
        keep-alive connection the HTTP server discards the rest of the body by itself, so the
        413 goes out at once. Bodies over ``limits.max_drain_bytes`` (or still arriving after
        ``limits.drain_timeout_s``) are not waited for."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else None
        stream = request.stream()
        size = 0
        if declared is None or declared <= limit:
            chunks = []
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
            else:
                return b"".join(chunks)
        if _closes_after_answer(request):
            await self._discard(stream, size, declared)
        shown = f"body of {declared} bytes" if declared is not None else "body"
        raise RequestError(413, f"{shown} is over the limit of {limit} bytes")

    async def _discard(self, stream, size: int, declared: int | None) -> bool:
        """Read what is left of a refused body and drop it; False if it was too big or too slow
        to wait for (or the client left)."""
        cap = self.limits.max_drain_bytes
        if declared is not None and declared > cap:
            return False

        async def drain() -> bool:
            seen = size
            async for chunk in stream:
                seen += len(chunk)
                if seen > cap:
                    return False
            return True

        try:
            return await asyncio.wait_for(drain(), self.limits.drain_timeout_s)
        except (asyncio.TimeoutError, ClientDisconnect):
            return False

    async def _predict(self, body: bytes, content_type: str | None, query: dict) -> dict:
        t = self.t  # one tree for the whole request, even if it grows meanwhile
        req = parse_predict(body, content_type, query, self.limits)
        wanted = resolve_classes(req, t.class_names, t.class_to_group)
        top_k = min(req.top_k, self.limits.max_top_k)
        pixels = await asyncio.to_thread(decode_images, req, self.size, self.limits)
        x = to_float_tensor(pixels, self.mean, self.std)
        out = await self._batched(x)
        needed = (sorted(set(t.class_to_subtree[wanted].tolist())) if wanted is not None
                  else list(range(len(t.subtree_classes))))
        if self.mode == "fanout":
            parts = await asyncio.gather(*(self._call_subtree(t, g, self._inputs_of(t, g, out)) for g in needed))
            classes, position = t.class_order(tuple(needed))  # back to the original class order
            logits = np.take(np.concatenate(parts, axis=1), position, axis=1)
        else:  # the whole tree / the dense model ran in-process: logits of every class, class order
            classes, logits = np.arange(len(t.class_names)), out
        if wanted is not None:
            keep = np.searchsorted(classes, wanted)
            classes, logits = classes[keep], logits[:, keep]
        return self._answer(t, classes, logits, top_k, req.probabilities, needed, wanted is not None)

    @staticmethod
    def _answer(t: _Tables, classes, logits, top_k, with_probabilities, needed, filtered) -> dict:
        logits = logits.astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, len(classes))
        predictions = []
        for row in probs:
            top = np.argsort(-row, kind="stable")[:k]
            entry = {"top_k": [{"index": int(classes[j]), "name": t.class_names[classes[j]],
                                "probability": float(row[j]), "group": t.class_to_group[classes[j]],
                                "subtree": f"subtree-{int(t.class_to_subtree[classes[j]])}"} for j in top]}
            if with_probabilities:
                entry["probabilities"] = [float(p) for p in row]
            predictions.append(entry)
        answer = {"predictions": predictions, "subtrees_called": [f"subtree-{g}" for g in needed],
                  "scored_classes": len(classes)}
        if with_probabilities:
            answer["classes"] = [int(c) for c in classes]
        if filtered:
            answer["note"] = "probabilities are over the requested classes only"
        return answer

    @serve.batch(max_batch_size=TRUNK_USER_CONFIG["max_batch_images"],
                 batch_wait_timeout_s=TRUNK_USER_CONFIG["batch_wait_timeout_s"], batch_size_fn=_images_in)
    async def _batched(self, xs: list[torch.Tensor]) -> list[np.ndarray]:
        """Trunk features (fanout) or logits (local, dense) for several requests in one forward."""
        sizes = [len(x) for x in xs]
        out = await asyncio.to_thread(self.model.forward, torch.cat(xs) if len(xs) > 1 else xs[0])
        return np.split(out, np.cumsum(sizes)[:-1])

    def _inputs_of(self, t: _Tables, g: int, features: np.ndarray) -> np.ndarray:
        """The trunk channels subtree ``g`` reads, contiguous, in its order."""
        index = t.subtree_inputs[g]
        return features if index is None else np.take(features, index, axis=1)

    async def _call_subtree(self, t: _Tables, g: int, features: np.ndarray) -> np.ndarray:
        """Logits of subtree ``g``. A replica that dies mid-request is retried on another one; when
        no replica takes the request (the only one is restarting) the subtree is marked
        unavailable and its requests get a 503 at once until a background probe sees it back
        (Serve restarts replicas by itself)."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import ReplicaUnavailableError

        reason = "unknown"
        for attempt in range(1 + self.retries):
            if g in self.down:
                raise SubtreeUnavailable(f"subtree-{g} is unavailable ({self.down[g]}); Ray Serve is restarting it, "
                                         "retry shortly")
            if attempt:
                await asyncio.sleep(0.05 * 2 ** (attempt - 1))
            try:
                return await _call_assigned(t.handles[g].logits, (features,), self.assign_timeout_s)
            except _NotAssigned:
                reason = f"no replica took the request within {self.assign_timeout_s:g} s"
                break
            except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as e:
                reason = f"its replica failed: {type(e).__name__}"
        self._mark_down(g, reason)
        raise SubtreeUnavailable(f"subtree-{g} is unavailable ({reason}); Ray Serve is restarting it, retry shortly")

    def _mark_down(self, g: int, reason: str) -> None:
        if g not in self.down:
            log.warning("subtree-%d marked unavailable: %s", g, reason)
            self.down[g] = reason
            self._probes[g] = asyncio.get_running_loop().create_task(self._probe(g))

    async def _probe(self, g: int) -> None:
        """Ask subtree ``g`` who it is until a replica answers, then take requests for it again."""
        delay = 0.2
        while g in self.down:
            try:
                await _call_assigned(self.t.handles[g].info, (), self.assign_timeout_s)
                log.warning("subtree-%d answers again", g)
                self.down.pop(g, None)
            except Exception:  # noqa: BLE001 — any failure means "not back yet"
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)


# -- the application builder ---------------------------------------------------------------------
def build(args: dict) -> serve.Application:
    """The app ``serve deploy`` builds from ``import_path: pipelines.serve.app:build`` + ``args``
    (the config file's ``deployments`` entries then set replicas, resources and user_config)."""
    return build_with_options(args)


def build_with_options(args: dict, options: dict[str, dict] | None = None) -> serve.Application:
    """:func:`build` with per-deployment ``.options(...)`` (``{"subtree-1": {"num_replicas": 3}}``),
    which is how ``splitnet serve`` applies the same deployment specs without a config file."""
    args, options = dict(args or {}), options or {}
    if "tree" not in args:
        raise ValueError("args.tree is required: the run dir or tree dir to serve")
    tree = tree_location(str(args.pop("tree")))
    mode = args.pop("mode", "fanout")
    common = {k: args.pop(k) for k in ("device", "amp", "torch_threads", "cpu_cores") if k in args}
    dense_weights = args.pop("dense_weights", None)
    if args:
        raise ValueError(f"unknown args: {', '.join(sorted(args))}; allowed: tree, mode, device, amp, torch_threads, "
                         "cpu_cores, dense_weights")
    if mode not in MODES:
        raise ValueError(f"args.mode {mode!r}: use one of {', '.join(MODES)}")
    ingress = TreeIngress.options(**options.get("trunk", {}))
    if mode != "fanout":
        return ingress.bind(tree, None, mode=mode, dense_weights=dense_weights, **common)
    count = len(read_tree_manifest(tree)["subtrees"])
    subtrees = [Subtree.options(name=f"subtree-{g}", **options.get(f"subtree-{g}", {})).bind(tree, g, **common)
                for g in range(count)]
    return ingress.bind(tree, subtrees, mode="fanout", **common)
