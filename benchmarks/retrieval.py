"""Retrieval throughput: vidtag.retrieval (FAISS / torch) vs. geoclip's predict path and a per-query loop.

Queries/s for exact top-1 over galleries of 100K and 1M random unit 512-d embeddings:

* ``vidtag faiss`` / ``vidtag torch``: ``GalleryIndex.build(gallery).search(queries, k)``, a batch of
  queries at once over gallery embeddings computed once (the build is timed separately).
* ``per-query matmul loop``: cached gallery embeddings, one ``gallery @ q`` + argmax per query.
* ``geoclip predict path``: what ``GeoCLIP.predict`` does per image after the image encoder: the whole
  GPS gallery through geoclip's ``LocationEncoder(from_pretrained=True)``, normalise, logits, softmax,
  top-k. Slow, so few queries are timed at 100K and the 1M rate is extrapolated (cost is linear in G).

Also the end-to-end ``predict_input`` time for a 60 s clip (tiny backbones, CPU).
Run: ``.venv/bin/python benchmarks/retrieval.py [--sizes 100000 1000000] [--queries 512]``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidtag.retrieval import GalleryIndex


def unit(rng, n, d=512):
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed(fn, repeat=1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_size(g_size: int, n_queries: int, n_loop: int, n_geoclip: int, rng, geoclip_enc) -> list[tuple]:
    gallery = unit(rng, g_size)
    queries = unit(rng, n_queries)
    rows = []
    ref = None
    for backend in ("faiss", "torch"):
        t_build, index = timed(lambda: GalleryIndex.build(gallery, backend, "cpu"))
        t, (_, idx) = timed(lambda: index.search(queries, k=1), repeat=2)
        ref = idx if ref is None else ref
        assert np.array_equal(idx, ref), "backends disagree"
        rows.append((g_size, f"vidtag {backend} (batch {n_queries})", n_queries, t, n_queries / t, f"build {t_build:.2f} s"))
        del index

    gal_t = torch.from_numpy(gallery)
    q_t = torch.from_numpy(queries[:n_loop])

    def loop():
        return [int(torch.argmax(gal_t @ q)) for q in q_t]

    t, out = timed(loop)
    assert out == ref[:n_loop, 0].tolist()
    rows.append((g_size, "per-query matmul loop (cached)", n_loop, t, n_loop / t, ""))

    if geoclip_enc is not None:
        gps = torch.from_numpy(np.stack([rng.uniform(-60, 70, g_size), rng.uniform(-180, 180, g_size)], 1).astype(np.float32))
        img = torch.from_numpy(queries[:1])
        scale = torch.tensor(1 / 0.07)
        n_q = n_geoclip if g_size <= 100_000 else 0

        @torch.no_grad()
        def geoclip_predict(image_features):
            loc = F.normalize(geoclip_enc(gps), dim=1)  # (G, 2) -> (G, 512): the whole gallery, every image
            probs = (scale * F.normalize(image_features, dim=1) @ loc.T).softmax(dim=-1)
            return torch.topk(probs, 1, dim=1)

        if n_q:
            t, _ = timed(lambda: [geoclip_predict(img) for _ in range(n_q)])
            rows.append((g_size, "geoclip predict path", n_q, t, n_q / t, ""))
    return rows


def bench_predict_60s(tmp: Path) -> tuple[float, int]:
    import av
    import polars as pl

    from vidtag.features.backbones import BackboneConfig, build_backbones
    from vidtag.inference import predict_input
    from vidtag.models import VidTAGConfig, build_models, load_bundle, save_bundle
    from vidtag.models.bundle import Bundle

    video = tmp / "clip60.mp4"
    with av.open(str(video), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for i in range(600):
            img = np.full((240, 320, 3), (i * 3) % 256, np.uint8)
            img[:, : (i % 320)] = 40
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    bb = build_backbones(BackboneConfig(preset="tiny"), "cpu")
    fp = {k: v for k, v in bb.fingerprint().items() if k != "preprocessing"}
    # The demo's model shapes at the tiny backbones' dims; untrained weights time the same as trained ones.
    cfg = VidTAGConfig.from_dict({"frame": {"clip_dim": bb.dims[0], "dino_dim": bb.dims[1]}, "location": {"pretrained": False}})
    frame, loc, ref = build_models(cfg)
    lat, lon = np.meshgrid(np.linspace(47.3, 47.4, 100), np.linspace(8.4, 8.6, 100), indexing="ij")
    gal = tmp / "gallery.parquet"
    pl.DataFrame({"lat": lat.ravel(), "lon": lon.ravel()}).write_parquet(gal)
    save_bundle(tmp / "model", Bundle(frame, loc, ref, torch.tensor(2.66), {"model": cfg.to_dict(), "backbones": fp}, gal))
    bundle = load_bundle(tmp / "model", "cpu")
    predict_input(video, bundle, fps=1.0, device="cpu", cache_dir=tmp / "cache")  # warm: gallery embedded and cached
    t, df = timed(lambda: predict_input(video, bundle, fps=1.0, device="cpu", cache_dir=tmp / "cache"))
    return t, df.height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=512, help="queries per batched search")
    ap.add_argument("--loop-queries", type=int, default=32)
    ap.add_argument("--geoclip-queries", type=int, default=2)
    ap.add_argument("--no-geoclip", action="store_true")
    ap.add_argument("--no-predict", action="store_true")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    enc = None
    if not args.no_geoclip:
        from geoclip import LocationEncoder

        enc = LocationEncoder(from_pretrained=True).eval()
    rng = np.random.default_rng(0)
    rows = []
    for g in args.sizes:
        rows += bench_size(g, args.queries, args.loop_queries, args.geoclip_queries, rng, enc)
    # geoclip at larger galleries: extrapolated from the smallest size (its cost is linear in G)
    gc = [r for r in rows if r[1] == "geoclip predict path"]
    if gc:
        g0, _, _, _, rate0, _ = gc[0]
        for g in args.sizes:
            if g != g0:
                rows.append((g, "geoclip predict path", 0, float("nan"), rate0 * g0 / g, f"extrapolated from {g0:,}"))
    print("\n| gallery | method | queries timed | time (s) | queries/s | note |\n|---:|---|---:|---:|---:|---|")
    for g, name, n, t, rate, note in sorted(rows, key=lambda r: (r[0], -r[4])):
        print(f"| {g:,} | {name} | {n} | {t:.3f} | {rate:,.4g} | {note} |")
    for g in args.sizes:
        by = {r[1].split(" (")[0]: r[4] for r in rows if r[0] == g}
        best = max(by.get("vidtag faiss", 0), by.get("vidtag torch", 0))
        ratios = ", ".join(f"{best / v:,.0f}x vs {k}" for k, v in by.items() if not k.startswith("vidtag"))
        print(f"gallery {g:,}: best vidtag {best:,.0f} q/s; {ratios}")
    if not args.no_predict:
        with tempfile.TemporaryDirectory() as tmp:
            t, n = bench_predict_60s(Path(tmp))
        print(f"predict on a 60 s 320x240 H.264 clip at 1 fps ({n} frames, tiny backbones, CPU): {t:.2f} s")


if __name__ == "__main__":
    main()
