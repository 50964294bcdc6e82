"""Plain frame folders: ``ROOT/<sequence_id>/<frames>`` in natural order, optional coordinates CSV.

CSV columns: ``sequence_id, frame, lat, lon`` (``frame`` a file name or a 0-based index in natural
order), optionally ``city`` (used to stratify the train/val split) and ``split``. The toy world is
written in this layout and read by this reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import natsort
import polars as pl

from vidtag.data.manifest import SPLITS
from vidtag.data.report import (OUTSIDE_ROOT, finalize, flag, flag_bad_coords, flag_duplicates, flag_outside_root,
                                outside_root, read_csv_strings)
from vidtag.data.split import split_sequences
from vidtag.errors import ConfigError, ManifestError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_frames(folder: Path) -> list[str]:
    """Image file names in a folder, naturally sorted (frame_2 before frame_10), hidden files left out."""
    names = [n for n in os.listdir(folder) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return natsort.natsorted(names, alg=natsort.ns.PATH)


def _scan(root: Path, allow_outside_root: bool) -> tuple[pl.DataFrame, list[str]]:
    """Image files per sequence folder, and the sequence folders left unread because they resolve
    outside ``root`` (a symlinked folder pointing elsewhere)."""
    seqs = natsort.natsorted([d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")])
    outside = [] if allow_outside_root else [s for s, o in zip(seqs, outside_root(root, seqs)) if o]
    rows = {"sequence_id": [], "name": [], "_order": []}
    for s in seqs:
        if s in outside:
            continue
        for i, name in enumerate(list_frames(root / s)):
            rows["sequence_id"].append(s)
            rows["name"].append(name)
            rows["_order"].append(i)
    return pl.DataFrame(rows, schema={"sequence_id": pl.String, "name": pl.String, "_order": pl.Int64}), outside


def _read_coords(path: Path) -> pl.DataFrame:
    df = read_csv_strings(path, "sequence_id, frame, lat, lon")  # all strings: we parse and report per row
    missing = [c for c in ("sequence_id", "frame", "lat", "lon") if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; found {df.columns}, expected sequence_id, frame, lat, lon")
    return df.with_row_index("_row", offset=2)  # line number in the file (header is line 1)


def read_frames(
    root: str | os.PathLike,
    coords_csv: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    split: str | None = None,
    skip_bad: bool = False,
    allow_outside_root: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Manifest rows for a folder of sequences; returns ``(manifest_df, skipped_df)``.

    Without a CSV, coordinates are null (frames to predict). With one, every image needs a row and
    every row an image. Splits: a CSV ``split`` column wins; else ``val_fraction > 0`` splits by
    sequence (stratified by ``city`` if given); else every sequence gets ``split`` (default:
    ``train`` with coordinates, ``test`` without). A sequence folder or frame that resolves outside
    ``root`` (a symlink leaving it) is never read: a bad row, unless ``allow_outside_root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"frames root {root} is not a folder; expected ROOT/<sequence_id>/<frame files>")
    split = split or ("train" if coords_csv is not None else "test")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    files, outside = _scan(root, allow_outside_root)
    if files.height == 0 and not outside:
        raise ManifestError(f"{root} has no images in sub-folders; expected ROOT/<sequence_id>/<frame>{IMAGE_EXTENSIONS}")
    files = files.with_columns(
        (pl.col("sequence_id") + "/" + pl.col("name")).alias("image_path"),
        (pl.lit(str(root) + os.sep) + pl.col("sequence_id") + "/" + pl.col("name")).alias("_file"),
        pl.lit(None, dtype=pl.Int64).alias("_row"),
    )
    if coords_csv is None:
        df = files.with_columns(
            pl.lit(None, dtype=pl.Float64).alias("lat"), pl.lit(None, dtype=pl.Float64).alias("lon"),
            pl.lit(None, dtype=pl.String).alias("_reason"),
        )
    else:
        df = _join_coords(files, Path(coords_csv), root)
    if outside:  # one bad row per folder left unread
        df = pl.concat([df, pl.DataFrame({
            "sequence_id": outside, "image_path": outside, "_file": [str(root / s) for s in outside],
            "_reason": [f"sequence folder {OUTSIDE_ROOT}"] * len(outside), "_order": [0] * len(outside),
        }, schema_overrides={"_order": pl.Int64})], how="diagonal_relaxed")
    df = flag_outside_root(df, root, "image_path", allow_outside_root)
    df = flag_duplicates(flag_bad_coords(df), "image_path", "image (sequence_id, frame)")

    if "split" not in df.columns:
        seq = df.unique("sequence_id", keep="first", maintain_order=True)
        if val_fraction > 0:
            strata = seq["city"].to_list() if "city" in seq.columns else None
            mapping = split_sequences(seq["sequence_id"].to_list(), val_fraction, seed, strata)
            df = df.with_columns(pl.col("sequence_id").replace_strict(mapping).alias("split"))
        else:
            df = df.with_columns(pl.lit(split).alias("split"))
    else:
        df = flag(df, ~df["split"].is_in(SPLITS).fill_null(False).to_numpy(), f"split not one of {SPLITS}")
        df = df.with_columns(pl.col("split").fill_null("train"))
    keep = ["sequence_id", "image_path", "lat", "lon", "split", "city", "_file", "_row", "_reason", "_order"]
    return finalize(df.select([c for c in keep if c in df.columns]), skip_bad)


def _join_coords(files: pl.DataFrame, csv: Path, root: Path) -> pl.DataFrame:
    coords = _read_coords(csv)
    extra = [c for c in ("city", "split") if c in coords.columns]
    # A frame given as an index is resolved to the file at that position in natural order.
    by_index = files.select("sequence_id", pl.col("_order").cast(pl.String).alias("frame"), pl.col("name").alias("_name_i"))
    coords = coords.join(by_index, on=["sequence_id", "frame"], how="left")
    names = files.select("sequence_id", pl.col("name").alias("frame"), pl.lit(True).alias("_is_name"))
    coords = coords.join(names, on=["sequence_id", "frame"], how="left")
    coords = coords.with_columns(
        pl.when(pl.col("_is_name")).then(pl.col("frame")).otherwise(pl.col("_name_i")).alias("name"),
        pl.col("lat").str.strip_chars().cast(pl.Float64, strict=False).fill_null(float("nan")),
        pl.col("lon").str.strip_chars().cast(pl.Float64, strict=False).fill_null(float("nan")),
    )
    # CSV rows naming no existing image: bad rows, reported with their line in the CSV.
    orphan = coords.filter(pl.col("name").is_null()).select(
        "sequence_id", (pl.col("sequence_id") + "/" + pl.col("frame")).alias("image_path"), "lat", "lon", *extra,
        pl.lit(str(csv)).alias("_file"), pl.col("_row").cast(pl.Int64), pl.lit("image file not found").alias("_reason"),
        pl.lit(-1, dtype=pl.Int64).alias("_order"),
    )
    matched = coords.filter(pl.col("name").is_not_null()).select(
        "sequence_id", "name", "lat", "lon", *extra, pl.col("_row").cast(pl.Int64).alias("_csv_row")
    )
    # Duplicate CSV rows for one image are reported, the first one kept.
    matched = matched.with_columns(pl.struct("sequence_id", "name").is_first_distinct().alias("_first"))
    dups = matched.filter(~pl.col("_first")).select(
        "sequence_id", (pl.col("sequence_id") + "/" + pl.col("name")).alias("image_path"), "lat", "lon", *extra,
        pl.lit(str(csv)).alias("_file"), pl.col("_csv_row").alias("_row"),
        pl.lit("duplicate row for the same frame").alias("_reason"), pl.lit(-1, dtype=pl.Int64).alias("_order"),
    )
    matched = matched.filter(pl.col("_first")).drop("_first")
    df = files.drop("_row").join(matched, on=["sequence_id", "name"], how="left", maintain_order="left")
    df = df.with_columns(
        pl.when(pl.col("_csv_row").is_null()).then(pl.col("_file")).otherwise(pl.lit(str(csv))).alias("_file"),
        pl.col("_csv_row").alias("_row"),
        pl.when(pl.col("_csv_row").is_null()).then(pl.lit(f"image has no row in {csv.name}")).otherwise(None).alias("_reason"),
    )
    df = df.with_columns(
        pl.when(pl.col("_row").is_null()).then(pl.col("image_path")).otherwise(pl.col("_file")).alias("_file")
    )
    cols = ["sequence_id", "image_path", "lat", "lon", *extra, "_file", "_row", "_reason", "_order"]
    return pl.concat([df.select(cols), orphan.select(cols), dups.select(cols)], how="vertical_relaxed")
