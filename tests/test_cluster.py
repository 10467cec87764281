"""cluster/: the KubeRay and cluster-launcher YAML, checked without a cluster (no Ray is started).

Each check is a function that returns a list of problems (empty = fine), so the same check runs
on the real files and, to show it can fail, on broken copies of them. Every YAML in cluster/ is
picked up, so a new file (cluster/rayservice.yaml) is checked as soon as it lands: images and
pins everywhere, RayCluster-shaped specs wherever a KubeRay kind embeds one.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# ---------------------------------------------------------------------------------------------
# Loading


def cluster_yaml_files() -> list[Path]:
    """Every YAML file in cluster/, sorted."""
    return sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))


def load_yaml(path: Path) -> dict:
    """One cluster/ file as a mapping (yaml.safe_load; a file of one document)."""
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name}: expected a mapping at the top level, got {type(doc).__name__}"
    return doc


def cluster_docs() -> dict[str, dict]:
    """File name -> parsed document, for every YAML in cluster/."""
    return {p.name: load_yaml(p) for p in cluster_yaml_files()}


def kuberay_docs() -> dict[str, dict]:
    """The KubeRay custom resources (apiVersion ray.io/...) among cluster_docs()."""
    return {n: d for n, d in cluster_docs().items() if str(d.get("apiVersion", "")).startswith("ray.io/")}


def ray_cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for each Ray cluster a KubeRay resource describes.

    RayCluster: spec; RayJob: spec.rayClusterSpec (absent with clusterSelector);
    RayService: spec.rayClusterConfig.
    """
    spec = doc.get("spec") or {}
    where = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    kind = doc.get("kind")
    if kind not in where:
        return []
    if where[kind] is None:
        return [("spec", spec)]
    return [(f"spec.{where[kind]}", spec[where[kind]])] if where[kind] in spec else []


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head ("head") and each worker group of a RayClusterSpec."""
    out = [("head", spec.get("headGroupSpec") or {})]
    out += [(g.get("groupName", f"workerGroupSpecs[{i}]"), g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    return out


def ray_container(group: dict) -> dict:
    """The Ray container of a group's pod template (KubeRay runs Ray in the first container)."""
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]


