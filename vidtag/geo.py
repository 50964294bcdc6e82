"""Geodesy on the sphere: distances, the Equal Earth projection, km offsets, bounding boxes.

Units are in the names: degrees (``lat``, ``lon``, ``*_deg``) and kilometres (``*_km``).
Everything is pure numpy and broadcasts; ``*_torch`` twins exist where training needs gradients
or device tensors. Longitudes are returned wrapped to [-180, 180).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vidtag.errors import ManifestError

EARTH_RADIUS_KM = 6371.0088  # IUGG mean Earth radius; the sphere every distance here uses.

# Equal Earth polynomial coefficients (Šavrič, Patterson & Jenny 2018) and GeoCLIP's scale factor:
# GeoCLIP divides the projected coordinates by 180 after multiplying by SF, so the pretrained
# location encoder expects inputs in that exact range (roughly [-1.37, 1.37] x [-0.67, 0.67]).
EE_A1, EE_A2, EE_A3, EE_A4 = 1.340264, -0.081106, 0.000893, 0.003796
GEOCLIP_SF = 66.50336


def wrap_lon(lon_deg):
    """Longitude(s) wrapped to [-180, 180)."""
    return (np.asarray(lon_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km between points given in degrees; numpy broadcasting."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def unit_vectors(lat, lon) -> np.ndarray:
    """Points in degrees as unit vectors (..., 3) on the sphere: averaging them is antimeridian-safe."""
    lat_r, lon_r = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)], axis=-1)


def haversine_km_torch(lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`haversine_km` (degrees in, km out, broadcasting, differentiable)."""
    lat1, lon1, lat2, lon2 = (torch.deg2rad(v) for v in (lat1, lon1, lat2, lon2))
    a = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0.0, 1.0)))


def unit_vectors_torch(latlon_deg: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees -> (..., 3) float64 unit vectors on the sphere (:func:`unit_vectors` on the device)."""
    rad = torch.deg2rad(latlon_deg.double())
    lat, lon = rad[..., 0], rad[..., 1]
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


def latlon_from_vectors_torch(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) non-zero vectors -> (..., 2) float64 degrees of their directions (any length: atan2, no arcsin)."""
    v = v.double()
    lat = torch.atan2(v[..., 2], torch.linalg.vector_norm(v[..., :2], dim=-1))
    lon = torch.atan2(v[..., 1], v[..., 0])
    return torch.rad2deg(torch.stack([lat, lon], dim=-1))


def pairwise_haversine_km(a_deg: np.ndarray, b_deg: np.ndarray) -> np.ndarray:
    """Distance matrix (n, m) in km between (n, 2) and (m, 2) arrays of (lat, lon) degrees."""
    a = np.asarray(a_deg, dtype=np.float64)
    b = np.asarray(b_deg, dtype=np.float64)
    return haversine_km(a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1])


def equal_earth(lat, lon) -> np.ndarray:
    """Equal Earth projection of degrees, scaled exactly as GeoCLIP does; returns (..., 2) as (x, y)."""
    lat_rad = np.radians(np.asarray(lat, dtype=np.float64))
    lon_rad = np.radians(np.asarray(lon, dtype=np.float64))
    theta = np.arcsin(np.sqrt(3.0) / 2 * np.sin(lat_rad))
    denom = 3 * (9 * EE_A4 * theta**8 + 7 * EE_A3 * theta**6 + 3 * EE_A2 * theta**2 + EE_A1)
    x = 2 * np.sqrt(3.0) * lon_rad * np.cos(theta) / denom
    y = EE_A4 * theta**9 + EE_A3 * theta**7 + EE_A2 * theta**3 + EE_A1 * theta
    return np.stack([x, y], axis=-1) * GEOCLIP_SF / 180.0


