"""An evaluation run: two-stage predictions for a split, the paper's metrics (final and Phase I
alone, so the gain of Phase II shows), a per-sequence table, and plots ``dvc plots`` can show.

Frames of a sequence with no readable frame have no prediction; metrics.evaluate counts every frame,
so they are given the run's most frequent prediction (a data-driven prior, almost always wrong) and
counted in ``n_frames_unpredicted`` rather than dropped (dropping would inflate accuracy).

Beyond the paper (App. L): temporal decoding (``vidtag.decode``) and local refinement (``vidtag.refine``)
run in the same inference path. The top level of the metrics is the answer ``eval.decode`` chooses; the
``compare`` group holds the argmax and Viterbi answers side by side for Phase I and final, whichever is
chosen (plus ``gallery_top1``, Fig. 5's answer before refinement, when refinement is on), so their gain
shows beside the GeoRefiner's in one run and ``dvc metrics diff`` lines read ``compare.viterbi.final.dfd_km``.
Without timestamps (``timestamp_s`` in the manifest) the decoder's step scale is measured on the
manifest's training tracks (``decode.step_scale_km``), never on the split being evaluated.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import torch

from vidtag.decode import DECODE_METHODS, DecodeError, step_scale_km
from vidtag.errors import EvaluationError, InferenceError
from vidtag.gallery import read_gallery
from vidtag.geo import haversine_km, unit_vectors
from vidtag.inference import (InferenceConfig, Located, check_expert_and_smoothing, frame_table, gallery_latlon, locate_sequences,
                              offsets_from_sequence_ids)
from vidtag.io import atomic_path, write_json_atomic, write_parquet_atomic
from vidtag.metrics import LABEL_LEVELS, evaluate, evaluate_with_sequences, per_sequence
from vidtag.viz import accuracy_by_threshold, error_cdf, trajectory_map_png
from vidtag.windows import DEFAULT_WINDOW_FRAMES, DEFAULT_WINDOW_OVERLAP, check_window


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation computes (params ``eval:``); how it runs is :class:`EvalRuntime`."""

    split: str = "val"  # manifest split to evaluate (Sec. 4.1 reports the validation sets)
    k: int = 256  # Phase I candidates for the confidence softmax (vidtag.inference)
    confidence_radius_km: float = 1.0  # see vidtag.inference
    n_maps: int = 6  # trajectory maps drawn, for sequences evenly spaced in sorted-id order (stable across runs)
    # Beyond the paper (App. L); the defaults are the paper's Fig. 5. See vidtag.decode and vidtag.refine.
    decode: str = "argmax"  # the answer reported at the top level: argmax (Fig. 5) | viterbi; "compare" holds both
    top_k: int = 64  # candidates per frame for decoding and refinement (k above stays the confidence's: a mass over many)
    max_speed_kmh: float = 130.0  # frames with timestamps: a move at this speed costs one nat
    transition_weight: float = 1.0  # multiplies the decoder's log transitions (0 = argmax)
    refine: bool = False  # refine each frame's best candidates on a fine lattice in their gallery cell
    refine_step_km: float = 0.05  # the lattice's spacing (tens of metres)
    refine_radius_km: float | None = None  # half-width searched around a candidate; None = half the gallery spacing
    refine_k: int = 8  # candidates refined per frame
    refine_rerank: bool = False  # True: refined candidates re-sorted by their refined scores (vidtag.refine)
    expert_weight: float = 0.0  # the per-frame expert's weight in both retrievals (vidtag.models.frame_expert; 0 = Fig. 5)
    smooth_frames: int = 0  # temporal median of every answer over +-this many frames (vidtag.smoothing; 0 = off)
    # Long videos (vidtag.windows): TempGeo and the GeoRefiner run on overlapping windows; 0 = whole sequences.
    window_frames: int = DEFAULT_WINDOW_FRAMES  # 512 > MSLS's longest sequence (494): MSLS and toy results unchanged
    window_overlap: int = DEFAULT_WINDOW_OVERLAP  # frames shared by consecutive windows

    def __post_init__(self):
        if self.decode not in DECODE_METHODS:
            raise EvaluationError(f"eval.decode must be one of {DECODE_METHODS}; found {self.decode!r}")
        try:
            check_window(self.window_frames, self.window_overlap)
            check_expert_and_smoothing(self.expert_weight, self.smooth_frames)
        except InferenceError as e:
            raise EvaluationError(f"eval.{e}") from None


