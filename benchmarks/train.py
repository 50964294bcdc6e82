"""Training throughput at the paper's batch: input batches/s (resident and streamed features) beside model steps/s.

Paper batch (App. A): 128 sequences x 16 frames of CLIP 768 + DINOv2 1024 = 1792-d float16 features.

* **Input**: what one training step asks of its feature source (``vidtag.features.source``), timed alone:
  ``sample_frames`` draws 16 frames of 128 random sequences, ``gather`` brings them to the device as float32.
  ``resident``: the whole cache on the device (``FeatureTensors``); ``streamed``: read per batch from a Zarr
  store written by vidtag's own writer (``StreamedFeatures``, 64-row chunks, 512 MB chunk cache), much larger
  than the cache, so random batches mostly miss it, as with MSLS's ~1.7M frames. Resident is also given as
  a fraction of this machine's memory copy bandwidth (bytes gathered / time).
* **Model**: full optimizer steps of Phase I (frame encoder + GeoCLIP location encoder, contrastive loss)
  and Phase II (frozen Phase I forward, two location-encoder passes, GeoRefiner step) with paper-size
  models, the step code of ``vidtag.train`` (valid frames by position, losses in fp32, Adam fused on
  CUDA); FLOP per step counted by ``torch.utils.flop_counter`` and the achieved rate given as a fraction
  of the matmul limit measured in the same run (``benchmarks/limits.py``; bf16 steps against bf16).
  ``--compile`` also times ``torch.compile``d modules (the first steps, compiling, are not timed).

The input keeps a GPU busy when its batches/s exceed the model's steps/s ("input / model" below).

    .venv/bin/python benchmarks/train.py                     # paper batch, 500K-row store, fp32 (+bf16 on CUDA)
    .venv/bin/python benchmarks/train.py --smoke             # seconds: tiny batch and store
    .venv/bin/python benchmarks/train.py --device cuda --precisions fp32 bf16 --compile
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from limits import cpu_has_bf16, measure  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vidtag.features.sequences import SequenceTable  # noqa: E402
from vidtag.features.source import FeatureTensors, StreamedFeatures  # noqa: E402
from vidtag.features.store import StoreLayout, load_features, open_store, store_key  # noqa: E402
from vidtag.models import FrameEncoder, GeoRefiner, LocationEncoder, VidTAGConfig  # noqa: E402
from vidtag.train import loop  # noqa: E402
from vidtag.train.batches import epoch_order, sample_frames  # noqa: E402
from vidtag.train.losses import contrastive_loss, positive_targets, weighted_hinge_loss  # noqa: E402
from vidtag.train.noise import corrupt_gps  # noqa: E402

# MSLS train size: the paper trains on all MSLS sequences (query + database) split as in CityGuessr [21];
# MSLS has ~1.6 M images in ~ 54k sequences (Warburg et al. 2020, Table 1: 1,681,957 images). Phase I/II
# epochs draw one 16-frame sample per sequence, so an epoch is n_sequences / 128 steps. We assume
# 50,000 training sequences (about 90 % of the sequences that have >= 16 frames); change --msls-sequences.
MSLS_TRAIN_SEQUENCES = 50_000
MSLS_FRAMES_PER_SEQUENCE = 31  # 1.68M images / 54K sequences
CLIP_DIM, DINO_DIM = 768, 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, n: int, warmup: int, device: torch.device) -> float:
    """Calls per second of ``fn`` over ``n`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return n / (time.perf_counter() - t0)


# -- input ----------------------------------------------------------------------------------------------


def sequence_table(n_rows: int, device: torch.device) -> SequenceTable:
    """Sequences of MSLS's mean length over rows 0..n_rows-1, in order."""
    s = n_rows // MSLS_FRAMES_PER_SEQUENCE
    rows = torch.arange(s * MSLS_FRAMES_PER_SEQUENCE).view(s, MSLS_FRAMES_PER_SEQUENCE)
    return SequenceTable(rows.to(device), torch.full((s,), MSLS_FRAMES_PER_SEQUENCE).to(device), [""] * s, 0)


def write_store(path: Path, n_rows: int, rng) -> float:
    """Random float16 features through vidtag's writer; returns seconds."""
    t0 = time.perf_counter()
    fp = {"config": {"preset": "bench"}, "clip": {"dim": CLIP_DIM}, "dino": {"dim": DINO_DIM}, "preprocessing": {}}
    store, _ = open_store(path, store_key(fp, "bench", n_rows, StoreLayout()))
    for u in range(store.n_units):
        a, b = store.unit_rows(u)
        store.write_unit(u, rng.standard_normal((b - a, CLIP_DIM), dtype=np.float32).astype(np.float16),
                         rng.standard_normal((b - a, DINO_DIM), dtype=np.float32).astype(np.float16), np.ones(b - a, bool), [])
    store.finalize()
    return time.perf_counter() - t0


def input_rates(args, device: torch.device, rng) -> dict[str, float]:
    table = sequence_table(args.rows, device)
    manifest = pl.DataFrame({"lat": np.zeros(args.rows), "lon": np.zeros(args.rows)})
    out = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        seconds = write_store(Path(tmp) / "f.zarr", args.rows, rng)
        print(f"  store: {args.rows:,} rows of {CLIP_DIM}+{DINO_DIM} float16 written in {seconds:.1f} s", flush=True)
        lazy = load_features(Path(tmp) / "f.zarr", lazy=True)
        sources = {
            "streamed": StreamedFeatures(lazy.clip, lazy.dino, manifest, device),
            "resident": FeatureTensors.from_arrays(lazy.clip, lazy.dino, manifest, device),
        }
        for name, source in sources.items():
            gen = torch.Generator(device=device).manual_seed(0)
            batches = iter(epoch_order(len(table), args.batch, gen, device) * 1000)

            def one_batch():
                seq_idx = next(batches)
                rows, _ = source.sample(lambda: sample_frames(table, seq_idx, args.seq_len, gen, "subset"))
                clip, dino, latlon = source.gather(rows)
                return clip

            out[name] = rate(one_batch, args.input_batches, 2, device)
            print(f"  input {name}: {out[name]:.1f} batches/s", flush=True)
            del source
    return out


# -- model ----------------------------------------------------------------------------------------------


def model_steps(args, device: torch.device, precision: str, compiled: bool) -> dict[str, tuple[float, float]]:
    """{phase: (steps/s, GFLOP per step)} at the paper's model sizes."""
    torch.manual_seed(0)
    cfg = VidTAGConfig()
    b, t = args.batch, args.seq_len
    clip = torch.randn(b, t, CLIP_DIM, device=device)
    dino = torch.randn(b, t, DINO_DIM, device=device)
    latlon = torch.stack([40 + torch.rand(b, t) * 0.5, -74 + torch.rand(b, t) * 0.5], -1).double().to(device)
    pad = torch.zeros(b, t, dtype=torch.bool, device=device)
    n = b * t
    keep = loop.valid_positions(pad, n)
    frame = FrameEncoder(cfg.frame).to(device)
    loc = LocationEncoder.from_geoclip(cfg.location.sigmas).to(device)
    refiner = GeoRefiner(cfg.refiner).to(device)
    logit_scale = torch.nn.Parameter(torch.tensor(cfg.logit_scale_init, device=device))
    opt1 = loop.adam([p for p in [*frame.parameters(), *loc.parameters(), logit_scale] if p.requires_grad], 5e-5, device)
    opt2 = loop.adam(refiner.parameters(), 1e-4, device)
    f_frame, f_loc, f_ref = (loop.maybe_compile(m, compiled) for m in (frame, loc, refiner))
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = precision == "bf16"

    def phase1_step():
        gps = latlon.flatten(0, 1)[keep]
        with loop.autocast(device, bf16):
            v = f_frame(clip, dino, pad).flatten(0, 1)[keep]  # (B*T, 512)
            g = f_loc(gps)
        loss = contrastive_loss(v.float(), g.float(), logit_scale, positive_targets(gps, 0.0))
        loop.optimizer_step(opt1, loss, 5e-5)

    def phase2_step():
        with torch.no_grad(), loop.autocast(device, bf16):
            f = f_frame(clip, dino, pad)
            noisy = corrupt_gps(latlon, gen, pad_mask=pad)
            g_true = f_loc(latlon.flatten(0, 1)[keep]).view(b, t, -1)
            g_noisy = f_loc(noisy.flatten(0, 1)[keep]).view(b, t, -1)
        with loop.autocast(device, bf16):
            r = f_ref(f, g_noisy, pad)
        loss, _ = weighted_hinge_loss(r.float(), g_true.float(), pad)
        loop.optimizer_step(opt2, loss, 1e-4)

    out = {}
    for name, step in (("phase1", phase1_step), ("phase2", phase2_step)):
        frame.train()
        if name == "phase2":
            frame.eval()
        warm = args.warmup + (3 if compiled else 0)  # compiling happens in the first calls
        steps_per_s = rate(step, args.steps, warm, device)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        out[name] = (steps_per_s, counter.get_total_flops() / 1e9)
        print(f"  model {name} {precision}{' compiled' if compiled else ''}: {steps_per_s:.3f} steps/s, "
              f"{out[name][1]:,.0f} GFLOP/step", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = the available cores; read by setup_threads)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--rows", type=int, default=500_000, help="rows of the streamed store (~3.6 KB each)")
    ap.add_argument("--input-batches", type=int, default=100, help="batches timed per input source")
    ap.add_argument("--steps", type=int, default=3, help="model steps timed per phase")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                    help="default: fp32 on CPU, fp32 and bf16 on CUDA")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd modules")
    ap.add_argument("--limit-seconds", type=float, default=3.0)
    ap.add_argument("--tmp", default=None, help="folder for the streamed store (default: the system's temp folder)")
    ap.add_argument("--msls-sequences", type=int, default=MSLS_TRAIN_SEQUENCES)
    ap.add_argument("--smoke", action="store_true", help="tiny batch and store, seconds: checks the harness only")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.rows, args.input_batches, args.steps, args.warmup, args.limit_seconds = 4, 20_000, 5, 1, 0, 0.3
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    if "bf16" in precisions and device.type == "cpu" and not cpu_has_bf16():
        print("note: this CPU has no native bf16; bf16 steps are emulated and say nothing about a GPU")
    limits = measure(device, args.limit_seconds, 1024 if args.smoke else 4096, 256 if args.smoke else 1024)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}\nlimits: {limits.line()}", flush=True)
    rng = np.random.default_rng(0)
    inputs = input_rates(args, device, rng)
    models = {}
    for precision in precisions:
        for compiled in ((False, True) if args.compile else (False,)):
            models[(precision, compiled)] = model_steps(args, device, precision, compiled)
    after = measure(device, args.limit_seconds, 1024 if args.smoke else 4096, 256 if args.smoke else 1024)
    limit = {"fp32": max(limits.matmul_fp32_gflops, after.matmul_fp32_gflops),
             "bf16": max(limits.matmul_bf16_gflops or 0, after.matmul_bf16_gflops or 0) or float("nan")}
    copy_gbs = max(limits.copy_gbs, after.copy_gbs)

    b, t = args.batch, args.seq_len
    batch_gb = b * t * (CLIP_DIM + DINO_DIM) * (2 + 4) / 1e9  # read float16, write float32
    print(f"\nmachine: {limits.device}, {limits.threads} threads; matmul fp32 {limit['fp32']:,.1f} GFLOP/s"
          + (f", bf16 {limit['bf16']:,.1f}" if not math.isnan(limit["bf16"]) else "") + f"; memory copy {copy_gbs:,.1f} GB/s")
    print(f"batch {b} x {t} frames of {CLIP_DIM}+{DINO_DIM}-d float16\n")
    print("| input | batches/s | frames/s | GB/s gathered | fraction of memory copy |\n|---|---:|---:|---:|---:|")
    for name, r in inputs.items():
        print(f"| {name} | {r:,.1f} | {r * b * t:,.0f} | {r * batch_gb:,.2f} | {r * batch_gb / copy_gbs:.2f} |")
    print("\n| phase | precision | compiled | steps/s | GFLOP/step | fraction of matmul | input / model: resident | streamed |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")
    steps_per_epoch = math.ceil(args.msls_sequences / b)
    for (precision, compiled), phases in models.items():
        for name, (sps, gflop) in phases.items():
            frac = sps * gflop / limit[precision]
            print(f"| {name} | {precision} | {'yes' if compiled else 'no'} | {sps:.3f} | {gflop:,.0f} | {frac:.2f} | "
                  f"{inputs['resident'] / sps:,.1f}x | {inputs['streamed'] / sps:,.1f}x |")
        r1, r2 = phases["phase1"][0], phases["phase2"][0]
        h1, h2 = 600 * steps_per_epoch / r1 / 3600, 100 * steps_per_epoch / r2 / 3600
        print(f"MSLS projection, {precision}{' compiled' if compiled else ''} ({args.msls_sequences:,} sequences, "
              f"{steps_per_epoch} steps/epoch): Phase I 600 epochs {h1:.2f} h + Phase II 100 epochs {h2:.2f} h = {h1 + h2:.2f} h")


if __name__ == "__main__":
    main()
