"""``examples/gpu_check.py``, the real-GPU check, run here with a fake NVML: it says "no NVML" and exits 0 without
one, and with one it discovers, registers ``gpus: auto``, leases and samples, and every check it makes holds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from tests import fake_nvml as fk

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gpu_check.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_nvml_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    nvml = fk.FakeNvml([], init_error=fk.LIBRARY_NOT_FOUND)
    assert load().main(["--strict"], nvml=nvml) == 0
    out = capsys.readouterr().out
    assert "no NVML: NVML unavailable: the NVML library (libnvidia-ml.so.1) was not found" in out
    assert "== redis" not in out, "nothing else is tried"


def test_with_gpus_every_check_holds(real_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    nvml = fk.uniform_host()
    argv = ["--redis-url", real_url, "--namespace", namespace, "--interval", "0.1", "--strict", "--no-torch"]
    assert load().main(argv, nvml=nvml) == 0
    out = capsys.readouterr().out
    assert "4 GPU(s)" in out and f"cuda:0={fk.uuid_of(0x1001)}" in out  # PCI order, not NVML order
    assert "[ok] every GPU registered by UUID" in out and "[ok] a reading was stored" in out
    assert f"child_env: {{'CUDA_VISIBLE_DEVICES': '{fk.uuid_of(0x1000)}'}}" in out
    assert "--no-torch: allocation skipped" in out and "MISMATCH" not in out and "checks held" in out
    assert f"this process: pid {os.getpid()}" in out


def test_a_card_whose_driver_reserves_memory_is_registered_with_the_rest(
    real_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--redis-url", real_url, "--namespace", namespace, "--interval", "0.1", "--strict", "--no-torch"]
    assert load().main(argv, nvml=fk.h200_host()) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200  143771 MiB (616 reserved by the driver)" in out
    assert "[ok] each registered with what CUDA can allocate (total less the driver's reservation): " in out
    assert f"{fk.H200[:12]}: 143155 MiB" in out and "reserved 616, used 0, free 143155" in out