@dataclass(frozen=True)
class EvalRuntime:
    """How an evaluation runs; the results do not depend on it (params ``runtime:``, declared by no stage)."""

    device: str = "auto"  # auto | cpu | cuda[:i]
    backend: str = "auto"  # retrieval backend: auto | faiss | torch (both exact, same ties)
    batch_frames: int = 8192  # padded frames per forward pass


def inference_config(cfg: EvalConfig, runtime: EvalRuntime, step_km: float | None = None) -> InferenceConfig:
    return InferenceConfig(k=cfg.k, confidence_radius_km=cfg.confidence_radius_km, batch_frames=runtime.batch_frames,
                           backend=runtime.backend, decode=cfg.decode, top_k=cfg.top_k, max_speed_kmh=cfg.max_speed_kmh,
                           step_km=step_km, transition_weight=cfg.transition_weight, refine=cfg.refine,
                           refine_step_km=cfg.refine_step_km, refine_radius_km=cfg.refine_radius_km, refine_k=cfg.refine_k,
                           refine_rerank=cfg.refine_rerank,
                           window_frames=cfg.window_frames, window_overlap=cfg.window_overlap,
                           expert_weight=cfg.expert_weight, smooth_frames=cfg.smooth_frames)


def train_step_km(manifest: pl.DataFrame) -> float | None:
    """The decoder's step scale measured on the training split's tracks (``decode.step_scale_km``); None
    when it has no track of two geotagged frames, or its tracks never move. Frames without coordinates are skipped."""
    if "split" not in manifest.columns:
        return None
    t = manifest.filter((pl.col("split") == "train") & pl.col("lat").is_not_null() & pl.col("lon").is_not_null())
    if t.height < 2:
        return None
    offsets, _ = offsets_from_sequence_ids(t["sequence_id"].to_list())
    try:
        step = step_scale_km(t.select(pl.col("lat").cast(pl.Float64), pl.col("lon").cast(pl.Float64)).to_numpy(), offsets)
    except DecodeError:
        return None
    # Tracks that never move (CityGuessr68k labels every frame with its city centre, Sec. 5.3) give no scale.
    return step if step > 0 else None


def split_timestamps(m: pl.DataFrame) -> np.ndarray | None:
    """(N,) seconds of the split's frames (NaN = unknown), or None when the manifest has no times."""
    if "timestamp_s" not in m.columns or m["timestamp_s"].is_null().all():
        return None
    return m["timestamp_s"].cast(pl.Float64).fill_null(np.nan).to_numpy()


COMPACT_KEYS = ("frame_acc_0.5km", "frame_acc_1km", "frame_median_km", "frames_off_25km_pct", "video_acc_1km",
                "video_median_km", "dfd_km", "mrd_km")


def compact_metrics(pred: pl.DataFrame) -> dict[str, float]:
    """The few numbers a comparison group holds (``COMPACT_KEYS``): Sec. 4.3's frame and video accuracy and
    median, DFD and MRD in km, and the share of frames more than 25 km off (a jump to another city)."""
    e = evaluate(pred.select("sequence_id", "frame_index", "lat", "lon", "gt_lat", "gt_lon"))
    f, v, t = e["frame"], e["video"], e["trajectory"]
    return {"frame_acc_0.5km": f["acc_0.5km"], "frame_acc_1km": f["acc_1km"], "frame_median_km": f["median_km"],
            "frames_off_25km_pct": 100.0 - f["acc_25km"], "video_acc_1km": v["acc_1km"], "video_median_km": v["median_km"],
            "dfd_km": t["dfd_km"], "mrd_km": t["mrd_km"]}


