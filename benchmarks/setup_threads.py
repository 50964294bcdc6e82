"""Imported first by every benchmark: OpenMP told not to spin-wait and the thread count set, before numpy and
torch load their thread pools (OpenBLAS, MKL and both OpenMP runtimes read their settings once, at load).

The thread count is vidtag's (``vidtag.threads.set_threads``: the cores really available, cgroup-aware)
unless the command line says ``--threads N``; FAISS follows torch's count (``vidtag.retrieval``).
"""

from __future__ import annotations

import sys

from vidtag.threads import passive_openmp, set_threads


def _threads_from_argv(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 0


passive_openmp()
THREADS = set_threads(_threads_from_argv(sys.argv[1:]) or None)
