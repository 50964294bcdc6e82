"""Bad input rows: raise naming file and row, or (``skip_bad``) leave them out and list them.

Readers build one candidate row per frame with three bookkeeping columns — ``_file`` and ``_row``
(where the row came from, for messages) and ``_reason`` (null when the row is fine) — plus
``_order`` (the frame's temporal order key). :func:`finalize` turns that into a manifest table and a
skip report (:data:`vidtag.data.manifest.SKIPPED_COLUMNS`), which ``write_manifest`` writes.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from vidtag.data.manifest import validate_manifest
from vidtag.errors import ManifestError
from vidtag.geo import latlon_problems

BOOKKEEPING = ("_file", "_row", "_reason", "_order")


def flag(df: pl.DataFrame, mask, reason: str) -> pl.DataFrame:
    """Set ``_reason`` on rows where ``mask`` holds and no earlier reason was recorded."""
    mask = pl.Series(np.asarray(mask, dtype=bool))
    return df.with_columns(
        pl.when(pl.col("_reason").is_null() & mask).then(pl.lit(reason)).otherwise(pl.col("_reason")).alias("_reason")
    )


def flag_bad_coords(df: pl.DataFrame, allow_null: bool = True) -> pl.DataFrame:
    """Flag NaN / half-missing / out-of-range coordinates (both null is 'unknown', fine if allowed)."""
    reasons = latlon_problems(df["lat"], df["lon"], unknown_ok=allow_null)
    bad = reasons != None  # noqa: E711 - elementwise on an object array
    if not bad.any():
        return df
    out = df.with_columns(pl.Series("_bad_ll", reasons.tolist(), dtype=pl.String))
    return out.with_columns(
        pl.when(pl.col("_reason").is_null() & pl.Series(bad)).then(pl.col("_bad_ll")).otherwise(pl.col("_reason")).alias("_reason")
    ).drop("_bad_ll")


def flag_missing_files(df: pl.DataFrame, root, column: str) -> pl.DataFrame:
    """Flag rows whose ``column`` path (relative to ``root``) is not a file."""
    paths = df[column].to_list()
    # Check each distinct path once (videos repeat on every frame row).
    exists = {p: os.path.isfile(os.path.join(root, p)) for p in set(paths) if p is not None}
    missing = np.array([p is not None and not exists[p] for p in paths], dtype=bool)
    return flag(df, missing, f"{column.replace('_path', '')} file not found")


def flag_duplicates(df: pl.DataFrame, key: str | list[str], what: str) -> pl.DataFrame:
    """Flag every occurrence after the first of a duplicated key."""
    dup = df.select(pl.struct(key).is_first_distinct().not_()).to_series()
    return flag(df, dup, f"duplicate {what}")


def finalize(df: pl.DataFrame, skip_bad: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Raise on the first flagged row, or drop flagged rows; number frames 0.. by ``_order``.

    Returns ``(manifest_df, skipped_df)``.
    """
    bad = df["_reason"].is_not_null()
    if bad.any() and not skip_bad:
        n = int(bad.sum())
        r = df.filter(bad).sort("_file", "_row").row(0, named=True)
        more = f" ({n - 1} more bad row(s) after it)" if n > 1 else ""
        raise ManifestError(
            f"{r['_file']} row {r['_row']}: {r['_reason']}{more}; fix the input, or pass --skip-bad "
            "(skip_bad=True) to leave such rows out and list them in <manifest>.skipped.csv"
        )
    skipped = (
        df.filter(bad)
        .select(pl.col("_file").alias("file"), pl.col("_row").cast(pl.Int64).alias("row"), "sequence_id",
                pl.col("_reason").alias("reason"))
        .sort("file", "row")
    )
    good = df.filter(~bad).sort("sequence_id", "_order", maintain_order=True)
    good = good.with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("sequence_id").alias("frame_index"))
    good = validate_manifest(good.drop([c for c in BOOKKEEPING if c in good.columns]))
    return good, skipped
