"""The stages hold ATen, MKL, oneDNN, OpenBLAS and FAISS to their AVX2 paths before torch loads (vidtag.cpu_kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vidtag import cpu_kernels
from vidtag.cpu_kernels import OFF_SWITCH, PINNED_KERNELS, cpu_has_avx2, pin_cpu_kernels

REPO = Path(__file__).resolve().parent.parent
needs_avx2 = pytest.mark.skipif(not cpu_has_avx2(), reason="pinning applies to x86-64 CPUs with AVX2 only")


def _stage_environment(first: str = "", **env: str) -> dict:
    """What a stage process sees once pipeline.common is imported (after the modules ``first``, if any), and the
    kernels torch then runs."""
    clean = {k: v for k, v in os.environ.items() if k not in PINNED_KERNELS and k != OFF_SWITCH}
    code = (f"import json, os, sys{first}\nimport pipeline.common\n"
            "loaded = 'torch' in sys.modules\n"
            "import torch\n"
            f"print(json.dumps({{'loaded_before': loaded, 'capability': torch.backends.cpu.get_cpu_capability(), "
            f"'env': {{k: os.environ.get(k) for k in {sorted(PINNED_KERNELS)!r}}}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_avx2
def test_a_stage_pins_every_library_before_torch_loads():
    seen = _stage_environment()
    assert seen["loaded_before"] is False  # pinned in time: torch had not chosen its kernels yet
    assert seen["env"] == PINNED_KERNELS
    assert seen["capability"] == "AVX2"  # ATen honoured it


@needs_avx2
def test_a_users_own_choice_is_kept_and_the_off_switch_pins_nothing():
    seen = _stage_environment(ATEN_CPU_CAPABILITY="default")
    assert seen["env"]["ATEN_CPU_CAPABILITY"] == "default" and seen["capability"] == "DEFAULT"
    assert seen["env"]["MKL_CBWR"] == PINNED_KERNELS["MKL_CBWR"]
    off = _stage_environment(**{OFF_SWITCH: "0"})
    assert all(v is None for v in off["env"].values())


@needs_avx2
def test_nothing_is_pinned_once_numpy_is_loaded():
    """OpenBLAS has read its variables by then: pinning the others would leave a half-pinned process."""
    seen = _stage_environment(first=", numpy")
    assert all(v is None for v in seen["env"].values())


def test_nothing_is_pinned_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (the test process has it; pinning now would half-apply)

    for var in PINNED_KERNELS:
        monkeypatch.delenv(var, raising=False)
    assert pin_cpu_kernels(has_avx2=True) == {}
    assert not any(var in os.environ for var in PINNED_KERNELS)


def test_avx2_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_has_avx2(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2x\n")  # a flag that merely starts with avx2
    assert not cpu_has_avx2(info)
    assert not cpu_has_avx2(tmp_path / "missing")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    info.write_text("flags\t\t: avx2\n")
    assert not cpu_has_avx2(info)
