"""splitnet.schedule: the stage's learning rate as a torch LR scheduler whose state is the step."""
import json
import math

import pytest
import torch

from splitnet.schedule import Phase, PhaseSchedule
from splitnet.train import train_one_epoch


def _opt(lr=0.1, mult=10.0):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": lr}, {"params": [b], "lr": lr * mult, "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, weight_decay=5e-4)


def _walk(opt, schedule, steps):
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    return lrs


def test_cosine_keeps_each_groups_ratio_and_ends_at_zero():
    opt = _opt()
    lrs = _walk(opt, PhaseSchedule(opt, [Phase(2, 5)]), 10)
    assert lrs[0] == pytest.approx([0.1, 1.0])
    assert all(b == pytest.approx(10 * a) for a, b in lrs)  # a multiplier (the assignments') is kept
    assert [a for a, _ in lrs] == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])


def test_resumed_from_its_json_state_it_continues_the_same_curve():
    phases = [Phase(2, 5, lr=0.1, warmup_epochs=0.4), Phase(1, 8, lr=0.02, momentum=0.5, weight_decay=1e-3)]
    opt = _opt()
    schedule = PhaseSchedule(opt, phases)
    whole = _walk(opt, schedule, 18)
    opt2 = _opt()
    first = PhaseSchedule(opt2, phases)
    part = _walk(opt2, first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's progress.json holds
    opt3 = _opt()
    resumed = PhaseSchedule(opt3, phases)
    resumed.load_state_dict(state)
    assert sum(part + _walk(opt3, resumed, 11), []) == pytest.approx(sum(whole, []))
    assert sum([schedule.lrs_at(s) for s in range(18)], []) == pytest.approx(sum(whole, []))  # any step's, closed form
    # in the second phase: its lr (the multiplier kept), momentum, and weight decay on the decayed group only
    assert whole[10] == pytest.approx([0.02, 0.2])
    assert [(g["momentum"], g["weight_decay"]) for g in opt3.param_groups] == [(0.5, 1e-3), (0.5, 0.0)]


def test_train_one_epoch_steps_the_scheduler_after_each_step():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = PhaseSchedule(opt, [Phase(1, 4, schedule="step", milestones=(0.5,), gamma=0.5)])
    seen = []
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))] * 4
    train_one_epoch(model, batches, opt, scheduler=schedule, after_step=lambda i: seen.append(opt.param_groups[0]["lr"]))
    assert seen == [1.0, 0.5, 0.5, 0.5]  # the lr after step i is step i + 1's


def test_a_schedule_needs_a_phase():
    with pytest.raises(ValueError, match="at least one phase"):
        PhaseSchedule(_opt(), [])