def walk_strings(obj):
    """Every string inside a parsed YAML document (keys and values, nested)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_strings(k)
            yield from walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_strings(v)


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "8", "32Gi") as a number (CPUs, bytes)."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(value).strip())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


# ---------------------------------------------------------------------------------------------
# pyproject.toml: the pins everything must agree with


@functools.cache
def pyproject() -> dict:
    """The [project] table of pyproject.toml (tomllib; a regex for the fields used here on 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        return _pyproject_by_regex(text)
    return tomllib.loads(text)["project"]


def _pyproject_by_regex(text: str) -> dict:
    deps = text.split("\ndependencies = [", 1)[1].split("]\n", 1)[0]
    field = lambda key: re.search(rf'^{key}\s*=\s*"([^"]+)"', text, re.M).group(1)  # noqa: E731
    return {"dependencies": re.findall(r'"([^"]+)"', deps), "requires-python": field("requires-python"),
            "name": field("name"), "version": field("version")}


_PIN = re.compile(r"(?<![\w.-])(torch|torchvision|ray)(\[[^\]]*\])?\s*==\s*([0-9][\w.+-]*)")


def pins() -> dict[str, str]:
    """{"torch": ..., "torchvision": ..., "ray": ...} from pyproject's `==` dependencies."""
    found = {}
    for dep in pyproject()["dependencies"]:
        m = _PIN.fullmatch(dep.strip())
        if m:
            found[m.group(1)] = m.group(3)
    return found


def min_python() -> tuple[int, int]:
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", pyproject()["requires-python"].strip())
    assert m, f"requires-python {pyproject()['requires-python']!r}: expected '>=3.X'"
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------
# Checks: each returns a list of problems, one line each

_IMAGE = re.compile(r"rayproject/ray[\w-]*:[^\s\"',]+")
_TAG = re.compile(r"rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cpu|gpu|cu\d+)")


def images_in(obj) -> list[str]:
    """Every rayproject/ray image reference in a document (any string, also in commands)."""
    return [m.group(0) for s in walk_strings(obj) for m in _IMAGE.finditer(s)]


def image_problems(obj, where: str) -> list[str]:
    """Ray images must be rayproject/ray:<pinned ray>-py3X-<cpu|gpu|cuXYZ>, with 3.X >= requires-python."""
    problems = []
    for image in images_in(obj):
        m = _TAG.fullmatch(image)
        if not m:
            problems.append(f"{where}: image {image}: expected rayproject/ray:VERSION-py3X-cpu|gpu|cuXYZ")
            continue
        if m.group("version") != pins()["ray"]:
            problems.append(f"{where}: image {image}: Ray {m.group('version')}, pyproject pins ray=={pins()['ray']}")
        py = (3, int(m.group("py")[1:]))
        if py < min_python():
            problems.append(f"{where}: image {image}: Python {py[0]}.{py[1]} is below requires-python "
                            f"{pyproject()['requires-python']}")
    return problems


def pin_problems(obj, where: str) -> list[str]:
    """torch/torchvision/ray `==` pins anywhere (setup commands, pip lists) must equal pyproject's."""
    want = pins()
    return [f"{where}: {m.group(0)!r}, pyproject pins {m.group(1)}=={want[m.group(1)]}"
            for s in walk_strings(obj) for m in _PIN.finditer(s) if m.group(3) != want[m.group(1)]]


def pinned_in(obj) -> dict[str, str]:
    """The torch/torchvision/ray pins found in a document (name -> version)."""
    return {m.group(1): m.group(3) for s in walk_strings(obj) for m in _PIN.finditer(s)}


CRDS = REPO.parent / "shared" / "data" / "kuberay-crds"  # KubeRay's own schemas (README there)


def _strict(schema):
    """The CRD schema with unknown fields refused wherever it lists an object's fields: Kubernetes
    prunes them silently, so a typo'd key (enableInTreeAutoscalling) would never reach KubeRay."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str, version: str):
    import jsonschema

    with gzip.open(CRDS / f"{kind}.json.gz", "rt") as f:
        return jsonschema.Draft7Validator(_strict(json.load(f)[version]))


def crd_problems(doc: dict, where: str) -> list[str]:
    """The resource against KubeRay's CRD schema of its kind and version: types, enums, required
    fields (rayStartParams values are strings, a worker group has min/maxReplicas), unknown fields."""
    version = str(doc.get("apiVersion", "")).split("/")[-1]
    errors = crd_validator(doc.get("kind"), version).iter_errors(doc)
    return sorted(f"{where}:{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


def cluster_spec_problems(spec: dict, where: str) -> list[str]:
    """The project's rules for a RayClusterSpec (the schema's are crd_problems'): the pinned Ray, the
    head runs nothing, groups, resources, GPUs, /dev/shm."""
    problems = []
    if str(spec.get("rayVersion")) != pins()["ray"]:
        problems.append(f"{where}.rayVersion: {spec.get('rayVersion')!r}, pyproject pins ray=={pins()['ray']}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: missing"]
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        problems.append(f"{where}.headGroupSpec.rayStartParams: num-cpus must be \"0\" (no work on the head)")
    workers = spec.get("workerGroupSpecs")
    if not isinstance(workers, list) or not workers:
        problems.append(f"{where}.workerGroupSpecs: missing or empty")
        workers = []
    names = [g.get("groupName") for g in workers]
    if len(set(names)) != len(names):
        problems.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for group in workers:
        at = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if all(isinstance(c, int) for c in counts) and not 0 <= counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{at}: expected 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
    for name, group in groups(spec):
        problems += _group_problems(name, group, f"{where}[{name}]")
    return problems


def _group_problems(name: str, group: dict, at: str) -> list[str]:
    problems = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        return [f"{at}: rayStartParams missing"]
    container = ray_container(group)
    image = container.get("image")
    if not image:
        return problems + [f"{at}: the Ray container has no image"]
    res = container.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    for key in ("cpu", "memory"):
        if key not in limits:
            problems.append(f"{at}: resources.limits.{key} missing")
    if {k: str(v) for k, v in requests.items()} != {k: str(v) for k, v in limits.items()}:
        problems.append(f"{at}: resources.requests {requests} != limits {limits}")
    gpus = quantity(limits.get("nvidia.com/gpu", 0))
    tag = _TAG.fullmatch(image)
    gpu_image = bool(tag) and tag.group("platform") != "cpu"
    if "gpu" in name:
        if gpus <= 0:
            problems.append(f"{at}: a GPU group must request nvidia.com/gpu in its limits")
        if not gpu_image:
            problems.append(f"{at}: image {image}: a GPU group needs a -gpu/-cuXYZ image")
    elif gpus or gpu_image:
        problems.append(f"{at}: a CPU group with GPUs ({gpus:g}) or a GPU image ({image})")
    problems += _shm_problems(group, container, params, limits, at)
    return problems


def _shm_problems(group, container, params, limits, at) -> list[str]:
    """/dev/shm: a memory emptyDir at least as large as the object store, within the memory limit."""
    mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts") or []}
    if "/dev/shm" not in mounts:
        return [f"{at}: no volume mounted at /dev/shm (the object store lives there)"]
    volumes = {v.get("name"): v for v in (group["template"].get("spec") or {}).get("volumes") or []}
    empty_dir = (volumes.get(mounts["/dev/shm"]) or {}).get("emptyDir")
    if not isinstance(empty_dir, dict) or empty_dir.get("medium") != "Memory" or "sizeLimit" not in empty_dir:
        return [f"{at}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit"]
    size = quantity(empty_dir["sizeLimit"])
    problems = []
    if "object-store-memory" in params and size < int(params["object-store-memory"]):
        problems.append(f"{at}: /dev/shm sizeLimit {empty_dir['sizeLimit']} is smaller than "
                        f"object-store-memory {params['object-store-memory']}")
    if "memory" in limits and size >= quantity(limits["memory"]):
        problems.append(f"{at}: /dev/shm sizeLimit {empty_dir['sizeLimit']} leaves no memory under the "
                        f"limit {limits['memory']}")
    return problems


def resources(spec: dict, replicas: str = "replicas") -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees with each worker group at `replicas` (or minReplicas/maxReplicas)."""
    cpus = gpus = 0.0
    for name, group in groups(spec):
        count = 1 if name == "head" else group.get(replicas, 0)
        params = group.get("rayStartParams") or {}
        limits = (ray_container(group).get("resources") or {}).get("limits") or {}
        cpus += count * float(params.get("num-cpus", quantity(limits.get("cpu", 0))))
        gpus += count * float(params.get("num-gpus", quantity(limits.get("nvidia.com/gpu", 0))))
    return cpus, gpus


def entrypoint_problems(argv: list[str], where: str) -> list[str]:
    """`splitnet run CONFIG [key=value ...]`: CONFIG is in pipelines/configs/ and loads with the overrides."""
    from pipelines.config import ConfigError, load_config

    if argv[:2] != ["splitnet", "run"] or len(argv) < 3:
        return [f"{where}: expected `splitnet run CONFIG [key=value ...]`, got {shlex.join(argv)!r}"]
    config, overrides = argv[2], argv[3:]
    path = REPO / config
    if path.parent != REPO / "pipelines" / "configs" or not path.is_file():
        return [f"{where}: {config}: not a config in pipelines/configs/"]
    try:
        load_config(path, overrides)
    except ConfigError as e:
        return [f"{where}: {e}"]
    return []


def runtime_env_problems(env: dict, where: str) -> list[str]:
    """A KubeRay runtime_env: remote working_dir, pip pins like pyproject's, valid for Ray."""
    from ray.runtime_env import RuntimeEnv

    problems = []
    working_dir = str(env.get("working_dir", ""))
    if not re.match(r"(https|s3|gs)://", working_dir):
        problems.append(f"{where}: working_dir {working_dir!r}: KubeRay cannot upload a local folder, "
                        "use an https:// or s3:// archive")
    pip = env.get("pip") or {}
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    pinned = pinned_in(packages)
    for name in ("torch", "torchvision"):
        if name not in pinned:
            problems.append(f"{where}: pip does not pin {name} (pyproject: {name}=={pins()[name]})")
    problems += pin_problems(packages, where)
    try:
        RuntimeEnv(**env)
    except (ValueError, TypeError) as e:
        problems.append(f"{where}: Ray rejects the runtime_env: {e}")
    return problems


def launcher_schema() -> dict:
    """The cluster-launcher JSON schema shipped inside the installed ray package (no Ray import)."""
    import importlib.util

    root = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((root / "autoscaler" / "ray-schema.json").read_text())


def launcher_problems(cfg: dict, where: str) -> list[str]:
    """Ray's JSON schema, Ray's cross-field rules, images, GPU workers, pins, auth in start commands."""
    import jsonschema

    schema = launcher_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"{where}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in sorted(validator.iter_errors(cfg), key=str)]
    if problems:
        return problems
    types_ = cfg.get("available_node_types") or {}
    # The rules ray.autoscaler._private.util.validate_config adds to the schema.
    if cfg.get("head_node_type") not in types_:
        problems.append(f"{where}: head_node_type {cfg.get('head_node_type')!r} is not in available_node_types")
    if sum(t.get("min_workers", 0) for t in types_.values()) > cfg.get("max_workers", 0):
        problems.append(f"{where}: max_workers is smaller than the sum of min_workers")
    head = types_.get(cfg.get("head_node_type"), {})
    if head.get("resources", {}).get("CPU") != 0:
        problems.append(f"{where}: the head node type must advertise CPU 0 (no work on the head)")
    for name, node in types_.items():
        if node is head:
            continue
        image = (node.get("docker") or {}).get("worker_image") or (cfg.get("docker") or {}).get("image", "")
        tag = _TAG.fullmatch(image)
        gpu_image = bool(tag) and tag.group("platform") != "cpu"
        if "gpu" in name and (node.get("resources", {}).get("GPU", 0) <= 0 or not gpu_image):
            problems.append(f"{where}: node type {name} needs GPU resources and a -gpu/-cuXYZ image")
        if "gpu" not in name and (node.get("resources", {}).get("GPU", 0) or gpu_image):
            problems.append(f"{where}: CPU node type {name} has GPUs or a GPU image ({image})")
    pinned = pinned_in(cfg.get("setup_commands"))
    for name in ("torch", "torchvision", "ray"):
        if name not in pinned:
            problems.append(f"{where}: setup_commands do not pin {name} (pyproject: {name}=={pins()[name]})")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key, []) if "ray start" in c]
        if not starts or any("RAY_AUTH_MODE=token" not in c for c in starts):
            problems.append(f"{where}: {key}: every `ray start` must run with RAY_AUTH_MODE=token")
    return problems + image_problems(cfg, where) + pin_problems(cfg, where)


