"""The paper's failure modes (Fig. 4: jumps, jitter, collapse), simulated on held-out drives: what
temporal decoding (``vidtag.decode``, beyond App. L) recovers.

Each held-out drive's candidate lattice (every frame's top-K gallery points with their scores) is taken
as the model gives it, then corrupted in one of three ways, each a new best candidate inserted at rank 1
with a score ``--margin-nats`` above the true best (in nats at the model's temperature), the worst
candidate dropped:

* ``burst``: ``--burst`` consecutive frames whose top-1 jumps to another city (a gallery point more than
  100 km away, else a point 300 km off);
* ``jitter``: every frame's top-1 moved ``--jitter-km`` in a random direction;
* ``collapse``: ``--burst`` consecutive frames whose top-1 freezes on the stretch's first answer.

For each, the per-frame argmax and the Viterbi path (the inference path's settings: the train split's step
scale, floored at the gallery's spacing, dead zone of one scale), each also smoothed over +-``--smooth-frames``
frames (vidtag.smoothing; default the bundle's evaluated setting, none for ``--synthetic``), are scored against the truth: frame
accuracy at 1 km, median, DFD (km), the share of frames more than 25 km off, and ``recovered``: the share of
corrupted frames whose answer lies within 1 km of the clean lattice's argmax again.

After ``make demo`` (reads cache/bundle: the evaluated model with its gallery, cache/features.zarr, cache/manifest.parquet; the eval split):
    .venv/bin/python benchmarks/failure_modes.py [--stage final|phase1] [--top-k 64] [--out metrics/failure_modes.json]
Without a model (a smoke test on synthetic straight drives):
    .venv/bin/python benchmarks/failure_modes.py --synthetic
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import torch

from vidtag.decode import DecodeConfig, transition_scales_km, viterbi
from vidtag.geo import destination_point, haversine_km
from vidtag.metrics import evaluate
from vidtag.smoothing import smooth_sequences

MODES = ("clean", "burst", "jitter", "collapse")


@dataclass
class Lattice:
    """Candidates of S drives, frames in time order: sequence s is rows offsets[s]:offsets[s+1]."""

    latlon: np.ndarray  # (M, K, 2) degrees, best score first
    score: np.ndarray  # (M, K) cosine similarity
    truth: np.ndarray  # (M, 2) degrees
    offsets: np.ndarray  # (S + 1,)
    logit_scale: float  # the model's log temperature
    step_km: float  # transition scale per frame step (no timestamps)
    resolution_km: float  # the candidates' spacing: floor of the scale


def decode(lat: Lattice, cfg: DecodeConfig) -> np.ndarray:
    """Chosen column (M,) of the Viterbi path, as vidtag.inference decodes a lattice."""
    lengths = np.diff(lat.offsets)
    s, t_max, k = len(lengths), int(lengths.max()), lat.score.shape[1]
    pad = np.arange(t_max)[None, :] >= lengths[:, None]  # (S, T)
    keep = ~pad
    log_p = torch.log_softmax(torch.from_numpy(lat.score).double() * math.exp(lat.logit_scale), dim=1)
    log_e = torch.zeros(s, t_max, k, dtype=torch.float64)
    log_e[torch.from_numpy(keep)] = log_p
    cand = torch.zeros(s, t_max, k, 2, dtype=torch.float64)
    cand[torch.from_numpy(keep)] = torch.from_numpy(lat.latlon)
    n_steps = np.where(keep & (np.arange(t_max)[None, :] > 0), 1, 0)
    scale = transition_scales_km(np.full(pad.shape, np.nan), n_steps, replace(cfg, step_km=lat.step_km))
    path = viterbi(log_e, cand, torch.from_numpy(pad), scale_km=torch.from_numpy(scale), transition_weight=cfg.transition_weight,
                   min_scale_km=max(cfg.min_scale_km, lat.resolution_km), free_scales=cfg.free_scales).index
    return path[torch.from_numpy(keep)].numpy()


def corrupt(lat: Lattice, mode: str, rng, *, margin_nats: float, burst: int, jitter_km: float,
            far_points: np.ndarray | None) -> tuple[Lattice, np.ndarray]:
    """A corrupted copy of the lattice and the mask (M,) of corrupted frames."""
    m = len(lat.score)
    hit = np.zeros(m, bool)
    fake = lat.latlon[:, 0].copy()  # (M, 2) the inserted top-1
    for a, b in zip(lat.offsets[:-1], lat.offsets[1:]):
        n = b - a
        if mode == "jitter":
            hit[a:b] = True
            la, lo = destination_point(lat.latlon[a:b, 0, 0], lat.latlon[a:b, 0, 1], rng.uniform(0, 360, n), jitter_km)
            fake[a:b] = np.stack([la, lo], 1)
        elif mode in ("burst", "collapse") and n > burst + 1:
            s0 = a + int(rng.integers(1, n - burst))  # a stretch inside the drive, not at its first frame
            hit[s0:s0 + burst] = True
            if mode == "collapse":
                fake[s0:s0 + burst] = lat.latlon[s0, 0]
            else:
                far = None
                if far_points is not None and len(far_points):
                    d = haversine_km(*lat.latlon[s0, 0], far_points[:, 0], far_points[:, 1])
                    far = far_points[rng.choice(np.flatnonzero(d > 100.0))] if (d > 100.0).any() else None
                if far is None:
                    far = np.array(destination_point(*lat.latlon[s0, 0], rng.uniform(0, 360), 300.0))
                fake[s0:s0 + burst] = far
    margin = margin_nats / math.exp(lat.logit_scale)
    latlon, score = lat.latlon.copy(), lat.score.copy()
    latlon[hit] = np.concatenate([fake[hit][:, None], lat.latlon[hit, :-1]], axis=1)
    score[hit] = np.concatenate([lat.score[hit, :1] + margin, lat.score[hit, :-1]], axis=1)
    return replace(lat, latlon=latlon, score=score), hit


def scores(lat: Lattice, answer: np.ndarray, clean: np.ndarray, hit: np.ndarray) -> dict:
    """Frame acc@1km, median, DFD km, share > 25 km, and recovered share of the corrupted frames."""
    lengths = np.diff(lat.offsets)
    df = pl.DataFrame({"sequence_id": np.repeat(np.arange(len(lengths)), lengths).astype(str),
                       "frame_index": np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
                       "lat": answer[:, 0], "lon": answer[:, 1], "gt_lat": lat.truth[:, 0], "gt_lon": lat.truth[:, 1]})
    e = evaluate(df)
    back = haversine_km(answer[:, 0], answer[:, 1], clean[:, 0], clean[:, 1]) <= 1.0
    return {"acc_1km": e["frame"]["acc_1km"], "median_km": e["frame"]["median_km"], "dfd_km": e["trajectory"]["dfd_km"],
            "off_25km_pct": 100.0 - e["frame"]["acc_25km"], "recovered_pct": float(100.0 * back[hit].mean()) if hit.any() else None}


def run(lat: Lattice, args, far_points=None) -> dict:
    rng = np.random.default_rng(args.seed)
    cfg = DecodeConfig(step_km=lat.step_km)
    rows = np.arange(len(lat.score))
    clean = lat.latlon[:, 0]
    out = {}
    for mode in MODES:
        bad, hit = (lat, np.zeros(len(rows), bool)) if mode == "clean" else corrupt(
            lat, mode, rng, margin_nats=args.margin_nats, burst=args.burst, jitter_km=args.jitter_km, far_points=far_points)
        answers = {"argmax": bad.latlon[:, 0], "viterbi": bad.latlon[rows, decode(bad, cfg)]}
        if args.smooth_frames:
            for name in list(answers):
                answers[f"{name}+median"] = smooth_sequences(answers[name], bad.offsets, args.smooth_frames).numpy()
        out[mode] = {name: scores(bad, a, clean, hit) for name, a in answers.items()}
        out[mode]["n_corrupted"] = int(hit.sum())
    return out


def synthetic_lattice(n_drives=6, n_frames=40, k=16, step_km=0.02, seed=0) -> Lattice:
    """Straight drives in Paris; candidate 0 near the truth, the others within 2 km, scores falling with distance."""
    rng = np.random.default_rng(seed)
    truth, cands, scores_ = [], [], []
    for d in range(n_drives):
        la, lo = destination_point(48.85 + 0.01 * d, 2.35, rng.uniform(0, 360), step_km * np.arange(n_frames))
        tr = np.stack(np.broadcast_arrays(la, lo), 1)
        dist = np.concatenate([rng.uniform(0, 0.05, (n_frames, 1)), rng.uniform(0.1, 2.0, (n_frames, k - 1))], 1)
        cla, clo = destination_point(tr[:, None, 0], tr[:, None, 1], rng.uniform(0, 360, (n_frames, k)), dist)
        cands.append(np.stack([cla, clo], -1))
        scores_.append(0.6 - 0.05 * dist)
        truth.append(tr)
    score = np.concatenate(scores_)
    order = np.argsort(-score, axis=1, kind="stable")
    latlon = np.take_along_axis(np.concatenate(cands), order[..., None], 1)
    return Lattice(latlon, np.take_along_axis(score, order, 1), np.concatenate(truth),
                   np.arange(n_drives + 1) * n_frames, math.log(100.0), step_km, 0.1)


def model_lattice(args) -> tuple[Lattice, np.ndarray, int]:
    """The eval split's lattice as the trained model gives it (the same inference path as the evaluate stage), the
    gallery, and the smoothing window the bundle was evaluated with."""
    from vidtag.data.manifest import manifest_fingerprint, read_manifest
    from vidtag.evaluation import train_step_km
    from vidtag.features.store import load_features
    from vidtag.gallery import read_gallery
    from vidtag.inference import InferenceConfig, gallery_latlon, locate_sequences, offsets_from_sequence_ids
    from vidtag.models.bundle import load_bundle
    from vidtag.refine import gallery_spacing_km

    manifest = read_manifest(args.manifest).df
    features = load_features(args.features, expect_fingerprint=manifest_fingerprint(manifest))
    bundle = load_bundle(args.model, args.device)
    if bundle.gallery_path is None:
        raise SystemExit(f"{args.model} carries no gallery; give the evaluated bundle (cache/bundle), which does")
    rows = np.flatnonzero((manifest["split"] == args.split).to_numpy())
    m = manifest[rows]
    offsets, ids = offsets_from_sequence_ids(m["sequence_id"].to_list())
    gallery = gallery_latlon(read_gallery(bundle.gallery_path)[0], bundle.gallery_path)
    step_km = train_step_km(manifest)
    if step_km is None:
        raise SystemExit("the manifest's train split has no track to measure a step scale on")
    found, gallery = locate_sequences(bundle, features.clip[rows], features.dino[rows], features.valid[rows], offsets, gallery,
                                      sequence_ids=ids, cfg=InferenceConfig(top_k=args.top_k, step_km=step_km),
                                      device=args.device, top_k=args.top_k)
    recorded = (bundle.config.get("inference") or {}).get("smooth_frames", 0)
    return lattice_from_located(found, args.stage, m, float(bundle.logit_scale), step_km, gallery), gallery, int(recorded)


def lattice_from_located(found, stage: str, m: pl.DataFrame, logit_scale: float, step_km: float, gallery: np.ndarray) -> Lattice:
    """The ``stage`` candidates of ``found`` (vidtag.inference.Located over the split's rows ``m``), back in
    time order, frames without ground truth left out."""
    from vidtag.inference import offsets_from_sequence_ids
    from vidtag.refine import gallery_spacing_km

    cands = found.candidates[stage]
    order = np.argsort(found.rows, kind="stable")  # Located is in batch order: back to input (time) order
    r = found.rows[order]
    truth = m.select(pl.col("lat").cast(pl.Float64).fill_null(np.nan), pl.col("lon").cast(pl.Float64).fill_null(np.nan)).to_numpy()[r]
    ok = np.isfinite(truth).all(axis=1)
    r, order = r[ok], order[ok]
    seq_offsets, _ = offsets_from_sequence_ids(np.asarray(m["sequence_id"].to_list(), dtype=object)[r])
    return Lattice(cands.latlon[order], cands.score[order], truth[ok], seq_offsets, logit_scale, step_km, gallery_spacing_km(gallery))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="synthetic drives, no model (smoke test)")
    ap.add_argument("--model", default="cache/bundle", help="a model bundle that carries its gallery (stage `evaluate` writes it)")
    ap.add_argument("--features", default="cache/features.zarr")
    ap.add_argument("--manifest", default="cache/manifest.parquet")
    ap.add_argument("--split", default="val")
    ap.add_argument("--stage", default="final", choices=("final", "phase1"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--margin-nats", type=float, default=3.0, help="how much the corrupted top-1 beats the true best")
    ap.add_argument("--burst", type=int, default=5, help="frames in a burst or a collapsed stretch")
    ap.add_argument("--jitter-km", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smooth-frames", type=int, default=None, help="also score each answer smoothed over +-N frames "
                                                                     "[default: the bundle's eval.smooth_frames; 0 = not]")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    lat, gallery, recorded = (synthetic_lattice(), None, 0) if args.synthetic else model_lattice(args)
    if args.smooth_frames is None:
        args.smooth_frames = recorded
    res = run(lat, args, gallery)
    print(f"{len(lat.score)} frames in {len(lat.offsets) - 1} drives, K={lat.score.shape[1]}, step {lat.step_km * 1000:.1f} m, "
          f"resolution {lat.resolution_km * 1000:.0f} m, margin {args.margin_nats} nats")
    print(f"{'mode':10s}{'decode':16s}{'acc@1km':>9s}{'median km':>11s}{'DFD km':>10s}{'>25km %':>9s}{'recovered %':>13s}")
    for mode, r in res.items():
        for name in (k for k in r if k != "n_corrupted"):
            s = r[name]
            rec = "" if s["recovered_pct"] is None else f"{s['recovered_pct']:.1f}"
            print(f"{mode:10s}{name:16s}{s['acc_1km']:9.2f}{s['median_km']:11.3f}{s['dfd_km']:10.3f}{s['off_25km_pct']:9.2f}{rec:>13s}")
    if args.out:
        from vidtag.io import write_json_atomic

        write_json_atomic(args.out, res)


if __name__ == "__main__":
    main()
