"""GPS galleries to retrieve from (paper App. D): a uniform grid over training regions, city centres,
or GeoCLIP's shipped 100K points. Built from the training split only, so retrieval stays blind to val.
Beyond the paper, ``world``: a land-only grid over the whole Earth, for a model that was not trained on
one region (zero-shot, several datasets); at a coarse resolution, with local refinement
(``vidtag.refine``) for precision.

Gallery file: parquet with ``lat, lon`` (float64) and optional ``label``; parquet metadata key
``vidtag.gallery`` holds JSON: kind, regions, resolution_km, padding_km, the other build parameters,
the source manifest's fingerprint and the gallery's own ``fingerprint``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from vidtag.errors import ConfigError, GalleryError  # GalleryError re-exported: `from vidtag.gallery import GalleryError` works
from vidtag.fingerprint import sha256_arrays
from vidtag.geo import (KM_PER_DEG_LAT, EARTH_RADIUS_KM, BBox, bounding_box, check_latlon, km_per_deg_lon, unit_vectors,
                        wrap_lon)
from vidtag.io import read_parquet_metadata, write_parquet_atomic

KINDS = ("grid", "city_centres", "geoclip100k", "world", "val_set")
META_KEY = "vidtag.gallery"
EARTH_AREA_KM2 = 4 * np.pi * EARTH_RADIUS_KM**2
LAND_FRACTION = 0.30  # of the Earth's surface, Antarctica included: the world gallery's expected share of grid points
WORLD_MAX_POINTS = 20_000_000  # a world gallery's limit (~3 km): its embeddings alone are 40 GB at 512-d float32


def grid_points(box: BBox, resolution_km: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``resolution_km`` inside ``box``: rows at a constant latitude step, and along each row
    a longitude step of ``resolution_km / km_per_deg_lon(row latitude)``, so cells are square in km.

    N ≈ disLat·disLon / res² (App. D, step 5). Antimeridian-safe (longitudes wrapped to [-180, 180)).
    """
    if resolution_km <= 0:
        raise ConfigError(f"resolution_km must be > 0, got {resolution_km}")
    dlat = resolution_km / KM_PER_DEG_LAT
    n_rows = int(np.floor((box.lat_max - box.lat_min) / dlat + 1e-9)) + 1
    lat_rows = box.lat_min + dlat * np.arange(n_rows)  # (R,)
    kmpd = np.maximum(km_per_deg_lon(lat_rows), 1e-9)
    width_km = box.lon_span_deg * kmpd  # (R,)
    n_cols = np.floor(width_km / resolution_km + 1e-9).astype(np.int64) + 1  # (R,)
    n_cols = np.minimum(n_cols, np.floor(360.0 * kmpd / resolution_km).astype(np.int64).clip(min=1))  # full circle
    row = np.repeat(np.arange(n_rows), n_cols)  # (N,)
    start = np.cumsum(n_cols) - n_cols
    col = np.arange(row.size) - start[row]  # (N,) position within its row
    lat = lat_rows[row]
    lon = wrap_lon(box.lon_min + col * (resolution_km / kmpd[row]))
    return lat, lon


