"""What the CPU rehearsals of the full-size recipes share: `splitnet` run as users run it against the
session's Ray, and the cut tree served and asked over HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ROOT, free_port


def env(ray_cluster) -> dict:
    """The environment of a `splitnet` command joining the session's Ray."""
    return {**os.environ, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "SPLITNET_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "MPLBACKEND": "Agg",
            "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def splitnet(*args, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``splitnet ARGS`` as a subprocess; fails the test with its output unless it exits 0."""
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"splitnet {args[0]} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    """POST a JPEG; (status, JSON answer), 4xx/5xx included."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def vm_hwm_bytes(pid: int) -> int:
    """A process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@contextlib.contextmanager
def served(ray_cluster, run_dir: Path, name: str):
    """`splitnet serve RUN_DIR` as an application ``name`` at ``/name``; yields its URL, deletes it after.

    Serve's HTTP port is fixed once it runs: the session's is used, or Serve is started here on a
    free port and shut down after."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    started_here = client is None
    port = free_port() if started_here else client.http_config.port
    e = env(ray_cluster)
    try:
        out = splitnet("serve", run_dir, "--address", e["RAY_ADDRESS"], "--name", name, "--route-prefix", f"/{name}",
                       "--port", port, "--trunk-cpus", "0.1", "--subtree-cpus", "0.1", env=e, timeout=600)
        assert f"at http://127.0.0.1:{port}/{name}" in out.stdout, out.stdout
        yield f"http://127.0.0.1:{port}/{name}"
    finally:
        try:
            serve.delete(name)
        finally:
            if started_here:
                serve.shutdown()
