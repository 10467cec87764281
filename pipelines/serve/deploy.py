"""Deploying the tree: the Serve config users keep in git (``splitnet serve-config``) and the
one-command deploy (``splitnet serve``). Both come from :func:`serve_config`, so what a test
deploys with ``serve deploy`` is what ``splitnet serve`` runs.

Which knobs are light (``serve deploy`` applies them to running replicas):
``num_replicas`` of one deployment (only that deployment gains or loses replicas),
``autoscaling_config`` once a deployment has one, ``user_config`` (limits, batching, retries:
replicas are re-configured in place), ``max_ongoing_requests``. Heavy (every replica of the app
restarts): ``args`` (the tree, mode, device, amp), ``import_path``, ``runtime_env``; and a
deployment's ``ray_actor_options`` restarts that deployment's replicas.

The proxy side (:mod:`pipelines.serve.proxy`: requests whose trunk replica died are retried, 503
JSON while no trunk replica is up) is loaded by Serve's HTTP proxy when Serve starts with
``PROXY_ENV`` in its controller's environment: ``deploy`` starts Serve that way,
``serve-config --proxy-hook`` writes it into the config.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import yaml

IMPORT_PATH = "pipelines.serve.app:build"
# Ray Serve's HTTP proxy loads ASGI middlewares from the function this variable names when it
# starts; it inherits the Serve controller's environment. pipelines.serve.proxy retries requests
# whose trunk replica died and answers 503 {"error"} while no trunk replica is up.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pipelines.serve.proxy:middlewares"}
PROXY_HEADER = "x-splitnet-proxy"


class DeployError(ValueError):
    """Bad deploy options (one line for the CLI, exit status 2)."""


# what pinned replicas run with: OpenMP threads sleep when idle instead of spinning
PINNED_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# what each deployment takes without a config (pipelines.serve.app's decorators and reconfigure read these)
MAX_ONGOING_REQUESTS = 64
TRUNK_USER_CONFIG = {"max_batch_images": 64, "batch_wait_timeout_s": 0.0, "retries": 3, "assign_timeout_s": 2.0}
SUBTREE_USER_CONFIG = {"max_batch_images": 256, "batch_wait_timeout_s": 0.0}


@dataclass
class DeployOptions:
    """What ``splitnet serve`` / ``serve-config`` take on the command line."""

    app_name: str = "splitnet"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    trunk_replicas: int = 1
    subtree_replicas: dict[int, int] = field(default_factory=dict)   # subtree -> replicas (default 1)
    autoscale_max: dict[int, int] = field(default_factory=dict)      # subtree -> max replicas (autoscaling)
    trunk_cpus: float = 0.5
    trunk_gpus: float = 0.0
    subtree_cpus: float = 0.25
    subtree_gpus: float = 0.0
    device: str = "auto"
    amp: str = "auto"             # auto | bf16 | none, resolved by each replica on its device
    torch_threads: int = 1
    # pin each subtree replica to one core (subtree g on pin_cores[g mod n], one thread) and the
    # trunk to all of them: the subtrees of a request compute in parallel on one machine
    pin_cores: list[int] = field(default_factory=list)
    working_dir: str | None = None
    mode: str = "fanout"
    dense_weights: str | None = None
    limits: dict = field(default_factory=dict)
    proxy_hook: bool = False   # add controller_options that load pipelines.serve.proxy (serve-config --proxy-hook)


def parse_replicas(items: list[str], what: str = "--subtree-replicas") -> dict[int, int]:
    """``["1=3", "0=2"]`` -> ``{1: 3, 0: 2}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isdigit() or not value.strip().isdigit() or int(value) < 1:
            raise DeployError(f"{what} {item!r}: expected SUBTREE=N with N >= 1, e.g. 1=3")
        out[int(key)] = int(value)
    return out


