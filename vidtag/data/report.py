"""Bad input rows: raise naming file and row, or (``skip_bad``) leave them out and list them.

Readers build one candidate row per frame with three bookkeeping columns — ``_file`` and ``_row``
(where the row came from, for messages) and ``_reason`` (null when the row is fine) — plus
``_order`` (the frame's temporal order key). :func:`finalize` turns that into a manifest table and a
skip report (:data:`vidtag.data.manifest.SKIPPED_COLUMNS`), which ``write_manifest`` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vidtag.data.manifest import validate_manifest
from vidtag.errors import ManifestError
from vidtag.geo import latlon_problems

BOOKKEEPING = ("_file", "_row", "_reason", "_order")
OUTSIDE_ROOT = "path resolves outside the dataset root"
ALLOW_OUTSIDE_HINT = "pass --allow-outside-root (allow_outside_root=True) if that is intended"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (polars appends multi-line hints)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_csv_strings(path: str | os.PathLike, expected: str) -> pl.DataFrame:
    """A CSV with every column as strings (values are parsed and judged per row later).

    An empty, unreadable or ragged file raises :class:`ManifestError` naming it and ``expected`` (the
    columns the caller needs), never a parser traceback.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ManifestError(f"{path} is empty (0 bytes); expected a CSV with columns {expected}")
        return pl.read_csv(path, infer_schema_length=0)
    except ManifestError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"{path} not found; expected a CSV with columns {expected}") from None
    except (OSError, UnicodeDecodeError, pl.exceptions.PolarsError) as e:
        raise ManifestError(f"{path}: cannot read as CSV ({first_line(e)}); expected columns {expected}") from None


def conflicting_keys(df: pl.DataFrame, key: str, values: list[str]) -> pl.DataFrame:
    """Keys that appear more than once with different ``values`` (NaN equal to NaN): one row per key,
    with the first two rows' ``_row`` as ``_row_a`` / ``_row_b``. Exact repeats are not conflicts."""
    filled = df.with_columns([pl.col(c).fill_nan(None) if df[c].dtype.is_float() else pl.col(c) for c in values])
    distinct = filled.unique([key, *values], keep="first", maintain_order=True)
    clash = distinct.filter(pl.col(key).is_duplicated())
    return clash.group_by(key, maintain_order=True).agg(pl.col("_row").first().alias("_row_a"),
                                                       pl.col("_row").get(1).alias("_row_b"))


def as_number(value) -> float:
    """A JSON / XML value as a float, NaN for anything that is not a real number (strings, bools, None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


@dataclass(frozen=True)
class Track:
    """A GPS track's usable fixes; iterates as ``(t_s, lat, lon)`` so it unpacks like a tuple."""

    t_s: np.ndarray  # seconds from the video's start
    lat: np.ndarray  # degrees
    lon: np.ndarray  # degrees in [-180, 180]
    dropped: tuple[tuple[int, str], ...] = ()  # (row, reason) of the fixes ``skip_bad`` left out

    def __iter__(self):
        return iter((self.t_s, self.lat, self.lon))