@dataclass(frozen=True)
class LabelPredictor:
    """Place labels of predicted points (Table 3: city, state, country, continent accuracy on CityGuessr68k).

    The gallery's ``label`` names its points at one level (``city`` for a city-centre gallery, Sec. 5.3):
    a prediction's label is its gallery point's (the nearest point when refinement moved it off the
    gallery; exact coordinates first, the lowest index among equal ones, as retrieval breaks ties). The
    coarser levels come from the manifest's own hierarchy: each label's most common state, country and
    continent over all its rows (ties: alphabetical)."""

    level: str  # the gallery labels' level, one of LABEL_LEVELS
    labels: np.ndarray  # (G,) str, gallery order
    xyz: np.ndarray  # (G, 3) float64 unit vectors of the gallery points
    exact: pl.DataFrame  # lat, lon, _g: the first gallery index at each distinct point
    hierarchy: dict[str, dict[str, str]]  # coarser level -> {label: its value at that level}

    @classmethod
    def build(cls, gallery: pl.DataFrame, meta: dict, manifest: pl.DataFrame) -> "LabelPredictor | None":
        """None when there is nothing to score: no ``label`` in the gallery or no such column in the manifest."""
        level = meta.get("region_column") or "city"
        if meta.get("kind") == "datasets":  # several datasets' galleries in one (App. H): labels are scored per dataset
            return None
        if "label" not in gallery.columns or level not in LABEL_LEVELS or level not in manifest.columns:
            return None
        lat, lon = (gallery[c].cast(pl.Float64).to_numpy() for c in ("lat", "lon"))
        exact = (gallery.select(pl.col("lat").cast(pl.Float64), pl.col("lon").cast(pl.Float64))
                 .with_row_index("_g").unique(["lat", "lon"], keep="first", maintain_order=True))
        coarser = [c for c in LABEL_LEVELS[LABEL_LEVELS.index(level) + 1:] if c in manifest.columns]
        known = manifest.filter(pl.col(level).is_not_null())
        hierarchy = {}
        for c in coarser:
            best = (known.filter(pl.col(c).is_not_null()).group_by(pl.col(level).cast(pl.String), pl.col(c).cast(pl.String))
                    .len().sort(["len", c], descending=[True, False]).unique(level, keep="first"))
            hierarchy[c] = dict(best.select(level, c).iter_rows())
        return cls(level, gallery["label"].cast(pl.String).to_numpy().astype(object), unit_vectors(lat, lon), exact, hierarchy)

    def gallery_index(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(M,) gallery row of each point: the point itself where it is a gallery point, else the nearest."""
        q = pl.DataFrame({"lat": np.asarray(lat, np.float64), "lon": np.asarray(lon, np.float64)})
        idx = q.join(self.exact, on=["lat", "lon"], how="left", maintain_order="left")["_g"].to_numpy().astype(np.float64)
        off = np.flatnonzero(np.isnan(idx))
        if off.size:
            pts = unit_vectors(q["lat"].to_numpy()[off], q["lon"].to_numpy()[off])  # (M', 3)
            step = max(1, 4_000_000 // len(self.xyz))
            idx[off] = np.concatenate([(pts[i:i + step] @ self.xyz.T).argmax(axis=1) for i in range(0, len(pts), step)])
        return idx.astype(np.int64)

    def columns(self, lat: np.ndarray, lon: np.ndarray, prefix: str = "pred_") -> list[pl.Series]:
        """``pred_<level>`` and ``pred_<coarser level>`` for each point (null where the hierarchy lacks the label)."""
        own = self.labels[self.gallery_index(lat, lon)]
        out = [pl.Series(f"{prefix}{self.level}", own.tolist(), dtype=pl.String)]
        for c, mapping in self.hierarchy.items():
            out.append(pl.Series(f"{prefix}{c}", [mapping.get(v) for v in own], dtype=pl.String))
        return out


def frame_label_accuracy(pred: pl.DataFrame) -> dict[str, float]:
    """Percent of frames whose ``pred_<level>`` equals the frame's own label, per level (frames without a label
    are left out); the per-video accuracies are ``metrics.evaluate``'s ``city`` group."""
    out = {}
    for c in LABEL_LEVELS:
        if c in pred.columns and f"pred_{c}" in pred.columns:
            known = pred.filter(pl.col(c).is_not_null())
            if known.height:
                hit = known[c].cast(pl.String) == known[f"pred_{c}"].cast(pl.String)
                out[c] = float(100.0 * hit.fill_null(False).mean())
    return out


