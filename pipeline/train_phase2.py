"""`train_phase2` stage: params ``phase2`` + Phase I checkpoint + features -> the model bundle (cache/model/).

Params keys (``phase2:``): every field of vidtag.train.phase2.Phase2Config, plus ``refiner:`` with
vidtag.models.config.GeoRefinerConfig fields; ``runtime:`` as for `train_phase1` (read, not declared). Checkpoints go to ``--checkpoints`` (default: ``<out>.ckpt``
beside the bundle) and a re-run resumes from them.

A Phase I model of a kind Phase II does not refine (``phase1.kind``: GeoCLIP fine-tuned or zero-shot, App. F) is
passed on as the final model, a bundle of kind ``geoclip`` with no GeoRefiner (Fig. 5 then stops after Phase I);
the ``phase2`` params are not used, and the checkpoint and DVCLive folders hold only a note saying so.
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
from vidtag.train.phase1 import has_phase2
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
    kind = phase1_kind(args.phase1)
    if not has_phase2(kind):
        pass_on_phase1(args.phase1, kind, dict(features.attrs), out, ckpt, args.live)
        return
    gallery = split_points(m.df, "val") if (m.df["split"] == "val").any() else None  # App. D.2, as in train_phase1
    metrics = run_resumable(
        lambda live: train_phase2(features, m.df, None, gallery, args.phase1, out,
                                  ckpt, cfg, refiner_cfg, live, runtime,
                                  code=code_fingerprint("pipeline.train_phase2")),
        ckpt, args.live)
    print("phase2 done: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def phase1_kind(phase1_dir: str | Path) -> str:
    """The ``phase1.kind`` the Phase I output was made with (its checkpoint's run config; absent = vidtag)."""
    from vidtag.train.checkpoint import read_state
    from vidtag.train.phase1 import CHECKPOINT_DIR

    state = read_state(Path(phase1_dir) / CHECKPOINT_DIR) or {}
    return ((state.get("config") or {}).get("train") or {}).get("kind", "vidtag")


def pass_on_phase1(phase1_dir: str, kind: str, feature_attrs: dict, out: Path, ckpt: Path, live_dir: str | None) -> None:
    """Write Phase I's model of ``kind`` (no Phase II) as the final bundle; leave a note where Phase II's outputs go
    (DVC expects them): a finished, delivered empty checkpoint (a later Phase II run discards it and trains afresh)
    and a DVCLive folder with one JSON file."""
    import torch

    from vidtag.io import write_json_atomic
    from vidtag.models.bundle import save_bundle
    from vidtag.models.geoclip_model import assemble_geoclip_bundle
    from vidtag.train.checkpoint import save_checkpoint
    from vidtag.train.phase1 import load_phase1

    model, p1_config = load_phase1(phase1_dir, "cpu")
    frame = model.frame_encoder
    with torch.no_grad():  # the head's own copy of the temperature follows the trained one
        frame.head.logit_scale.copy_(model.logit_scale.detach().reshape(()))
    method = {"geoclip_finetune": "GeoCLIP fine-tuned on this dataset's frames as independent images (App. F.4)",
              "geoclip_zero_shot": "GeoCLIP as shipped, zero-shot (App. F.1)"}.get(kind, kind)
    bundle = assemble_geoclip_bundle(frame, model.location_encoder, model.logit_scale, feature_attrs,
                                     {"phase1": p1_config["train"], "phase2": None}, method)
    save_bundle(out, bundle)
    note = {"phase2": None, "reason": f"phase1.kind {kind} has no GeoRefiner: Phase I's model is the final one"}
    save_checkpoint(ckpt, {}, None, {"config": {"kind": kind}, "step": 0, "epoch": 0, "metrics": {}, "complete": True,
                                     "delivered": True, **note})
    if live_dir:
        write_json_atomic(Path(live_dir) / "phase2.json", note)
    print(f"phase2: skipped: {note['reason']}; wrote {out} (kind geoclip, no refiner)")


if __name__ == "__main__":
    run_stage(main)
