"""Peak memory of ``Locator.locate`` (Fig. 5) against video length, windowed (vidtag.windows) and whole.

TempGeo (Sec. 3.2) and the GeoRefiner (Sec. 3.4) attend over the sequence, so run whole they hold
(heads x T x T) attention scores per layer: memory grows with the square of the frame count. Run on
overlapping windows of ``--window`` frames, only the window's square is held, and what grows with T is
linear (features, embeddings, the two retrievals' candidates, Viterbi's back-pointers).

Each (length, mode) runs in a fresh subprocess on tiny random models (TempGeo and GeoRefiner at
``--width`` with ``--heads`` heads, the paper's 8 by default; tiny-backbone feature dims 32 + 48) against
a 1,000-point grid gallery, one sequence of T frames, argmax (Fig. 5) plus the confidence's k=256
candidates. Peak memory is the process's ``ru_maxrss`` (tracemalloc cannot see torch's allocations):
``peak`` is the whole process; ``locate`` is how far ``locate`` raised it above what was resident just
before (models, gallery, features of T frames already built). Whole sequences run only up to
``--max-whole`` frames (the next length would not fit in memory).

Run: ``.venv/bin/python benchmarks/long_video.py [--lengths 500,2000,8000,32000] [--window 512]
[--overlap 128] [--max-whole 8000]``. Smoke: ``--lengths 300,1200 --window 128 --overlap 32 --max-whole 1200``.
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def one_run(length: int, window: int, overlap: int, width: int, heads: int, seed: int = 0) -> dict:
    """One ``locate`` over a sequence of ``length`` frames in this (fresh) process; peak RSS before and after."""
    import numpy as np
    import torch

    from vidtag.features.sequences import sequences_from_offsets
    from vidtag.features.source import FeatureTensors
    from vidtag.inference import Locator
    from vidtag.models.bundle import build_models
    from vidtag.models.config import VidTAGConfig

    cfg = VidTAGConfig.from_dict({
        "frame": {"clip_dim": 32, "dino_dim": 48, "tempgeo_heads": heads, "tempgeo_ff_dim": 2 * width, "mlp_dims": [width],
                  "out_dim": width},
        "location": {"rff_dim": 16, "hidden_dim": width, "n_hidden": 1, "out_dim": width},
        "refiner": {"width": width, "heads": heads, "ff_dim": 2 * width},
    })
    frame, loc, refiner = build_models(cfg, seed=seed)
    lat, lon = np.meshgrid(np.linspace(-60, 70, 25), np.linspace(-180, 175, 40), indexing="ij")
    gallery = np.stack([lat.ravel(), lon.ravel()], 1)  # (1000, 2)
    locator = Locator.for_model(frame, loc, torch.tensor(2.0), refiner, gallery, device="cpu")
    rng = np.random.default_rng(seed)
    clip = rng.normal(size=(length, 32)).astype(np.float16)
    dino = rng.normal(size=(length, 48)).astype(np.float16)
    source = FeatureTensors.from_frames(clip, dino, torch.device("cpu"))
    table = sequences_from_offsets(np.array([0, length]), np.ones(length, bool), ["video"])
    before = rss_mb()
    t0 = time.perf_counter()
    found = locator.locate(source, table, k=256, confidence_radius_km=1.0, window_frames=window, window_overlap=overlap)
    seconds = time.perf_counter() - t0
    assert len(found.rows) == length and np.isfinite(found.confidence).all()
    after = rss_mb()
    return {"length": length, "window": window, "before_mb": before, "peak_mb": after, "locate_mb": after - before,
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="500,2000,8000,32000", help="frames per video, comma-separated")
    ap.add_argument("--window", type=int, default=512, help="window_frames of the windowed runs")
    ap.add_argument("--overlap", type=int, default=128, help="window_overlap of the windowed runs")
    ap.add_argument("--max-whole", type=int, default=8000, help="longest video also run whole (unwindowed)")
    ap.add_argument("--width", type=int, default=64, help="TempGeo / GeoRefiner width of the tiny random models")
    ap.add_argument("--heads", type=int, default=8, help="attention heads (the paper's TempGeo: 8)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (read by setup_threads)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one run, JSON out
    ap.add_argument("--one-window", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args.one, args.one_window, args.overlap, args.width, args.heads)))
        return

    import torch

    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {setup_threads.THREADS}; "
          f"tiny random models (width {args.width}, {args.heads} heads), window {args.window} / overlap {args.overlap}")
    rows = []
    for length in lengths:
        for window in ([args.window, 0] if length <= args.max_whole else [args.window]):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(length), "--one-window", str(window),
                   "--overlap", str(args.overlap), "--width", str(args.width), "--heads", str(args.heads),
                   "--threads", str(setup_threads.THREADS)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"run T={length} window={window} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  T={length} {'window ' + str(window) if window else 'whole'}: locate +{r['locate_mb']:.0f} MB, "
                  f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)
    print()
    print("| frames | mode | `locate` peak above resident (MB) | process peak RSS (MB) | seconds |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        mode = f"windows of {r['window']}" if r["window"] else "whole sequence"
        print(f"| {r['length']:,} | {mode} | {r['locate_mb']:,.0f} | {r['peak_mb']:,.0f} | {r['seconds']:.1f} |")
    skipped = [n for n in lengths if n > args.max_whole]
    if skipped:
        print(f"\nwhole sequence not run for {', '.join(f'{n:,}' for n in skipped)} frames (--max-whole {args.max_whole:,})")


if __name__ == "__main__":
    main()
