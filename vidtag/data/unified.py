"""Several datasets in one manifest: the unified model's training data (App. H).

App. H builds one training split from MSLS, GAMa and CityGuessr68k:

1. MSLS: the entire training split.
2. CityGuessr68k: (a) training data of cities also present in MSLS is removed (they would be false
   negatives in the contrastive loss, Eq. 1); (b, c) cities with fewer than 80 sequences keep all of
   them, every other city 80 sampled at random, so the part is roughly MSLS's size.
3. GAMa: videos sampled at random "so that the corpus size is equivalent to the other two".

Choices where App. H leaves room (also in the README, "Unified model (App. H)"):

- Only the **training** split is sampled (App. H "prepare[s] a training split"); every dataset's val and test
  frames are kept whole, so that Tables 12-13 score each dataset on its own validation set.
- "Present in MSLS" is geographic: a CityGuessr city whose centre lies within ``same_city_km`` (25 km, the
  paper's city scale, Table 12) of an MSLS city (the median position of that city's frames). Names cannot
  be compared: MSLS folders are abbreviations (``cph``, ``sf``) and CityGuessr names cities by id; and App. H's
  reason, false negatives, is about places.
- GAMa's size is counted in sequences (videos), as 2(b) counts CityGuessr's: the mean number of training
  sequences of the other datasets after their sampling (each roughly MSLS's size by 2(b)); ``sample_size``
  sets it outright.
- Random draws rank sequences by sha256 of (seed, dataset, sequence id), as :mod:`vidtag.data.split` does:
  deterministic for the seed, and adding one sequence never reshuffles the others.

Every frame's ``dataset`` column names its dataset, sequence ids are ``<dataset>/<reader's id>`` (unique
across datasets), and paths are relative to the datasets' common folder. What sampling left out is listed
in the skip report (one row per sequence) and summed up in :class:`SourcesReport`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vidtag.data.ingest import SOURCES, read_source
from vidtag.data.manifest import SKIPPED_COLUMNS, Manifest, write_manifest
from vidtag.errors import ConfigError, ManifestError
from vidtag.geo import haversine_km

# App. H 2(c): cities with more training sequences than this keep this many, sampled at random.
PAPER_MAX_PER_CITY = 80
# "Present in MSLS": a CityGuessr city centre within this distance of an MSLS city (Table 12's city scale).
SAME_CITY_KM = 25.0
DEFAULT_NAMES = {"bdd": "gama", "msls": "msls", "cityguessr": "cityguessr"}  # source -> dataset name in metrics
SAMPLING_KEYS = {"cityguessr": ("max_per_city", "same_city_km"), "bdd": ("sample_size",)}  # App. H options per source
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of params ``data.sources``: a dataset, where it lives, its reader's and App. H's options."""

    source: str  # reader: msls | bdd (GAMa) | cityguessr | frames | video | toy
    root: Path  # the dataset's own root
    name: str  # dataset name: the manifest's ``dataset`` column, sequence-id prefix, metrics key
    options: dict[str, Any] = field(default_factory=dict)  # the reader's keyword arguments (as data.<source>)
    sampling: dict[str, Any] = field(default_factory=dict)  # App. H options: max_per_city, same_city_km, sample_size


@dataclass
class SourcesReport:
    """What App. H's sampling did, per dataset (printed by `prepare`)."""

    train_sequences: dict[str, int] = field(default_factory=dict)  # dataset -> training sequences kept
    dropped_cities: dict[str, str] = field(default_factory=dict)  # CityGuessr city -> the MSLS city it is near
    capped_cities: dict[str, int] = field(default_factory=dict)  # CityGuessr city -> training sequences it had (> cap)
    sampled: dict[str, tuple[int, int]] = field(default_factory=dict)  # GAMa dataset -> (kept, had) training sequences

    def __str__(self) -> str:
        lines = ["App. H training split: " + ", ".join(f"{k} {v} sequences" for k, v in self.train_sequences.items())]
        if self.dropped_cities:
            lines.append(f"  CityGuessr cities also in MSLS, training data removed: {len(self.dropped_cities)} "
                         f"({', '.join(f'{c}~{m}' for c, m in list(self.dropped_cities.items())[:10])}"
                         f"{', ...' if len(self.dropped_cities) > 10 else ''})")
        if self.capped_cities:
            lines.append(f"  CityGuessr cities sampled down to the per-city cap: {len(self.capped_cities)}")
        for name, (kept, had) in self.sampled.items():
            lines.append(f"  {name}: {kept} of {had} training videos sampled (the size of the other datasets)")
        return "\n".join(lines)