def equal_earth_torch(latlon_deg: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`equal_earth` on a (..., 2) tensor of (lat, lon) degrees -> (..., 2)."""
    lat_rad = torch.deg2rad(latlon_deg[..., 0])
    lon_rad = torch.deg2rad(latlon_deg[..., 1])
    theta = torch.asin((3.0**0.5) / 2 * torch.sin(lat_rad))
    denom = 3 * (9 * EE_A4 * theta**8 + 7 * EE_A3 * theta**6 + 3 * EE_A2 * theta**2 + EE_A1)
    x = 2 * (3.0**0.5) * lon_rad * torch.cos(theta) / denom
    y = EE_A4 * theta**9 + EE_A3 * theta**7 + EE_A2 * theta**3 + EE_A1 * theta
    return torch.stack([x, y], dim=-1) * GEOCLIP_SF / 180.0  # same operation order as geoclip: bit-identical


def destination_point(lat, lon, bearing_deg, dist_km):
    """Point reached from (lat, lon) after ``dist_km`` along the great circle at ``bearing_deg``.

    Bearing is clockwise from north. Exact on the sphere, valid across the antimeridian and over
    the poles (going north past a pole comes back down on the other meridian).
    """
    lat1 = np.radians(np.asarray(lat, dtype=np.float64))
    lon1 = np.radians(np.asarray(lon, dtype=np.float64))
    brg = np.radians(np.asarray(bearing_deg, dtype=np.float64))
    d = np.asarray(dist_km, dtype=np.float64) / EARTH_RADIUS_KM
    sin_lat2 = np.sin(lat1) * np.cos(d) + np.cos(lat1) * np.sin(d) * np.cos(brg)
    lat2 = np.arcsin(np.clip(sin_lat2, -1.0, 1.0))
    lon2 = lon1 + np.arctan2(np.sin(brg) * np.sin(d) * np.cos(lat1), np.cos(d) - np.sin(lat1) * sin_lat2)
    return np.degrees(lat2), wrap_lon(np.degrees(lon2))


def offset_km(lat, lon, north_km, east_km):
    """Move (lat, lon) by ``north_km`` then ``east_km`` (along the parallel); returns degrees.

    North moves along the meridian (exact); east moves along the new parallel, so a grid built
    with it has square cells in km at any latitude. Latitude is clamped to ±90; within 1e-6° of a
    pole an eastward move is meaningless and leaves longitude unchanged.
    """
    lat2 = np.clip(np.asarray(lat, dtype=np.float64) + np.degrees(np.asarray(north_km, dtype=np.float64) / EARTH_RADIUS_KM), -90.0, 90.0)
    cos_lat = np.cos(np.radians(lat2))
    safe = np.where(cos_lat > 1e-8, cos_lat, np.inf)
    lon2 = np.asarray(lon, dtype=np.float64) + np.degrees(np.asarray(east_km, dtype=np.float64) / (EARTH_RADIUS_KM * safe))
    return lat2, wrap_lon(lon2)


def km_per_deg_lon(lat_deg) -> np.ndarray:
    """Length in km of one degree of longitude along the parallel at ``lat_deg``."""
    return np.radians(1.0) * EARTH_RADIUS_KM * np.cos(np.radians(np.asarray(lat_deg, dtype=np.float64)))


KM_PER_DEG_LAT = np.radians(1.0) * EARTH_RADIUS_KM  # ≈ 111.2 km along any meridian


@dataclass(frozen=True)
class BBox:
    """A latitude/longitude box in degrees. ``lon_min > lon_max`` means it crosses the antimeridian."""

    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    @property
    def crosses_antimeridian(self) -> bool:
        return self.lon_min > self.lon_max

    @property
    def lon_span_deg(self) -> float:
        span = self.lon_max - self.lon_min
        return span if span >= 0 else span + 360.0  # [-180, 180] is the full circle: 360

    @property
    def height_km(self) -> float:
        """Distance from the south edge to the north edge along a meridian."""
        return float((self.lat_max - self.lat_min) * KM_PER_DEG_LAT)

    @property
    def width_km(self) -> float:
        """East-west extent along the southern edge (Appendix D measures disLON there)."""
        return float(self.lon_span_deg * km_per_deg_lon(self.lat_min))

    def contains(self, lat, lon) -> np.ndarray:
        lat = np.asarray(lat, dtype=np.float64)
        rel = (wrap_lon(lon) - self.lon_min) % 360.0
        return (lat >= self.lat_min) & (lat <= self.lat_max) & (rel <= self.lon_span_deg + 1e-12)

    def padded(self, pad_km: float) -> BBox:
        """The box grown by ``pad_km`` on every side (latitude clamped to ±90)."""
        dlat = pad_km / KM_PER_DEG_LAT
        lat_min, lat_max = max(self.lat_min - dlat, -90.0), min(self.lat_max + dlat, 90.0)
        widest = max(abs(lat_min), abs(lat_max))
        kmpd = float(km_per_deg_lon(widest))
        dlon = 180.0 if kmpd < 1e-9 else pad_km / kmpd
        span = self.lon_span_deg + 2 * dlon
        if span >= 360.0:
            return BBox(lat_min, lat_max, -180.0, 180.0)
        return BBox(lat_min, lat_max, float(wrap_lon(self.lon_min - dlon)), float(wrap_lon(self.lon_max + dlon)))


def bounding_box(lat, lon) -> BBox:
    """Smallest box holding all points; longitudes take the shortest arc, so it may cross ±180.

    The longitude interval is the complement of the largest gap between sorted longitudes on the
    circle, which is what a region straddling the antimeridian (Fiji, Chukotka) needs.
    """
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.sort(wrap_lon(np.asarray(lon, dtype=np.float64).ravel()))
    if lat.size == 0:
        raise ValueError("bounding_box needs at least one point")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise ValueError("bounding_box got NaN or infinite coordinates")
    gaps = np.diff(np.concatenate([lon, lon[:1] + 360.0]))
    i = int(np.argmax(gaps))
    lon_max, lon_min = lon[i], lon[(i + 1) % lon.size]
    if lon.size == 1:
        lon_min = lon_max = lon[0]
    return BBox(float(lat.min()), float(lat.max()), float(lon_min), float(lon_max))


LATLON_RANGE = "[-90, 90] x [-180, 180]"


def validate_latlon(lat, lon) -> np.ndarray:
    """Boolean mask of rows whose coordinates are finite and within [-90, 90] x [-180, 180].

    The one validity rule for coordinates; :func:`latlon_problems` and :func:`check_latlon` build on it.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)


