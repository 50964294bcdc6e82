"""Feature-extraction throughput (frames/s): decode-only, compute-only and end-to-end, from JPEGs on disk.

    python benchmarks/extract.py                          # tiny preset on CPU (the demo's backbones)
    python benchmarks/extract.py --preset real-arch       # ViT-L/14 CLIP + DINOv2, random weights (GPU)

decode-only: the extraction DataLoader (workers decode + resize/crop both views) with no model.
compute-only: ``DualBackbone.encode`` on batches already in memory (includes host->device copies).
end-to-end: ``extract_features`` into a fresh store (decode, compute, fp16 store writes, overlapped).
On CUDA the share of the bf16 dense peak is reported from a FLOP count of one batch.
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidtag.data.manifest import read_manifest, write_manifest  # noqa: E402
from vidtag.features.backbones import BackboneConfig, build_backbones  # noqa: E402
from vidtag.features.dataset import FrameBatches, FrameSource  # noqa: E402
from vidtag.features.extract import ExtractConfig, extract_features  # noqa: E402
from vidtag.features.store import StoreLayout  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets), by substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0}


def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> Path:
    """n smooth random JPEGs (so they compress like photos, not noise) and their manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    rows = []
    root.mkdir(parents=True)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    for i in range(n):
        small = np.roll(base, i, axis=1)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(root / f"{i:06d}.jpg", quality=90)
        rows.append({"sequence_id": f"s{i // 100:04d}", "frame_index": i % 100, "image_path": f"{i:06d}.jpg",
                     "lat": 0.0, "lon": 0.0, "split": "train"})
    df = pl.DataFrame(rows, schema_overrides={"frame_index": pl.Int32})
    write_manifest(df, root.parent / "manifest.parquet", root, source="bench")
    return root.parent / "manifest.parquet"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "real-arch"])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--jpeg-size", default="320x240", help="WxH of the JPEGs on disk (MSLS frames are 640x480)")
    ap.add_argument("--image-size", type=int, default=None, help="model input px [tiny: 64, real-arch: 224]")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the available cores, as vidtag uses; read by setup_threads)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    image_size = args.image_size or (64 if args.preset == "tiny" else 224)
    bcfg = BackboneConfig(preset=args.preset, image_size=image_size)
    w, h = (int(v) for v in args.jpeg_size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="vidtag-bench-"))
    try:
        t = time.perf_counter()
        manifest = read_manifest(make_jpegs(tmp / "jpegs", args.frames, (w, h)))
        print(f"made {args.frames} JPEGs {w}x{h} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        bb = build_backbones(bcfg, device)
        bb.set_precision(True)
        if args.compile and device.type == "cuda":
            bb.compile_encoders()
        cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.num_workers, device=str(device),
                            compile=False, layout=StoreLayout(shard_rows=max(args.batch_size, 64) * 4, chunk_rows=64))
        res: dict = {"preset": args.preset, "image_size": image_size, "jpeg_size": args.jpeg_size,
                     "frames": args.frames, "batch_size": args.batch_size, "num_workers": args.num_workers,
                     "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                     "torch_threads": torch.get_num_threads(), "dims": list(bb.dims)}

        # decode-only
        batches = [(s, min(s + args.batch_size, args.frames)) for s in range(0, args.frames, args.batch_size)]
        loader = torch.utils.data.DataLoader(FrameBatches(FrameSource.from_manifest(manifest.df, manifest.root),
                                                          batches, bb.preprocessor), batch_size=None,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        t = time.perf_counter()
        kept = []
        for _, c, d, _, _ in loader:
            if len(kept) < 4:
                kept.append((c, d))
        res["decode_fps"] = args.frames / (time.perf_counter() - t)

        # compute-only (warm-up first: cuDNN/cuBLAS autotune, compile)
        c, d = kept[0]
        if device.type == "cuda":
            c, d = c.pin_memory(), d.pin_memory()
        for _ in range(2):
            bb.encode(c, d)
        sync(device)
        n_iter = max(3, min(20, args.frames // len(c)))
        t = time.perf_counter()
        for _ in range(n_iter):
            out = bb.encode(c, d)
        sync(device)
        dt = time.perf_counter() - t
        res["compute_fps"] = n_iter * len(c) / dt
        del out

        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            bb.encode(c[:2], d[:2])
        gflop_per_frame = fc.get_total_flops() / 2 / 1e9
        res["gflop_per_frame"] = gflop_per_frame
        if device.type == "cuda":
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
            if peak:
                res["bf16_peak_tflops"] = peak
                res["compute_share_of_peak"] = res["compute_fps"] * gflop_per_frame / (peak * 1e3)

        # end-to-end
        t = time.perf_counter()
        r = extract_features(manifest, tmp / "features.zarr", bb, cfg, progress=False)
        res["end_to_end_fps"] = args.frames / (time.perf_counter() - t)
        if "bf16_peak_tflops" in res:
            res["end_to_end_share_of_peak"] = res["end_to_end_fps"] * gflop_per_frame / (res["bf16_peak_tflops"] * 1e3)
        assert r.status == "complete" and r.n_bad == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps(res, indent=2))
    print(f"{args.preset} @ {image_size}px on {res['device']}: decode {res['decode_fps']:.0f}, compute "
          f"{res['compute_fps']:.0f}, end-to-end {res['end_to_end_fps']:.0f} frames/s "
          f"({gflop_per_frame:.2f} GFLOP/frame)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
