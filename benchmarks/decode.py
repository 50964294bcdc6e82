"""Cost of temporal decoding and local refinement next to retrieval (beyond the paper, App. L).

For B sequences of T frames (random unit 512-d queries) against a gallery of G points on a real
0.1 km grid (random unit embeddings: retrieval cost does not depend on what they mean), times:

* ``retrieval top-K``: ``GalleryIndex.search(queries, k=K)``, the search Fig. 5 runs anyway (twice);
* ``viterbi``: ``vidtag.decode.viterbi`` over the (B, T, K) candidate lattice, exact, O(T K^2);
* ``refine cold`` / ``refine warm``: ``vidtag.refine.LocalRefiner.refine`` of the top ``refine_k``
  candidates on a ``refine_step_km`` lattice within ``refine_radius_km``, with GeoCLIP's location-encoder
  architecture (random weights: same cost), first with an empty cache, then again with it filled.

Run: ``.venv/bin/python benchmarks/decode.py [--gallery 1000000] [--sequences 64] [--frames 64] [--top-k 64]
[--device cuda]``. Smoke: ``--gallery 2000 --sequences 2 --frames 8 --top-k 8 --refine-k 2``.
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from vidtag.decode import viterbi
from vidtag.gallery import grid_points
from vidtag.geo import BBox, KM_PER_DEG_LAT, km_per_deg_lon
from vidtag.models.config import LocationEncoderConfig
from vidtag.models.location_encoder import LocationEncoder
from vidtag.refine import LocalRefiner, RefineConfig
from vidtag.retrieval import GalleryIndex


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def square_gallery(n_points: int, resolution_km: float = 0.1, lat0: float = 48.85, lon0: float = 2.35) -> np.ndarray:
    """About ``n_points`` grid points at ``resolution_km`` in a square around (lat0, lon0)."""
    side_km = resolution_km * np.sqrt(n_points)
    box = BBox(lat0, lat0 + side_km / KM_PER_DEG_LAT, lon0, lon0 + side_km / float(km_per_deg_lon(lat0)))
    lat, lon = grid_points(box, resolution_km)
    return np.stack([lat, lon], 1)[:n_points]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=1_000_000, help="gallery points (a 0.1 km grid)")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--frames", type=int, default=64, help="frames per sequence")
    ap.add_argument("--top-k", type=int, default=64, help="candidates per frame")
    ap.add_argument("--refine-k", type=int, default=8, help="candidates refined per frame")
    ap.add_argument("--refine-step-km", type=float, default=0.05)
    ap.add_argument("--refine-radius-km", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    b, t, k = args.sequences, args.frames, args.top_k
    m = b * t

    latlon = square_gallery(args.gallery)
    g = len(latlon)
    emb = F.normalize(torch.from_numpy(rng.standard_normal((g, 512), dtype=np.float32)), dim=-1).to(dev)
    queries = F.normalize(torch.from_numpy(rng.standard_normal((m, 512), dtype=np.float32)), dim=-1).to(dev)
    t_build, index = timed(lambda: GalleryIndex.build(emb, "auto", dev), dev)
    t_ret, (score, idx) = timed(lambda: index.search(queries, k=k), dev, repeat=2)

    cand = torch.from_numpy(latlon).to(dev)[idx]  # (M, K, 2)
    log_e = torch.log_softmax(score.double() * 100.0, dim=1).view(b, t, k)
    t_vit, _ = timed(lambda: viterbi(log_e, cand.view(b, t, k, 2), step_km=0.02, free_scales=1.0), dev, repeat=2)

    enc = LocationEncoder.from_config(LocationEncoderConfig(), init="random", seed=0).to(dev).eval()
    refiner = LocalRefiner(enc, RefineConfig(step_km=args.refine_step_km, top=args.refine_k), args.refine_radius_km, device=dev)
    t_cold, _ = timed(lambda: refiner.refine(queries, cand, score, idx), dev)
    n_cold = refiner.n_embedded
    t_warm, _ = timed(lambda: refiner.refine(queries, cand, score, idx), dev)

    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"gallery {g} points, {b} sequences x {t} frames = {m} frames, top-K {k}; index build {t_build:.2f} s")
    print(f"{'step':34s}{'seconds':>10s}{'frames/s':>14s}{'x retrieval':>14s}")
    for name, sec in (("retrieval top-K (one of Fig. 5's two)", t_ret), ("viterbi (B, T, K)", t_vit),
                      (f"refine cold ({n_cold} points embedded)", t_cold), ("refine warm (cached)", t_warm)):
        print(f"{name:34s}{sec:10.4f}{m / sec:14.0f}{sec / t_ret:14.2f}")


if __name__ == "__main__":
    main()
