"""Progress inside an epoch: rank 0's status every few seconds (step i/N, images/s, ETA of the
epoch and of the stage, or how long no batch came), shown as a line in a log and as a bar rewritten
in place on an interactive terminal. The end-to-end run that prints them is in test_run.py."""
from __future__ import annotations

import io
import json

from pipelines.progress import STATUS_MARK, StepProgress, TerminalLog, format_status


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_status_counts_steps_rate_and_etas():
    clock = Clock()
    said = []
    p = StepProgress(said.append, "baseline", epochs=5, steps=78, images_per_step=128, interval_s=0, clock=clock)
    p.start_epoch(1)  # the second epoch
    assert p.due() is None  # nothing to say yet
    for i in range(1, 11):
        clock.t += 0.5
        p.step(i)
    st = p.due()
    assert st["epoch"] == 2 and st["step"] == 10 and st["steps"] == 78
    assert abs(st["images_per_s"] - 256) < 1e-6  # 128 images per 0.5 s
    assert abs(st["eta_epoch_s"] - 68 * 0.5) < 1e-6
    assert abs(st["eta_stage_s"] - (68 + 3 * 78) * 0.5) < 1e-6
    line = format_status(st)
    assert line == "[baseline] epoch 2/5: step 10/78 | 256 img/s | ETA epoch 0:34, stage 2:31"
    assert said == []  # interval 0: no thread, nothing said by itself


def test_a_stalled_stream_and_a_slow_step_are_told_apart():
    clock = Clock()
    p = StepProgress(lambda st: None, "group", epochs=3, steps=78, images_per_step=128, interval_s=30, clock=clock)
    said_while_waiting = []

    def stream():  # the data stream delivers the first batch after 45 s
        clock.t += 45
        said_while_waiting.append(p.due())
        yield "batch"

    try:
        p.start_epoch(0, done=12)  # resumed mid-epoch
        batches = p.batches(stream())
        assert next(batches) == "batch"
        st = said_while_waiting[0]
        assert st["step"] == 12 and st["waiting_s"] == 45 and "running_s" not in st
        assert "no batch for 45s (waiting for the data stream)" in format_status(st)
        # the batch is in: 50 s later the step still runs (a big model on a small CPU), the stream is not to blame
        clock.t += 50
        st = p.due()
        assert st["running_s"] == 50 and "waiting_s" not in st
        line = format_status(st)
        assert "step 13 running for 50s" in line and "data stream" not in line
        p.step(13)
        clock.t += 10  # under the interval: nothing to flag
        assert not {"waiting_s", "running_s"} & set(p.due())
        p.validating()
        clock.t += 40
        assert "validating" in format_status(p.due()) and not {"waiting_s", "running_s"} & set(p.due())
    finally:
        p.close()


def test_the_thread_says_statuses_until_closed():
    import threading

    said, got = [], threading.Event()

    def emit(st):
        said.append(st)
        got.set()

    p = StepProgress(emit, "finetune", epochs=2, steps=10, images_per_step=32, interval_s=0.05)
    p.start_epoch(0)
    p.step(1)
    assert got.wait(5)
    p.close()
    n = len(said)
    assert said[0]["stage"] == "finetune" and said[0]["step"] == 1
    assert not p.thread.is_alive() and len(said) == n


def test_log_gets_lines_and_a_terminal_gets_a_bar_in_place():
    st = {"stage": "baseline", "epoch": 1, "epochs": 5, "step": 39, "steps": 78, "phase": "train",
          "images_per_s": 300.0, "eta_epoch_s": 17.0, "eta_stage_s": 170.0}
    out = io.StringIO()
    log = TerminalLog(out, interactive=False)
    log("[baseline] 5 epochs x 78 steps")
    log.status(st)
    log("[baseline] epoch 1/5 | loss 2.5")
    assert out.getvalue().splitlines() == ["[baseline] 5 epochs x 78 steps",
                                           "[baseline] epoch 1/5: step 39/78 | 300 img/s | ETA epoch 0:17, stage 2:50",
                                           "[baseline] epoch 1/5 | loss 2.5"]
    tty = io.StringIO()
    log = TerminalLog(tty, interactive=True)
    log.status(st)
    log.status({**st, "step": 78})
    log("[baseline] epoch 1/5 | loss 2.5")
    log.close()
    text = tty.getvalue()
    # the bar is rewritten in place (carriage return + clear line), then cleared for the epoch line
    assert text.count("\r\x1b[K") == 3 and "[##########..........] step 39/78" in text
    assert "[####################] step 78/78" in text
    assert text.endswith("\r\x1b[K[baseline] epoch 1/5 | loss 2.5\n")


def test_a_status_said_outside_a_run_is_a_readable_line(capsys):
    from pipelines.progress import say

    say(STATUS_MARK + json.dumps({"stage": "group", "epoch": 1, "epochs": 2, "step": 3, "steps": 4, "phase": "train",
                                  "images_per_s": 10.0, "eta_epoch_s": 1.0, "eta_stage_s": 5.0}), None)
    assert capsys.readouterr().out == "[group] epoch 1/2: step 3/4 | 10 img/s | ETA epoch 0:01, stage 0:05\n"
