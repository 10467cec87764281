"""The ``splitnet`` command.

    splitnet plan --arch wrn-16-8 --split 2-2-2 --num-classes 100 [--json]
    splitnet prepare SOURCE --out DIR [--format parquet|webdataset] [--shard-size N]
    splitnet run CONFIG.yaml [OVERLAY.yaml ...] [key=value ...]   # the staged Ray pipeline; re-running resumes
    splitnet serve RUN_DIR [--subtree-replicas 1=3 ...] [--port 8000]   # the tree on Ray Serve, over HTTP
    splitnet serve-config RUN_DIR [...] > serve.yaml                    # the same, for `serve deploy`

Bad input prints one line naming the problem and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import yaml

from pipelines.config import ON_BAD_RECORD, ConfigError, load_config, to_dict
from pipelines.serve.deploy import (DeployError, DeployOptions, deploy, dump_config, grow_deploy, parse_replicas,
                                     proxy_failover_active, serve_config)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _fmt(n: float, unit: str = "M", scale: float = 1e6) -> str:
    return f"{n / scale:.2f}{unit}"


def cmd_plan(args) -> int:
    from .plan import plan

    result = plan(args.arch, args.split, args.num_classes, args.input_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    d, s, r = result["dense"], result["split_tree"], result["reduction"]
    print(f"{result['arch']}, split {result['split']}, {result['num_classes']} classes, "
          f"{result['input_size']}x{result['input_size']} input, balanced groups")
    print(f"{'':12}{'weights':>10}{'params':>10}{'GFLOPs':>10}")
    print(f"{'dense':12}{_fmt(d['weights']):>10}{_fmt(d['params']):>10}{d['flops'] / 1e9:>10.3f}")
    print(f"{'split':12}{_fmt(s['weights']):>10}{_fmt(s['params']):>10}{s['flops'] / 1e9:>10.3f}")
    print(f"{'reduction':12}{r['weights']:>10.1%}{r['params']:>10.1%}{r['flops']:>10.1%}")
    print(f"trunk: {_fmt(s['trunk']['weights'])} weights, {s['trunk']['flops'] / 1e9:.3f} GFLOPs")
    for g, sub in enumerate(s["subtrees"]):
        print(f"subtree-{g}: {_fmt(sub['weights'])} weights, {sub['flops'] / 1e9:.3f} GFLOPs, "
              f"{sub['state_bytes'] / 2**20:.1f} MiB")
    print(f"ideal speedup (dense FLOPs / split FLOPs): {result['ideal_speedup']:.2f}x")
    print(f"counting rule: {result['counting_rule']}")
    return 0


def cmd_prepare(args) -> int:
    from pipelines.data.prepare import PrepareError, prepare

    try:
        prepare(args.source, args.out, fmt=args.format, shard_size=args.shard_size, seed=args.seed,
                validate=args.validate, on_bad_record=args.on_bad_record, max_pixels=args.max_pixels,
                per_class=args.per_class, parents=args.parents,
                classes=[c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None,
                log=lambda line: print(line, flush=True))
    except PrepareError as e:
        raise UsageError(str(e)) from None
    return 0


def _overlays_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``run``'s arguments after the config: overlay YAML files first (merged in order), then
    key=value overrides. A YAML file after an override would read as if it came last: refused."""
    overlays, overrides = [], []
    for item in items:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            if overrides:
                raise UsageError(f"{item}: overlay YAML files go before the key=value overrides "
                                 f"(they apply in order, then the overrides)")
            overlays.append(item)
        else:
            overrides.append(item)
    return overlays, overrides


def cmd_run(args) -> int:
    overlays, overrides = _overlays_and_overrides(args.overrides)
    try:
        cfg = load_config(args.config, overrides, overlays=overlays)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from pipelines.run import run

    return _pipeline(cfg.run_dir, cfg.name, args.verbose, lambda log, logs: run(cfg, log=log, logs_dir=logs))


def cmd_grow(args) -> int:
    from pipelines.grow import grow_config, grow_run
    from pipelines.rundir import RunDir
    from pipelines.run import PipelineError

    out = args.out or args.run_dir.rstrip("/") + "-grown"
    overrides = list(args.overrides) + ([f"grow.replay={args.replay}"] if args.replay is not None else []) \
        + ([f"grow.calibrate={args.calibrate}"] if args.calibrate is not None else []) \
        + ([f"grow.init={args.init}"] if args.init else [])
    try:  # the parent and the settings, before anything is written (the new run dir's logs included)
        grow_config(RunDir(args.run_dir), args.source, out, overrides)
    except PipelineError as e:
        raise UsageError(str(e)) from None
    return _pipeline(out, Path(out).name, args.verbose,
                     lambda log, logs: grow_run(args.run_dir, args.source, out, overrides, log=log))


