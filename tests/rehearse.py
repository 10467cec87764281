"""What the CPU rehearsals of the full-size recipes share: `splitnet` run as users run it against the
session's Ray, and the cut tree served and asked over HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
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


def wait_for(predicate, what: str, timeout: float = 600, alive=lambda: True) -> None:
    """Poll ``predicate`` every 0.2 s; fail naming ``what`` on timeout or when ``alive()`` turns false."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive():
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class RayStartHead:
    """`ray start --head --block` on ports of its own, as a user starts a cluster, with the job
    server's address in ``job_env`` for `ray job submit`.

    The test session's cluster already holds Ray's default ports (e.g. the dashboard agent's
    52365); a head whose job agent cannot bind never accepts a job, and a `--block` head whose Ray
    client server cannot bind its port (10001 by default) stops all its processes a second after
    it started; its workers take ports from a range the session's cluster does not use. A port
    picked free can be taken by another process before the head binds it (a race no choice of
    ports rules out on a busy machine): a head that stops before its job server answers is
    started again on new ports, at most 3 times; every log of one that stopped is in the failure.
    """

    def __init__(self, workdir: Path, env: dict, num_cpus: int = 2):
        self.ray = Path(sys.executable).parent / "ray"
        self.workdir, self.num_cpus = workdir, num_cpus
        # the cluster's processes see this environment's `splitnet` on PATH, as on a user's cluster image
        self.env = {**env, "RAY_AUTH_MODE": "token",
                    "PATH": f"{self.ray.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, attempt: int) -> None:
        import socket
        import tempfile

        def free() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        port, dash = free(), free()
        ports = [f"--{name}={free()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "node-manager-port", "object-manager-port", "ray-client-server-port")]
        ports += ["--min-worker-port=20002", "--max-worker-port=29999"]
        self.log = self.workdir / f"head{attempt}.log"
        self.proc = subprocess.Popen(
            [str(self.ray), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}", *ports],
            cwd=self.workdir, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.job_env = {**self.env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # --block: the head's reaper stops every process it started
            self.proc.wait(timeout=60)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive(self) -> bool:
        """True while the head runs; a head that stopped says which of its processes exited and why."""
        if self.proc.poll() is None:
            return True
        raise AssertionError(f"`ray start --head` exited ({self.proc.returncode}):\n"
                             + self.log.read_text(errors="replace")[-4000:])

    def __enter__(self) -> "RayStartHead":
        stopped: list[str] = []
        for attempt in range(3):
            self._start(attempt)

            def dashboard_up():
                return subprocess.run([str(self.ray), "job", "list"], env=self.job_env, capture_output=True).returncode == 0

            try:
                wait_for(dashboard_up, "the head's job server", timeout=180, alive=lambda: self.proc.poll() is None)
                return self
            except AssertionError as e:
                if self.proc.poll() is None:  # up but never answering: no port race, nothing to retry
                    self.stop()
                    raise AssertionError(f"{e}:\n" + self.log.read_text(errors="replace")[-3000:]) from None
                stopped.append(f"attempt {attempt + 1}: {e}; `ray start --head` exited ({self.proc.poll()}):\n"
                               + self.log.read_text(errors="replace")[-3000:])
                self.stop()
        raise AssertionError("\n\n".join(stopped))

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, job_id: str, entrypoint: list[str], timeout: float = 900) -> tuple[str, str]:
        """`ray job submit --no-wait --working-dir ROOT -- ENTRYPOINT` (retried until the head's job
        agent, which comes up a little after its HTTP server, accepts it), then its logs followed to
        the end; returns (logs, `ray job status` output)."""
        submit = [str(self.ray), "job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", str(ROOT),
                  "--", *entrypoint]

        def submitted():
            r = subprocess.run(submit, cwd=ROOT, env=self.job_env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 or "No available agent" in r.stderr, r.stderr[-2000:]
            return r.returncode == 0

        wait_for(submitted, "the job to be accepted", timeout=300, alive=self.alive)
        logs = subprocess.run([str(self.ray), "job", "logs", "--follow", job_id], env=self.job_env, capture_output=True,
                              text=True, timeout=timeout)
        status = subprocess.run([str(self.ray), "job", "status", job_id], env=self.job_env, capture_output=True,
                                text=True, timeout=60)
        return logs.stdout, status.stdout + status.stderr
