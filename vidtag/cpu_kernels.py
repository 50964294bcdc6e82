"""Pinned CPU kernels: the pipeline's float results are the same on every x86-64 CPU with AVX2.

PyTorch's own kernels (ATen), MKL (matrix products) and oneDNN each pick the code path of the CPU they find:
AVX2, AVX-512, AVX-512 with VNNI or BF16. Paths of different widths add in different orders, so their last bits
differ, and a training run amplifies last bits into different models. Measured on 2026-12-07 with the same code,
params and packages: the demo's features already differed in their float16 bits between a 2-core AVX-512 EPYC
and a 2-core AVX2 EPYC, and Phase I acc@1km came out 27.4 % on one and 29.6 % on the other, so `dvc metrics
diff` after `make demo` showed a change on any machine but the one that recorded the metrics. With
``ATEN_CPU_CAPABILITY=default`` instead of the AVX2 path, or MKL and oneDNN held to SSE4.1, the AVX2 machine's
features changed again: each library's choice matters.

So the stages (``pipeline.common``) hold every library to its AVX2 path, the widest one nearly every x86-64
server has: ATen's ``avx2`` kernels, MKL's conditional numerical reproducibility (``MKL_CBWR=AVX2,STRICT``),
oneDNN's ``ONEDNN_MAX_CPU_ISA=AVX2``, OpenBLAS's Haswell kernels (numpy, FAISS) and FAISS's AVX2 build. On an
AVX-512 CPU this gives up the wider vectors (the CPU demo runs tiny models; a GPU does the heavy work of real
runs and is untouched). A variable the user has set is left alone; ``VIDTAG_PIN_CPU_KERNELS=0`` turns the pinning
off (the fastest kernels, results then tied to the CPU). Takes effect only before torch is imported, which is why
``pipeline.common`` calls it at import time.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PINNED_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's vectorised kernels (softmax, norms, reductions, GELU ...)
    "MKL_CBWR": "AVX2,STRICT",  # MKL's reproducible branch: the same bits on every CPU with AVX2
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels (linear layers, convolutions)
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS (numpy, the FAISS wheel): its AVX2 kernels
    "FAISS_OPT_LEVEL": "AVX2",  # FAISS's AVX2 library where the wheel ships one (it falls back to its generic one)
}
OFF_SWITCH = "VIDTAG_PIN_CPU_KERNELS"
READ_AT_LOAD = ("torch", "numpy", "faiss")  # the modules whose libraries read these variables once, when they load


def cpu_has_avx2(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on an x86-64 CPU that reports AVX2 (Linux's /proc/cpuinfo; elsewhere False: nothing is pinned)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx2" in flags.split()


def pin_cpu_kernels(has_avx2: bool | None = None) -> dict[str, str]:
    """Hold ATen, MKL, oneDNN, OpenBLAS and FAISS to their AVX2 paths (module docstring); returns what was set.

    Nothing is set when ``VIDTAG_PIN_CPU_KERNELS=0``, on a CPU without AVX2, or once torch, numpy or FAISS is
    imported (their libraries have chosen by then, and a half-pinned process would only mislead)."""
    if os.environ.get(OFF_SWITCH, "1").strip() in ("0", "false", "no", "off"):
        return {}
    if any(m in sys.modules for m in READ_AT_LOAD) or not (cpu_has_avx2() if has_avx2 is None else has_avx2):
        return {}
    chosen = {}
    for var, value in PINNED_KERNELS.items():
        if var not in os.environ:
            os.environ[var] = chosen[var] = value
    return chosen