@dataclass
class EvalResult:
    predictions: pl.DataFrame  # one row per frame: sequence_id, frame_index, lat, lon, gt_*, phase1_*, confidence, valid
    metrics: dict[str, Any]  # metrics.evaluate(...) + "phase1" + counts
    sequences: pl.DataFrame  # per-sequence table
    plots: dict[str, pl.DataFrame] = field(default_factory=dict)  # name -> plot data
    timing: dict[str, float] = field(default_factory=dict)  # locate_s, peak_rss_mb (machine-dependent: logged, not a metric)


def _with_truth(pred: pl.DataFrame, m: pl.DataFrame, gallery: np.ndarray) -> tuple[pl.DataFrame, int]:
    """A frame table with the manifest's frame_index, frames without prediction given the run's most frequent
    answer (see the module docstring), and ground truth; returns it and the number of unpredicted frames."""
    pred = pred.with_columns(pl.Series("frame_index", m["frame_index"].to_numpy(), dtype=pl.Int32))
    missing = pred["lat"].is_null()
    n_unpredicted = int(missing.sum())
    if n_unpredicted:
        prior = pred.filter(~missing).group_by("lat", "lon").len().sort(["len", "lat", "lon"], descending=[True, False, False])
        p_lat, p_lon = (prior["lat"][0], prior["lon"][0]) if prior.height else (float(gallery[0, 0]), float(gallery[0, 1]))
        fill = {c: pl.col(c).fill_null(v) for c, v in (("lat", p_lat), ("lon", p_lon), ("phase1_lat", p_lat), ("phase1_lon", p_lon))}
        pred = pred.with_columns(**fill)
    extra = [c for c in LABEL_LEVELS if c in m.columns]
    pred = pred.with_columns(
        pl.Series("gt_lat", m["lat"].cast(pl.Float64)), pl.Series("gt_lon", m["lon"].cast(pl.Float64)),
        *[m[c].alias(c) for c in extra],
    )
    return pred, n_unpredicted


def _compare(found: Located, gallery, valid, offsets, ids, m: pl.DataFrame, decoded_available: bool, refined: bool) -> dict:
    """``compare`` group: argmax / viterbi (/ gallery_top1 with refinement) x (final, phase1), compact metrics."""
    answers = {"argmax": (found, False)}
    if decoded_available:
        answers["viterbi"] = (found, True)
    if refined:
        answers["gallery_top1"] = (found.before_refinement(), False)  # Fig. 5's gallery points, before refinement
    out = {}
    for name, (f, decoded) in answers.items():
        table, _ = _with_truth(frame_table(f, gallery, valid, offsets, ids, decoded=decoded), m, gallery)
        phase1 = table.select("sequence_id", "frame_index", "gt_lat", "gt_lon", lat="phase1_lat", lon="phase1_lon")
        out[name] = {"final": compact_metrics(table), "phase1": compact_metrics(phase1)}
    return out