def parse_sources(entries: list[dict[str, Any]]) -> list[SourceSpec]:
    """params ``data.sources`` -> specs; a clear :class:`ConfigError` for a malformed entry."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError("data.sources must be a non-empty list of {source, root, <options>} entries")
    specs, names = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "source" not in e or "root" not in e:
            raise ConfigError(f"data.sources[{i}] must be a mapping with 'source' and 'root'; got {e!r}")
        opts = dict(e)
        source, root = opts.pop("source"), Path(opts.pop("root"))
        if source not in SOURCES:
            raise ConfigError(f"data.sources[{i}].source must be one of {SOURCES}, got {source!r}")
        name = str(opts.pop("name", DEFAULT_NAMES.get(source, source)))
        if not _NAME.match(name) or name in names:
            raise ConfigError(f"data.sources[{i}].name {name!r} must be unique and made of letters, digits, '_' or '-'; "
                              "give each entry its own name")
        names.add(name)
        sampling = {k: opts.pop(k) for k in SAMPLING_KEYS.get(source, ()) if k in opts}
        for k, v in sampling.items():
            if v is not None and k != "sample_size" and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"data.sources[{i}].{k} must be a number > 0 or null (null: no such rule), got {v!r}")
        if sampling.get("sample_size") not in (None, "auto") and not (isinstance(sampling["sample_size"], int)
                                                                       and sampling["sample_size"] > 0):
            raise ConfigError(f"data.sources[{i}].sample_size must be 'auto', null or an integer > 0, "
                              f"got {sampling['sample_size']!r}")
        specs.append(SourceSpec(source, root, name, opts, sampling))
    return specs


def _rank(seed: int, dataset: str, sequence_ids: list[str]) -> np.ndarray:
    """sha256 rank keys: the sequences a random draw keeps are those with the smallest keys."""
    return np.array([hashlib.sha256(f"{seed}\x00{dataset}\x00{s}".encode()).hexdigest() for s in sequence_ids], dtype=object)


def _left_out(df: pl.DataFrame, ids: list[str], reason: pl.Expr | str) -> pl.DataFrame:
    """Skip-report rows (one per sequence, pointing at its first frame) for the sequences ``ids`` of ``df``."""
    path_col = "image_path" if "image_path" in df.columns else "video_path"
    first = df.filter(pl.col("sequence_id").is_in(ids)).group_by("sequence_id", maintain_order=True).first()
    reason = pl.lit(reason) if isinstance(reason, str) else reason
    return first.select(pl.col(path_col).cast(pl.String).alias("file"), pl.lit(None, dtype=pl.Int64).alias("row"),
                        "sequence_id", reason.alias("reason"))


def _train_ids(df: pl.DataFrame) -> pl.DataFrame:
    """One row per training sequence: sequence_id and its first frame's other columns."""
    return df.filter(pl.col("split") == "train").group_by("sequence_id", maintain_order=True).first()


def _msls_cities(parts: dict[str, pl.DataFrame], specs: list[SourceSpec]) -> pl.DataFrame:
    """city, lat, lon: the median position of each MSLS city's geotagged frames (all MSLS entries)."""
    frames = [parts[s.name] for s in specs if s.source == "msls"]
    if not frames:
        return pl.DataFrame(schema={"city": pl.String, "lat": pl.Float64, "lon": pl.Float64})
    df = pl.concat([f.select("city", "lat", "lon") for f in frames]).drop_nulls()
    return df.group_by("city").agg(pl.col("lat").median(), pl.col("lon").median()).sort("city")


def _sample_cityguessr(df: pl.DataFrame, spec: SourceSpec, msls: pl.DataFrame, seed: int,
                       report: SourcesReport) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """App. H 2(a)-(c) on the training split of one CityGuessr68k part."""
    same_km = spec.sampling.get("same_city_km", SAME_CITY_KM)
    cap = spec.sampling.get("max_per_city", PAPER_MAX_PER_CITY)
    seqs = _train_ids(df)
    skipped = []
    if same_km is not None and msls.height and seqs.height:
        cities = seqs.group_by("city").agg(pl.col("lat").first(), pl.col("lon").first()).sort("city")
        d = haversine_km(cities["lat"].to_numpy()[:, None], cities["lon"].to_numpy()[:, None],
                         msls["lat"].to_numpy()[None, :], msls["lon"].to_numpy()[None, :])  # (C, M) km
        near = d.min(axis=1) < same_km
        for c, j in zip(cities["city"].to_numpy()[near], d.argmin(axis=1)[near]):
            report.dropped_cities[str(c)] = str(msls["city"][int(j)])
        gone = seqs.filter(pl.col("city").is_in(list(report.dropped_cities)))["sequence_id"].to_list()
        if gone:
            why = pl.format(f"App. H 2(a): training video of city {{}} within {same_km:g} km of an MSLS city "
                            "(false negatives in the contrastive loss); left out", pl.col("city"))
            skipped.append(_left_out(df, gone, why))
            seqs = seqs.filter(~pl.col("sequence_id").is_in(gone))
    if cap is not None and seqs.height:
        seqs = seqs.with_columns(pl.Series("_k", _rank(seed, spec.name, seqs["sequence_id"].to_list()), dtype=pl.String))
        seqs = seqs.sort("city", "_k").with_columns(pl.int_range(pl.len()).over("city").alias("_r"), pl.len().over("city").alias("_n"))
        over = seqs.filter(pl.col("_n") > cap)
        report.capped_cities.update(dict(over.group_by("city").agg(pl.col("_n").first()).sort("city").iter_rows()))
        gone = over.filter(pl.col("_r") >= cap)["sequence_id"].to_list()
        if gone:
            skipped.append(_left_out(df, gone, f"App. H 2(c): its city has more than {int(cap)} training videos; "
                                               f"{int(cap)} sampled, this one left out"))
        seqs = seqs.filter(pl.col("_r") < cap)
    kept_train = set(seqs["sequence_id"].to_list())
    out = df.filter((pl.col("split") != "train") | pl.col("sequence_id").is_in(list(kept_train)))
    return out, skipped


