"""vidtag.basemap: the shipped country outlines decode right, and places are found offline."""

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from vidtag import basemap


def test_topojson_arcs_are_delta_decoded_reversed_and_joined():
    # two arcs around the unit square (quantized on a 0.5-degree grid); the second ring walks arc 0 backwards
    topology = {
        "type": "Topology",
        "transform": {"scale": [0.5, 0.5], "translate": [10.0, 20.0]},
        "arcs": [[[0, 0], [2, 0], [0, 2]], [[2, 2], [-2, 0], [0, -2]]],
        "objects": {"c": {"type": "GeometryCollection", "geometries": [
            {"type": "Polygon", "arcs": [[0, 1]], "properties": {"name": "square"}},
            {"type": "MultiPolygon", "arcs": [[[~0]]], "properties": {"name": "reversed"}},
            {"type": None, "properties": {"name": "too small"}},
        ]}},
    }
    (name, polys), (rname, rpolys) = basemap.decode_topojson(topology, "c")
    assert name == "square" and rname == "reversed"
    np.testing.assert_allclose(polys[0][0], [[10, 20], [11, 20], [11, 21], [10, 21], [10, 20]])  # shared ends once
    np.testing.assert_allclose(rpolys[0][0], [[11, 21], [11, 20], [10, 20]])


def test_ring_across_the_antimeridian_is_unwrapped_and_a_polar_ring_is_closed():
    fiji = basemap.planar_ring(np.array([[179.0, -17.0], [-179.5, -17.0], [-179.5, -16.0], [179.0, -16.0], [179.0, -17.0]]))
    assert np.ptp(fiji[:, 0]) == pytest.approx(1.5)  # one island, not a band round the world
    lon = np.linspace(-180, 180, 13)
    polar = basemap.planar_ring(np.stack([lon, np.full_like(lon, -70.0)], axis=1))
    assert polar[-3:, 1].tolist() == [-90.0, -90.0, -70.0] and np.ptp(polar[:, 0]) == pytest.approx(360.0)


def _inside(country: basemap.Country, lat: float, lon: float) -> bool:
    return any(MplPath(poly[0]).contains_point((lon, lat)) for poly in country.polygons)


def test_shipped_outlines_hold_the_countries_where_they_are():
    by_name = {c.name: c for c in basemap.countries()}
    assert len(by_name) > 170
    assert _inside(by_name["Switzerland"], 47.37, 8.54) and not _inside(by_name["Switzerland"], 48.14, 11.58)  # Munich
    assert _inside(by_name["Germany"], 48.14, 11.58) and _inside(by_name["Japan"], 35.68, 139.69)
    assert _inside(by_name["Russia"], 64.7, 177.5)  # Chukotka, east of the antimeridian's other side
    assert by_name["Antarctica"].lat_min == -90.0
    assert not any(_inside(c, 40.0, -40.0) for c in by_name.values())  # mid-Atlantic
    names = {f["properties"]["name"] for f in basemap.countries_geojson()["features"]}
    assert names == set(by_name)


def test_places_in_a_box_are_the_largest_and_spread_out():
    places = basemap.places_in(46.5, 48.5, 7.0, 10.0, max_places=5, min_separation=0.1)
    assert places[0].name == "Zürich" and len(places) == 5
    assert all(7.0 <= p.lon <= 10.0 and 46.5 <= p.lat <= 48.5 for p in places)
    pops = [p.population for p in places]
    assert pops == sorted(pops, reverse=True)
    for i, a in enumerate(places):
        for b in places[:i]:
            assert abs(a.lon - b.lon) >= 0.3 or abs(a.lat - b.lat) >= 0.2  # 10% of the box apart


def test_places_across_the_antimeridian_come_back_in_the_boxs_longitudes():
    places = basemap.places_in(-19.0, -15.0, 176.0, 184.0, max_places=10)
    assert places and all(176.0 <= p.lon <= 184.0 for p in places) and {p.country_code for p in places} == {"FJ"}


def test_describe_names_the_nearest_place_and_its_city():
    assert basemap.describe(37.7955, -122.4067) == "Chinatown (San Francisco, United States)"
    assert basemap.describe(47.3769, 8.5417).endswith("Switzerland")