def run_evaluation(bundle, features, manifest: pl.DataFrame, cfg: EvalConfig = EvalConfig(), *,
                   runtime: EvalRuntime = EvalRuntime(), cache_dir: str | Path | None = None, progress: bool = False,
                   gallery_path: str | Path | None = None, dataset: str | None = None) -> EvalResult:
    """Predict every frame of ``cfg.split`` and score it; ``features`` row i is manifest row i. The gallery is
    ``gallery_path`` when given (any gallery file: Table 5's resolutions, App. D.2's validation set), else the
    bundle's own. ``dataset`` (a manifest of several, App. H): only that dataset's frames, retrieved from its own
    part of the gallery (:mod:`vidtag.dataset_gallery`), its decoder scale and label hierarchy from its own rows."""
    if features.clip.shape[0] != manifest.height:
        raise EvaluationError(f"feature store has {features.clip.shape[0]} rows but the manifest {manifest.height}; "
                              "extract features for this manifest")
    in_split = manifest["split"] == cfg.split
    scope = manifest  # the rows this evaluation draws its training statistics from: one dataset's, or all
    if dataset is not None:
        if "dataset" not in manifest.columns:
            raise EvaluationError(f"dataset {dataset!r} asked for, but the manifest has one dataset (no 'dataset' column)")
        in_split = in_split & (manifest["dataset"] == dataset).fill_null(False)
        scope = manifest.filter(pl.col("dataset") == dataset)
    rows = np.flatnonzero(in_split.to_numpy())
    if rows.size == 0 and dataset is not None:
        raise EvaluationError(f"dataset {dataset!r} has no frames in split {cfg.split!r}")
    if rows.size == 0:
        splits = sorted(manifest["split"].unique().to_list())
        raise EvaluationError(f"the manifest has no frames in split {cfg.split!r}; it has {splits}; set eval.split")
    m = manifest[rows]
    offsets, ids = offsets_from_sequence_ids(m["sequence_id"].to_list())
    if len(set(ids)) != len(ids):
        raise EvaluationError("manifest rows of a sequence are not contiguous; the manifest must be sorted by (sequence_id, frame_index)")
    gallery_path = gallery_path if gallery_path is not None else bundle.gallery_path
    if gallery_path is None:
        raise EvaluationError("the model bundle carries no gallery; give the evaluation one (`--gallery FILE`)")
    gal_df, gal_meta = read_gallery(gallery_path)
    if dataset is not None:
        from vidtag.dataset_gallery import dataset_gallery

        gal_df, gal_meta = dataset_gallery(gal_df, gal_meta, dataset)
    gallery = gallery_latlon(gal_df, gallery_path)

    # Temporal decoding: timestamps where the manifest has them, else the training tracks' step scale.
    ts = split_timestamps(m)
    step_km = train_step_km(scope)
    can_decode = step_km is not None or (ts is not None and not np.isnan(ts).any())
    if cfg.decode == "viterbi" and not can_decode:
        raise EvaluationError("eval.decode=viterbi needs frame timestamps (manifest timestamp_s) or training tracks "
                              "of two or more geotagged frames to measure a step scale on; this manifest has neither")
    valid = np.asarray(features.valid[rows], dtype=bool)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    found, gallery = locate_sequences(bundle, features.clip[rows], features.dino[rows], valid, offsets, gallery,
                                      sequence_ids=ids, timestamps_s=ts, cache_dir=cache_dir,
                                      cfg=inference_config(cfg, runtime, step_km), device=runtime.device, progress=progress,
                                      always_decode=can_decode)
    locate_s = time.perf_counter() - t0
    pred, n_unpredicted = _with_truth(frame_table(found, gallery, valid, offsets, ids, decoded=cfg.decode == "viterbi"), m, gallery)
    # Labelled galleries (CityGuessr68k's city centres): each frame's predicted city and, from the manifest's
    # hierarchy, its state, country and continent (Table 3).
    labels = LabelPredictor.build(gal_df, gal_meta, scope)
    if labels is not None:
        pred = pred.with_columns(*labels.columns(pred["lat"].to_numpy(), pred["lon"].to_numpy()))
    cols = ["sequence_id", "frame_index", "lat", "lon", "gt_lat", "gt_lon", "phase1_lat", "phase1_lon", "confidence", "valid"]
    pred = pred.select(cols + [c for c in pred.columns if c not in cols])

    metrics, seq = evaluate_with_sequences(pred, gallery)  # the per-sequence tables are reported below too
    phase1_df = pred.select("sequence_id", "frame_index", "gt_lat", "gt_lon", lat="phase1_lat", lon="phase1_lon")
    if labels is not None:
        phase1_df = phase1_df.with_columns(*[pred[c] for c in LABEL_LEVELS if c in pred.columns],
                                           *labels.columns(phase1_df["lat"].to_numpy(), phase1_df["lon"].to_numpy()))
    p1, seq_p1 = evaluate_with_sequences(phase1_df, gallery)
    metrics["phase1"] = {k: p1[k] for k in ("frame", "video", "trajectory", "shape", "city") if k in p1}
    if labels is not None:
        metrics["city_frame"] = frame_label_accuracy(pred)
        metrics["phase1"]["city_frame"] = frame_label_accuracy(phase1_df)
    metrics["n_frames_unpredicted"] = n_unpredicted
    metrics["n_frames_invalid"] = int((~pred["valid"]).sum())
    metrics["mean_confidence"] = float(pred["confidence"].mean())
    if "frame" in metrics:  # the comparison needs ground truth
        metrics["compare"] = _compare(found, gallery, valid, offsets, ids, m, can_decode, cfg.refine)
    metrics["decode"] = {"step_km": step_km, "timed_frames_pct": 0.0 if ts is None else float(100.0 * np.isfinite(ts).mean())}
    # What the run cost: counts in the metrics (they reproduce); times and memory depend on the machine and
    # its load, so they go to the log only, and `dvc metrics diff` after a re-run shows no change.
    metrics["cost"] = {"gallery_points": int(len(gallery)), "refined_points_embedded": int(found.n_refined_points)}
    timing = {"locate_s": round(locate_s, 3), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        timing["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    if seq is None or seq_p1 is None:  # no frame with ground truth: per_sequence says so in one line
        seq, seq_p1 = per_sequence(pred, gallery), per_sequence(phase1_df, gallery)
    seq_p1 = seq_p1.select("sequence_id", phase1_median_km="median_km", phase1_dfd_km="dfd_km",
                                                     phase1_path_length_ratio="path_length_ratio",
                                                     phase1_distinct_cells="distinct_cells", phase1_r2_in_drive="r2_in_drive")
    conf = pred.group_by("sequence_id").agg(mean_confidence=pl.col("confidence").mean())
    seq = seq.join(seq_p1, on="sequence_id", how="left").join(conf, on="sequence_id", how="left").sort("sequence_id")

    has_gt = pred["gt_lat"].is_not_null()
    g = pred.filter(has_gt)
    errors = {
        "final": haversine_km(g["lat"].to_numpy(), g["lon"].to_numpy(), g["gt_lat"].to_numpy(), g["gt_lon"].to_numpy()),
        "phase1": haversine_km(g["phase1_lat"].to_numpy(), g["phase1_lon"].to_numpy(), g["gt_lat"].to_numpy(), g["gt_lon"].to_numpy()),
    }
    plots = {"error_cdf": error_cdf(errors), "accuracy": accuracy_by_threshold(errors)}
    return EvalResult(pred, metrics, seq, plots, timing)


def manifest_datasets(manifest: pl.DataFrame, split: str) -> list[str]:
    """The datasets of a manifest of several (App. H) with frames in ``split``, in manifest order; [] for one dataset."""
    if "dataset" not in manifest.columns:
        return []
    names = manifest.filter(pl.col("split") == split)["dataset"].drop_nulls()
    return names.unique(maintain_order=True).to_list()


def run_dataset_evaluations(bundle, features, manifest: pl.DataFrame, cfg: EvalConfig = EvalConfig(), **kw) -> dict[str, EvalResult]:
    """Each dataset of a manifest of several scored on its own, against its own gallery (App. H, Tables 12-13:
    MSLS and GAMa on their GPS grids, CityGuessr68k on its city centres); keyword arguments as :func:`run_evaluation`."""
    return {name: run_evaluation(bundle, features, manifest, cfg, dataset=name, **kw)
            for name in manifest_datasets(manifest, cfg.split)}


def map_sample(sequence_ids: list[str], n: int) -> list[str]:
    """``n`` ids evenly spaced over the sorted ids: the same sequences in every run of a dataset."""
    ids = sorted(set(sequence_ids))
    if n <= 0 or not ids:
        return []
    if n >= len(ids):
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, n).round().astype(int)]


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:100]


