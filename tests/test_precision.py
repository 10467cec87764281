"""``amp: auto``: bf16 where the device computes it natively, fp32 elsewhere, with the reason said;
an explicit bf16 on a device that only emulates it still runs, with one warning line. The
capability check is injected both ways, so these pass on any CPU."""
from __future__ import annotations


import pytest
import torch

from splitnet import precision as P
from splitnet.precision import Support, choose_precision


def native(why="this CPU has AMX (native bf16 matrix tiles)"):
    return lambda device: Support(True, why)


def emulated(why="this CPU has no native bf16 (AVX2)"):
    return lambda device: Support(False, why)


def test_auto_is_bf16_only_where_native():
    on = choose_precision("auto", "cpu", support=native())
    assert on.name == "bf16" and on.dtype is torch.bfloat16 and not on.slow
    assert on.line() == "precision bf16: auto, this CPU has AMX (native bf16 matrix tiles)"
    off = choose_precision("auto", "cpu", support=emulated())
    assert off.name == "fp32" and off.dtype is None and not off.slow and off.warning() is None
    assert off.line() == "precision fp32: auto, this CPU has no native bf16 (AVX2)"


def test_explicit_bf16_without_native_support_runs_with_one_warning():
    p = choose_precision("bf16", "cpu", support=emulated())
    assert p.dtype is torch.bfloat16 and p.slow
    assert "emulated" in p.line()
    warning = p.warning()
    assert warning.startswith("warning:") and "slower than fp32" in warning and "\n" not in warning
    assert choose_precision("bf16", "cpu", support=native()).warning() is None


def test_none_is_fp32_and_bad_values_are_refused():
    assert choose_precision("none", "cpu", support=native()).dtype is None
    assert choose_precision(None, "cpu").name == "fp32"
    with pytest.raises(ValueError, match="amp 'fp16'"):
        choose_precision("fp16", "cpu")


def test_avx512_bf16_without_amx_stays_fp32_on_auto_but_not_slow_on_request(monkeypatch):
    """Measured slower than fp32 there (module docstring): auto keeps fp32; bf16 asked for is not
    'emulated', so no warning."""
    monkeypatch.delenv(P.OVERRIDE_ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert choose_precision("auto", "cpu").name == "fp32"
    assert "AVX512_BF16 but no AMX" in choose_precision("auto", "cpu").reason
    assert choose_precision("bf16", "cpu").warning() is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert choose_precision("auto", "cpu").name == "bf16"


def test_cpu_check_reads_the_capability_and_the_caps(monkeypatch):
    monkeypatch.delenv(P.OVERRIDE_ENV, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    s = P.cpu_bf16_support()
    assert not s.native and s.emulated and "(AVX2)" in s.why
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert P.cpu_bf16_support().native
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # standing in for an older CPU
    s = P.cpu_bf16_support()
    assert not s.native and "ONEDNN_MAX_CPU_ISA=AVX2" in s.why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert P.cpu_bf16_support().native


def test_override_env_forces_the_answer_both_ways(monkeypatch):
    monkeypatch.setenv(P.OVERRIDE_ENV, "1")
    assert choose_precision("auto", "cpu").name == "bf16"
    assert "SPLITNET_NATIVE_BF16=1" in choose_precision("auto", "cpu").reason
    monkeypatch.setenv(P.OVERRIDE_ENV, "0")
    assert choose_precision("auto", "cpu").name == "fp32"
    assert choose_precision("bf16", "cpu").slow


def test_cuda_check_asks_for_native_bf16_without_emulation(monkeypatch):
    monkeypatch.delenv(P.OVERRIDE_ENV, raising=False)
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    p = choose_precision("auto", torch.device("cuda", 0))
    assert asked == {"emulation": False} and p.name == "fp32" and "Tesla V100 has no native bf16" in p.reason


def test_a_bf16_training_step_runs_on_cpu():
    """What an explicit bf16 (or auto on a bf16 CPU) does in a step: autocast forward, fp32 loss
    and master weights; the weights move and stay fp32."""
    from splitnet import build_model
    from splitnet.train import train_one_epoch

    model = build_model("wrn-10-1", 4, "2-2-2")
    before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))) for _ in range(2)]
    stats = train_one_epoch(model, batches, opt, amp_dtype=choose_precision("bf16", "cpu").dtype)
    assert stats["steps"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    assert model.fc.weight.dtype is torch.float32 and not torch.equal(model.fc.weight, before)