def short_of(cfg, cpus: float, gpus: float, monkeypatch) -> str:
    """pipelines.run's own resource check against a cluster of (cpus, gpus): '' if the run fits.

    A stand-in `ray` module answers cluster_resources(); nothing is started.
    """
    from pipelines.run import PipelineError, _check_resources

    strict = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, autoscale=False))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "ray", types.SimpleNamespace(cluster_resources=lambda: {"CPU": cpus, "GPU": gpus}))
        try:
            _check_resources(strict, log=lambda line: None)
        except PipelineError as e:
            return str(e)
    return ""


# ---------------------------------------------------------------------------------------------
# The files


def test_expected_files_exist_and_every_yaml_parses():
    names = {p.name for p in cluster_yaml_files()}
    assert {"raycluster.yaml", "rayjob.yaml", "launcher-aws.yaml"} <= names
    for path in cluster_yaml_files():
        load_yaml(path)  # raises on bad YAML or a non-mapping
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and re.search(r"\b(kubectl|ray|serve)\b", first), \
            f"{path.name}: the first line should be a comment with the command that uses the file"


def test_pyproject_pins_are_found():
    assert set(pins()) == {"torch", "torchvision", "ray"}, pins()
    by_regex = _pyproject_by_regex((REPO / "pyproject.toml").read_text())  # the Python 3.10 path
    assert {k: by_regex[k] for k in ("dependencies", "requires-python", "name")} == \
        {k: pyproject()[k] for k in ("dependencies", "requires-python", "name")}


