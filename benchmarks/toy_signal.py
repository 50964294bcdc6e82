"""How much position the toy world's frames carry, from the pixels and from the extracted features.

For each city, a kernel ridge regression (RBF kernel, exact solve on up to ``--max-train`` training frames)
maps a frame to its east/north offset in km within the city; it is fitted on the training drives and
scored on the validation drives (frames of drives never seen). The median error is what a per-frame
model could reach with that input; "centre" is the error of always answering the training frames' mean
position. "R2 in drive" asks whether the input places a frame *along its drive*, which a trajectory needs
(Fig. 1, Fig. 6): per validation drive, 1 - SSE / SST of the predicted offsets from the drive's own mean
against the true ones (median over drives; 1 = the drive's shape is recovered, 0 = no better than one
point at the drive's centre, < 0 = the along-drive movement predicted is noise). "R2 avg +-N" is the same
for the per-frame predictions averaged over +-N frames of their drive (``--average-frames``): what a
temporal model could recover where the per-frame signal is there but noisier than the drive is long. Pixels are summarised as an 8x8 grid of mean RGB (192 numbers); features are the cached CLIP
and DINOv2 embeddings, each L2-normalised and concatenated (Sec. 3.1), as the frame encoder sees them.

After ``make demo`` (reads cache/manifest.parquet, cache/toy, cache/features.zarr):
    .venv/bin/python benchmarks/toy_signal.py
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from vidtag.data.manifest import manifest_fingerprint, read_manifest
from vidtag.features.store import load_features
from vidtag.geo import EARTH_RADIUS_KM


def kernel_ridge(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, gamma: float, ridge: float = 1e-2) -> np.ndarray:
    """RBF kernel ridge regression: (n, d), (n, 2), (m, d) -> (m, 2) predictions around the training mean."""
    def kernel(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-gamma * np.maximum(d2, 0.0))
    mean = y_train.mean(0)
    w = np.linalg.solve(kernel(x_train, x_train) + ridge * np.eye(len(x_train)), y_train - mean)
    return kernel(x_test, x_train) @ w + mean


def offsets_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(n,) degrees -> (n, 2) north/east km from their mean (equirectangular: cities are a few km wide)."""
    lat0 = np.radians(lat.mean())
    k = np.pi / 180 * EARTH_RADIUS_KM
    return np.stack([(lat - lat.mean()) * k, (lon - lon.mean()) * k * np.cos(lat0)], 1)


def moving_average(x: np.ndarray, half: int) -> np.ndarray:
    """(n, 2) -> (n, 2): the mean over +-half rows, the ends repeated (no shrinking towards zero at the edges)."""
    if half <= 0:
        return x
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.stack([np.convolve(np.pad(x[:, a], half, mode="edge"), kernel, mode="valid") for a in range(x.shape[1])], 1)


def r2_within_drives(pred: np.ndarray, true: np.ndarray, drives: np.ndarray, average_frames: int = 0) -> float:
    """Median over drives of 1 - SSE / SST of (n, 2) offsets, each drive centred on its own mean; the
    predictions first averaged over +-``average_frames`` frames of their drive (rows in frame order)."""
    r2 = []
    for d in np.unique(drives):
        j = drives == d
        p = moving_average(pred[j], average_frames)
        t, p = true[j] - true[j].mean(0), p - p.mean(0)
        r2.append(1.0 - ((p - t) ** 2).sum() / max((t ** 2).sum(), 1e-12))
    return float(np.median(r2))


def pixel_summary(paths: list[Path]) -> np.ndarray:
    """(n,) image paths -> (n, 192): an 8x8 grid of mean RGB in [0, 1]."""
    out = []
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB").resize((64, 64)), dtype=np.float64) / 255.0
        out.append(img.reshape(8, 8, 8, 8, 3).mean((1, 3)).ravel())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default="cache/manifest.parquet")
    ap.add_argument("--features", default="cache/features.zarr")
    ap.add_argument("--max-train", type=int, default=3000, help="training frames per city in the exact solve")
    ap.add_argument("--average-frames", type=int, default=30, help="half-width of the along-drive average (frames)")
    args = ap.parse_args()

    m = read_manifest(args.manifest)
    df = m.df
    f = load_features(args.features, expect_fingerprint=manifest_fingerprint(df), lazy=False)
    clip, dino = (np.asarray(a, dtype=np.float64) for a in (f.clip, f.dino))
    feats = np.concatenate([clip / np.linalg.norm(clip, axis=1, keepdims=True),
                            dino / np.linalg.norm(dino, axis=1, keepdims=True)], 1)
    pixels = pixel_summary([Path(m.root) / p for p in df["image_path"].to_list()])
    inputs = {"pixels": (pixels, 0.1), "features": (feats, 10.0)}  # RBF widths: the better of 0.1/1 and 1/10 when measured
    city = df["city"].to_numpy()
    split = df["split"].to_numpy()
    rng = np.random.default_rng(0)
    print(f"{'city':<12} {'val frames':>10} {'centre (km)':>12} "
          + " ".join(f"{k + ' (km)':>14} {k + ' R2 in drive':>20} {'R2 avg +-' + str(args.average_frames):>14}" for k in inputs))
    for c in np.unique(city):
        s = city == c
        y = offsets_km(df["lat"].to_numpy()[s], df["lon"].to_numpy()[s])
        train = np.flatnonzero(split[s] == "train")
        val = split[s] == "val"
        if not len(train) or not val.any():
            continue
        train = rng.choice(train, min(args.max_train, len(train)), replace=False)
        centre = np.median(np.linalg.norm(y[val] - y[train].mean(0), axis=1))
        drives = df["sequence_id"].to_numpy()[s][val]
        cols = []
        for x, gamma in inputs.values():
            pred = kernel_ridge(x[s][train], y[train], x[s][val], gamma)
            cols.append(f"{np.median(np.linalg.norm(pred - y[val], axis=1)):>14.2f} {r2_within_drives(pred, y[val], drives):>20.2f} "
                        f"{r2_within_drives(pred, y[val], drives, args.average_frames):>14.2f}")
        print(f"{c:<12} {int(val.sum()):>10} {centre:>12.2f} " + " ".join(cols))


if __name__ == "__main__":
    main()
