"""What a run records about the machine it ran on (docs/methods/protocol.md §5)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradtail


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from gradtail.distributed import is_distributed, local_rank

        return torch.device("cuda", local_rank()) if is_distributed() else torch.device("cuda")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from gradtail.errors import ConfigError

        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class Precision:
    """The autocast precision a run resolved: ``setting`` as configured, ``resolved`` one of ``none``,
    ``bf16``, ``fp16``, and ``reason`` in a few words (printed at the start and recorded)."""

    setting: str
    resolved: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.resolved]

    def describe(self) -> str:
        name = {"none": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}[self.resolved]
        return f"{name} ({self.setting}: {self.reason})" if self.setting == "auto" else name

    def to_dict(self) -> dict[str, str]:
        return {"setting": self.setting, "resolved": self.resolved, "reason": self.reason}


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 natively, and why (for the run record).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: the AVX512-BF16 or AMX instructions,
    as PyTorch's build reports them (without them oneDNN emulates bf16 and it is slower than float32).
    """
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without native bf16"
    if device.type == "cpu":
        try:  # private helpers of torch.cpu (PyTorch >= 2.3); older builds report no native bf16
            checks = (
                ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported),
                ("AMX", torch.cpu._is_amx_tile_supported),
            )
        except AttributeError:
            checks = ()
        features = [name for name, check in checks if check()]
        if features:
            return True, f"CPU with {' and '.join(features)}"
        return False, "CPU without AVX512-BF16 or AMX"
    return False, f"{device.type} device"


def resolve_amp(setting: str, device: torch.device) -> Precision:
    """``train.amp`` -> the precision used: ``auto`` is bf16 where :func:`native_bf16` holds, else
    float32; ``none`` / ``bf16`` / ``fp16`` as given (fp16 needs CUDA)."""
    if setting == "auto":
        ok, reason = native_bf16(device)
        return Precision(setting, "bf16" if ok else "none", reason)
    if setting == "fp16" and device.type != "cuda":
        from gradtail.errors import ConfigError

        raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 or auto on CPU")
    return Precision(setting, setting, "as configured")


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX / 2 = 32 MiB); blocks above it are
# still mapped and unmapped per allocation.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024
_allocator_state: dict[str, str] | None = None


def configure_cpu_allocator(setting: str, device: torch.device) -> dict[str, str]:
    """``train.cpu_allocator`` -> what the process's allocator does, recorded in ``environment.json``.

    By default glibc serves every block above its mmap threshold (128 KiB, raised only once such a block
    is freed) with a fresh ``mmap`` and returns the top of the heap to the OS once 128 KiB of it is
    free. A training step allocates and frees activations of several MiB each, so every step
    page-faults the same memory in again: on this project's 2-core CPU the zero-fills, BatchNorm and
    ReLU backward of the Fashion-MNIST CNN spent a third of the step in page faults. ``auto`` on a CPU
    run under glibc keeps freed blocks below 32 MiB in the heap (``M_MMAP_THRESHOLD`` 32 MiB) and trims
    the heap only when 1 GiB of its top is free (``M_TRIM_THRESHOLD``): the process keeps its peak
    heap, not more. The setting is process-wide and changes no number, only speed
    (``benchmarks/reference_loop.py``). ``system`` (or a CUDA run, or another C library) leaves the
    allocator alone.
    """
    global _allocator_state
    if setting == "system":
        return {"setting": setting, "resolved": "system", "reason": "as configured"}
    if device.type != "cpu":
        return {"setting": setting, "resolved": "system", "reason": f"{device.type} run"}
    if _allocator_state is not None:
        return {"setting": setting, **_allocator_state}
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return {"setting": setting, "resolved": "system", "reason": f"C library {libc_name or 'unknown'}"}
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        return {"setting": setting, "resolved": "system", "reason": f"mallopt unavailable ({e})"}
    if not ok:
        return {"setting": setting, "resolved": "system", "reason": "mallopt refused the thresholds"}
    _allocator_state = {"resolved": "retain", "reason": "glibc: mmap threshold 32 MiB, trim threshold 1 GiB"}
    return {"setting": setting, **_allocator_state}


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "gradtail": gradtail.__version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        info["torchvision"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