def _sample_videos(df: pl.DataFrame, spec: SourceSpec, target: int | None, seed: int,
                   report: SourcesReport) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """App. H 3: ``target`` training videos of a GAMa part, drawn at random (all of them when it has fewer)."""
    seqs = _train_ids(df)["sequence_id"].to_list()
    if target is None or len(seqs) <= target:
        return df, []
    order = np.argsort(_rank(seed, spec.name, seqs), kind="stable")
    keep = {seqs[i] for i in order[:target]}
    gone = [s for s in seqs if s not in keep]
    report.sampled[spec.name] = (target, len(seqs))
    out = df.filter((pl.col("split") != "train") | pl.col("sequence_id").is_in(list(keep)))
    return out, [_left_out(df, gone, f"App. H 3: GAMa sampled to {target} training videos (the size of the other "
                                     "datasets); this one left out")]


def _relocate(df: pl.DataFrame, skipped: pl.DataFrame, name: str, prefix: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Sequence ids ``<name>/<id>``, paths from the common root, the ``dataset`` column."""
    paths = [pl.when(pl.col(c).is_not_null()).then(pl.lit(prefix) + pl.col(c)).alias(c)
             for c in ("image_path", "video_path") if c in df.columns] if prefix else []
    df = df.with_columns((pl.lit(f"{name}/") + pl.col("sequence_id")).alias("sequence_id"), *paths, pl.lit(name).alias("dataset"))
    skipped = skipped.with_columns(pl.when(pl.col("sequence_id").is_not_null())
                                   .then(pl.lit(f"{name}/") + pl.col("sequence_id")).alias("sequence_id"))
    return df, skipped


def read_sources(specs: list[SourceSpec], *, val_fraction: float = 0.2, seed: int = 0, skip_bad: bool = False,
                 allow_outside_root: bool = False, min_frames: int | None = None
                 ) -> tuple[pl.DataFrame, pl.DataFrame, Path, SourcesReport]:
    """Read every dataset with its own reader, apply App. H's sampling to the training split, and join them:
    ``(rows, skip report, common root, report)``."""
    parts, skips, roots = {}, {}, {}
    for s in specs:
        df, skipped, root = read_source(s.source, s.root, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
                                        allow_outside_root=allow_outside_root, options=s.options, min_frames=min_frames)
        parts[s.name], skips[s.name], roots[s.name] = df, skipped.select(list(SKIPPED_COLUMNS)), Path(root).resolve()

    report = SourcesReport()
    msls = _msls_cities(parts, specs)
    for s in specs:
        if s.source == "cityguessr":
            parts[s.name], extra = _sample_cityguessr(parts[s.name], s, msls, seed, report)
            skips[s.name] = pl.concat([skips[s.name], *extra], how="vertical_relaxed")
    others = [_train_ids(parts[s.name]).height for s in specs if s.source != "bdd"]
    for s in specs:
        if s.source == "bdd":
            size = s.sampling.get("sample_size", "auto")
            target = (int(round(float(np.mean(others)))) if others else None) if size == "auto" else size
            parts[s.name], extra = _sample_videos(parts[s.name], s, target, seed, report)
            skips[s.name] = pl.concat([skips[s.name], *extra], how="vertical_relaxed")
    for s in specs:
        report.train_sequences[s.name] = _train_ids(parts[s.name]).height

    common = Path(os.path.commonpath([str(r) for r in roots.values()]))
    frames, skipped = [], []
    for s in specs:
        rel = os.path.relpath(roots[s.name], common)
        df, sk = _relocate(parts[s.name], skips[s.name], s.name, "" if rel == "." else Path(rel).as_posix() + "/")
        frames.append(df)
        skipped.append(sk)
    df = pl.concat(frames, how="diagonal_relaxed")
    if df.height == 0:
        raise ManifestError(f"no frames in any of the datasets {[s.name for s in specs]}")
    return df, pl.concat(skipped, how="vertical_relaxed"), common, report


def ingest_sources(entries: list[dict[str, Any]], out: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0,
                   skip_bad: bool = False, allow_outside_root: bool = False,
                   min_frames: int | None = None) -> tuple[Manifest, SourcesReport]:
    """params ``data.sources`` -> one manifest of several datasets (App. H) and its skip report at ``out``."""
    specs = parse_sources(entries)
    df, skipped, root, report = read_sources(specs, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
                                             allow_outside_root=allow_outside_root, min_frames=min_frames)
    source = "+".join(s.name for s in specs)
    m = write_manifest(df, out, root, source=source, skipped=skipped, allow_outside_root=allow_outside_root)
    return m, report