def judge_track(t_s, lat, lon, *, source: str, rows, label: str = "row {}", skip_bad: bool,
                not_numbers=None) -> Track:
    """Keep the fixes with a finite time and valid coordinates (:func:`vidtag.geo.latlon_problems`).

    A bad fix raises :class:`ManifestError` naming ``source`` and the fix (``label.format(rows[i])``, e.g.
    ``row 7`` for a CSV line), or with ``skip_bad`` is dropped and listed in ``Track.dropped``.
    ``not_numbers[i]`` (optional) says which value was not a number at all (reported as such, not as NaN).
    """
    t_s, lat, lon = (np.asarray(a, dtype=np.float64) for a in (t_s, lat, lon))
    reasons = latlon_problems(lat, lon, unknown_ok=False).astype(object)
    reasons[~np.isfinite(t_s)] = "time is missing or not a finite number"
    for i, what in enumerate(not_numbers or []):
        if what:
            reasons[i] = what
    bad = np.flatnonzero(reasons != None)  # noqa: E711 - elementwise on an object array
    if bad.size and not skip_bad:
        i = int(bad[0])
        more = f" ({bad.size - 1} more bad fix(es) after it)" if bad.size > 1 else ""
        raise ManifestError(f"{source} {label.format(rows[i])}: {reasons[i]}{more}; fix the track, or pass --skip-bad "
                            "(skip_bad=True) to drop bad fixes and list them in <manifest>.skipped.csv")
    keep = np.ones(t_s.shape, dtype=bool)
    keep[bad] = False
    dropped = tuple((int(rows[i]), f"GPS fix {label.format(rows[i])}: {reasons[i]}") for i in bad)
    return Track(t_s[keep], lat[keep], lon[keep], dropped)


def parse_numbers(values, name: str) -> tuple[np.ndarray, list[str | None]]:
    """Strings (or None) -> floats (NaN where not a number) and, per value, why it is not one."""
    out, why = [], []
    for v in values:
        text = None if v is None else str(v).strip()
        try:
            out.append(float(text))
            why.append(None)
        except (TypeError, ValueError):
            out.append(float("nan"))
            why.append(f"{name} is missing" if not text else f"{name} {text!r} is not a number")
    return np.array(out, dtype=np.float64), why


def _resolver(root: Path):
    """A function path -> (real path, inside root?) resolving each distinct folder once (symlinks included)."""
    real_root = os.path.realpath(root)
    folders: dict[str, str] = {}

    def inside(rel: str) -> bool:
        full = os.path.normpath(os.path.join(root, rel))  # an absolute ``rel`` stays absolute
        parent, name = os.path.split(full)
        if parent not in folders:
            folders[parent] = os.path.realpath(parent)
        real = os.path.realpath(full) if os.path.islink(full) else os.path.join(folders[parent], name)
        return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)

    return inside


def outside_root(root: str | os.PathLike, paths) -> np.ndarray:
    """Per path (relative to ``root``, or absolute), whether it resolves outside ``root``: ``../``,
    absolute paths elsewhere and symlinks leaving the root all do. None is never outside."""
    inside = _resolver(Path(root))
    cache: dict[str, bool] = {}
    out = []
    for p in paths:
        if p is None or p == "":
            out.append(False)
            continue
        if p not in cache:
            cache[p] = not inside(p)
        out.append(cache[p])
    return np.array(out, dtype=bool)


def flag_outside_root(df: pl.DataFrame, root, column: str, allow_outside_root: bool) -> pl.DataFrame:
    """Flag rows whose ``column`` path resolves outside ``root`` (checked before anything is read there),
    unless the user allowed it."""
    if allow_outside_root:
        return df
    return flag(df, outside_root(root, df[column].to_list()), f"{column.replace('_path', '')} {OUTSIDE_ROOT}")


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
    flagged = df["_reason"].is_not_null().to_list()  # e.g. outside the root: not even looked at
    # Check each distinct path once (videos repeat on every frame row).
    exists = {p: os.path.isfile(os.path.join(root, p)) for p, f in zip(paths, flagged) if p is not None and not f}
    missing = np.array([p is not None and not f and not exists[p] for p, f in zip(paths, flagged)], dtype=bool)
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
        r = df.filter(bad).sort("_file", "_row", nulls_last=True).row(0, named=True)
        more = f" ({n - 1} more bad row(s) after it)" if n > 1 else ""
        where = f"{r['_file']} row {r['_row']}" if r["_row"] is not None else str(r["_file"])
        hint = f"; {ALLOW_OUTSIDE_HINT}" if OUTSIDE_ROOT in r["_reason"] else ""
        raise ManifestError(
            f"{where}: {r['_reason']}{more}{hint}; fix the input, or pass --skip-bad "
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