@pytest.mark.parametrize("name", [p.name for p in cluster_yaml_files()])
def test_images_and_pins_match_pyproject(name):
    doc = cluster_docs()[name]
    assert image_problems(doc, name) == []
    assert pin_problems(doc, name) == []


def test_one_python_and_one_image_per_role_across_files():
    """Every image names the same Python; head / cpu-workers / gpu-workers run the same image everywhere."""
    pys, by_role = set(), {}
    for name, doc in cluster_docs().items():
        for image in images_in(doc):
            m = _TAG.fullmatch(image)
            if m:
                pys.add(m.group("py"))
        for where, spec in ray_cluster_specs(doc):
            for group_name, group in groups(spec):
                by_role.setdefault(group_name, set()).add(ray_container(group).get("image"))
        if "available_node_types" in doc:
            docker = doc.get("docker") or {}
            for type_name, node in doc["available_node_types"].items():
                image = docker.get("head_image") if type_name == doc.get("head_node_type") else \
                    (node.get("docker") or {}).get("worker_image") or docker.get("worker_image") or docker.get("image")
                by_role.setdefault(type_name, set()).add(image)
    assert len(pys) == 1, f"more than one Python across cluster/ images: {sorted(pys)}"
    assert {"head", "cpu-workers", "gpu-workers"} <= set(by_role)
    assert {role: images for role, images in by_role.items() if len(images) > 1} == {}


