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

import json
import os
import shutil
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from splitnet.train import _clock

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


STATUS_MARK = "\x1e"  # a posted line that is a status (progress inside an epoch), JSON after the mark


def say_status(status: dict, actor_name: str | None) -> None:
    """A worker's progress inside an epoch (:class:`StepProgress`): the driver shows it as a line
    (or, on an interactive terminal, as a bar rewritten in place)."""
    say(STATUS_MARK + json.dumps(status), actor_name)


def format_status(st: dict, bar_width: int = 0) -> str:
    """``[baseline] epoch 2/5: step 40/78 | 312 img/s | ETA epoch 0:12, stage 2:40``; with
    ``bar_width``, a bar in place of the step count's percentage. Distinct from an epoch line
    (``[stage] epoch 2/5 | ...``): the colon after the epoch."""
    head = f"[{st['stage']}] epoch {st['epoch']}/{st['epochs']}:"
    step, steps = st["step"], max(st["steps"], 1)
    if bar_width:
        filled = int(bar_width * min(step / steps, 1.0))
        head += f" [{'#' * filled}{'.' * (bar_width - filled)}]"
    parts = [f"{head} step {step}/{steps}"]
    if st.get("phase") == "validate":
        parts.append("validating")
    elif st.get("waiting_s") is not None:
        waited = st["waiting_s"]
        parts.append(f"no batch for {waited:.1f}s" if waited < 10 else f"no batch for {waited:.0f}s")
        parts[-1] += " (waiting for the data stream)"
    elif st.get("running_s") is not None:
        ran = st["running_s"]
        parts.append(f"step {step + 1} running for {ran:.1f}s" if ran < 10 else f"step {step + 1} running for {ran:.0f}s")
    if st.get("images_per_s"):
        parts.append(f"{st['images_per_s']:.0f} img/s")
    if st.get("eta_epoch_s") is not None:
        parts.append(f"ETA epoch {_clock(st['eta_epoch_s'])}, stage {_clock(st['eta_stage_s'])}")
    return " | ".join(parts)