def write_reports(result: EvalResult, *, predictions: str | Path, metrics: str | Path, per_sequence_csv: str | Path,
                  plots_dir: str | Path, n_maps: int = 6) -> list[Path]:
    """Write every output atomically; returns the map files written."""
    write_parquet_atomic(result.predictions, predictions)
    write_json_atomic(metrics, result.metrics)
    with atomic_path(per_sequence_csv) as tmp:
        result.sequences.write_csv(tmp, float_precision=6)
    plots_dir = Path(plots_dir)
    for name, df in result.plots.items():
        with atomic_path(plots_dir / f"{name}.csv") as tmp:
            df.write_csv(tmp, float_precision=6)
    maps_dir = plots_dir / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    for old in maps_dir.glob("*.png"):  # a previous run's sample must not linger beside this one's
        old.unlink()
    written = []
    with_gt = result.predictions.filter(pl.col("gt_lat").is_not_null())
    for sid in map_sample(with_gt["sequence_id"].to_list(), n_maps):
        s = with_gt.filter(pl.col("sequence_id") == sid).sort("frame_index")
        written.append(trajectory_map_png(
            maps_dir / f"{_safe_name(sid)}.png", s["lat"].to_numpy(), s["lon"].to_numpy(), s["gt_lat"].to_numpy(), s["gt_lon"].to_numpy(),
            title=f"{sid}  ({s.height} frames)", phase1=(s["phase1_lat"].to_numpy(), s["phase1_lon"].to_numpy()),
        ))
    return written


