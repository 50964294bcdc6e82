"""The manifest: one row per frame of a dataset (paper Sec. 4.1), the single table every later stage reads.

Frames are referenced, never copied: ``image_path`` (relative to the dataset root) or ``video_path``
+ ``timestamp_s`` (decoded later by the extractor through :mod:`vidtag.data.video`). The root is
kept in the parquet metadata, relative to the manifest's folder when the two share a tree, so a
clone of the repository (manifest and toy data under ``cache/``) can move.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vidtag.errors import ManifestError  # re-exported: `from vidtag.data.manifest import ManifestError` works
from vidtag.fingerprint import sha256_file, sha256_frame
from vidtag.geo import check_latlon
from vidtag.io import atomic_path, read_parquet_metadata, write_parquet_atomic
from vidtag.lock import writer_lock

# Column -> dtype, in the order a manifest is written. Only the first three and ``split`` are always
# present; a manifest has ``image_path`` or ``video_path`` + ``timestamp_s`` (or both, per row one);
# the label columns appear where the dataset has them.
MANIFEST_COLUMNS: dict[str, pl.DataType] = {
    "sequence_id": pl.String(),
    "frame_index": pl.Int32(),  # 0-based, contiguous within a sequence
    "image_path": pl.String(),  # relative to the manifest's root
    "video_path": pl.String(),  # relative to the manifest's root
    "timestamp_s": pl.Float64(),  # presentation time of the frame in its video
    "lat": pl.Float64(),  # degrees; null = unknown
    "lon": pl.Float64(),  # degrees in [-180, 180]; null = unknown
    "split": pl.String(),
    "city": pl.String(),
    "state": pl.String(),
    "country": pl.String(),
    "continent": pl.String(),
    "dataset": pl.String(),  # which dataset a frame comes from, in a manifest of several (App. H's unified model)
}
REQUIRED_COLUMNS = ("sequence_id", "frame_index", "lat", "lon", "split")
LABEL_COLUMNS = ("city", "state", "country", "continent")
SPLITS = ("train", "val", "test")
# What the feature store depends on: change any of these and extracted features no longer line up.
FINGERPRINT_COLUMNS = ("sequence_id", "frame_index", "image_path", "video_path", "timestamp_s")

# The skip report: one row per input row left out by ``skip_bad`` (vidtag.data.report.finalize).
SKIPPED_COLUMNS = {"file": pl.String(), "row": pl.Int64(), "sequence_id": pl.String(), "reason": pl.String()}

META_ROOT = "vidtag.root"
META_SOURCE = "vidtag.source"
META_FINGERPRINT = "vidtag.manifest_fingerprint"
META_OUTSIDE_ROOT = "vidtag.allow_outside_root"  # "true" when the user let paths leave the root
META_SKIPPED_SHA256 = "vidtag.skipped_sha256"  # the skip report written with this manifest


@dataclass(frozen=True)
class Manifest:
    """A manifest table with the absolute dataset root its relative paths resolve against."""

    df: pl.DataFrame
    root: Path
    source: str = "unknown"
    allow_outside_root: bool = False  # the reader was allowed paths outside ``root``; readers of frames honour it

    def __repr__(self) -> str:
        n_seq = self.df["sequence_id"].n_unique() if self.df.height else 0
        splits = dict(self.df.group_by("split").len().sort("split").iter_rows()) if self.df.height else {}
        return f"Manifest({self.df.height} frames, {n_seq} sequences, splits={splits}, source={self.source!r}, root={str(self.root)!r})"


def _row_name(df: pl.DataFrame, i: int) -> str:
    """Row ``i`` by position and by its sequence and frame."""
    row = df.row(i, named=True)
    return f"row {i} (sequence_id={row.get('sequence_id')!r}, frame_index={row.get('frame_index')})"


def _row_error(df: pl.DataFrame, mask: pl.Series | np.ndarray, what: str, hint: str) -> ManifestError:
    """An error naming the first offending row (its position and sequence/frame) and how many there are."""
    mask = np.asarray(mask, dtype=bool)
    idx = np.flatnonzero(mask)
    more = f" and {idx.size - 1} more row(s)" if idx.size > 1 else ""
    return ManifestError(f"manifest {_row_name(df, int(idx[0]))}{more}: {what}; {hint}")


def validate_manifest(df: pl.DataFrame) -> pl.DataFrame:
    """Check and normalise a manifest: dtypes cast, columns ordered, rows sorted by sequence and frame.

    Raises :class:`ManifestError` naming the first bad row. Extra columns are kept after the known
    ones (readers may carry e.g. a dataset's own frame key); consumers ignore them.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest is missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}")
    if "image_path" not in df.columns and "video_path" not in df.columns:
        raise ManifestError("manifest has neither 'image_path' nor 'video_path'; every frame needs one")
    if "video_path" in df.columns and "timestamp_s" not in df.columns:
        raise ManifestError("manifest has 'video_path' but no 'timestamp_s'; a video frame needs its time")
    try:
        df = df.with_columns(
            [pl.col(c).cast(t, strict=True) for c, t in MANIFEST_COLUMNS.items() if c in df.columns]
        )
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as e:
        raise ManifestError(f"manifest column has the wrong type: {e}; expected {MANIFEST_COLUMNS}") from e
    known = [c for c in MANIFEST_COLUMNS if c in df.columns]
    df = df.select(known + [c for c in df.columns if c not in MANIFEST_COLUMNS])
    if df.height == 0:
        return df

    for c in ("sequence_id", "frame_index", "split"):
        if df[c].null_count():
            raise _row_error(df, df[c].is_null(), f"'{c}' is null", "every frame needs one")
    bad_split = ~df["split"].is_in(SPLITS)
    if bad_split.any():
        raise _row_error(df, bad_split, f"split is not one of {list(SPLITS)}", "fix the reader's split")

    has_img = df["image_path"].is_not_null() if "image_path" in df.columns else pl.Series([False] * df.height)
    has_vid = df["video_path"].is_not_null() if "video_path" in df.columns else pl.Series([False] * df.height)
    if not (has_img ^ has_vid).all():
        raise _row_error(df, ~(has_img ^ has_vid), "needs exactly one of image_path / video_path", "set one per row")
    if "timestamp_s" in df.columns:
        ts = df["timestamp_s"].to_numpy()
        bad_ts = has_vid.to_numpy() & ~(np.isfinite(ts) & (ts >= 0))
        if bad_ts.any():
            raise _row_error(df, bad_ts, "video frame without a finite timestamp_s >= 0", "give each frame its time")

    # Both null is "unknown" (frames to predict); NaN, half-null and out-of-range are errors.
    check_latlon(df["lat"], df["lon"], source="manifest", row_name=lambda i: _row_name(df, i),
                 what="lat/lon is NaN, half-missing or out of range [-90, 90] x [-180, 180]")
    df = df.sort("sequence_id", "frame_index", maintain_order=True)
    dup = df.select(pl.struct("sequence_id", "frame_index").is_duplicated()).to_series()
    if dup.any():
        raise _row_error(df, dup, "duplicate (sequence_id, frame_index)", "each frame must appear once")
    expected = df.select(pl.int_range(pl.len(), dtype=pl.Int32).over("sequence_id")).to_series()
    gap = df["frame_index"] != expected
    if gap.any():
        raise _row_error(df, gap, "frame_index is not 0-based and contiguous in its sequence",
                         "renumber frames 0..n-1 in temporal order")
    splits = df.group_by("sequence_id").agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1)
    if splits.height:
        raise _row_error(df, df["sequence_id"].is_in(splits["sequence_id"].implode()),
                         "one sequence spans several splits", "split by whole sequences")
    return df


