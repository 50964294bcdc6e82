"""Discrete Fréchet distance: vidtag vs. similaritymeasures vs. frechetdist, side by side in one run.

    .venv/bin/python benchmarks/frechet.py [--pairs 2000] [--points 100] [--frdist-pairs 200]

Times per curve pair on random (lat, lon) curves, checks that every implementation returns the same
values, and prints a markdown table for BENCHMARKS.md. frechetdist (recursive, pure Python) is timed
on the first ``--frdist-pairs`` pairs only, because it takes tens of ms per pair; its row says so.
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
import platform
import time

import numpy as np
import similaritymeasures
from frechetdist import frdist

from vidtag.metrics import discrete_frechet, discrete_frechet_many


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--frdist-pairs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    # Random walks around random places: realistic tracks, not uniform noise.
    start = np.column_stack([rng.uniform(-60, 60, args.pairs), rng.uniform(-170, 170, args.pairs)])
    A = [s + np.cumsum(rng.normal(0, 0.001, (args.points, 2)), axis=0) for s in start]
    B = [a + rng.normal(0, 0.002, a.shape) for a in A]
    k = min(args.frdist_pairs, args.pairs)

    t_many, d_many = timed(lambda: discrete_frechet_many(A, B, "deg"), repeats=3)
    t_many_km, _ = timed(lambda: discrete_frechet_many(A, B, "km"), repeats=3)
    t_one, d_one = timed(lambda: np.array([discrete_frechet(a, b) for a, b in zip(A, B)]))
    t_sm, d_sm = timed(lambda: np.array([similaritymeasures.frechet_dist(a, b) for a, b in zip(A, B)]))
    t_fr, d_fr = timed(lambda: np.array([frdist(a, b) for a, b in zip(A[:k], B[:k])]))

    err = max(np.abs(d_many - d_sm).max(), np.abs(d_one - d_sm).max(), np.abs(d_fr - d_sm[:k]).max())
    sm_pair = t_sm / args.pairs
    rows = [
        ("vidtag `discrete_frechet_many` (deg, batched)", args.pairs, t_many),
        ("vidtag `discrete_frechet_many` (km, batched)", args.pairs, t_many_km),
        ("vidtag `discrete_frechet` (deg, one call per pair)", args.pairs, t_one),
        ("`similaritymeasures.frechet_dist`", args.pairs, t_sm),
        ("`frechetdist.frdist`", k, t_fr),
    ]
    print(f"{args.pairs} pairs of {args.points}-point curves; CPU: {cpu_model()}; max |difference| = {err:.3g}\n")
    print("| implementation | pairs timed | total (s) | ms / pair | speed-up vs similaritymeasures |")
    print("|---|---:|---:|---:|---:|")
    for name, n, t in rows:
        print(f"| {name} | {n} | {t:.3f} | {1e3 * t / n:.3f} | {sm_pair / (t / n):.1f}× |")
    print(f"\nratio similaritymeasures / vidtag batched (deg): {t_sm / t_many:.1f}×")
    if err > 1e-9:
        raise SystemExit(f"implementations disagree: max |difference| {err}")


if __name__ == "__main__":
    main()
