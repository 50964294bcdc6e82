"""Training step rates at the paper's batch shape (128 sequences x 16 frames, 768 + 1024-d features).

Times full optimizer steps of Phase I (frame encoder + GeoCLIP location encoder, contrastive loss)
and Phase II (frozen Phase I forward, two location-encoder passes, GeoRefiner step) on random
features with paper-size models, then projects wall time for MSLS. Not part of the test run.

    .venv/bin/python benchmarks/train.py [--device cpu|cuda] [--steps N] [--threads N] [--bf16]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from vidtag.models import FrameEncoder, GeoRefiner, LocationEncoder, VidTAGConfig
from vidtag.train.losses import contrastive_loss, positive_targets, weighted_hinge_loss
from vidtag.train.noise import corrupt_gps

# MSLS train size: the paper trains on all MSLS sequences (query + database) split as in CityGuessr [21];
# MSLS has ~1.6 M images in ~ 54k sequences (Warburg et al. 2020, Table 1: 1,681,957 images). Phase I/II
# epochs draw one 16-frame sample per sequence, so an epoch is n_sequences / 128 steps. We assume
# 50,000 training sequences (about 90 % of the sequences that have >= 16 frames); change --msls-sequences.
MSLS_TRAIN_SEQUENCES = 50_000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step_fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    ap.add_argument("--msls-sequences", type=int, default=MSLS_TRAIN_SEQUENCES)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = VidTAGConfig()
    b, t = args.batch, args.seq_len
    clip = torch.randn(b, t, 768, device=device)
    dino = torch.randn(b, t, 1024, device=device)
    latlon = torch.stack([40 + torch.rand(b, t) * 0.5, -74 + torch.rand(b, t) * 0.5], -1).double().to(device)
    pad = torch.zeros(b, t, dtype=torch.bool, device=device)
    frame = FrameEncoder(cfg.frame).to(device)
    loc = LocationEncoder.from_geoclip(cfg.location.sigmas).to(device)
    refiner = GeoRefiner(cfg.refiner).to(device)
    logit_scale = torch.nn.Parameter(torch.tensor(cfg.logit_scale_init, device=device))
    opt1 = torch.optim.Adam([p for p in [*frame.parameters(), *loc.parameters(), logit_scale] if p.requires_grad], lr=5e-5)
    opt2 = torch.optim.Adam(refiner.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def phase1_step():
        with amp:
            v = frame(clip, dino, pad).reshape(b * t, -1)  # (B*T, 512)
            gps = latlon.reshape(b * t, 2)
            loss = contrastive_loss(v.float(), loc(gps).float(), logit_scale, positive_targets(gps, 0.0))
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        opt1.step()

    def phase2_step():
        with torch.no_grad(), amp:
            f = frame(clip, dino, pad)
            noisy = corrupt_gps(latlon, gen, pad_mask=pad)
            g_true = loc(latlon.reshape(-1, 2)).reshape(b, t, -1)
            g_noisy = loc(noisy.reshape(-1, 2)).reshape(b, t, -1)
        with amp:
            loss, _ = weighted_hinge_loss(refiner(f.float(), g_noisy.float(), pad).float(), g_true.float(), pad)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    r1 = bench(phase1_step, args.steps, args.warmup, device)
    r2 = bench(phase2_step, args.steps, args.warmup, device)
    steps_per_epoch = math.ceil(args.msls_sequences / b)
    h1 = 600 * steps_per_epoch / r1 / 3600
    h2 = 100 * steps_per_epoch / r2 / 3600
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"device: {name}; batch {b}x{t}, features 768+1024, bf16={args.bf16}")
    print(f"phase1: {r1:.3f} steps/s; phase2: {r2:.3f} steps/s")
    print(f"MSLS projection ({args.msls_sequences} train sequences, {steps_per_epoch} steps/epoch): "
          f"phase1 600 epochs {h1:.2f} h, phase2 100 epochs {h2:.2f} h, total {h1 + h2:.2f} h")


if __name__ == "__main__":
    main()
