"""train.cpu_allocator: what `auto` does where, and that it is recorded and changes no number."""

from __future__ import annotations

import platform

import pytest
import torch

from gradtail import environment
from gradtail.config import load_config
from gradtail.environment import configure_cpu_allocator
from gradtail.errors import ConfigError


def test_system_and_cuda_leave_the_allocator_alone() -> None:
    assert configure_cpu_allocator("system", torch.device("cpu"))["resolved"] == "system"
    cuda = configure_cpu_allocator("auto", torch.device("cuda"))
    assert cuda["resolved"] == "system" and cuda["reason"] == "cuda run"


def test_auto_needs_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "_allocator_state", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    got = configure_cpu_allocator("auto", torch.device("cpu"))
    assert got == {"setting": "auto", "resolved": "system", "reason": "C library musl"}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_auto_on_glibc_retains_freed_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    import ctypes

    monkeypatch.setattr(environment, "_allocator_state", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    got = configure_cpu_allocator("auto", torch.device("cpu"))
    assert got["resolved"] == "retain"
    assert calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    calls.clear()
    assert configure_cpu_allocator("auto", torch.device("cpu"))["resolved"] == "retain"
    assert calls == []  # process-wide: set once


def test_refused_mallopt_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    class Refusing:
        def mallopt(self, param: int, value: int) -> int:
            return 0

    monkeypatch.setattr(environment, "_allocator_state", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Refusing())
    got = configure_cpu_allocator("auto", torch.device("cpu"))
    assert got["resolved"] == "system" and "refused" in got["reason"]


def test_bad_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cpu_allocator must be one of auto, system, got 'jemalloc'"):
        load_config("configs/fashion_mnist_lt/ce.yaml", ["train.cpu_allocator=jemalloc"])