def serve_config(tree: str, opts: DeployOptions) -> dict:
    """The Serve config (``serve deploy`` schema) for the tree at ``tree`` (run dir or tree dir)."""
    from pipelines.serve.app import MODES, read_tree_manifest, tree_location

    try:
        tree = tree_location(tree)
        manifest = read_tree_manifest(tree)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DeployError(str(e)) from None
    count = len(manifest["subtrees"])
    for what, mapping in (("--subtree-replicas", opts.subtree_replicas), ("--autoscale-max", opts.autoscale_max)):
        bad = sorted(g for g in mapping if not 0 <= g < count)
        if bad:
            raise DeployError(f"{what}: subtree {bad[0]} does not exist; this tree has subtrees 0..{count - 1}")
    if opts.mode not in MODES:
        raise DeployError(f"mode {opts.mode!r}: use one of {', '.join(MODES)}")
    from splitnet.precision import AMP_CHOICES

    if opts.amp not in AMP_CHOICES:
        raise DeployError(f"--amp {opts.amp!r}: use one of {', '.join(AMP_CHOICES)}")
    if min(opts.subtree_gpus, opts.subtree_cpus, opts.trunk_cpus, opts.trunk_gpus) < 0:
        raise DeployError("CPU and GPU counts must be >= 0")
    args = {"tree": tree, "mode": opts.mode, "device": opts.device, "torch_threads": opts.torch_threads}
    if opts.pin_cores:
        if any(c < 0 for c in opts.pin_cores) or len(set(opts.pin_cores)) != len(opts.pin_cores):
            raise DeployError(f"--pin-cores {','.join(map(str, opts.pin_cores))}: distinct core numbers >= 0, e.g. 0,1")
        args["cpu_cores"] = list(opts.pin_cores)
    args["amp"] = opts.amp
    if opts.dense_weights:
        args["dense_weights"] = opts.dense_weights
    trunk = {"name": "trunk", "num_replicas": opts.trunk_replicas, "max_ongoing_requests": MAX_ONGOING_REQUESTS,
             "ray_actor_options": {"num_cpus": opts.trunk_cpus, **({"num_gpus": opts.trunk_gpus} if opts.trunk_gpus else {})},
             "user_config": {"limits": dict(opts.limits), **TRUNK_USER_CONFIG}}
    if opts.pin_cores:
        # an idle OpenMP thread of the trunk spins on its core for a while (the default active wait
        # policy) and starves the subtree pinned there: measured p50 at concurrency 1 137 ms vs 33 ms
        trunk["ray_actor_options"]["runtime_env"] = {"env_vars": dict(PINNED_ENV)}
    deployments = [trunk]
    if opts.mode == "fanout":
        for g in range(count):
            actor = {"num_cpus": opts.subtree_cpus}
            if opts.pin_cores:
                actor["runtime_env"] = {"env_vars": dict(PINNED_ENV)}
            if opts.subtree_gpus:
                actor["num_gpus"] = opts.subtree_gpus
            spec = {"name": f"subtree-{g}", "max_ongoing_requests": MAX_ONGOING_REQUESTS, "ray_actor_options": actor,
                    "user_config": dict(SUBTREE_USER_CONFIG)}
            if g in opts.autoscale_max:
                spec["autoscaling_config"] = {"min_replicas": opts.subtree_replicas.get(g, 1),
                                              "max_replicas": opts.autoscale_max[g], "target_ongoing_requests": 4}
            else:
                spec["num_replicas"] = opts.subtree_replicas.get(g, 1)
            deployments.append(spec)
    app = {"name": opts.app_name, "route_prefix": opts.route_prefix, "import_path": IMPORT_PATH, "args": args,
           "deployments": deployments}
    if opts.working_dir:
        app["runtime_env"] = {"working_dir": opts.working_dir}
    config = {"proxy_location": "EveryNode", "http_options": {"host": opts.host, "port": opts.port},
              "applications": [app]}
    if opts.proxy_hook:
        config["controller_options"] = proxy_controller_options()
    return config


def proxy_controller_options() -> dict:
    """Serve ``controller_options`` that make the HTTP proxy load :mod:`pipelines.serve.proxy`.
    Serve applies them only when it starts (a Serve already running keeps its proxy as it is)."""
    return {"runtime_env": {"env_vars": dict(PROXY_ENV)}}


