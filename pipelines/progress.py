"""What a successful ``splitnet run`` prints, and where everything else goes.

A run prints a header, one line per epoch of each stage (from rank 0 only), the stage summaries
and the final verdict. Ray's own output (Train's per-report lines, Data's progress and
deprecation warnings, core-worker log lines, tracebacks of Ray's background threads) goes to the
run's ``logs/`` folder instead; the header names it. ``--verbose`` (or ``SPLITNET_VERBOSE=1``)
brings Ray's output back to the terminal.

Epoch lines travel from the workers through a named actor (:class:`ProgressLog`), not through
Ray's worker-to-driver log forwarding: that forwarding carries everything a worker prints, and a
run that keeps it off must still show its progress.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

_HANDLES: list = []  # a named actor lives as long as its creating handle


def verbose() -> bool:
    return os.environ.get("SPLITNET_VERBOSE", "0") not in ("", "0", "false", "no")


class ProgressLog:
    """Ray actor (no CPU): workers :meth:`post` lines, the driver :meth:`drain` s them in order."""

    def __init__(self):
        self.lines: list[str] = []

    def post(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def say(line: str, actor_name: str | None) -> None:
    """A progress line from a worker: to the driver's terminal through the run's
    :class:`ProgressLog` actor, or to stdout where there is none (a loop run outside ``splitnet run``)."""
    import ray

    try:
        if not actor_name:
            raise ValueError("no progress actor")
        actor = ray.get_actor(actor_name)
    except (ValueError, RuntimeError):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return
    actor.post.remote(line)  # in order: tasks from one caller to one actor run in submission order


class Printer:
    """Driver side: prints the workers' lines as they arrive (a polling thread) and the driver's
    own lines, one at a time, in order. ``flush()`` before a line that must come after theirs."""

    def __init__(self, log: Callable[[str], None], interval: float = 0.5):
        import uuid

        import ray

        self.log = log
        self.interval = interval
        self.lock = threading.Lock()
        # one actor per run: two runs on one cluster must not print each other's lines
        self.name = f"splitnet-progress-{uuid.uuid4().hex[:12]}"
        self.actor = ray.remote(num_cpus=0)(ProgressLog).options(name=self.name).remote()
        _HANDLES.append(self.actor)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="splitnet-progress", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # the cluster is going away: the driver prints what is left itself
                return

    def flush(self) -> None:
        import ray

        with self.lock:
            for line in ray.get(self.actor.drain.remote()):
                self.log(line)

    def __call__(self, line: str) -> None:
        try:
            self.flush()
        except Exception:
            pass
        with self.lock:
            self.log(line)

    def close(self) -> None:
        import ray

        self.stop.set()
        self.thread.join(timeout=5)
        try:
            self.flush()
            ray.kill(self.actor)
        except Exception:
            pass
        if self.actor in _HANDLES:
            _HANDLES.remove(self.actor)


class QuietRun:
    """Send the process's file descriptors 1 and 2 (Ray's C++ logging, the raylet's messages to
    the driver, Python warnings, background threads' tracebacks, Ray's Python loggers) to
    ``logs_dir/driver.log``; ``user_out`` / ``user_err`` still reach the real terminal, for the
    lines a user must see. Undone by :meth:`restore`."""

    def __init__(self, logs_dir: Path):
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.path = logs_dir / "driver.log"
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.user_out = os.fdopen(os.dup(1), "w", buffering=1)
        self.user_err = os.fdopen(os.dup(2), "w", buffering=1)
        self.file = open(self.path, "a", buffering=1)
        self.file.write(f"---- splitnet run, {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}\n")
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        self._thread_hook = threading.excepthook
        threading.excepthook = self._thread_exception  # Ray Data's pool threads end with tracebacks at shutdown

    def _thread_exception(self, args) -> None:
        import traceback

        self.file.write(f"exception in thread {args.thread.name if args.thread else '?'}:\n")
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback, file=self.file)

    def restore(self) -> None:
        # Ray's driver threads (e.g. the raylet's "N PYTHON worker processes have been started"
        # warning) print until Ray shuts down, and at exit: shut it down while the output still goes
        # to the log (joining a cluster, this only disconnects; the process ends right after)
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception as e:  # the run's result is already reported; say it in the log only
            print(f"ray.shutdown failed: {e!r}", file=self.file)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        threading.excepthook = self._thread_hook
        self.file.flush()


def link_ray_logs(logs_dir) -> str | None:
    """``logs_dir/ray`` -> this Ray session's log folder (local runs); returns that folder."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        return None
    target = Path(session) / "logs"
    link = Path(logs_dir) / "ray"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        pass
    return str(target)