@pytest.mark.parametrize("name", sorted(kuberay_docs()))
def test_kuberay_resources(name):
    doc = kuberay_docs()[name]
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc.get("kind") in ("RayCluster", "RayJob", "RayService")
    assert (doc.get("metadata") or {}).get("name"), f"{name}: metadata.name missing"
    assert crd_problems(doc, name) == []
    specs = ray_cluster_specs(doc)
    assert specs, f"{name}: no Ray cluster spec"
    for where, spec in specs:
        assert cluster_spec_problems(spec, f"{name}:{where}") == []


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_cluster_has_autoscaled_cpu_and_gpu_groups(name):
    ((_, spec),) = ray_cluster_specs(cluster_docs()[name])
    assert spec.get("enableInTreeAutoscaling") is True
    assert (spec.get("authOptions") or {}).get("mode") == "token", "keep Ray token authentication on"
    by_name = dict(groups(spec))
    assert {"cpu-workers", "gpu-workers"} <= set(by_name)
    assert by_name["cpu-workers"]["maxReplicas"] > by_name["cpu-workers"]["minReplicas"], "cpu-workers should autoscale"
    assert quantity(ray_container(by_name["gpu-workers"])["resources"]["limits"]["nvidia.com/gpu"]) == 8


def test_rayjob_cluster_is_raycluster_yaml():
    """The RayJob's groups are raycluster.yaml's (images, pods, start params); only replica counts differ."""
    def shape(spec):
        drop = {"replicas", "minReplicas", "maxReplicas"}
        return {k: v for k, v in spec.items() if k != "workerGroupSpecs"}, \
            {g["groupName"]: {k: v for k, v in g.items() if k not in drop} for g in spec["workerGroupSpecs"]}

    ((_, cluster),) = ray_cluster_specs(cluster_docs()["raycluster.yaml"])
    ((_, job_cluster),) = ray_cluster_specs(cluster_docs()["rayjob.yaml"])
    assert shape(job_cluster) == shape(cluster)