class StepProgress:
    """Rank 0's progress inside an epoch, said every ``interval_s`` seconds by a background thread:
    step i/N, images/s (this worker's rate x the workers), the ETA of the epoch and of the stage, and,
    when nothing finished for an interval, which of the two is slow: the data stream (no batch has
    arrived for N s) or the step itself (step i+1 running for N s: a big model on a small CPU).
    ``batches(iterable)`` wraps the epoch's batches to tell the two apart; ``step(i)`` after each
    training step; ``validating()`` once the epoch's steps are done; ``close()`` at the stage's end.
    ``interval_s`` <= 0: nothing is said."""

    def __init__(self, say_status: Callable[[dict], None], stage: str, epochs: int, steps: int, images_per_step: int,
                 interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.emit, self.clock = say_status, clock
        self.stage, self.epochs, self.steps, self.images_per_step = stage, epochs, steps, images_per_step
        self.interval = interval_s
        self.lock = threading.Lock()
        self.epoch = 0
        self.done = 0                # steps of this epoch done (resumed ones included)
        self.timed = 0               # steps timed since the epoch (re)started here
        self.started = self.last_step = clock()
        self.fetch_since: float | None = None  # when the loop asked for the batch it still waits for
        self.batch_at: float | None = None     # when the batch being trained on arrived
        self.phase = "train"
        self.stop = threading.Event()
        self.thread = None
        if interval_s > 0:
            self.thread = threading.Thread(target=self._run, name="splitnet-step-progress", daemon=True)
            self.thread.start()

    def start_epoch(self, epoch: int, done: int = 0, steps: int | None = None, images_per_step: int | None = None) -> None:
        """Epoch ``epoch`` (0-based) begins, ``done`` of its steps already done (a resumed epoch); ``steps``
        / ``images_per_step``: this epoch's, where they change within the stage (the control's phases)."""
        with self.lock:
            self.epoch, self.done, self.timed, self.phase = epoch, done, 0, "train"
            self.steps = steps or self.steps
            self.images_per_step = images_per_step or self.images_per_step
            self.started = self.last_step = self.clock()
            self.fetch_since = self.batch_at = None

    def batches(self, batches: Iterable) -> Iterator:
        """``batches``, noting how long each ``next()`` waits (the data stream) apart from the steps."""
        it = iter(batches)
        while True:
            with self.lock:
                self.fetch_since = self.clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                with self.lock:
                    self.fetch_since, self.batch_at = None, self.clock()
            yield batch

    def step(self, done: int) -> None:
        with self.lock:
            self.done = done
            self.timed += 1
            self.last_step = self.clock()

    def validating(self) -> None:
        with self.lock:
            self.phase = "validate"

    def status(self) -> dict:
        with self.lock:
            now = self.clock()
            st = {"stage": self.stage, "epoch": self.epoch + 1, "epochs": self.epochs, "step": self.done,
                  "steps": self.steps, "phase": self.phase}
            if self.timed:
                per_step = (self.last_step - self.started) / self.timed
                left = self.steps - self.done
                st.update(images_per_s=self.images_per_step / max(per_step, 1e-9), eta_epoch_s=left * per_step,
                          eta_stage_s=(left + (self.epochs - self.epoch - 1) * self.steps) * per_step)
            if self.phase == "train" and self.interval > 0:
                if self.fetch_since is not None:
                    if now - self.fetch_since >= self.interval:
                        st["waiting_s"] = now - self.fetch_since
                else:
                    since = self.batch_at if self.batch_at is not None and self.batch_at > self.last_step else self.last_step
                    if now - since >= self.interval:
                        st["running_s"] = now - since
            return st

    def due(self) -> dict | None:
        """The status to say now, or None when there is nothing to say yet (an epoch just began)."""
        st = self.status()
        if st["phase"] == "train" and not {"images_per_s", "waiting_s", "running_s"} & set(st):
            return None
        return st

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                st = self.due()
                if st is not None:
                    self.emit(st)
            except Exception:  # noqa: BLE001 - progress must never fail a stage
                return

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class TerminalLog:
    """The driver's lines on ``out``; ``status(dict)`` shows a progress status: on an interactive
    terminal as a bar rewritten in place (cleared before the next line), elsewhere (a log file, a
    pipe, CI) as a line of its own."""

    def __init__(self, out, interactive: bool | None = None):
        self.out = out
        self.interactive = out.isatty() if interactive is None else interactive
        self.showing = False
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            if self.showing:
                self.out.write("\r\x1b[K")
                self.showing = False
            self.out.write(line + "\n")
            self.out.flush()

    def status(self, st: dict) -> None:
        with self.lock:
            if not self.interactive:
                self.out.write(format_status(st) + "\n")
            else:
                width = shutil.get_terminal_size((100, 20)).columns
                self.out.write("\r\x1b[K" + format_status(st, bar_width=20)[:max(width - 1, 20)])
                self.showing = True
            self.out.flush()

    def close(self) -> None:
        with self.lock:
            if self.showing:
                self.out.write("\r\x1b[K")
                self.out.flush()
                self.showing = False


def say(line: str, actor_name: str | None) -> None:
    """A progress line from a worker: to the driver's terminal through the run's
    :class:`ProgressLog` actor, or to stdout where there is none (a loop run outside ``splitnet run``)."""
    import ray

    try:
        if not actor_name:
            raise ValueError("no progress actor")
        actor = ray.get_actor(actor_name)
    except (ValueError, RuntimeError):
        if line.startswith(STATUS_MARK):
            line = format_status(json.loads(line[len(STATUS_MARK):]))
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return
    actor.post.remote(line)  # in order: tasks from one caller to one actor run in submission order


class Printer:
    """Driver side: prints the workers' lines as they arrive (a polling thread) and the driver's
    own lines, one at a time, in order. ``flush()`` before a line that must come after theirs."""

    def __init__(self, log: Callable[[str], None], interval: float = 0.5):
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
                if line.startswith(STATUS_MARK):
                    status = json.loads(line[len(STATUS_MARK):])
                    show = getattr(self.log, "status", None)
                    self.log(format_status(status)) if show is None else show(status)
                else:
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
        if hasattr(self.log, "close"):  # a bar left on the terminal
            self.log.close()


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
