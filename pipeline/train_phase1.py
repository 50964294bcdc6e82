"""`train_phase1` stage: params ``phase1`` + feature store + manifest -> Phase I checkpoint directory.

Params keys (``phase1:``): every field of vidtag.train.phase1.Phase1Config, plus ``model:`` with ``frame:`` /
``location:`` sub-sections (vidtag.models.config.FrameEncoderConfig / LocationEncoderConfig fields) and
``logit_scale_init``. ``frame_expert: true`` also trains the per-frame expert (vidtag.models.frame_expert: the
same model without TempGeo, same training) into ``<out>/expert``, which `train_phase2` packs into the bundle.
``kind`` picks the model: ``vidtag`` (the paper's), ``geoclip_finetune`` (App. F.4) or
``geoclip_zero_shot`` (App. F.1, written without training; needs real CLIP ViT-L/14 features). ``runtime:`` (vidtag.train.loop.RuntimeConfig: device, memory mode, validation
frequency) is read but not declared, so changing it re-runs nothing. Feature dims come from the store,
never from params. Re-running with an existing ``--out`` resumes from its checkpoint (same config and
data), e.g. after an interruption.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.common import load_params, pick, run_stage
from pipeline.training import code_fingerprint, run_resumable
from vidtag.data.manifest import manifest_fingerprint, read_manifest
from vidtag.features.store import load_features
from vidtag.gallery import split_points
from vidtag.models.config import VidTAGConfig, build_config
from vidtag.models.frame_expert import expert_config
from vidtag.train.checkpoint import mark_delivered
from vidtag.train.loop import RuntimeConfig
from vidtag.train.phase1 import CHECKPOINT_DIR, EXPERT_DIR, Phase1Config, train_phase1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", required=True, help="feature store, e.g. cache/features.zarr")
    ap.add_argument("--manifest", required=True, help="manifest parquet, e.g. cache/manifest.parquet")
    ap.add_argument("--out", required=True, help="output directory, e.g. cache/phase1")
    ap.add_argument("--live", default=None, help="DVCLive directory for metrics and plots, e.g. dvclive/phase1")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args()

    params = load_params("phase1")
    p = dict(params["phase1"])
    model_cfg = VidTAGConfig.from_dict(p.pop("model", {}) or {})
    with_expert = bool(p.pop("frame_expert", False))
    cfg = build_config(Phase1Config, {**p, "seed": p.get("seed", params["seed"])})
    runtime = build_config(RuntimeConfig, {**pick(params["runtime"], RuntimeConfig), "progress": not args.no_progress})
    m = read_manifest(args.manifest)
    features = load_features(args.features, expect_fingerprint=manifest_fingerprint(m.df), lazy=True)
    # Validation retrieves against the validation frames' own GPS (App. D.2), so training depends on the
    # manifest alone and a change of the evaluation gallery re-runs only `evaluate`.
    gallery = split_points(m.df, "val") if (m.df["split"] == "val").any() else None
    if with_expert and (cfg.kind != "vidtag" or model_cfg.frame.tempgeo_layers == 0):
        raise SystemExit(f"phase1.frame_expert: true adds a model that sees each frame alone to one with TempGeo; this "
                         f"model ({'phase1.kind ' + cfg.kind if cfg.kind != 'vidtag' else 'tempgeo_layers: 0'}) sees each "
                         "frame alone already: set phase1.frame_expert: false (and eval.expert_weight: 0)")
    code = code_fingerprint("pipeline.train_phase1")
    out = Path(args.out)
    metrics = run_resumable(
        lambda live: train_phase1(features, m.df, gallery, out, cfg, model_cfg, live, runtime, code=code),
        out / CHECKPOINT_DIR, args.live, deliver=not with_expert)
    print("phase1 done: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if with_expert:
        expert = run_resumable(
            lambda live: train_phase1(features, m.df, gallery, out / EXPERT_DIR, cfg, expert_config(model_cfg), live, runtime,
                                      code=code),
            out / EXPERT_DIR / CHECKPOINT_DIR, args.live and str(Path(args.live) / EXPERT_DIR))
        mark_delivered(out / CHECKPOINT_DIR)
        print("phase1 frame expert done: " + " ".join(f"{k}={v:.4g}" for k, v in expert.items()))
    elif (out / EXPERT_DIR).exists():
        shutil.rmtree(out / EXPERT_DIR)  # an expert of an earlier run with frame_expert on: not this model's


if __name__ == "__main__":
    run_stage(main)