def _root_for_metadata(root: Path, manifest_dir: Path) -> str:
    """Relative to the manifest's folder when both live in one tree (not just '/'), else absolute."""
    root, manifest_dir = root.resolve(), manifest_dir.resolve()
    common = Path(os.path.commonpath([root, manifest_dir]))
    if common == Path(common.anchor):
        return str(root)
    return os.path.relpath(root, manifest_dir)


def write_manifest(
    df: pl.DataFrame,
    path: str | os.PathLike,
    root: str | os.PathLike,
    *,
    source: str = "unknown",
    skipped: pl.DataFrame | None = None,
    allow_outside_root: bool = False,
) -> Manifest:
    """Validate and write a manifest and (if given) its ``skipped`` rows to ``<path>.skipped.csv``, as one unit.

    Both files are written in full beside their targets before either replaces the old one (a full disk
    or a crash while writing leaves the old pair), and the manifest records the report's sha256. A
    second writer of the same manifest at the same time is refused (:func:`vidtag.lock.writer_lock`).
    """
    path = Path(path)
    df = validate_manifest(df)
    meta = {
        META_ROOT: _root_for_metadata(Path(root), path.parent),
        META_SOURCE: source,
        META_FINGERPRINT: manifest_fingerprint(df),
    }
    if allow_outside_root:
        meta[META_OUTSIDE_ROOT] = "true"
    try:
        with writer_lock(path, what="write manifest"), contextlib.ExitStack() as pending:
            if skipped is not None:
                tmp_report = pending.enter_context(atomic_path(skipped_report_path(path)))  # renamed on exit
                skipped.select(list(SKIPPED_COLUMNS)).write_csv(tmp_report)
                meta[META_SKIPPED_SHA256] = sha256_file(tmp_report)
            write_parquet_atomic(df, path, metadata=meta)
    except OSError as e:
        raise ManifestError(f"cannot write manifest {path} ({e.strerror or e}); the previous manifest "
                            "and skip report are kept") from None
    return Manifest(df, Path(root).resolve(), source, allow_outside_root)


def skipped_report_path(manifest_path: str | os.PathLike) -> Path:
    """Where the rows left out by ``skip_bad`` are listed: beside the manifest."""
    p = Path(manifest_path)
    return p.with_name(p.name + ".skipped.csv")


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; its root comes back absolute."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; create one with `vidtag ingest ... --out {path}`")
    try:
        meta = read_parquet_metadata(path)
        raw = pl.read_parquet(path)
    except Exception as e:  # pyarrow / polars raise many types for a file that is not parquet
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(f"{path}: cannot read as a parquet manifest ({msg}); write it again with `vidtag ingest`") from None
    if META_ROOT not in meta:
        raise ManifestError(f"{path} has no '{META_ROOT}' metadata; it was not written by vidtag's write_manifest")
    try:
        df = validate_manifest(raw)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from e
    root = Path(meta[META_ROOT])
    if not root.is_absolute():
        root = path.parent / root
    return Manifest(df, root.resolve(), meta.get(META_SOURCE, "unknown"), meta.get(META_OUTSIDE_ROOT) == "true")


def manifest_fingerprint(df: pl.DataFrame) -> str:
    """sha256 over the columns that shape features (row order included), stable across polars versions.

    The feature store records it and refuses to serve another manifest's rows.
    """
    return sha256_frame(df, FINGERPRINT_COLUMNS)
