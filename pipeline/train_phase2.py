"""`train_phase2` stage: params ``phase2`` + Phase I checkpoint + features -> the model bundle (cache/model/).

Params keys (``phase2:``): every field of vidtag.train.phase2.Phase2Config, plus ``refiner:`` with
vidtag.models.config.GeoRefinerConfig fields; ``runtime:`` as for `train_phase1` (read, not declared). Checkpoints go to ``--checkpoints`` (default: ``<out>.ckpt``
beside the bundle) and a re-run resumes from them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.common import load_params, pick, run_stage
from pipeline.training import code_fingerprint, run_resumable
from vidtag.data.manifest import manifest_fingerprint, read_manifest
from vidtag.features.store import load_features
from vidtag.gallery import split_points
from vidtag.models.config import GeoRefinerConfig, build_config
from vidtag.train.loop import RuntimeConfig
from vidtag.train.phase2 import Phase2Config, train_phase2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", required=True, help="feature store, e.g. cache/features.zarr")
    ap.add_argument("--manifest", required=True, help="manifest parquet, e.g. cache/manifest.parquet")
    ap.add_argument("--phase1", required=True, help="Phase I output directory, e.g. cache/phase1")
    ap.add_argument("--out", required=True, help="model bundle directory to write (no gallery: `evaluate` packs one), e.g. cache/model")
    ap.add_argument("--checkpoints", default=None, help="Phase II checkpoint directory (default: <out>.ckpt)")
    ap.add_argument("--live", default=None, help="DVCLive directory, e.g. dvclive/phase2")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args()

    params = load_params("phase2")
    p = dict(params["phase2"])
    refiner_cfg = build_config(GeoRefinerConfig, p.pop("refiner", {}) or {})
    cfg = build_config(Phase2Config, {**p, "seed": p.get("seed", params["seed"])})
    runtime = build_config(RuntimeConfig, {**pick(params["runtime"], RuntimeConfig), "progress": not args.no_progress})
    out = Path(args.out)
    ckpt = Path(args.checkpoints) if args.checkpoints else out.with_name(out.name + ".ckpt")
    m = read_manifest(args.manifest)
    features = load_features(args.features, expect_fingerprint=manifest_fingerprint(m.df), lazy=True)
    gallery = split_points(m.df, "val") if (m.df["split"] == "val").any() else None  # App. D.2, as in train_phase1
    metrics = run_resumable(
        lambda live: train_phase2(features, m.df, None, gallery, args.phase1, out,
                                  ckpt, cfg, refiner_cfg, live, runtime,
                                  code=code_fingerprint("pipeline.train_phase2")),
        ckpt, args.live)
    print("phase2 done: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_stage(main)