def summary(metrics: dict[str, Any]) -> str:
    """A few human-readable lines: final vs. Phase I at the paper's thresholds, and the trajectory errors."""
    f, p1 = metrics["frame"], metrics.get("phase1", {}).get("frame", {})
    keys = [k for k in f if k.startswith("acc_")] + ["median_km"]
    head = f"{'':10s}" + "".join(f"{k:>12s}" for k in keys)
    lines = [f"evaluated {metrics.get('n_frames')} frames in {metrics.get('n_sequences')} sequences "
             f"({metrics.get('n_frames_invalid', 0)} unreadable, {metrics.get('n_frames_unpredicted', 0)} without prediction)", head]
    for name, group in (("final", f), ("phase I", p1)):
        if group:
            lines.append(f"{name:10s}" + "".join(f"{group[k]:12.2f}" for k in keys))
    t = metrics.get("trajectory", {})
    if t:
        lines.append("trajectory " + "  ".join(f"{k}={v:.3f}" for k, v in t.items()))
    for name, group in metrics.get("compare", {}).items():
        lines.append(f"{name:13s}" + "  ".join(f"{stage}: acc@1km {g['frame_acc_1km']:.2f} median {g['frame_median_km']:.3f} km "
                                               f"DFD {g['dfd_km']:.3f} km >25km {g['frames_off_25km_pct']:.2f}%"
                                               for stage, g in group.items()))
    if metrics.get("city"):
        lines.append("labels     " + "  ".join(f"{k}={v:.1f}%" for k, v in metrics["city"].items() if v is not None))
    if metrics.get("city_frame"):
        lines.append("per frame  " + "  ".join(f"{k}={v:.1f}%" for k, v in metrics["city_frame"].items()))
    return "\n".join(lines)
