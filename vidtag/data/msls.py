"""Mapillary Street-Level Sequences: every ``train_val`` city, query and database (paper Sec. 4.1).

Layout: ``ROOT/train_val/<city>/{query,database}/`` with ``images/<key>.jpg``, ``seq_info.csv``
(``key, sequence_key|sequence_id, frame_number``) and ``raw.csv`` (``key, lon, lat, ca, captured_at,
pano``; lon before lat). Every CSV has a leading unnamed index column; columns are read by name.
A sequence is one ``sequence_key``, ordered by ``frame_number`` (gaps allowed); its id in the
manifest is ``<city>/<subset>/<sequence_key>`` so ids are unique across folders. Panoramas are left
out by default (as the official loader does). ``test/`` cities (no GPS) are optional.

A drive is its ``sequence_key`` within a city: MSLS can list frames of one drive in both ``query`` and
``database``, so the train/val split is decided per drive (``<city>/<sequence_key>``), never per
folder, and no drive is in both splits. Sequences shorter than ``min_frames`` (default 16, the
paper's shortest, Sec. 4.1) are left out whole and named in the skip report.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from vidtag.data.report import (conflicting_keys, finalize, flag, flag_bad_coords, flag_duplicates, flag_missing_files,
                                flag_outside_root, read_csv_strings)
from vidtag.data.split import PAPER_MIN_FRAMES, check_min_frames, official_split, short_sequences, split_sequences
from vidtag.errors import ConfigError, ManifestError

SUBSETS = ("query", "database")
OFFICIAL_VAL_CITIES = ("cph", "sf")  # mapillary_sls default_cities["val"]


def _read_csv(path: Path, required: tuple[str, ...], aliases: dict[str, str] | None = None) -> pl.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path} not found; expected MSLS layout train_val/<city>/<subset>/{path.name}")
    df = read_csv_strings(path, ", ".join(required))
    first = df.columns[0]
    if first == "" or first.startswith("_duplicated") or first == "Unnamed: 0":
        df = df.drop(first)  # the leading unnamed index column
    for old, new in (aliases or {}).items():
        if old in df.columns and new not in df.columns:
            df = df.rename({old: new})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; found {df.columns}")
    return df.with_row_index("_row", offset=2)


def _folder_rows(folder: Path, city: str, subset: str, with_gps: bool, include_panoramas: bool) -> pl.DataFrame:
    seq_csv = folder / "seq_info.csv"
    seq = _read_csv(seq_csv, ("key", "sequence_key", "frame_number"), {"sequence_id": "sequence_key"})
    df = seq.select(
        "key", "sequence_key", pl.col("frame_number").str.strip_chars().cast(pl.Int64, strict=False).alias("_order"),
        pl.col("_row").cast(pl.Int64), pl.lit(str(seq_csv)).alias("_file"),
    )
    df = df.with_columns(pl.lit(None, dtype=pl.String).alias("_reason"))
    df = flag(df, df["_order"].is_null().to_numpy(), "frame_number is not an integer")
    if with_gps:
        raw_csv = folder / "raw.csv"
        raw = _read_csv(raw_csv, ("key", "lon", "lat"))
        raw = raw.select(
            "key", "_row",
            pl.col("lat").str.strip_chars().cast(pl.Float64, strict=False).fill_null(float("nan")),
            pl.col("lon").str.strip_chars().cast(pl.Float64, strict=False).fill_null(float("nan")),
            (pl.col("pano").str.to_lowercase().str.strip_chars() == "true").fill_null(False).alias("_pano")
            if "pano" in raw.columns else pl.lit(False).alias("_pano"),
        )
        # A key listed twice with different coordinates: which one is right cannot be told, so its frames
        # are bad (exact repeats are harmless and collapse to one).
        clash = conflicting_keys(raw, "key", ["lat", "lon"]).select(
            "key", pl.format(f"key has conflicting coordinates in {raw_csv.name} (rows {{}} and {{}})",
                             "_row_a", "_row_b").alias("_clash"))
        raw = raw.drop("_row").unique("key", keep="first", maintain_order=True)
        df = df.join(raw, on="key", how="left", maintain_order="left")
        df = df.join(clash, on="key", how="left", maintain_order="left")
        df = df.with_columns(pl.coalesce("_reason", "_clash").alias("_reason")).drop("_clash")
        df = flag(df, df["lat"].is_null().to_numpy() & df["lon"].is_null().to_numpy(), f"key has no row in {raw_csv.name}")
        if not include_panoramas:
            df = df.filter(~pl.col("_pano").fill_null(False))
        df = df.drop("_pano")
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("lat"), pl.lit(None, dtype=pl.Float64).alias("lon"))
    prefix = folder.relative_to(folder.parents[2]).as_posix()  # train_val/<city>/<subset>
    return df.with_columns(
        (pl.lit(f"{city}/{subset}/") + pl.col("sequence_key")).alias("sequence_id"),
        (pl.lit(f"{city}/") + pl.col("sequence_key")).alias("_drive"),  # one drive across query and database
        (pl.lit(f"{prefix}/images/") + pl.col("key") + ".jpg").alias("image_path"),
        pl.lit(city).alias("city"),
    )


def read_msls(root: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0, split: str = "random",
              val_cities: tuple[str, ...] = OFFICIAL_VAL_CITIES, cities: tuple[str, ...] | None = None,
              include_panoramas: bool = False, include_test: bool = False, check_images: bool = True,
              skip_bad: bool = False, allow_outside_root: bool = False,
              min_frames: int = PAPER_MIN_FRAMES) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Manifest rows for MSLS; returns ``(df, skipped)``.

    ``split="random"``: whole drives to val with ``val_fraction`` per city, from ``seed`` (val in
    training cities, as the paper's own split needs); a drive's query and database sequences share
    its split. ``split="official"``: ``val_cities`` are val.
    An image key whose path leaves ``root`` (``../``, a symlink out) is a bad row unless
    ``allow_outside_root``. A sequence with fewer than ``min_frames`` good frames is left out whole
    (whatever ``skip_bad`` says: it is the paper's rule, not bad input) and listed in ``skipped`` with
    its length; the split is drawn among the sequences kept.
    """
    if split not in ("random", "official"):
        raise ConfigError(f"split must be one of ('random', 'official'), got {split!r}")
    check_min_frames(min_frames)
    root = Path(root)
    tv = root / "train_val"
    if not tv.is_dir():
        raise ManifestError(f"{tv} is not a folder; expected ROOT/train_val/<city>/{{query,database}}/")
    parts = []
    for city_dir in sorted(d for d in tv.iterdir() if d.is_dir()):
        if cities and city_dir.name not in cities:
            continue
        for subset in SUBSETS:
            if (city_dir / subset).is_dir():
                parts.append(_folder_rows(city_dir / subset, city_dir.name, subset, True, include_panoramas))
    if not parts:
        raise ManifestError(f"no <city>/{{query,database}} folders under {tv}")
    df = pl.concat(parts, how="vertical_relaxed").with_columns(pl.lit(None, dtype=pl.String).alias("split"))

    if include_test and (root / "test").is_dir():
        test = [
            _folder_rows(c / s, c.name, s, False, include_panoramas)
            for c in sorted(d for d in (root / "test").iterdir() if d.is_dir())
            for s in SUBSETS if (c / s).is_dir()
        ]
        if test:
            df = pl.concat([df, *[t.with_columns(pl.lit("test").alias("split")) for t in test]], how="diagonal_relaxed")
    df = flag_bad_coords(df, allow_null=True)
    df = flag_duplicates(df, "image_path", "image key")
    df = flag_duplicates(df, ["sequence_id", "_order"], "frame_number in its sequence")
    df = flag_outside_root(df, root, "image_path", allow_outside_root)
    if check_images:
        df = flag_missing_files(df, root, "image_path")

    # Sec. 4.1's length rule on the frames that will be kept; a short sequence's bad rows stay (reported as bad).
    short = short_sequences(df.filter(pl.col("_reason").is_null()).sort("_file", "_row"), min_frames, ("_file", "_row"))
    df = df.filter(~(pl.col("sequence_id").is_in(short["sequence_id"].implode()) & pl.col("_reason").is_null()))
    df = _assign_split(df, split, val_fraction, seed, val_cities)
    cols = ["sequence_id", "image_path", "lat", "lon", "split", "city", "_file", "_row", "_reason", "_order"]
    good, skipped = finalize(df.select(cols), skip_bad)
    if good.height == 0 and short.height:
        raise ManifestError(f"every sequence under {root} is shorter than min_frames {min_frames} (the longest has "
                            f"{int(short['n_frames'].max())} frames); lower --min-frames (data.min_frames) to keep them")
    report = short.select(pl.col("_file").alias("file"), pl.col("_row").cast(pl.Int64).alias("row"), "sequence_id", "reason")
    return good, pl.concat([skipped, report], how="vertical_relaxed").sort("file", "row")


def _assign_split(df: pl.DataFrame, split: str, val_fraction: float, seed: int, val_cities: tuple[str, ...]) -> pl.DataFrame:
    """Fill the null ``split`` of train_val rows: per drive (``_drive``) among the sequences that have good
    frames, so that the val share counts drives that are really in the manifest."""
    todo = df.filter(pl.col("split").is_null())
    seqs = todo.filter(pl.col("_reason").is_null()).unique("sequence_id", keep="first", maintain_order=True)
    if split == "official":
        mapping = dict(zip(seqs["sequence_id"], official_split(seqs["city"].to_list(), val_cities)))
    else:
        mapping = split_sequences(seqs["sequence_id"].to_list(), val_fraction, seed, seqs["city"].to_list(),
                                  groups=seqs["_drive"].to_list())
    # Rows of sequences without a good frame get a placeholder: they are all bad rows, raised or skipped.
    filled = pl.col("sequence_id").replace_strict(mapping, default="train", return_dtype=pl.String)
    return df.with_columns(pl.coalesce("split", filled).alias("split"))
