"""What temporal decoding can and cannot do on a model's own candidate lattices (beyond App. L).

``metrics/eval.json`` holds argmax against Viterbi for one run; this study asks why the difference is what it
is. On the eval split and, for comparison, on the training split (frames the model was trained on), for the
final and the Phase I lattices (each frame's top-K gallery points and scores, the evaluate stage's inference
path), it reports:

* ``spread_km``: how far a frame's K candidates lie from its top-1 (median over frames of the median and the
  largest distance). A lattice whose candidates are all neighbours of the top-1 lets a decoder smooth within
  a few hundred metres but never reach a far, right answer;
* ``argmax`` and ``viterbi`` (the inference path's transition model: the train split's step scale floored at
  the gallery spacing, a dead zone of one scale);
* ``viterbi_temperature_xN``: the same with the emissions' temperature multiplied by N (sharper emissions);
* ``max_marginal``: each frame's candidate of highest posterior probability (forward-backward over the same
  HMM): the decoder that maximises the expected number of right frames, where Viterbi maximises the
  probability of the whole path;
* ``mbr_1km``: each frame's candidate with the most posterior mass within 1 km (minimum Bayes risk for
  "within 1 km"), the decision that maximises expected acc@1km if the HMM's probabilities are right.

Where the posterior decoders gain on the training split and lose on the eval split, the HMM's probabilities
are right for frames the model knows and wrong for new ones: the errors on new drives are shared by a
drive's frames (a drive placed a kilometre off), which no decoder over that drive's own candidates corrects.

After ``make demo`` (reads cache/bundle, cache/features.zarr, cache/manifest.parquet):
    .venv/bin/python benchmarks/decoder_study.py [--top-k 64] [--out metrics/decoder_study.json]
"""

from __future__ import annotations

import setup_threads  # noqa: F401  (first: threads and OpenMP policy before numpy and torch load)

import argparse
import math
from dataclasses import replace

import numpy as np
import torch
from failure_modes import Lattice, decode, lattice_from_located, scores

from vidtag.decode import DecodeConfig, candidate_distances_km, log_transitions
from vidtag.geo import haversine_km

TEMPERATURE_FACTORS = (4.0, 16.0, 64.0)


def spread_km(lat: Lattice) -> dict:
    """Distances (km) of each frame's candidates from its top-1: median over frames of their median and max."""
    d = haversine_km(lat.latlon[:, :1, 0], lat.latlon[:, :1, 1], lat.latlon[..., 0], lat.latlon[..., 1])  # (M, K)
    return {"median_of_median": float(np.median(np.median(d, axis=1))), "median_of_max": float(np.median(d.max(axis=1)))}


def posterior(lat: Lattice, cfg: DecodeConfig) -> list[torch.Tensor]:
    """Per drive, the HMM's posterior marginals (T, K) by forward-backward, with the transitions Viterbi uses."""
    scale = max(lat.step_km, lat.resolution_km, cfg.min_scale_km)
    out = []
    for a, b in zip(lat.offsets[:-1], lat.offsets[1:]):
        log_e = torch.log_softmax(torch.from_numpy(lat.score[a:b]).double() * math.exp(lat.logit_scale), dim=1)  # (T, K)
        cand = torch.from_numpy(lat.latlon[a:b])  # (T, K, 2)
        n = b - a
        step = candidate_distances_km(cand[:-1], cand[1:])  # (T - 1, K, K): [t - 1, previous k, current j]
        log_a = [None] + list(log_transitions(step, scale, cfg.transition_weight, cfg.free_scales))  # Viterbi's, exactly
        fwd = torch.empty_like(log_e)
        bwd = torch.zeros_like(log_e)
        fwd[0] = log_e[0]
        for t in range(1, n):
            fwd[t] = torch.logsumexp(fwd[t - 1][:, None] + log_a[t], dim=0) + log_e[t]
        for t in range(n - 2, -1, -1):
            bwd[t] = torch.logsumexp(log_a[t + 1] + (log_e[t + 1] + bwd[t + 1])[None, :], dim=1)
        out.append(torch.softmax(fwd + bwd, dim=1))
    return out