def test_rayjob_spec():
    doc = cluster_docs()["rayjob.yaml"]
    spec = doc["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env_problems(env, "rayjob.yaml:runtimeEnvYAML") == []
    # One source for the code: the archive that is the working_dir is the one pip installs.
    project = [p for p in env["pip"]["packages"] if p.startswith(pyproject()["name"])]
    assert project and project[0].split("@", 1)[1].strip() == env["working_dir"]


def test_rayjob_entrypoint_loads():
    argv = shlex.split(cluster_docs()["rayjob.yaml"]["spec"]["entrypoint"])
    assert argv[2] == "pipelines/configs/imagenet22k-resnet50.yaml"
    assert entrypoint_problems(argv, "rayjob.yaml:entrypoint") == []


def test_pipelines_config_imports_no_ray():
    """The loader the tests (and `splitnet run --print-config`) use must not pull in Ray."""
    code = "import sys, pipelines.config; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_rayjob_cluster_holds_the_run_from_the_start(monkeypatch):
    """pipelines.run's resource check passes on the RayJob's cluster as created (before autoscaling)."""
    from pipelines.config import load_config

    doc = cluster_docs()["rayjob.yaml"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    cfg = load_config(REPO / argv[2], argv[3:])
    cpus, gpus = resources(doc["spec"]["rayClusterSpec"])
    assert gpus == cfg.scaling.num_workers * cfg.scaling.gpus_per_worker, "GPU pods should match the trainers"
    assert short_of(cfg, cpus, gpus, monkeypatch) == ""
    ((_, cluster),) = ray_cluster_specs(cluster_docs()["raycluster.yaml"])
    assert short_of(cfg, *resources(cluster, "maxReplicas"), monkeypatch) == "", \
        "raycluster.yaml at maxReplicas cannot hold the ImageNet-22K run"


def test_launcher_validates_against_rays_schema():
    cfg = cluster_docs()["launcher-aws.yaml"]
    assert launcher_problems(cfg, "launcher-aws.yaml") == []


def test_launcher_passes_rays_own_validation():
    """ray's validate_config (schema + its cross-field rules) on the config merged with AWS defaults, offline:
    it raises on a broken config (shown on one), and returns on ours."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    broken = copy.deepcopy(cluster_docs()["launcher-aws.yaml"])
    broken["max_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(fillout_defaults(broken))
    assert validate_config(fillout_defaults(copy.deepcopy(cluster_docs()["launcher-aws.yaml"]))) is None


def test_launcher_file_mounts_point_at_the_checkout():
    cfg = cluster_docs()["launcher-aws.yaml"]
    local = [v for v in cfg["file_mounts"].values() if not v.startswith("~")]
    assert local and all((REPO / v).resolve() == REPO for v in local), local
    assert ".gitignore" in cfg.get("rsync_filter", []), "without it the 5 GB .venv is copied to every node"
    assert any("~/splitnet-ray" in c and "pip install" in c for c in cfg["setup_commands"])


# ---------------------------------------------------------------------------------------------
# The commands in cluster/README.md: parsed with Ray's own CLI, entrypoints loaded


def readme_commands() -> list[list[str]]:
    """`ray ...` and `kubectl apply ...` lines of cluster/README.md's code blocks, as argv lists."""
    text = (CLUSTER / "README.md").read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            argv = [a for a in shlex.split(line, comments=True) if a != "&"]
            if argv[:1] == ["ray"] or argv[:2] == ["kubectl", "apply"]:
                out.append(argv)
    return out


def ray_cli_params(argv: list[str]) -> dict:
    """Parse a `ray ...` command line with Ray's click CLI (no command runs); click errors raise."""
    import click
    from ray.scripts.scripts import cli

    command, args = cli, argv[1:]
    while isinstance(command, click.Group):
        assert args and args[0] in command.commands, f"{shlex.join(argv)}: unknown ray subcommand"
        command, args = command.commands[args[0]], args[1:]
    return command.make_context(shlex.join(argv[:2]), list(args)).params


def readme_command_problems(argv: list[str]) -> list[str]:
    where = f"README: {shlex.join(argv)[:60]}"
    if argv[0] == "kubectl":
        files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-f"]
        return [f"{where}: {f} does not exist" for f in files if not (REPO / f).is_file()] or \
            ([] if files else [f"{where}: no -f FILE"])
    import click

    try:
        params = ray_cli_params(argv)
    except click.ClickException as e:
        return [f"{where}: {e.format_message()}"]
    problems = []
    if params.get("cluster_config_file") and not (REPO / params["cluster_config_file"]).is_file():
        problems.append(f"{where}: {params['cluster_config_file']} does not exist")
    if argv[1:3] == ["job", "submit"]:
        if params.get("working_dir") != ".":
            problems.append(f"{where}: submit from the repository root with --working-dir .")
        problems += entrypoint_problems(list(params["entrypoint"]), where)
        if params.get("runtime_env_json"):
            problems += pin_problems(json.loads(params["runtime_env_json"]), where)
    return problems


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, from importing Ray's CLI
def test_readme_commands_parse_and_point_at_real_files():
    commands = readme_commands()
    typed = {" ".join(a[:3]) for a in commands}
    assert {"ray up -y", "ray job submit"} <= typed, typed
    applied = {a[-1] for a in commands if a[0] == "kubectl"}
    assert {"cluster/raycluster.yaml", "cluster/rayjob.yaml"} <= applied, applied
    assert "cluster/launcher-aws.yaml" in {a[-1] for a in commands if a[:2] == ["ray", "up"]}
    problems = [p for argv in commands for p in readme_command_problems(argv)]
    assert problems == []


# ---------------------------------------------------------------------------------------------
# Broken copies: every check above fails when it should


def _set(doc: dict, path: tuple, value) -> dict:
    """A deep copy of doc with the key at path (keys and list indexes) set, or deleted if value is ...."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


CPU_GROUP = ("spec", "workerGroupSpecs", 0)
GPU_GROUP = ("spec", "workerGroupSpecs", 1)
GPU_CONTAINER = GPU_GROUP + ("template", "spec", "containers", 0)


SPEC_BREAKS = [
    (("spec", "rayVersion"), "2.59.0", "pyproject pins ray=="),
    (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), "1", 'num-cpus must be "0"'),
    (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, 'num-cpus must be "0"'),
    (("spec", "headGroupSpec"), ..., "headGroupSpec: missing"),
    (GPU_GROUP + ("minReplicas",), 9, "minReplicas <= replicas <= maxReplicas"),
    (GPU_GROUP + ("groupName",), "cpu-workers", "duplicate groupName"),
    (GPU_CONTAINER + ("image",), "rayproject/ray:2.60.0-py311-cpu", "needs a -gpu/-cuXYZ image"),
    (GPU_CONTAINER + ("resources", "limits", "nvidia.com/gpu"), ..., "must request nvidia.com/gpu"),
    (GPU_CONTAINER + ("resources", "requests", "cpu"), "44", "!= limits"),
    (GPU_CONTAINER + ("volumeMounts",), [], "no volume mounted at /dev/shm"),
    (GPU_GROUP + ("template", "spec", "volumes", 0, "emptyDir", "sizeLimit"), "64Gi", "smaller than object-store-memory"),
    (GPU_GROUP + ("template", "spec", "volumes", 0, "emptyDir", "sizeLimit"), "960Gi", "leaves no memory"),
    (CPU_GROUP + ("template", "spec", "containers", 0, "image"), "rayproject/ray:2.60.0-py311-gpu", "a CPU group with GPUs"),
]


@pytest.mark.parametrize("path, value, expected", SPEC_BREAKS, ids=[e for _, _, e in SPEC_BREAKS])
def test_cluster_spec_check_catches(path, value, expected):
    doc = cluster_docs()["raycluster.yaml"]
    assert cluster_spec_problems(doc["spec"], "ok") == []
    problems = cluster_spec_problems(_set(doc, path, value)["spec"], "broken")
    assert any(expected in p for p in problems), problems


CRD_BREAKS = [
    (("spec", "enableInTreeAutoscalling"), True, "Additional properties are not allowed ('enableInTreeAutoscalling'"),
    (GPU_GROUP + ("maxReplicas",), ..., "'maxReplicas' is a required property"),
    (GPU_GROUP + ("rayStartParams", "object-store-memory"), 274877906944, "274877906944 is not of type 'string'"),
    (GPU_GROUP + ("replicas",), "2", "'2' is not of type 'integer'"),
    (GPU_CONTAINER + ("env",), "RAY_DEDUP_LOGS=0", "'RAY_DEDUP_LOGS=0' is not of type 'array'"),
    (GPU_CONTAINER + ("resources", "limitz"), {"cpu": "1"}, "Additional properties are not allowed ('limitz'"),
]


@pytest.mark.parametrize("path, value, expected", CRD_BREAKS, ids=[e.split(" ")[0] for _, _, e in CRD_BREAKS])
def test_crd_check_catches(path, value, expected):
    """KubeRay's own schema (made strict on unknown fields) catches what the hand checks no longer do."""
    doc = cluster_docs()["raycluster.yaml"]
    assert crd_problems(doc, "ok") == []
    problems = crd_problems(_set(doc, path, value), "broken")
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("old, new, expected", [
    ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.59.0-py311-gpu", "pyproject pins ray=="),
    ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:latest-gpu", "expected rayproject/ray:VERSION"),
    ("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py39-gpu", "below requires-python"),
])
def test_image_check_catches(old, new, expected):
    broken = yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text().replace(old, new))
    problems = image_problems(broken, "broken")
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("old, new", [
    ("torch==2.14.1", "torch==2.13.0"),
    ("torchvision==0.29.1", "torchvision==0.28.0"),
    ('"ray[train,serve]==2.60.0"', '"ray[train,serve]==2.59.1"'),
])
def test_pin_check_catches(old, new):
    text = (CLUSTER / "launcher-aws.yaml").read_text()
    assert old in text
    problems = pin_problems(yaml.safe_load(text.replace(old, new)), "broken")
    assert any(new.strip('"') in p for p in problems), problems


def test_schema_check_catches_broken_launcher_copies():
    cfg = cluster_docs()["launcher-aws.yaml"]
    misspelt = {("setup_command" if k == "setup_commands" else k): v for k, v in cfg.items()}
    no_resources = _set(cfg, ("available_node_types", "gpu-workers", "resources"), ...)
    fractional = _set(cfg, ("available_node_types", "gpu-workers", "resources"), {"CPU": 96, "GPU": 0.5})
    bad_docker = _set(cfg, ("docker", "gpu_image"), "rayproject/ray:2.60.0-py311-gpu")
    for broken, expected in [(misspelt, "setup_command"), (no_resources, "'resources' is a required property"),
                             (fractional, "is not of type 'integer'"), (bad_docker, "gpu_image")]:
        problems = launcher_problems(broken, "broken")
        assert any(expected in p for p in problems), (expected, problems)


def test_launcher_rules_catch():
    cfg = cluster_docs()["launcher-aws.yaml"]
    cases = [
        (_set(cfg, ("head_node_type",), "gpu-workers"), "CPU 0"),
        (_set(cfg, ("head_node_type",), "nope"), "not in available_node_types"),
        (_set(_set(cfg, ("available_node_types", "cpu-workers", "min_workers"), 2), ("max_workers",), 1),
         "smaller than the sum of min_workers"),
    ]
    for broken, expected in cases:
        problems = launcher_problems(broken, "broken")
        assert any(expected in p for p in problems), (expected, problems)


def test_launcher_checks_catch_missing_auth_pins_and_cpu_gpu_mixups():
    cfg = cluster_docs()["launcher-aws.yaml"]
    cases = [
        (_set(cfg, ("worker_start_ray_commands",), [c.replace("RAY_AUTH_MODE=token ", "")
                                                    for c in cfg["worker_start_ray_commands"]]), "RAY_AUTH_MODE=token"),
        (_set(cfg, ("setup_commands",), ["pip install torch torchvision ~/splitnet-ray"]), "do not pin torch"),
        (_set(cfg, ("available_node_types", "gpu-workers", "resources"), {"CPU": 96}), "needs GPU resources"),
        (_set(cfg, ("available_node_types", "cpu-workers", "docker", "worker_image"), "rayproject/ray:2.60.0-py311-gpu"),
         "has GPUs or a GPU image"),
    ]
    for broken, expected in cases:
        problems = launcher_problems(broken, "broken")
        assert any(expected in p for p in problems), (expected, problems)


def test_entrypoint_check_catches():
    good = shlex.split(cluster_docs()["rayjob.yaml"]["spec"]["entrypoint"])
    cases = [
        (["python", "train.py"], "expected `splitnet run CONFIG"),
        (["splitnet", "run", "pipelines/configs/imagenet22k.yaml"], "not a config in pipelines/configs/"),
        (good + ["scaling.num_workerz=8"], "unknown key scaling.num_workerz"),
        (good + ["scaling.backend=mpi"], "scaling.backend"),
    ]
    for argv, expected in cases:
        problems = entrypoint_problems(argv, "broken")
        assert any(expected in p for p in problems), (expected, problems)


def test_runtime_env_check_catches():
    env = yaml.safe_load(cluster_docs()["rayjob.yaml"]["spec"]["runtimeEnvYAML"])
    cases = [
        ({**env, "working_dir": "."}, "cannot upload a local folder"),
        ({**env, "pip": {"packages": ["torch", "torchvision==0.29.1"]}}, "does not pin torch"),
        ({**env, "pip": {"packages": ["torch==2.13.0", "torchvision==0.29.1"]}}, "pyproject pins torch=="),
        ({**env, "working_dir": "https://example.com/splitnet.tar.bz2"}, "Ray rejects the runtime_env"),
    ]
    for broken, expected in cases:
        problems = runtime_env_problems(broken, "broken")
        assert any(expected in p for p in problems), (expected, problems)


def test_resource_check_catches_a_cluster_too_small(monkeypatch):
    from pipelines.config import load_config

    argv = shlex.split(cluster_docs()["rayjob.yaml"]["spec"]["entrypoint"])
    cfg = load_config(REPO / argv[2], argv[3:])
    job_cluster = cluster_docs()["rayjob.yaml"]["spec"]["rayClusterSpec"]
    one_gpu_pod = _set(job_cluster, ("workerGroupSpecs", 1, "replicas"), 1)
    assert "GPUs" in short_of(cfg, *resources(one_gpu_pod), monkeypatch)
    assert "CPU" in short_of(cfg, 100, 16, monkeypatch)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_readme_command_check_catches():
    cases = [
        (["ray", "up", "-y", "cluster/launcher-gcp.yaml"], "does not exist"),
        (["ray", "up", "--yess", "cluster/launcher-aws.yaml"], "--yess"),
        (["kubectl", "apply", "-f", "cluster/rayjobs.yaml"], "does not exist"),
        (["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
          "splitnet", "run", "pipelines/configs/imagenet22k-resnet50.yaml", "group.epochz=1"], "unknown key group.epochz"),
        (["ray", "job", "submit", "--working-dir", "src", "--", "splitnet", "run",
          "pipelines/configs/demo.yaml"], "--working-dir ."),
    ]
    for argv, expected in cases:
        problems = readme_command_problems(argv)
        assert any(expected in p for p in problems), (expected, problems)
