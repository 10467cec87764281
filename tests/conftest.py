import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# every run in the tests computes in fp32, whatever this machine's CPU: `amp: auto` would pick bf16 on
# a CPU with AMX and fp32 on one without, and a suite must not take 2x as long (or compare other
# numbers) on one kind of runner. The precision choice itself is tested with the check injected
# both ways (test_precision.py); subprocesses and Ray workers inherit this.
os.environ.setdefault("SPLITNET_NATIVE_BF16", "0")
ROOT = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("SPLITNET_CIFAR100", ROOT.parent / "shared" / "data" / "cifar100"))


# The fast tier (`make test-fast`: `pytest -m "not integration"`) leaves out what starts real components:
# every test that uses the session's Ray (directly or through another fixture) is marked here, and the
# tests that run subprocesses, HTTP servers or whole pipelines carry `@pytest.mark.integration` (or a
# module-level `pytestmark`).
INTEGRATION_FIXTURES = {"ray_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model, seed: int = 0):
    """Random assignments and BatchNorm statistics, so equivalence tests are not trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.assignments.names():
            logit = model.assignments.logit(name)
            logit.copy_(torch.randn(logit.shape, generator=g) * 3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_PORTS: dict[str, int] = {}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting Ray costs 5-8 s). The dashboard is on (the
    `serve deploy` REST API lives there) and so is the Prometheus endpoint; their ports are free
    ones, recorded in RAY_PORTS, so another Ray on the machine cannot collide with them."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    pythonpath = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    RAY_PORTS.update(dashboard=free_port(), metrics=free_port())
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=RAY_PORTS["dashboard"], _metrics_export_port=RAY_PORTS["metrics"], log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                       "SPLITNET_NATIVE_BF16": os.environ["SPLITNET_NATIVE_BF16"]}})
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