def posterior_answers(lat: Lattice, cfg: DecodeConfig, radius_km: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(max-marginal answers (M, 2), minimum-Bayes-risk answers for "within radius_km" (M, 2))."""
    mm, mbr = [], []
    for (a, b), post in zip(zip(lat.offsets[:-1], lat.offsets[1:]), posterior(lat, cfg)):
        cand = torch.from_numpy(lat.latlon[a:b])  # (T, K, 2)
        near = candidate_distances_km(cand, cand) <= radius_km  # (T, K, K)
        rows = torch.arange(b - a)
        mm.append(cand[rows, post.argmax(dim=1)].numpy())
        mbr.append(cand[rows, (post[:, None, :] * near).sum(dim=-1).argmax(dim=1)].numpy())
    return np.concatenate(mm), np.concatenate(mbr)


def study(lat: Lattice) -> dict:
    cfg = DecodeConfig(step_km=lat.step_km)
    rows = np.arange(len(lat.score))
    none = np.zeros(len(rows), bool)
    clean = lat.latlon[:, 0]

    def score(answer):
        s = scores(lat, answer, clean, none)
        s.pop("recovered_pct")
        return s

    out = {"spread_km": spread_km(lat), "argmax": score(clean), "viterbi": score(lat.latlon[rows, decode(lat, cfg)])}
    for f in TEMPERATURE_FACTORS:
        sharp = replace(lat, logit_scale=lat.logit_scale + math.log(f))
        out[f"viterbi_temperature_x{f:g}"] = score(lat.latlon[rows, decode(sharp, cfg)])
    mm, mbr = posterior_answers(lat, cfg)
    out["max_marginal"], out["mbr_1km"] = score(mm), score(mbr)
    return out


def lattices(args) -> dict[str, Lattice]:
    """The final and Phase I lattices of the eval and train splits, from the evaluated model (one inference pass per split)."""
    from vidtag.data.manifest import manifest_fingerprint, read_manifest
    from vidtag.evaluation import train_step_km
    from vidtag.features.store import load_features
    from vidtag.gallery import read_gallery
    from vidtag.inference import InferenceConfig, gallery_latlon, locate_sequences, offsets_from_sequence_ids
    from vidtag.models.bundle import load_bundle

    manifest = read_manifest(args.manifest).df
    features = load_features(args.features, expect_fingerprint=manifest_fingerprint(manifest))
    bundle = load_bundle(args.model, args.device)
    if bundle.gallery_path is None:
        raise SystemExit(f"{args.model} carries no gallery; give the evaluated bundle (cache/bundle), which does")
    gallery = gallery_latlon(read_gallery(bundle.gallery_path)[0], bundle.gallery_path)
    step_km = train_step_km(manifest)
    if step_km is None:
        raise SystemExit("the manifest's train split has no track to measure a step scale on")
    out = {}
    for split in (args.split, "train"):
        rows = np.flatnonzero((manifest["split"] == split).to_numpy())
        m = manifest[rows]
        offsets, ids = offsets_from_sequence_ids(m["sequence_id"].to_list())
        found, gal = locate_sequences(bundle, features.clip[rows], features.dino[rows], features.valid[rows], offsets, gallery,
                                      sequence_ids=ids, cfg=InferenceConfig(top_k=args.top_k, step_km=step_km),
                                      device=args.device, top_k=args.top_k)
        for stage in found.candidates:
            out[f"{split}/{stage}"] = lattice_from_located(found, stage, m, float(bundle.logit_scale), step_km, gal)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cache/bundle", help="a model bundle that carries its gallery (stage `evaluate` writes it)")
    ap.add_argument("--features", default="cache/features.zarr")
    ap.add_argument("--manifest", default="cache/manifest.parquet")
    ap.add_argument("--split", default="val", help="the held-out split; the train split is studied beside it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    res = {name: study(lat) for name, lat in lattices(args).items()}
    print(f"{'lattice':14s}{'decoder':26s}{'acc@1km':>9s}{'median km':>11s}{'DFD km':>10s}")
    for name, r in res.items():
        print(f"{name:14s}candidates within {r['spread_km']['median_of_max']:.2f} km of the top-1 "
              f"(median {r['spread_km']['median_of_median']:.2f} km)")
        for dec, s in r.items():
            if dec != "spread_km":
                print(f"{'':14s}{dec:26s}{s['acc_1km']:9.2f}{s['median_km']:11.3f}{s['dfd_km']:10.3f}")
    if args.out:
        from vidtag.io import write_json_atomic

        write_json_atomic(args.out, res)


if __name__ == "__main__":
    main()
