"""This machine's limits, measured the way vidtag runs: sustained matrix-product throughput and memory bandwidth.

Every other benchmark divides its own rate by one of these, measured in the same run with the same threads,
so a result reads as "x % of what this machine can do right now" rather than a number that depends on
the day's load:

* ``matmul fp32`` (and ``bf16`` where the CPU has native bf16 dot products, AVX512_BF16 or AMX, and on
  every CUDA GPU): square ``torch.mm`` products repeated for ``--seconds``; the rate is all FLOP over all
  time (sustained, not a best single call). On CUDA fp32 is IEEE fp32 (TF32 off) and tf32 is reported
  beside it.
* ``memory read``: ``torch.sum`` over a buffer far larger than the caches (bytes read / time), and
  ``memory copy``: ``dst.copy_(src)`` (bytes read + written / time).

The fp32 limit is the faster of torch's GEMM (MKL / oneDNN) and numpy's (OpenBLAS, the library FAISS
also uses): on some CPUs one of them is 10 % faster, and a backend should not look good against the slower.
OpenMP threads are told not to spin-wait (``OMP_WAIT_POLICY=PASSIVE``, as vidtag's pipeline does) and the
thread count is vidtag's own (``vidtag.threads``: the available cores, cgroup-aware, unless ``--threads``),
set before numpy and torch load (``setup_threads``).

    .venv/bin/python benchmarks/limits.py [--device cpu|cuda] [--threads N] [--seconds S] [--size N]
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vidtag.threads import available_cores  # noqa: E402


@dataclass
class Limits:
    device: str  # what was measured, in words
    threads: int  # torch CPU threads
    matmul_fp32_gflops: float  # sustained n x n x n fp32 products: the faster of torch and numpy
    matmul_fp32_torch_gflops: float  # torch.mm (MKL / oneDNN on CPU, cuBLAS on CUDA)
    matmul_fp32_numpy_gflops: float | None  # numpy.matmul (OpenBLAS); CPU only
    matmul_bf16_gflops: float | None  # None: no native bf16 on this CPU
    matmul_tf32_gflops: float | None  # CUDA only
    read_gbs: float  # bytes read per second (sum over a large buffer)
    copy_gbs: float  # bytes read + written per second (copy)
    size: int  # n of the products

    def line(self) -> str:
        parts = [f"matmul fp32 {self.matmul_fp32_gflops:,.1f} GFLOP/s (torch {self.matmul_fp32_torch_gflops:,.1f}"
                 + (f", numpy {self.matmul_fp32_numpy_gflops:,.1f})" if self.matmul_fp32_numpy_gflops else ")")]
        if self.matmul_tf32_gflops is not None:
            parts.append(f"tf32 {self.matmul_tf32_gflops:,.1f}")
        if self.matmul_bf16_gflops is not None:
            parts.append(f"bf16 {self.matmul_bf16_gflops:,.1f}")
        parts.append(f"memory read {self.read_gbs:,.1f} GB/s, copy {self.copy_gbs:,.1f} GB/s")
        return f"{self.device}, {self.threads} threads, n={self.size}: " + ", ".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512_BF16 or AMX-BF16); elsewhere torch emulates bf16 and it says nothing."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sustained(fn, device: torch.device, seconds: float, min_calls: int = 2) -> tuple[float, int]:
    """(seconds per call, calls) of ``fn`` repeated for at least ``seconds`` after one warm-up call."""
    fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
        if device.type == "cuda" and calls % 8 == 0:
            sync(device)
    sync(device)
    return (time.perf_counter() - t0) / calls, calls


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    per_call, _ = sustained(lambda: torch.mm(a, b, out=c), device, seconds)
    return 2 * n**3 / per_call / 1e9


def numpy_matmul_gflops(n: int, seconds: float) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    per_call, _ = sustained(lambda: np.matmul(a, a, out=c), torch.device("cpu"), seconds)
    return 2 * n**3 / per_call / 1e9


def memory_gbs(device: torch.device, seconds: float, mib: int) -> tuple[float, float]:
    """(read GB/s, copy GB/s) over a float32 buffer of ``mib`` MiB."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    per_read, _ = sustained(lambda: src.sum(), device, seconds / 2)
    per_copy, _ = sustained(lambda: dst.copy_(src), device, seconds / 2)
    return 4 * n / per_read / 1e9, 8 * n / per_copy / 1e9


def measure(device: str | torch.device = "cpu", seconds: float = 3.0, size: int = 4096, memory_mib: int = 1024) -> Limits:
    """The limits of ``device`` with the thread count ``setup_threads`` set."""
    device = torch.device(device)
    with torch.no_grad():
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            before = torch.get_float32_matmul_precision()
            try:
                torch.set_float32_matmul_precision("highest")
                fp32 = matmul_gflops(device, torch.float32, size, seconds)
                torch.set_float32_matmul_precision("high")
                tf32 = matmul_gflops(device, torch.float32, size, seconds)
            finally:
                torch.set_float32_matmul_precision(before)
            bf16 = matmul_gflops(device, torch.bfloat16, size, seconds)
            read, copy = memory_gbs(device, seconds, max(memory_mib, 4096))
            fp32_np = None
        else:
            name = f"{cpu_name()} ({available_cores()} cores available)"
            fp32 = matmul_gflops(device, torch.float32, size, seconds)
            fp32_np = numpy_matmul_gflops(size, seconds)
            tf32 = None
            bf16 = matmul_gflops(device, torch.bfloat16, size, seconds) if cpu_has_bf16() else None
            read, copy = memory_gbs(device, seconds, memory_mib)
    best = max(fp32, fp32_np or 0.0)
    return Limits(name, torch.get_num_threads(), best, fp32, fp32_np, bf16, tf32, read, copy, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = the available cores, as vidtag uses; read by setup_threads)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--size", type=int, default=4096, help="n of the n x n x n products")
    ap.add_argument("--memory-mib", type=int, default=1024, help="buffer for the bandwidth measurements")
    args = ap.parse_args()
    limits = measure(args.device, args.seconds, args.size, args.memory_mib)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}")
    print(limits.line())
    print(asdict(limits))


if __name__ == "__main__":
    main()
