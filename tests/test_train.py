import re

import pytest
import torch
from conftest import ROOT

from splitnet import build_model
from splitnet.regularizers import RegularizerWeights, parameter_groups, regularizer_terms
from splitnet.train import evaluate, evaluate_models, train_one_epoch


def synthetic(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.1 + y.float().view(-1, 1, 1, 1) / classes
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_grouping_makes_assignments_more_disjoint():
    model = build_model("wrn-10-1", 4, "2-2-2")
    before = {k: v.item() for k, v in regularizer_terms(model).items() if k != "per_layer"}
    opt = torch.optim.SGD(parameter_groups(model, 0.05, 0.0, assignment_lr_mult=1000), momentum=0.9)
    for _ in range(4):
        stats = train_one_epoch(model, synthetic(), opt, reg_weights=RegularizerWeights(1, 1, 10))
    after = {k: v.item() for k, v in regularizer_terms(model).items() if k != "per_layer"}
    assert after["disjoint"] < before["disjoint"] - 0.05
    assert {"weight", "disjoint", "balance", "ce", "acc", "images_per_s"} <= set(stats)


def test_plain_training_learns_and_evaluate_counts():
    model = build_model("wrn-10-1", 4, "1")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = train_one_epoch(model, synthetic(), opt)
    for _ in range(5):
        last = train_one_epoch(model, synthetic(), opt)
    assert "weight" not in last and last["ce"] < first["ce"]
    held_out = synthetic(seed=1)
    result = evaluate(model, held_out)
    model.eval()
    with torch.no_grad():  # what evaluate must count: the same sums, by hand
        logits = torch.cat([model(x) for x, _ in held_out])
    y = torch.cat([y for _, y in held_out])
    assert result["images"] == 64
    assert result["top1"] == (logits.argmax(1) == y).float().mean().item()
    assert result["top5"] == 1.0  # 4 classes: every label is in the top 5
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def _twin_steps(compiled_forward, seed=0):
    """The same tiny model trained 2 steps eager and 2 steps through ``compiled_forward(model)``:
    (eager state, compiled-route state)."""
    g = torch.Generator().manual_seed(seed)
    # unit-variance images: synthetic()'s near-constant ones leave the first BatchNorm a variance near
    # 0, where any reordering of its float sums (which Inductor does) is amplified to ~1e-3
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    states = []
    for wrap in (lambda m: m, compiled_forward):
        torch.manual_seed(seed)
        model = build_model("wrn-10-1", 4, "2-2-2")
        forward = wrap(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_one_epoch(forward, batches, opt)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def test_compiled_forward_trains_the_same_weights_as_eager():
    """scaling.compile: the wrapper's training steps move the module's own weights as eager steps
    do (to float tolerance); it holds no state of its own and train()/eval() reach the module."""
    from splitnet.train import CompiledForward

    warnings = []
    eager, compiled = _twin_steps(lambda m: CompiledForward(m, warn=warnings.append))
    assert warnings == []
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    model = build_model("wrn-10-1", 4, "1")
    wrapper = CompiledForward(model)
    assert wrapper.state_dict().keys() == {f"module.{k}" for k in model.state_dict()}
    wrapper.eval()
    assert not model.training


def test_compiled_forward_falls_back_to_eager_with_one_line(monkeypatch):
    """No working C++ compiler for Inductor (a bare CPU node): one warning naming the error, then
    the steps run eager and train exactly as eager does."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from splitnet.train import CompiledForward

    torch._dynamo.reset()  # nothing compiled by an earlier test may be reused
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    warnings, wrappers = [], []

    def wrap(m):
        wrappers.append(CompiledForward(m, warn=warnings.append))
        return wrappers[-1]

    eager, fallback = _twin_steps(wrap, seed=1)
    torch._dynamo.reset()
    assert len(warnings) == 1 and warnings[0].startswith("torch.compile failed (") and "eager" in warnings[0], warnings
    assert "compiler" in warnings[0].lower() and wrappers[0].failed
    for k in eager:
        torch.testing.assert_close(fallback[k], eager[k], rtol=0, atol=0, msg=k)


def test_evaluate_restores_the_models_mode():
    """Evaluating in the middle of training (a benchmark's mid-stage score) leaves the model training:
    the rest of the epoch must not run with frozen BatchNorm statistics."""
    model = build_model("wrn-10-1", 4, "1")
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))]
    evaluate(model.train(), batches)
    assert model.training and all(m.training for m in model.modules())
    evaluate(model.eval(), batches)
    assert not model.training


def test_evaluate_models_scores_each_model_as_evaluate_does_in_one_pass():
    """The pipeline's evaluate stage scores every model of the run over one read of the data: each
    result is what evaluate() gives that model alone, and every model's mode is restored."""
    torch.manual_seed(0)
    a, b = build_model("wrn-10-1", 4, "1"), build_model("wrn-10-1", 4, "1")
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])), (torch.randn(3, 3, 16, 16), torch.tensor([3, 2, 1]))]
    reads = []

    def once():
        for batch in batches:
            reads.append(1)
            yield batch

    both = evaluate_models({"a": a.train(), "b": b.eval()}, once())
    assert len(reads) == len(batches)
    assert both == {"a": evaluate(a, batches), "b": evaluate(b, batches)}
    assert a.training and not b.training
    assert evaluate_models({"a": a}, batches, max_batches=1)["a"]["images"] == 4


def test_the_library_snippet_in_the_docs_runs_as_written(tmp_path, monkeypatch):
    """docs/library.md's ten lines, unchanged, on a few random batches: a notebook user's first try."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "library.md").read_text(), re.S).group(1)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))) for _ in range(2)]
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(code, {"epochs": 2, "steps_per_epoch": 2, "loader": batches, "val_loader": batches[:1],
                "print": printed.append})
    assert [set(p) for p in printed[:2]] == [{"top1", "top5", "loss", "images"}] * 2
    assert (tmp_path / "runs" / "x" / "tree" / "manifest.yaml").is_file()
