"""Exact top-k retrieval against this machine's matrix-product limit, and against its peers.

For each gallery size (default 1M random unit 512-d points) and each batch of queries (default 512 and
8,192), every backend of ``vidtag.retrieval.GalleryIndex`` searches the whole batch; its rate in GFLOP/s
(2 x queries x gallery x dim per search) is divided by the sustained fp32 matrix-product rate measured in
the same run with the same threads (``benchmarks/limits.py``; bf16 backends by the bf16 rate). Target:
>= 0.5 for every backend. Limits are measured before and after the searches and the higher is used.

* ``faiss``: ``IndexFlatIP`` (exact), FAISS's threads = torch's.
* ``torch``: fp32 tiles with a running top-k merge. On a CPU at k = 1: tiles of 2^21 scores (512 x 4,096 or
  4,096 x 512, cache-resident), the product through numpy's BLAS (OpenBLAS) into torch's score buffer with
  the project's threads, the selection by numpy's ``argmax`` (see ``vidtag.retrieval``); k > 1 and GPUs: up
  to 4,096 queries x 16,384-65,536 rows.
* ``torch-bf16`` (where the CPU has native bf16, and on CUDA): bf16 scores, short list re-scored in fp32,
  certified by an error bound, uncertified queries searched again in fp32 (counted: ``fallback``).

Every backend's answer is checked: identical indices across backends, and equal to a float64 brute force
on ``--check-queries`` queries. Peers, each checked against vidtag's answer:

* ``per-query loop``: cached gallery embeddings, one ``gallery @ q`` + argmax per query.
* ``geoclip predict path``: what ``GeoCLIP.predict`` does per image after its image encoder: the whole GPS
  gallery through geoclip's ``LocationEncoder(from_pretrained=True)``, normalise, logits, softmax, top-k;
  timed at ``--geoclip-size`` points (in chunks of 100K, which geoclip itself does not do: it needs the
  whole gallery's activations in memory at once), its top-1 compared with vidtag's search over the same
  embeddings.

OpenMP threads do not spin-wait (``OMP_WAIT_POLICY=PASSIVE``, set before numpy, torch and FAISS load:
``setup_threads``); a machine under load then slows every measurement alike instead of letting idle
OpenMP threads burn the cores the others need, and the ratios stay meaningful.

    .venv/bin/python benchmarks/retrieval.py                       # 1M gallery, 512 and 8,192 queries
    .venv/bin/python benchmarks/retrieval.py --smoke               # seconds: 20K gallery, 64 and 256 queries
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from limits import Limits, cpu_has_bf16, measure  # noqa: E402

from vidtag.retrieval import GalleryIndex  # noqa: E402

GEOCLIP_CHUNK = 100_000


def unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def brute_force(q: np.ndarray, g: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """float64 top-k indices, ties to the lowest index, over gallery chunks (memory stays small)."""
    best_s = np.full((len(q), 0), -np.inf)
    best_i = np.zeros((len(q), 0), np.int64)
    q64 = q.astype(np.float64)
    for g0 in range(0, len(g), chunk):
        tile = q64 @ g[g0 : g0 + chunk].astype(np.float64).T  # (q, c)
        s = np.concatenate([best_s, tile], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(g0, g0 + tile.shape[1]), tile.shape)], 1)
        order = _order(s, i, k)
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def _order(s: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    by_index = np.argsort(i, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(s, by_index, 1), axis=1, kind="stable")
    return np.take_along_axis(by_index, by_score, 1)[:, :k]


def backends_for(device: torch.device, chosen: list[str] | None) -> list[str]:
    if chosen:
        return chosen
    names = ["faiss", "torch"]
    if device.type == "cuda" or cpu_has_bf16():
        names.append("torch-bf16")
    return names


def build(name: str, gallery: np.ndarray, device: torch.device) -> GalleryIndex:
    if name == "faiss":
        return GalleryIndex.build(gallery, "faiss", device)
    precision = {"torch": "fp32", "torch-bf16": "bf16", "torch-fp16": "fp16"}[name]
    g = torch.from_numpy(gallery).to(device)
    return GalleryIndex.build(g, "torch", device, precision=precision)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_search(index: GalleryIndex, queries, k: int, device: torch.device) -> tuple[float, np.ndarray]:
    index.search(queries[: min(len(queries), 64)], k)  # warm-up: buffers, thread pools, kernels
    sync(device)
    t0 = time.perf_counter()
    _, idx = index.search(queries, k)
    sync(device)
    dt = time.perf_counter() - t0
    return dt, (idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx)


def geoclip_rate(gallery_size: int, n_queries: int, rng, device: torch.device) -> tuple[float, bool, str]:
    """(queries/s of geoclip's predict path at ``gallery_size`` points, its top-1 equals vidtag's, note)."""
    from geoclip import LocationEncoder

    enc = LocationEncoder(from_pretrained=True).eval().to(device)
    gps = torch.from_numpy(np.stack([rng.uniform(-60, 70, gallery_size), rng.uniform(-180, 180, gallery_size)], 1)
                           .astype(np.float32)).to(device)
    img = torch.from_numpy(unit(rng, n_queries, 512)).to(device)
    scale = torch.tensor(1 / 0.07, device=device)

    @torch.no_grad()
    def geoclip_predict(image_features):  # (1, 512): geoclip's path, the whole gallery through its encoder
        loc = torch.cat([F.normalize(enc(c), dim=1) for c in gps.split(GEOCLIP_CHUNK)])  # (G, 512)
        probs = (scale * F.normalize(image_features, dim=1) @ loc.T).softmax(dim=-1)
        return torch.topk(probs, 1, dim=1).indices, loc

    agree = True
    sync(device)
    t0 = time.perf_counter()
    for j in range(n_queries):
        top, loc = geoclip_predict(img[j : j + 1])
        sync(device)
        t1 = time.perf_counter()
        _, ours = GalleryIndex.build(loc, "auto", device).search(img[j : j + 1], 1)  # not timed: the check
        agree &= int(ours[0, 0]) == int(top[0, 0])
        t0 += time.perf_counter() - t1
    dt = time.perf_counter() - t0
    note = f"{gallery_size:,} points in chunks of {GEOCLIP_CHUNK:,}" if gallery_size > GEOCLIP_CHUNK else ""
    return n_queries / dt, agree, note


PREDICT_SCRIPT = """
import sys, time
t0 = time.perf_counter()
from pathlib import Path
from vidtag.models import load_bundle
from vidtag.predict import predict_input
tmp = Path(sys.argv[1])
bundle = load_bundle(tmp / "model", "cpu")
df = predict_input(tmp / "clip60.mp4", bundle, fps=1.0, device="cpu", cache_dir=tmp / "cache")
print(time.perf_counter() - t0, df.height)
"""


def bench_predict_60s(tmp: Path) -> tuple[float, float, int]:
    """(cold s: a fresh process, imports included; warm s: a second call in one process; frames)."""
    import av
    import polars as pl

    from vidtag.features.backbones import BackboneConfig, build_backbones
    from vidtag.models import VidTAGConfig, build_models, load_bundle, save_bundle
    from vidtag.models.bundle import Bundle
    from vidtag.predict import predict_input

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
    cfg = VidTAGConfig.from_dict({"frame": {"clip_dim": bb.dims[0], "dino_dim": bb.dims[1]}, "location": {"pretrained": False}})
    frame, loc, ref = build_models(cfg)
    lat, lon = np.meshgrid(np.linspace(47.3, 47.4, 100), np.linspace(8.4, 8.6, 100), indexing="ij")
    gal = tmp / "gallery.parquet"
    pl.DataFrame({"lat": lat.ravel(), "lon": lon.ravel()}).write_parquet(gal)
    save_bundle(tmp / "model", Bundle(frame, loc, ref, torch.tensor(2.66), {"model": cfg.to_dict(), "backbones": fp}, gal))
    bundle = load_bundle(tmp / "model", "cpu")
    predict_input(video, bundle, fps=1.0, device="cpu", cache_dir=tmp / "cache")  # gallery embedded and cached
    t0 = time.perf_counter()
    df = predict_input(video, bundle, fps=1.0, device="cpu", cache_dir=tmp / "cache")
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, str(tmp)], check=True, capture_output=True)
    cold = time.perf_counter() - t0
    return cold, warm, df.height


def best_limits(a: Limits, b: Limits) -> Limits:
    """The higher of two measurements of each limit: fractions against it are conservative."""
    out = Limits(**a.__dict__)
    for f in ("matmul_fp32_gflops", "matmul_bf16_gflops", "matmul_tf32_gflops", "read_gbs", "copy_gbs"):
        va, vb = getattr(a, f), getattr(b, f)
        setattr(out, f, None if va is None else max(va, vb))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000], help="gallery sizes")
    ap.add_argument("--queries", type=int, nargs="+", default=[512, 8192], help="queries per batched search")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", choices=["faiss", "torch", "torch-bf16", "torch-fp16"],
                    help="default: faiss, torch, and torch-bf16 where bf16 is native")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = the available cores; read by setup_threads)")
    ap.add_argument("--limit-seconds", type=float, default=3.0, help="time per limit measurement")
    ap.add_argument("--matmul-size", type=int, default=4096)
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the matmul limit each backend should reach")
    ap.add_argument("--check-queries", type=int, default=16, help="queries checked against a float64 brute force")
    ap.add_argument("--loop-queries", type=int, default=32)
    ap.add_argument("--geoclip-size", type=int, default=100_000, help="gallery points for the geoclip peer (0 = skip)")
    ap.add_argument("--geoclip-queries", type=int, default=1)
    ap.add_argument("--predict", action="store_true", help="also time vidtag predict on a 60 s clip (tiny backbones)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the harness, not the machine")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.queries, args.limit_seconds, args.matmul_size = [20_000], [64, 256], 0.3, 1024
        args.loop_queries, args.check_queries, args.geoclip_size = 4, 4, min(args.geoclip_size, 2_000)
    device = torch.device(args.device)
    names = backends_for(device, args.backends)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"{'faiss ' + __import__('faiss').__version__ if 'faiss' in names else ''}")
    before = measure(device, args.limit_seconds, args.matmul_size, 1024)
    print("limits before:", before.line(), flush=True)

    rng = np.random.default_rng(0)
    rows, peers, problems = [], [], []
    for g_size in args.sizes:
        gallery = unit(rng, g_size, args.dim)
        queries = unit(rng, max(args.queries), args.dim)
        truth = brute_force(queries[: args.check_queries], gallery, args.k)
        answers = {}
        for name in names:
            t0 = time.perf_counter()
            index = build(name, gallery, device)
            t_build = time.perf_counter() - t0
            for n_q in args.queries:
                q = queries[:n_q] if name == "faiss" else torch.from_numpy(queries[:n_q]).to(device)
                dt, idx = timed_search(index, q, args.k, device)
                gflops = 2 * n_q * g_size * args.dim / dt / 1e9
                ref = answers.setdefault(n_q, idx)
                agree = np.array_equal(idx, ref) and np.array_equal(idx[: args.check_queries], truth[: min(n_q, args.check_queries)])
                if not agree:
                    problems.append(f"{name} at {g_size:,} x {n_q}: indices differ from the other backends or brute force")
                note = f"build {t_build:.2f} s" + (f", fallback {index.n_fallback} queries" if name.startswith("torch-") else "")
                rows.append((g_size, name, n_q, dt, n_q / dt, gflops, "bf16" if name == "torch-bf16" else "fp32", agree, note))
                print(f"  {g_size:,} {name} {n_q} queries: {dt:.3f} s, {gflops:,.1f} GFLOP/s", flush=True)
            del index

        gal_t = torch.from_numpy(gallery)
        q_t = torch.from_numpy(queries[: args.loop_queries])
        t0 = time.perf_counter()
        loop = [int(torch.argmax(gal_t @ q)) for q in q_t]  # one matrix-vector product per query
        dt = time.perf_counter() - t0
        ok = loop == answers[min(args.queries)][: args.loop_queries, 0].tolist() if args.k == 1 else True
        peers.append((g_size, "per-query matmul loop (cached embeddings)", args.loop_queries, dt, args.loop_queries / dt, ok, ""))

    if args.geoclip_size:
        rate, ok, note = geoclip_rate(args.geoclip_size, args.geoclip_queries, rng, device)
        peers.append((args.geoclip_size, "geoclip predict path", args.geoclip_queries, args.geoclip_queries / rate, rate, ok, note))
        if args.geoclip_size not in args.sizes:  # vidtag at the same size, for the ratio
            gallery = unit(rng, args.geoclip_size, 512)
            queries = unit(rng, max(args.queries), 512)
            for name in names:
                index = build(name, gallery, device)
                n_q = max(args.queries)
                q = queries if name == "faiss" else torch.from_numpy(queries).to(device)
                dt, _ = timed_search(index, q, 1, device)
                rows.append((args.geoclip_size, name, n_q, dt, n_q / dt, 2 * n_q * args.geoclip_size * 512 / dt / 1e9,
                             "bf16" if name == "torch-bf16" else "fp32", True, "for the geoclip ratio"))

    after = measure(device, args.limit_seconds, args.matmul_size, 1024)
    print("limits after: ", after.line())
    lim = best_limits(before, after)
    limit_of = {"fp32": lim.matmul_fp32_gflops, "bf16": lim.matmul_bf16_gflops}

    print(f"\nmachine: {lim.device}, {lim.threads} threads; matmul limit (higher of before/after): fp32 "
          f"{lim.matmul_fp32_gflops:,.1f} GFLOP/s" + (f", bf16 {lim.matmul_bf16_gflops:,.1f}" if lim.matmul_bf16_gflops else "")
          + f"; memory read {lim.read_gbs:,.1f} GB/s")
    print(f"\n| gallery | backend | queries | time (s) | queries/s | GFLOP/s | fraction of {'/'.join(limit_of)} matmul | "
          "equal to brute force | note |\n|---:|---|---:|---:|---:|---:|---:|---|---|")
    verdicts = []
    for g, name, n_q, dt, qps, gf, kind, agree, note in rows:
        frac = gf / limit_of[kind]
        print(f"| {g:,} | {name} | {n_q:,} | {dt:.3f} | {qps:,.1f} | {gf:,.1f} | {frac:.2f} ({kind}) | {'yes' if agree else 'NO'} | {note} |")
        if g in args.sizes:
            verdicts.append((frac >= args.target, f"{name} at {g:,} x {n_q:,}: {frac:.2f} of the {kind} matmul limit"))
    print("\n| gallery | peer | queries timed | time (s) | queries/s | top-1 equals vidtag's | vidtag (best backend) / peer | note |\n"
          "|---:|---|---:|---:|---:|---|---:|---|")
    for g, name, n_q, dt, qps, ok, note in peers:
        best = max((r[4] for r in rows if r[0] == g), default=float("nan"))
        print(f"| {g:,} | {name} | {n_q} | {dt:.3f} | {qps:,.4g} | {'yes' if ok else 'NO'} | {best / qps:,.0f}x | {note} |")
    print()
    for ok, line in verdicts:
        print(f"{'ok  ' if ok else 'LOW '} {line} (target >= {args.target})")
    for p in problems:
        print("PROBLEM", p)
    if args.predict:
        with tempfile.TemporaryDirectory() as tmp:
            cold, warm, n = bench_predict_60s(Path(tmp))
        print(f"\npredict on a 60 s 320x240 H.264 clip at 1 fps ({n} frames, tiny backbones, CPU): cold {cold:.2f} s "
              f"(a fresh process: imports, bundle, backbones), warm {warm:.2f} s (a second call in one process)")


if __name__ == "__main__":
    main()
