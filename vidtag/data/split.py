"""Train/val splits by whole sequences, deterministic from a seed, stratified so val lies in training regions."""

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
) -> dict[str, str]:
    """Map each sequence id to ``train`` or ``val``.

    Within every stratum (e.g. city) ``round(n * val_fraction)`` sequences go to val, but a stratum
    always keeps at least one training sequence, so that val drives lie in regions the gallery
    (built from training data) covers. Strata are the paper's "same regions" requirement (Sec. 4.1
    follows CityGuessr's split; for MSLS we stratify per city).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    strata = list(strata) if strata is not None else [None] * len(sequence_ids)
    if len(strata) != len(sequence_ids):
        raise ManifestError("strata must have one entry per sequence id")
    df = pl.DataFrame({"sequence_id": list(sequence_ids), "stratum": strata}, schema={"sequence_id": pl.String, "stratum": pl.String})
    df = df.unique("sequence_id", keep="first", maintain_order=True)
    df = df.with_columns(pl.col("sequence_id").map_elements(lambda s: _rank_key(seed, s), return_dtype=pl.String).alias("_k"))
    df = df.sort("stratum", "_k", nulls_last=True)
    df = df.with_columns(
        pl.int_range(pl.len()).over("stratum").alias("_rank"),
        pl.len().over("stratum").alias("_n"),
    )
    n_val = (pl.col("_n") * val_fraction).round().cast(pl.Int64).clip(upper_bound=pl.col("_n") - 1)
    df = df.with_columns(pl.when(pl.col("_rank") < n_val).then(pl.lit("val")).otherwise(pl.lit("train")).alias("split"))
    return dict(df.select("sequence_id", "split").iter_rows())


def official_split(cities: Sequence[str], val_cities: Sequence[str]) -> list[str]:
    """``val`` for rows whose city is one of ``val_cities`` (MSLS: cph, sf), else ``train``."""
    val = set(val_cities)
    return ["val" if c in val else "train" for c in cities]
