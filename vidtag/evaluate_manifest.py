"""Score a model bundle on anyone's annotated videos or frames (``vidtag evaluate``).

The pipeline's ``evaluate`` stage reads features a DVC stage extracted with ``params.yaml``'s backbone
settings; a user's own manifest has no such stage. Here the features come from the bundle's own frozen
backbones (the ones its model was trained on, Sec. 3.1, checked by their weights' sha256), extracted
once into a cache keyed by the manifest and the backbones, and the scoring is the pipeline's
(:func:`vidtag.evaluation.run_evaluation`: Fig. 5 inference, the metrics of Sec. 4.3, per-sequence table).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from vidtag.errors import EvaluationError

ALL_SPLITS = "all"  # score every row of the manifest, whatever its split


@dataclass(frozen=True)
class EvaluationFiles:
    """Where ``vidtag evaluate`` writes, under one output folder."""

    out_dir: Path

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics.json"  # metrics.evaluate(...) + Phase I + counts

    @property
    def per_sequence(self) -> Path:
        return self.out_dir / "per_sequence.csv"  # one row per sequence: errors, DFD, path length, confidence

    @property
    def predictions(self) -> Path:
        return self.out_dir / "predictions.parquet"  # one row per frame: prediction, ground truth, confidence

    @property
    def plots(self) -> Path:
        return self.out_dir / "plots"  # error CDF and accuracy-by-threshold data, trajectory maps


def features_path(cache_dir: str | Path, manifest_fp: str, backbone_fp: dict) -> Path:
    """The cached store for this manifest and these backbones (any other pair gets another folder)."""
    from vidtag.fingerprint import sha256_json

    key = sha256_json({"manifest": manifest_fp, "backbones": backbone_fp})
    return Path(cache_dir) / "features" / f"{key[:20]}.zarr"


def extract_for_bundle(manifest, bundle, cache_dir: str | Path, *, device, batch_size: int = 32, num_workers: int = 2,
                       progress: bool = False):
    """Features of every manifest row from the bundle's own backbones, extracted into (or resumed from) the
    cache; returns ``(features, path, extract summary line)``."""
    from vidtag.data.manifest import manifest_fingerprint
    from vidtag.features.extract import ExtractConfig, extract_features
    from vidtag.features.store import load_features
    from vidtag.predict import backbones_for_bundle

    recorded = bundle.config.get("backbones") or {}
    bf16 = recorded.get("compute_dtype") == "bfloat16"  # as the training features were computed (CUDA only)
    bb = backbones_for_bundle(bundle, device)
    bb.set_precision(bf16)
    fp = manifest_fingerprint(manifest.df)
    path = features_path(cache_dir, fp, bb.fingerprint())
    cfg = ExtractConfig(batch_size=batch_size, num_workers=num_workers, device=str(device), bf16=bf16)
    result = extract_features(manifest, path, bb, cfg, progress=progress)
    return load_features(path, expect_fingerprint=fp), path, result.summary()


def evaluate_manifest(manifest_path: str | Path, model_dir: str | Path, out_dir: str | Path, *, split: str = ALL_SPLITS,
                      cache_dir: str | Path, device="auto", batch_size: int = 32, num_workers: int = 2, n_maps: int = 6,
                      progress: bool = False):
    """Extract, predict and score ``split`` of the manifest (``"all"``: every row); write the metrics JSON, the
    per-sequence CSV, the per-frame predictions and the plots under ``out_dir``. Returns ``(EvalResult,
    EvaluationFiles, extract summary line)``."""
    from vidtag.data.manifest import read_manifest
    from vidtag.device import resolve_device
    from vidtag.evaluation import EvalConfig, EvalRuntime, run_evaluation, write_reports
    from vidtag.metrics import LABEL_LEVELS
    from vidtag.models.bundle import load_bundle

    manifest = read_manifest(manifest_path)
    df = manifest.df
    if split != ALL_SPLITS and not (df["split"] == split).any():
        raise EvaluationError(f"{manifest_path} has no rows in split {split!r}; it has "
                              f"{sorted(df['split'].unique().to_list())} (or use --split all)")
    scored = df if split == ALL_SPLITS else df.filter(pl.col("split") == split)
    has_gt = scored["lat"].is_not_null() & scored["lon"].is_not_null()
    if not has_gt.any() and not any(c in scored.columns for c in LABEL_LEVELS):
        raise EvaluationError(f"{manifest_path} has no ground truth to score against (every lat/lon is empty); "
                              "annotate it with `vidtag ingest video --track` or `vidtag ingest frames --coords`")
    dev = resolve_device(device)
    bundle = load_bundle(model_dir, dev)
    features, _, extracted = extract_for_bundle(manifest, bundle, cache_dir, device=dev, batch_size=batch_size,
                                                num_workers=num_workers, progress=progress)
    eval_split = "test" if split == ALL_SPLITS else split
    if split == ALL_SPLITS:  # one split holding every row; features are keyed by rows, not splits
        manifest = replace(manifest, df=df.with_columns(pl.lit(eval_split).alias("split")))
    result = run_evaluation(bundle, features, manifest.df, EvalConfig(split=eval_split, n_maps=n_maps),
                            runtime=EvalRuntime(device=str(dev)), cache_dir=Path(cache_dir) / "embeddings",
                            progress=progress)
    result.metrics["split"] = split
    files = EvaluationFiles(Path(out_dir))
    write_reports(result, predictions=files.predictions, metrics=files.metrics, per_sequence_csv=files.per_sequence,
                  plots_dir=files.plots, n_maps=n_maps)
    return result, files, extracted
