"""Distillation in the finetune stage (splitnet/distill.py): the loss, the frozen teacher, the training loop."""
import pytest
import torch
import torch.nn.functional as F

from splitnet import build_model, cut
from splitnet.distill import Distiller, distillation_loss
from splitnet.train import train_one_epoch


def batches(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, classes, (16,), generator=g))
            for _ in range(n // 16)]


class CountingTeacher(torch.nn.Module):
    """A dense model that counts its forwards."""

    def __init__(self, classes=4):
        super().__init__()
        self.net = build_model("wrn-10-1", classes, "1")
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_the_loss_is_the_mix_of_ce_and_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    T, w = 3.0, 0.3
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean()
    want = (1 - w) * F.cross_entropy(s, y) + w * T * T * kl
    assert torch.allclose(distillation_loss(s, t, y, T, w), want, atol=1e-6)
    # a student that equals its teacher pays only the CE share
    assert torch.allclose(distillation_loss(t, t, y, T, w), (1 - w) * F.cross_entropy(t, y), atol=1e-6)


def test_weight_zero_is_plain_ce_and_never_runs_the_teacher():
    teacher = CountingTeacher()
    d = Distiller(teacher, temperature=4.0, weight=0.0)
    x, y = batches()[0]
    logits = torch.randn(16, 4)
    ce = F.cross_entropy(logits, y)
    assert d.loss(logits, x, y, ce) is ce and torch.equal(d.loss(logits, x, y), ce)
    assert teacher.calls == 0
    # and training with it moves the weights exactly as training without it
    states = []
    for distill in (None, d):
        torch.manual_seed(0)
        model = build_model("wrn-10-1", 4, "1")
        train_one_epoch(model, batches(), torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), distill=distill)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert teacher.calls == 0


def test_the_teacher_is_frozen_and_its_gradients_are_never_computed():
    torch.manual_seed(0)
    teacher = CountingTeacher().train()  # handed over in training mode: the Distiller freezes it
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(teacher, temperature=2.0, weight=0.7)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x, y = batches()[0]
    assert d.teacher_logits(x).grad_fn is None
    student = build_model("wrn-10-1", 4, "1")
    loss = d.loss(student(x), x, y)
    loss.backward()
    assert teacher.calls == 2
    assert all(p.grad is None for p in teacher.parameters())  # no gradient ever reached the teacher
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    teacher.train()  # even a caller's train() does not let a forward move its BatchNorm statistics
    d.teacher_logits(x)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items() if not k.endswith("num_batches_tracked"))


def test_a_tree_moves_toward_its_teacher():
    """The finetune stage's use: a cut tree is the student; trained on the soft targets of a dense teacher
    it ends closer to the teacher's predictions than it started, and closer than CE training takes it."""
    torch.manual_seed(1)
    teacher = build_model("wrn-10-1", 4, "1")
    with torch.no_grad():
        teacher.fc.weight.mul_(20)  # confident, and unlike the student
    data = batches(128)
    x = torch.cat([b[0] for b in data])

    def run(weight):
        torch.manual_seed(0)
        tree = cut(build_model("wrn-10-1", 4, "2-2-2"))
        d = Distiller(teacher, temperature=2.0, weight=weight)

        def gap():
            tree.eval()
            with torch.no_grad():
                return F.kl_div(F.log_softmax(tree(x) / 2, 1), F.log_softmax(d.teacher_logits(x) / 2, 1),
                                reduction="batchmean", log_target=True).item()

        start = gap()
        opt = torch.optim.SGD(tree.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            stats = train_one_epoch(tree, data, opt, distill=d)
        return start, gap(), stats

    start, distilled, stats = run(1.0)
    _, plain, _ = run(0.0)
    assert distilled < 0.5 * start and distilled < plain
    assert stats["loss"] != pytest.approx(stats["ce"])  # the loss is the soft term; ce is still reported as CE


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"weight": 1.5}, {"weight": -0.1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Distiller(build_model("wrn-10-1", 4, "1"), **kwargs)
