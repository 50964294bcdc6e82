"""Train/val splits by whole sequences, deterministic from a seed, stratified so val lies in training regions;
and which whole sequences are long enough to enter them (Sec. 4.1)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import polars as pl

from vidtag.errors import ConfigError, ManifestError


def _rank_key(seed: int, sequence_id: str) -> str:
    # A per-sequence hash, not a shuffled list: adding or removing one sequence never reshuffles the others.
    return hashlib.sha256(f"{seed}\x00{sequence_id}".encode()).hexdigest()


def split_sequences(
    sequence_ids: Sequence[str],
    val_fraction: float,
    seed: int,
    strata: Sequence[str | None] | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, str]:
    """Map each sequence id to ``train`` or ``val``.

    Within every stratum (e.g. city) ``round(n * val_fraction)`` sequences go to val, but a stratum
    always keeps at least one training sequence, so that val drives lie in regions the gallery
    (built from training data) covers. Strata are the paper's "same regions" requirement (Sec. 4.1
    follows CityGuessr's split; for MSLS we stratify per city).

    ``groups`` (one per sequence id, optional) names the drive a sequence belongs to: the sequences
    of one group always share a split and ``n`` counts groups, so one drive seen twice (MSLS lists a
    drive's frames in both its ``query`` and ``database`` folders) is never in both splits. A group
    takes the stratum of its first sequence. Without groups every sequence is its own group (same
    split as before groups existed).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    strata = list(strata) if strata is not None else [None] * len(sequence_ids)
    if len(strata) != len(sequence_ids):
        raise ManifestError("strata must have one entry per sequence id")
    groups = list(groups) if groups is not None else list(sequence_ids)
    if len(groups) != len(sequence_ids):
        raise ManifestError("groups must have one entry per sequence id")
    seqs = pl.DataFrame({"sequence_id": list(sequence_ids), "stratum": strata, "group": groups},
                        schema={"sequence_id": pl.String, "stratum": pl.String, "group": pl.String})
    seqs = seqs.unique("sequence_id", keep="first", maintain_order=True)
    df = seqs.unique("group", keep="first", maintain_order=True).select("group", "stratum")
    df = df.with_columns(pl.col("group").map_elements(lambda s: _rank_key(seed, s), return_dtype=pl.String).alias("_k"))
    df = df.sort("stratum", "_k", nulls_last=True)
    df = df.with_columns(
        pl.int_range(pl.len()).over("stratum").alias("_rank"),
        pl.len().over("stratum").alias("_n"),
    )
    n_val = (pl.col("_n") * val_fraction).round().cast(pl.Int64).clip(upper_bound=pl.col("_n") - 1)
    df = df.with_columns(pl.when(pl.col("_rank") < n_val).then(pl.lit("val")).otherwise(pl.lit("train")).alias("split"))
    out = seqs.join(df.select("group", "split"), on="group", how="left", maintain_order="left")
    return dict(out.select("sequence_id", "split").iter_rows())


# Sec. 4.1: the paper's MSLS sequences run 16 to 494 frames, and both phases train on 16-frame sequences
# (App. A); a shorter sequence cannot fill one.
PAPER_MIN_FRAMES = 16
SHORT_SEQUENCE = "shorter than min_frames"  # in the skip report's reason for a sequence the length rule left out


def check_min_frames(min_frames: int) -> int:
    """``min_frames`` as an int >= 0 (0 and 1 keep every sequence), else :class:`ConfigError`."""
    if isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 0:
        raise ConfigError(f"min_frames must be an integer >= 0 (0 keeps every sequence), got {min_frames!r}")
    return min_frames


def short_sequences(df: pl.DataFrame, min_frames: int, keep_first: Sequence[str] = ()) -> pl.DataFrame:
    """The sequences of ``df`` (its rows are the frames that count) with fewer than ``min_frames`` frames:
    ``sequence_id``, ``n_frames``, ``reason`` (a skip-report line) and, from each one's first row, the
    ``keep_first`` columns (where to point the report at)."""
    check_min_frames(min_frames)
    out = df.group_by("sequence_id", maintain_order=True).agg(pl.len().alias("n_frames"), *[pl.col(c).first() for c in keep_first])
    out = out.filter(pl.col("n_frames") < min_frames)
    return out.with_columns(pl.format(f"sequence of {{}} frame(s) is {SHORT_SEQUENCE} {min_frames} (Sec. 4.1: the "
                                      f"paper's sequences run {PAPER_MIN_FRAMES}-494 frames); left out whole",
                                      "n_frames").alias("reason"))


def official_split(cities: Sequence[str], val_cities: Sequence[str]) -> list[str]:
    """``val`` for rows whose city is one of ``val_cities`` (MSLS: cph, sf), else ``train``."""
    val = set(val_cities)
    return ["val" if c in val else "train" for c in cities]