def is_land(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Land (lakes included) at each point, from the GLOBE 1 km land mask the ``global-land-mask`` package
    ships (read from the installed package: no network). Loading it takes ~1 GB and a few seconds."""
    try:
        from global_land_mask import globe
    except ImportError:
        raise GalleryError("kind='world' needs the global-land-mask package (`pip install global-land-mask`)") from None
    return np.asarray(globe.is_land(np.asarray(lat, np.float64), wrap_lon(lon)), dtype=bool)


def world_points(resolution_km: float, band_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A land-only grid over the Earth: :func:`grid_points`' square-km cells over the whole globe (rows
    every ``resolution_km`` from pole to pole, columns every ``resolution_km`` around each parallel), kept
    where :func:`is_land`. Built a band of rows at a time, so memory follows the land points, not the globe."""
    if not resolution_km > 0:
        raise ConfigError(f"resolution_km must be > 0, got {resolution_km}")
    expected = EARTH_AREA_KM2 * LAND_FRACTION / resolution_km**2
    if expected > WORLD_MAX_POINTS:
        finest = float(np.sqrt(EARTH_AREA_KM2 * LAND_FRACTION / WORLD_MAX_POINTS))
        raise ConfigError(f"a world gallery at {resolution_km} km has ~{expected / 1e6:.0f}M points; use resolution_km >= "
                          f"{finest:.1f} and local refinement (eval.refine) for precision")
    dlat = resolution_km / KM_PER_DEG_LAT
    n_rows = int(np.floor(180.0 / dlat + 1e-9)) + 1
    lats, lons = [], []
    for r0 in range(0, n_rows, band_rows):
        r1 = min(r0 + band_rows, n_rows)
        box = BBox(-90.0 + dlat * r0, min(-90.0 + dlat * (r1 - 1), 90.0), -180.0, 180.0)
        lat, lon = grid_points(box, resolution_km)
        land = is_land(lat, lon)
        lats.append(lat[land])
        lons.append(lon[land])
    return np.concatenate(lats), np.concatenate(lons)


def cluster_regions(lat: np.ndarray, lon: np.ndarray, cluster_km: float) -> np.ndarray:
    """Region id per point: connected components of occupied cells, cells linked within ``cluster_km``.

    Points are snapped to cells of ``cluster_km / 2``; cells whose centres lie within ``cluster_km``
    (chord on the unit sphere, so antimeridian and poles need no care) join one region.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    cell_km = cluster_km / 2
    ci = np.floor(lat * KM_PER_DEG_LAT / cell_km).astype(np.int64)
    lat_c = (ci + 0.5) * cell_km / KM_PER_DEG_LAT
    cj = np.floor(wrap_lon(lon) * np.maximum(km_per_deg_lon(lat_c), 1e-6) / cell_km).astype(np.int64)
    cells, inverse = np.unique(np.stack([ci, cj], 1), axis=0, return_inverse=True)
    # Each cell is represented by the mean of its points (robust to the snapping convention).
    xyz = np.zeros((len(cells), 3))
    np.add.at(xyz, inverse.ravel(), unit_vectors(lat, lon))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    pairs = cKDTree(xyz).query_pairs(r=cluster_km / EARTH_RADIUS_KM, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(cells), len(cells)))
    _, comp = connected_components(graph, directed=False)
    return comp[inverse.ravel()]


def _trimmed_box(lat: np.ndarray, lon: np.ndarray, q: float) -> BBox:
    """Bounding box of the points within the [q, 1-q] quantiles of lat and of lon (App. D step 1's
    "outliers can be skipped"); longitude quantiles are taken around the region's own box."""
    box = bounding_box(lat, lon)
    if q <= 0 or lat.size < 3:
        return box
    rel = (wrap_lon(lon) - box.lon_min) % 360.0  # east of the box's west edge; continuous across ±180
    lo_lat, hi_lat = np.quantile(lat, [q, 1 - q])
    lo_rel, hi_rel = np.quantile(rel, [q, 1 - q])
    keep = (lat >= lo_lat) & (lat <= hi_lat) & (rel >= lo_rel) & (rel <= hi_rel)
    return bounding_box(lat[keep], lon[keep]) if keep.any() else box


def gallery_fingerprint(df: pl.DataFrame) -> str:
    """sha256 over the gallery's points (float64 lat, lon, then label if any), in order.

    Without labels it equals :func:`vidtag.retrieval.latlon_fingerprint` of the same points.
    """
    cols = [df["lat"].cast(pl.Float64), df["lon"].cast(pl.Float64)]
    return sha256_arrays(*cols, *([df["label"]] if "label" in df.columns else []))


def geoclip_gallery_path() -> Path:
    """GeoCLIP's shipped 100K gallery, found beside the installed package (without importing it)."""
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        raise GalleryError("the geoclip package is not installed; `pip install geoclip` to use kind='geoclip100k'")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "gps_gallery" / "coordinates_100K.csv"
    if not path.is_file():
        raise GalleryError(f"{path} not found; the installed geoclip package does not ship its 100K gallery")
    return path


def build_gallery(
    manifest_df: pl.DataFrame | None,
    kind: str = "grid",
    *,
    resolution_km: float = 0.1,  # App. D / Sec. 5.5: 0.1 km on MSLS (0.5 km on GAMa)
    padding_km: float = 1.0,  # App. D step 2: "a constant padding"; unit and value unstated, our choice
    trim_quantile: float = 0.0,  # App. D step 1: outliers "can be skipped"; 0 keeps all
    cluster_km: float = 5.0,  # regions without a city column: cells linked within this distance
    splits: tuple[str, ...] = ("train",),
    region_column: str | None = "city",
    manifest_fingerprint: str | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Build a gallery ``(df, meta)``: ``grid`` (App. D), ``city_centres`` (Sec. 5.3), ``geoclip100k``,
    ``world`` (land everywhere at ``resolution_km``; needs no manifest and ignores the region settings) or
    ``val_set`` (App. D.2: the validation frames' own GPS)."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    meta: dict = {"kind": kind, "splits": list(splits)}
    if kind == "world":
        lat, lon = world_points(resolution_km)
        meta.update(regions=[], resolution_km=resolution_km, land_mask="global-land-mask (GLOBE 1 km)", splits=[])
        return _finish(pl.DataFrame({"lat": lat, "lon": lon}), meta, manifest_fingerprint)
    if kind == "geoclip100k":
        path = geoclip_gallery_path()
        raw = pl.read_csv(path)
        df = raw.select(pl.col("LAT").cast(pl.Float64).alias("lat"), pl.col("LON").cast(pl.Float64).alias("lon"))
        meta.update(source=str(path.name), regions=[])
        return _finish(df, meta, manifest_fingerprint)

    if manifest_df is None:
        raise GalleryError(f"kind={kind!r} needs a manifest to build from")
    if kind == "val_set":
        latlon = split_points(manifest_df, "val")
        meta.update(splits=["val"], regions=[])
        return _finish(pl.DataFrame({"lat": latlon[:, 0], "lon": latlon[:, 1]}), meta, manifest_fingerprint)
    pts = manifest_df.filter(pl.col("split").is_in(list(splits)) & pl.col("lat").is_not_null() & pl.col("lon").is_not_null())
    if pts.height == 0:
        raise GalleryError(f"the manifest has no frames with coordinates in split(s) {list(splits)}; "
                           "a gallery is built from training data (set gallery splits or check the manifest's split column)")
    use_col = region_column if region_column and region_column in pts.columns and pts[region_column].null_count() == 0 else None

    if kind == "city_centres":
        if use_col is None:
            raise GalleryError(f"kind='city_centres' needs a '{region_column}' label on every frame; this manifest has none")
        # CityGuessr frames already carry their city centre, so the median is that centre; for other
        # datasets it is the median position of the city's training frames.
        df = (pts.group_by(use_col).agg(pl.col("lat").median(), pl.col("lon").median())
              .rename({use_col: "label"}).sort("label").select("lat", "lon", "label"))
        meta.update(regions=df["label"].to_list(), region_column=use_col)
        return _finish(df, meta, manifest_fingerprint)

    if padding_km < 0 or cluster_km <= 0 or not 0 <= trim_quantile < 0.5:
        raise ConfigError(f"need padding_km >= 0, cluster_km > 0 and 0 <= trim_quantile < 0.5; got {padding_km}, "
                          f"{cluster_km}, {trim_quantile}")
    lat, lon = pts["lat"].to_numpy(), pts["lon"].to_numpy()
    if use_col is not None:
        names = pts[use_col].to_numpy().astype(str)
        region_ids, inv = np.unique(names, return_inverse=True)
        region_names = [str(r) for r in region_ids]
    else:
        inv = cluster_regions(lat, lon, cluster_km)
        region_names = [f"cluster_{i}" for i in range(int(inv.max()) + 1)]
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(region_names) + 1))
    lats, lons, regions = [], [], []
    for r, name in enumerate(region_names):
        idx = order[bounds[r]:bounds[r + 1]]
        box = _trimmed_box(lat[idx], lon[idx], trim_quantile).padded(padding_km)
        glat, glon = grid_points(box, resolution_km)
        lats.append(glat)
        lons.append(glon)
        regions.append({"name": name, "n_train_points": int(idx.size), "n_points": int(glat.size),
                        "bbox": [float(box.lat_min), float(box.lat_max), float(box.lon_min), float(box.lon_max)],
                        "height_km": round(box.height_km, 4), "width_km": round(box.width_km, 4)})
    df = pl.DataFrame({"lat": np.concatenate(lats), "lon": np.concatenate(lons)})
    meta.update(regions=regions, resolution_km=resolution_km, padding_km=padding_km, trim_quantile=trim_quantile,
                region_column=use_col, cluster_km=None if use_col else cluster_km)
    return _finish(df, meta, manifest_fingerprint)


def split_points(manifest_df: pl.DataFrame, split: str = "val") -> np.ndarray:
    """(G, 2) distinct lat, lon of a split's geotagged frames, sorted: App. D.2's validation-set gallery, where
    the truth of every frame is in the gallery. Training validates against it, so training depends on the
    manifest alone and a change of the evaluation gallery re-runs only `evaluate`."""
    pts = (manifest_df.filter((pl.col("split") == split) & pl.col("lat").is_not_null() & pl.col("lon").is_not_null())
           .select(pl.col("lat").cast(pl.Float64), pl.col("lon").cast(pl.Float64)).unique().sort("lat", "lon"))
    if pts.height == 0:
        raise GalleryError(f"the manifest has no geotagged frames in split {split!r} to build a validation-set gallery from")
    return pts.to_numpy()


def _finish(df: pl.DataFrame, meta: dict, manifest_fingerprint: str | None) -> tuple[pl.DataFrame, dict]:
    meta = {**meta, "n_points": df.height, "manifest_fingerprint": manifest_fingerprint, "fingerprint": gallery_fingerprint(df)}
    return df, meta


def write_gallery(df: pl.DataFrame, meta: dict, path: str | os.PathLike) -> None:
    """Write a gallery atomically; the metadata's fingerprint is recomputed from the rows."""
    df = df.with_columns(pl.col("lat").cast(pl.Float64), pl.col("lon").cast(pl.Float64))
    meta = {**meta, "fingerprint": gallery_fingerprint(df), "n_points": df.height}
    write_parquet_atomic(df, path, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_gallery(path: str | os.PathLike) -> tuple[pl.DataFrame, dict]:
    """Read a gallery file; refuses a file whose rows do not match its recorded fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"gallery {path} does not exist; build one with `vidtag gallery build`")
    df = pl.read_parquet(path)
    if not {"lat", "lon"} <= set(df.columns):
        raise GalleryError(f"{path} has columns {df.columns}; a gallery needs lat, lon (float64) and optional label")
    meta_raw = read_parquet_metadata(path).get(META_KEY)
    meta = json.loads(meta_raw) if meta_raw else {"kind": "external"}
    if meta_raw and meta.get("fingerprint") != gallery_fingerprint(df):
        raise GalleryError(f"{path}: rows do not match the recorded fingerprint (file altered after writing); rebuild it")
    meta.setdefault("fingerprint", gallery_fingerprint(df))
    check_latlon(df["lat"], df["lon"], source=f"gallery {path}", unknown_ok=False, error=GalleryError)
    return df, meta

