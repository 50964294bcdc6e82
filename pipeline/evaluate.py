"""`evaluate` stage: params ``eval`` + trained model + gallery + features + manifest -> predictions, metrics,
plots, and the model packed with the gallery it was evaluated on (the bundle `vidtag predict` uses).

Training never reads the gallery (it validates against the validation frames' own GPS, App. D.2), so a new
gallery (Table 5's resolutions, a worldwide grid) re-runs `gallery` and this stage only. A model without a GeoRefiner
(``phase1.kind`` GeoCLIP, App. F) is evaluated as Fig. 5's first stage alone: its final answer is Phase I's.
A manifest of several datasets (App. H) adds ``datasets.<name>`` to the metrics: each dataset against its own gallery."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pipeline.common import load_params, pick, run_stage
from vidtag.data.manifest import manifest_fingerprint, read_manifest
from vidtag.device import resolve_device
from vidtag.evaluation import EvalConfig, EvalRuntime, run_dataset_evaluations, run_evaluation, summary, write_reports
from vidtag.features.store import load_features
from vidtag.models.bundle import load_bundle, save_bundle
from vidtag.models.geoclip_head import clip_features_only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="trained model bundle directory, e.g. cache/model")
    ap.add_argument("--gallery", required=True, help="gallery parquet to retrieve from, e.g. cache/gallery.parquet")
    ap.add_argument("--bundle", required=True, help="the evaluated model packed with this gallery, for `vidtag predict`, "
                                                    "e.g. cache/bundle")
    ap.add_argument("--features", required=True, help="feature store, e.g. cache/features.zarr")
    ap.add_argument("--manifest", required=True, help="manifest parquet, e.g. cache/manifest.parquet")
    ap.add_argument("--predictions", required=True, help="predictions parquet to write")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write, e.g. metrics/eval.json")
    ap.add_argument("--per-sequence", required=True, help="per-sequence CSV to write")
    ap.add_argument("--plots", required=True, help="folder for plot data (CSV) and trajectory maps (PNG)")
    ap.add_argument("--cache-dir", default="cache/embeddings", help="gallery-embedding cache (keyed by model and gallery)")
    args = ap.parse_args()

    params = load_params("eval")
    cfg = EvalConfig(**params["eval"])
    runtime = EvalRuntime(**pick(params["runtime"], EvalRuntime))
    manifest = read_manifest(args.manifest).df
    features = load_features(args.features, expect_fingerprint=manifest_fingerprint(manifest))
    bundle = load_bundle(args.model, resolve_device(runtime.device))
    if bundle.frame_encoder.cfg.dino_dim == 0:  # a GeoCLIP kind (phase1.kind) reads CLIP only, as `vidtag predict` feeds it
        features = clip_features_only(features)
    result = run_evaluation(bundle, features, manifest, cfg, runtime=runtime, cache_dir=args.cache_dir, progress=True,
                            gallery_path=args.gallery)
    # A manifest of several datasets (App. H): each one also scored alone against its own gallery (Tables 12-13),
    # under metrics `datasets.<name>`; the top level stays the pooled run over the whole gallery file.
    per_dataset = run_dataset_evaluations(bundle, features, manifest, cfg, runtime=runtime, cache_dir=args.cache_dir,
                                          gallery_path=args.gallery)
    if per_dataset:
        result.metrics["datasets"] = {name: r.metrics for name, r in per_dataset.items()}
    # the evaluated settings travel with the model: `vidtag predict --model <bundle>` answers as this evaluation did
    inference = {"expert_weight": cfg.expert_weight, "smooth_frames": cfg.smooth_frames}  # a weight without an expert failed above
    save_bundle(args.bundle, dataclasses.replace(bundle, gallery_path=Path(args.gallery),
                                                 config={**bundle.config, "inference": inference}))
    maps = write_reports(result, predictions=args.predictions, metrics=args.metrics, per_sequence_csv=args.per_sequence,
                         plots_dir=args.plots, n_maps=cfg.n_maps)
    print(summary(result.metrics))
    for name, r in per_dataset.items():
        print(f"--- {name} (its own gallery: {r.metrics['cost']['gallery_points']} points)\n{summary(r.metrics)}")
    print("cost: " + " ".join(f"{k}={v}" for k, v in result.timing.items()))
    print(f"wrote {args.predictions}, {args.metrics}, {args.per_sequence}, {args.plots} ({len(maps)} maps), {args.bundle}")


if __name__ == "__main__":
    run_stage(main)
