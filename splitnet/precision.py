"""Which precision a device should compute in: ``amp: auto`` (the default), ``bf16`` or ``none``.

bf16 autocast pays only where the hardware computes bf16 natively. Where it does not, PyTorch
and oneDNN emulate it, and a training step runs many times slower than in fp32 (WRN-16-2,
batch 64, one thread, on an AVX2-only CPU: fp32 0.8-1.0 s, bf16 14-16 s). ``auto`` picks:

- a CUDA GPU that computes bf16 (Ampere and newer): **bf16**;
- a CPU with AMX (AMX-BF16 tiles: Sapphire Rapids and newer Xeons): **bf16**;
- an x86 CPU with AVX512_BF16 but no AMX: **fp32**. It has bf16 dot-product instructions, but
  measured on one (2 threads, channels-last, batch 128) a bf16 training step is slower than
  fp32: WRN-16-2 0.91x, WRN-16-1 0.46x; ``amp: bf16`` still forces it;
- an Arm CPU with the BF16 extension (oneDNN's check): **bf16**;
- anything else (AVX2, AVX-512 without BF16, older GPUs): **fp32**.

oneDNN and ATen can be capped below what the CPU has (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``, used to stand in for an older CPU); a capped process counts as one
without native bf16. ``SPLITNET_NATIVE_BF16=1`` or ``=0`` overrides the detection (a CPU the
check gets wrong, or tests that must not depend on the machine's CPU).

Nothing here imports Ray: the pipeline's workers, ``splitnet serve``'s replicas and the
benchmarks resolve the same way, on the device that computes.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Callable

import torch

AMP_CHOICES = ("auto", "bf16", "none")
OVERRIDE_ENV = "SPLITNET_NATIVE_BF16"
# oneDNN's ISA names at or above AVX512_CORE_BF16 (x64): a cap to any other keeps bf16 emulated
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
                     "DEFAULT"}


@dataclass(frozen=True)
class Support:
    """Whether a device computes bf16 natively, and what the answer rests on (for the run's header)."""
    native: bool
    why: str          # e.g. "this CPU has AMX", "this CPU has no native bf16 (AVX2)"
    emulated: bool = True  # not native because bf16 would be emulated (slow); False: native but not worth it


@dataclass(frozen=True)
class Precision:
    """What a device computes in: ``name`` (``bf16`` / ``fp32``), the autocast ``dtype`` (None =
    fp32), ``reason`` (one phrase) and ``slow``: bf16 asked for explicitly on a device that only
    emulates it."""
    name: str
    dtype: torch.dtype | None
    reason: str
    slow: bool = False

    def line(self) -> str:
        """``precision fp32: this CPU has no native bf16 (AVX2)``: what the run's header says."""
        return f"precision {self.name}: {self.reason}"

    def warning(self) -> str | None:
        """One line for an explicit bf16 that the device only emulates, else None."""
        if not self.slow:
            return None
        return ("warning: bf16 autocast asked for on a device without native bf16: it is emulated and runs many times "
                "slower than fp32 (~16x measured on an AVX2 CPU); use amp auto or none")


def _override() -> bool | None:
    value = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    return None


def cpu_bf16_support() -> Support:
    """This process's CPU, as oneDNN and ATen will use it (caps included)."""
    forced = _override()
    if forced is not None:
        return Support(forced, f"{OVERRIDE_ENV}={int(forced)}")
    capability = torch.backends.cpu.get_cpu_capability()  # AVX2 / AVX512 / DEFAULT / SVE256 / ...
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()

    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if isa and isa not in _ONEDNN_BF16_ISAS:
            return Support(False, f"this process caps oneDNN at ONEDNN_MAX_CPU_ISA={isa}, without native bf16")
        if not capability.startswith("AVX512"):
            return Support(False, f"this CPU has no native bf16 ({capability})")
        cpu = torch.cpu
        amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
        if amx and avx512_bf16:
            return Support(True, "this CPU has AMX (native bf16 matrix tiles)")
        if avx512_bf16:
            return Support(False, "this CPU has AVX512_BF16 but no AMX, where bf16 training measured slower than fp32",
                           emulated=False)
        return Support(False, f"this CPU has no native bf16 ({capability}, no AVX512_BF16)")
    # Arm and others: oneDNN's own check (on aarch64: the BF16 extension)
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return Support(native, f"this {machine} CPU {'has' if native else 'has no'} native bf16")


def cuda_bf16_support(device: torch.device | None = None) -> Support:
    forced = _override()
    if forced is not None:
        return Support(forced, f"{OVERRIDE_ENV}={int(forced)}")
    name = torch.cuda.get_device_name(device)
    try:
        native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no emulation argument
        native = bool(torch.cuda.is_bf16_supported())
    return Support(native, f"{name} {'computes bf16 natively' if native else 'has no native bf16'}")


def bf16_support(device: torch.device | str = "cpu") -> Support:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16_support(device)
    if device.type == "cpu":
        return cpu_bf16_support()
    forced = _override()
    if forced is not None:
        return Support(forced, f"{OVERRIDE_ENV}={int(forced)}")
    return Support(False, f"no bf16 check for {device.type} devices")


def choose_precision(amp: str | None, device: torch.device | str = "cpu",
                     support: Callable[[torch.device], Support] | None = None) -> Precision:
    """``amp`` (``auto`` / ``bf16`` / ``none``; None = ``none``) on ``device`` -> the precision.
    ``support``: the capability check (default :func:`bf16_support`; tests inject one)."""
    amp = "none" if amp in (None, "", "fp32") else amp
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp {amp!r}: use one of {', '.join(AMP_CHOICES)}")
    device = torch.device(device)
    if amp == "none":
        return Precision("fp32", None, "amp none")
    s = (support or bf16_support)(device)
    if amp == "auto":
        if s.native:
            return Precision("bf16", torch.bfloat16, f"auto, {s.why}")
        return Precision("fp32", None, f"auto, {s.why}")
    if s.native or not s.emulated:
        return Precision("bf16", torch.bfloat16, f"amp bf16, {s.why}")
    return Precision("bf16", torch.bfloat16, f"amp bf16, {s.why}: emulated, many times slower than fp32", slow=True)
