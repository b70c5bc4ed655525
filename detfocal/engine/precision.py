"""Training precision: fp32, bf16 autocast (+ channels_last on CPU) or fp16 autocast + GradScaler."""
from __future__ import annotations

import platform

import torch


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return set(next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512-BF16 or AMX-BF16).

    Without them bf16 autocast is emulated, and slower than fp32 (docs: benchmarks page).
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_description() -> str:
    """The CPU model and its vector extensions, e.g. ``AMD EPYC 7B13 (AVX2; no AVX-512, no AMX)``.

    Every timing detfocal reports names this: a ratio measured on one CPU can miss on the next.
    """
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    present = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"),
                                       ("amx_bf16", "AMX-BF16")) if flag in flags]
    absent = [name for flag, name in (("avx512f", "AVX-512"), ("amx_bf16", "AMX")) if flag not in flags]
    return f"{model} ({', '.join(present) or 'no AVX2'}" + (f"; no {', no '.join(absent)}" if absent else "") + ")"


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """Pick the autocast dtype and memory format for ``train.amp``.

    ``auto``: fp16 autocast with a GradScaler on CUDA; bf16 autocast plus channels_last on a CPU
    with native bf16 (AVX-512-BF16 or AMX, where bf16 convs run natively and beat fp32); fp32
    elsewhere. ``off``, ``bf16`` and ``fp16`` force a choice.

    Args:
        mode: "auto", "off", "bf16" or "fp16".
        device: the training device.

    Returns:
        ``(amp_dtype or None for fp32, channels_last, description)``; the description is one
        line for the log. Use a GradScaler exactly when ``amp_dtype is torch.float16``.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp: expected one of 'auto', 'off', 'bf16', 'fp16', got {mode!r}")
    on_cpu = device.type == "cpu"
    native_bf16 = on_cpu and cpu_supports_bf16()
    if mode == "auto":
        if device.type == "cuda":
            mode = "fp16"
        else:
            mode = "bf16" if native_bf16 else "off"
        why = "auto: " + ("CUDA" if device.type == "cuda" else
                          "CPU with AVX-512-BF16/AMX" if native_bf16 else f"{device.type} without native bf16")
    else:
        why = "set by train.amp"
    if mode == "off":
        return None, False, f"precision: fp32 ({why})"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    # channels_last lets oneDNN pick its blocked bf16 conv kernels; on CUDA it needs tensor-core
    # friendly shapes to help, so it is only turned on for the CPU.
    channels_last = on_cpu
    note = " (emulated: this CPU has no native bf16, expect it slower than fp32)" if on_cpu and mode == "bf16" and not native_bf16 else ""
    scaler = " + GradScaler" if dtype is torch.float16 else ""
    layout = " + channels_last" if channels_last else ""
    return dtype, channels_last, f"precision: {mode} autocast{scaler}{layout} ({why}){note}"