def _pipeline(run_dir: str, name: str, verbose_flag: bool, job) -> int:
    """``job(log, logs_dir)`` with Ray's own output in RUN_DIR/logs (or ./splitnet-logs/NAME for a run
    dir on s3://) and the CLI's exits: 2 and one line for bad input, 1 for a failed stage."""
    from pipelines.progress import QuietRun, TerminalLog, verbose
    from pipelines.run import PipelineError, StageFailed

    os.environ.setdefault("MPLBACKEND", "Agg")
    if verbose_flag:
        os.environ["SPLITNET_VERBOSE"] = "1"
    logs = Path(run_dir) / "logs" if "://" not in run_dir else Path("splitnet-logs") / name
    quiet = None if verbose() else QuietRun(logs.absolute())
    out, err = (quiet.user_out, quiet.user_err) if quiet else (sys.stdout, sys.stderr)
    try:
        job(TerminalLog(out), None if verbose() else str(logs))
    except PipelineError as e:
        print(f"splitnet: error: {e}", file=err)
        return 2
    except StageFailed as e:
        print(f"splitnet: {e} (details in {logs})", file=err)
        return 1
    except KeyboardInterrupt:
        print("splitnet: interrupted; run the same command again to resume", file=err)
        return 130
    except Exception:

        traceback.print_exc(file=err)  # a bug: the traceback belongs on the terminal
        return 1
    finally:
        if quiet:
            quiet.restore()
    return 0


def _cores(text: str) -> list[int]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not all(t.isdigit() for t in items):
        raise DeployError(f"--pin-cores {text!r}: expected core numbers separated by commas, e.g. 0,1")
    return [int(t) for t in items]


def _deploy_options(args):
    try:
        return DeployOptions(
            app_name=args.name, host=args.host, port=args.port, route_prefix=args.route_prefix,
            trunk_replicas=args.trunk_replicas,
            subtree_replicas=parse_replicas(args.subtree_replicas),
            autoscale_max=parse_replicas(args.autoscale_max, "--autoscale-max"),
            trunk_cpus=args.trunk_cpus, trunk_gpus=args.trunk_gpus, subtree_cpus=args.subtree_cpus, subtree_gpus=args.subtree_gpus,
            device=args.device, amp=args.amp, torch_threads=args.torch_threads, pin_cores=_cores(args.pin_cores),
            working_dir=getattr(args, "working_dir", None), proxy_hook=getattr(args, "proxy_hook", False))
    except DeployError as e:
        raise UsageError(str(e)) from None


def cmd_serve_config(args) -> int:
    try:
        config = serve_config(args.tree, _deploy_options(args))
    except DeployError as e:
        raise UsageError(str(e)) from None
    print(dump_config(config, args.tree), end="")
    return 0


def cmd_serve_grow(args) -> int:
    """The running app (``--name`` on ``--address``) takes the grown tree's new subtrees, live."""
    import ray

    try:
        config = serve_config(args.tree, _deploy_options(args))
    except DeployError as e:
        raise UsageError(str(e)) from None
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False,
             configure_logging=False)
    try:
        added = grow_deploy(config)
    except DeployError as e:
        raise UsageError(str(e)) from None
    print(f"{added['app']}: now {added['classes']} classes; new subtree app(s) {', '.join(added['subtrees'])}; "
          f"{added['replicas_switched']} trunk replica(s) switched, none restarted", flush=True)
    return 0