def proxy_failover_active(url: str, timeout: float = 5) -> bool | None:
    """Whether the proxy in front of ``url`` (the app's base URL) runs pipelines.serve.proxy (its
    answers to the tree's routes carry the ``x-splitnet-proxy`` header); None if unreachable."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout) as r:
            return r.headers.get(PROXY_HEADER) is not None
    except urllib.error.HTTPError as e:
        return e.headers.get(PROXY_HEADER) is not None
    except OSError:
        return None


def dump_config(config: dict, tree: str) -> str:
    header = (f"# Ray Serve config for the SplitNet tree at {tree}\n"
              "# Deploy:  serve deploy serve.yaml   (on the cluster's head, or --address http://HEAD:8265)\n"
              "# Light:   num_replicas / autoscaling_config / user_config / max_ongoing_requests of one deployment:\n"
              "#          re-deploying changes that deployment alone; its siblings' replicas keep running.\n"
              "# Heavy:   args, import_path, runtime_env restart every replica; ray_actor_options restarts that deployment.\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def check_cluster(config: dict) -> None:
    """Fail fast (instead of replicas pending forever) when the cluster cannot host the app."""
    import ray

    total = ray.cluster_resources()
    app = config["applications"][0]
    def replicas(d):
        return d.get("num_replicas", d.get("autoscaling_config", {}).get("min_replicas", 1))

    gpus = sum(d.get("ray_actor_options", {}).get("num_gpus", 0) * replicas(d) for d in app["deployments"])
    if app["args"].get("device") == "cuda" and not gpus:
        raise DeployError("--device cuda but no deployment asks for a GPU: add --subtree-gpus / --trunk-gpus "
                          "(Ray only shows a replica the GPUs it was given), or use --device auto")
    if gpus and total.get("GPU", 0) == 0:
        raise DeployError(f"the deployments ask for GPUs (num_gpus {gpus:g} in all) but this Ray cluster has none; "
                          "drop --subtree-gpus / --trunk-gpus or connect to a cluster with GPU nodes (--address)")
    if gpus > total.get("GPU", 0) + 1e-9:
        raise DeployError(f"the deployments ask for {gpus:g} GPUs, the cluster has {total.get('GPU', 0):g}")
    cpus = sum(d.get("ray_actor_options", {}).get("num_cpus", 1) * replicas(d) for d in app["deployments"])
    if cpus > total.get("CPU", 0) + 1e-9:
        raise DeployError(f"the deployments ask for {cpus:g} CPUs, the cluster has {total.get('CPU', 0):g}; "
                          "lower --trunk-cpus / --subtree-cpus or replicas")


def deploy(config: dict) -> str:
    """Deploy ``config`` on the connected Ray cluster (``ray.init`` done); returns the app's URL.

    Uses the same builder and the same per-deployment options as ``serve deploy`` would."""
    import ray
    from ray import serve

    from pipelines.serve.app import build_with_options, tree_registry

    check_cluster(config)
    http = config["http_options"]
    serve.start(http_options={"host": http["host"], "port": http["port"]},
                controller_options=config.get("controller_options") or proxy_controller_options())
    app = config["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
    application = build_with_options(dict(app["args"]), options)
    tree = app["args"]["tree"]  # a fresh deployment serves this tree, whatever grew before under the name
    ray.get(tree_registry(app["name"]).publish.remote({"base": tree, "tree": tree, "apps": {}}))
    serve.run(application, name=app["name"], route_prefix=app["route_prefix"], blocking=False)
    host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
    return f"http://{host}:{http['port']}{app['route_prefix'].rstrip('/')}"


def grow_deploy(config: dict, timeout_s: float = 120.0) -> dict:
    """Add a grown tree's new subtrees to the running app ``config`` names (``serve_config`` of the grown
    tree): each new subtree as a Serve app of its own, ``<app>-subtree-<g>`` (a new app, so nothing
    of the running one is redeployed), then every ingress replica switches to the grown tree through
    the app's TreeRegistry (no restart: the trunk's and the old subtrees' replicas keep running).
    Returns what was added; raises DeployError when the app is not running this tree's parent."""
    import ray
    from ray import serve

    from pipelines.serve.app import Subtree, read_tree_manifest, tree_registry

    app = config["applications"][0]
    name, grown_tree = app["name"], app["args"]["tree"]
    status = serve.status().applications.get(name)
    if status is None:
        raise DeployError(f"no Serve app {name!r} is running on this cluster; start it with `splitnet serve` (--name)")
    registry = tree_registry(name)
    gen, state = ray.get(registry.current.remote())
    if not state:
        raise DeployError(f"the app {name!r} was not deployed by `splitnet serve`: it does not follow a growing tree")
    served, grown = read_tree_manifest(state["tree"]), read_tree_manifest(grown_tree)
    old = [served["trunk"]] + list(served["subtrees"])
    if [e["sha256"] for e in old] != [e["sha256"] for e in ([grown["trunk"]] + list(grown["subtrees"]))[:len(old)]]:
        raise DeployError(f"{grown_tree} was not grown from the served tree {state['tree']} (its trunk or old subtrees differ)")
    new = list(range(len(served["subtrees"]), len(grown["subtrees"])))
    if not new:
        raise DeployError(f"{grown_tree} has no subtree the served tree lacks")
    specs = {d["name"]: d for d in app["deployments"]}
    common = {k: app["args"][k] for k in ("device", "amp", "torch_threads") if k in app["args"]}
    apps = dict(state.get("apps") or {})
    for g in new:
        spec = {k: v for k, v in specs[f"subtree-{g}"].items() if k != "name"}
        apps[str(g)] = f"{name}-subtree-{g}"
        serve.run(Subtree.options(name=f"subtree-{g}", **spec).bind(grown_tree, g, **common), name=apps[str(g)],
                  route_prefix=None, blocking=False)
    gen = ray.get(registry.publish.remote({"base": state["base"], "tree": grown_tree, "apps": apps}))
    trunk = serve.status().applications[name].deployments["trunk"]
    expected = int(trunk.replica_states.get("RUNNING", 0))
    deadline = time.monotonic() + timeout_s
    while len(ray.get(registry.acked.remote(gen))) < expected:  # every running ingress replica switched
        if time.monotonic() > deadline:
            raise DeployError(f"the grown tree is published but only {len(ray.get(registry.acked.remote(gen)))} of "
                              f"{expected} trunk replicas switched to it within {timeout_s:g} s")
        time.sleep(0.2)
    return {"app": name, "tree": grown_tree, "subtrees": [apps[str(g)] for g in new], "classes": grown["num_classes"],
            "replicas_switched": expected}