def _values_and_nulls(x) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (null as NaN) and the null mask; only a polars Series has nulls, NaN is never null."""
    if hasattr(x, "is_null") and hasattr(x, "fill_null"):
        import polars as pl

        return x.cast(pl.Float64).fill_null(np.nan).to_numpy(), x.is_null().to_numpy()
    values = np.asarray(x, dtype=np.float64)
    return values, np.zeros(values.shape, dtype=bool)


def latlon_problems(lat, lon, *, unknown_ok: bool = True) -> np.ndarray:
    """Per row, why its coordinates are unusable, or None where they are fine: an object array.

    ``lat`` / ``lon``: polars Series (null = unknown, NaN = an error) or arrays. Rows with both null are
    "unknown": fine when ``unknown_ok``, else "no coordinates". A row is otherwise fine when
    :func:`validate_latlon` holds.
    """
    la, lat_null = _values_and_nulls(lat)
    lo, lon_null = _values_and_nulls(lon)
    unknown = lat_null & lon_null
    bad = ~validate_latlon(la, lo) & ~(unknown & unknown_ok)
    reasons = np.full(la.shape, None, dtype=object)
    reasons[bad] = f"lat/lon out of range {LATLON_RANGE}"
    reasons[bad & (np.isnan(la) | np.isnan(lo))] = "lat/lon is NaN or missing"  # NaN, or one of the two null
    reasons[bad & unknown] = "no coordinates"
    return reasons


def check_latlon(lat, lon, *, source: str, unknown_ok: bool = True, row_name: Callable[[int], str] | None = None,
                 what: str | None = None, error: type[Exception] = ManifestError) -> None:
    """Raise ``error`` (default :class:`~vidtag.errors.ManifestError`) naming ``source`` and its first bad row.

    ``source`` names the file or table; ``row_name(i)`` describes row ``i`` (default ``"row i"``, 0-based);
    ``what`` replaces the row's own reason from :func:`latlon_problems`, which judges the rows.
    """
    reasons = latlon_problems(lat, lon, unknown_ok=unknown_ok)
    bad = np.flatnonzero(reasons != None)  # noqa: E711 - elementwise on an object array
    if bad.size == 0:
        return
    i = int(bad[0])
    where = row_name(i) if row_name is not None else f"row {i}"
    more = f" and {bad.size - 1} more row(s)" if bad.size > 1 else ""
    hint = "fix the coordinates" + (" or leave both null when unknown" if unknown_ok else "")
    raise error(f"{source} {where}{more}: {what or reasons[i]}; {hint}")