def cmd_serve(args) -> int:
    try:
        config = serve_config(args.tree, _deploy_options(args))
    except DeployError as e:
        raise UsageError(str(e)) from None
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        url = deploy(config)
    except DeployError as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # a replica failed to start: Serve's message names the deployment
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"splitnet: deploying failed: {first} (replica logs: Ray's session dir, logs/serve/)", file=sys.stderr)
        return 1
    app = config["applications"][0]
    print(f"serving {config['applications'][0]['args']['tree']} at {url}", flush=True)
    for d in app["deployments"]:
        scale = d.get("num_replicas") or f"autoscaling {d['autoscaling_config']['min_replicas']}-" \
                                           f"{d['autoscaling_config']['max_replicas']}"
        print(f"  {d['name']}: {scale} replica(s), {d['ray_actor_options']}", flush=True)

    if proxy_failover_active(url) is False:
        print("note: this Serve was already running without splitnet's proxy hook: a request whose trunk replica "
              "dies gets Serve's plain 500 (see README, Serving the tree)", flush=True)
    print(f"try: curl -s -H 'Content-Type: image/jpeg' --data-binary @image.jpg {url}/predict", flush=True)
    if address:  # the app stays on the cluster; `serve shutdown` or `serve delete` removes it
        return 0
    print("local Ray: serving until Ctrl-C", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()
    return 0


def _add_deploy_arguments(p) -> None:
    D = DeployOptions  # the defaults are the deploy options'
    p.add_argument("tree", help="a run dir (serves its tree/) or a tree dir; local path or s3://-style URI")
    p.add_argument("--subtree-replicas", action="append", default=[], metavar="G=N",
                   help="replicas of subtree G (default 1); repeat for several subtrees")
    p.add_argument("--autoscale-max", action="append", default=[], metavar="G=N",
                   help="autoscale subtree G between its replicas and N")
    p.add_argument("--trunk-replicas", type=_positive_int, default=D.trunk_replicas)
    p.add_argument("--trunk-cpus", type=float, default=D.trunk_cpus, help="CPUs per trunk replica")
    p.add_argument("--trunk-gpus", type=float, default=D.trunk_gpus, help="GPUs per trunk replica")
    p.add_argument("--subtree-cpus", type=float, default=D.subtree_cpus, help="CPUs per subtree replica")
    p.add_argument("--subtree-gpus", type=float, default=D.subtree_gpus, help="GPUs per subtree replica (fractions share a GPU)")
    p.add_argument("--device", default=D.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default=D.amp, choices=["auto", "bf16", "none"],
                   help="auto (default): bf16 autocast on replicas whose device computes bf16 natively (a GPU with "
                        "bf16, a CPU with AMX), fp32 elsewhere; bf16: always; none: fp32")
    p.add_argument("--torch-threads", type=_positive_int, default=D.torch_threads, help="torch threads per replica")
    p.add_argument("--pin-cores", default="", metavar="0,1,...",
                   help="pin subtree G's replica to core G mod n of this list (one thread) and the trunk to all of "
                        "them: the subtrees of a request run in parallel on one machine")
    p.add_argument("--name", default=D.app_name, help="Serve application name")
    p.add_argument("--host", default=D.host)
    p.add_argument("--port", type=_positive_int, default=D.port)
    p.add_argument("--route-prefix", default=D.route_prefix, help="URL prefix of the app (several apps share one HTTP port)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="splitnet", description="SplitNet: learn to split a classifier into a tree; train, cut, serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="dense vs split parameters and FLOPs, without training (balanced groups)")
    p.add_argument("--arch", required=True, help="wrn-16-8, resnet50, ... (see splitnet.list_models())")
    p.add_argument("--split", required=True, help="groups per level, bottom to top: 2-2-2, 1-2-4, 4-4, ...")
    p.add_argument("--num-classes", type=_positive_int, required=True)
    p.add_argument("--input-size", type=_positive_int, default=None, help="image side (default 32 for WRN, 224 for ResNet)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prepare", help="convert CIFAR-100, an ImageFolder tree or per-synset tars into shuffled shards (Ray Data)")
    p.add_argument("source", help="CIFAR-100 folder (train.npz), ImageFolder root (<class>/ or train/ val/ test/ "
                                  "holding <class>/), or folder of nXXXXXXXX.tar")
    p.add_argument("--out", required=True, help="output folder (re-running resumes: finished shards are skipped)")
    p.add_argument("--format", default="parquet", choices=["parquet", "webdataset"])
    p.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard (sizes differ by at most 1)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--validate", default="header", choices=["none", "header", "full"],
                   help="check each image: header (cheap: empty, not an image, too many pixels) or full decode")
    p.add_argument("--on-bad-record", default="skip", choices=ON_BAD_RECORD)
    p.add_argument("--max-pixels", type=_positive_int, default=64_000_000, help="larger images are bad records")
    p.add_argument("--per-class", type=_positive_int, default=None, help="keep at most N images of each class (every split)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="keep only these classes: class names, or parent names for all their classes "
                        "(CIFAR-100 superclasses, e.g. vehicles_1,vehicles_2); relabelled 0..K-1")
    p.add_argument("--parents", default=None, metavar="PARENTS.tsv",
                   help="class<TAB>parent table (header optional): the class table's parents, scored in the report")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="the staged pipeline on Ray: prepare, baseline, group, cut, finetune, evaluate, report")
    p.add_argument("config", help="YAML config, e.g. pipelines/configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="OVERLAY.yaml|key=value",
                   help="overlay YAML files merged over the config in order (e.g. pipelines/configs/rehearsal-cpu.yaml), "
                        "then key=value overrides, e.g. group.epochs=5 run_dir=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own output on the terminal too (default: in RUN_DIR/logs; also SPLITNET_VERBOSE=1)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("grow", help="grow a finished run's tree by new classes: one more subtree, the rest frozen")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run (its tree/ is grown; nothing in it is written)")
    p.add_argument("source", metavar="NEW_SOURCE", help="the new classes' images, in any layout `splitnet prepare` reads")
    p.add_argument("--replay", type=int, default=None, metavar="K",
                   help="old-class images per class replayed from the run's shards (default: grow.replay, 20; 0 warns)")
    p.add_argument("--calibrate", type=int, default=None, metavar="C",
                   help="held-out images per class, old and new, the new logits' scale and shift are fitted on "
                        "(default: grow.calibrate, 20; 0: none)")
    p.add_argument("--init", choices=("sibling", "fresh"), default=None,
                   help="the new subtree starts from its most similar sibling's weights (default) or fresh")
    p.add_argument("--out", default=None, metavar="NEW_RUN_DIR", help="the grown run's dir (default RUN_DIR-grown)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="over the run's config, e.g. grow.epochs=3")
    p.add_argument("--verbose", action="store_true", help="Ray's own output on the terminal too")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("serve", help="deploy the tree on Ray Serve: a trunk deployment + one per subtree, over HTTP")
    _add_deploy_arguments(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (default $RAY_ADDRESS; none: start a local Ray and serve until Ctrl-C)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-grow", help="add a grown tree's new subtrees to its parent's running app, live (no restart)")
    _add_deploy_arguments(p)
    p.add_argument("--address", default=None, help="the Ray cluster the app runs on (default $RAY_ADDRESS, else auto)")
    p.set_defaults(func=cmd_serve_grow)

    p = sub.add_parser("serve-config", help="print the Serve config for `serve deploy` (same app as `splitnet serve`)")
    _add_deploy_arguments(p)
    p.add_argument("--working-dir", default=None, help="runtime_env working_dir URI for the app (e.g. local:///srv/app "
                                                       "or https://.../project.zip); default: the installed package")
    p.add_argument("--proxy-hook", action="store_true",
                   help="add controller_options that make Serve's HTTP proxy load pipelines.serve.proxy (retry requests "
                        "whose trunk replica died, 503 JSON while none is up); applied when the config starts Serve")
    p.set_defaults(func=cmd_serve_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.data.records import BadRecordError
    from splitnet.artifacts import ArtifactError
    from splitnet.assignment import SplitConfigError

    try:
        args, extra = build_parser().parse_known_args(argv)
        overrides = [e for e in extra if "=" in e and not e.startswith("-")]
        if extra and (getattr(args, "command", None) not in ("run", "grow") or len(overrides) != len(extra)):
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        if overrides:  # key=value after the options (`splitnet grow RUN SRC --out X grow.epochs=3`)
            args.overrides = list(args.overrides) + overrides
        if args.command == "plan":
            _validate_model_args(args)
        return args.func(args)
    except (UsageError, SplitConfigError, ArtifactError, FileNotFoundError, BadRecordError) as e:
        print(f"splitnet: error: {e}", file=sys.stderr)
        return 2


def _validate_model_args(args) -> None:
    """Check --arch/--split before any work, so a typo costs nothing."""
    import torch

    from splitnet import build_model
    from splitnet.assignment import SplitConfigError

    try:
        with torch.device("meta"):
            model = build_model(args.arch, getattr(args, "num_classes", 100), args.split)
    except SplitConfigError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
    size = getattr(args, "input_size", None)
    if size is not None and size < model.min_input_size:
        raise UsageError(f"--input-size {size}: {args.arch} takes images of at least {model.min_input_size} px")


if __name__ == "__main__":
    sys.exit(main())
