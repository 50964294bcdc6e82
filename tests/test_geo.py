import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidtag import geo

lat_s = st.floats(-89.9, 89.9)
lon_s = st.floats(-180, 179.999)


def test_haversine_known_distances():
    # One degree of latitude on the mean-radius sphere.
    assert geo.haversine_km(0, 0, 1, 0) == pytest.approx(np.pi / 180 * geo.EARTH_RADIUS_KM)
    # Antipodes: half the circumference.
    assert geo.haversine_km(0, 0, 0, 180) == pytest.approx(np.pi * geo.EARTH_RADIUS_KM)
    # Across the antimeridian the short way round: 0.2 deg of longitude at the equator.
    assert geo.haversine_km(0, 179.9, 0, -179.9) == pytest.approx(0.2 * np.pi / 180 * geo.EARTH_RADIUS_KM)
    # Paris -> London, a classic ~343.5 km.
    assert geo.haversine_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=1.0)


def test_haversine_broadcasts():
    d = geo.haversine_km(np.zeros((3, 1)), 0, 0, np.array([0.0, 1.0, 2.0]))
    assert d.shape == (3, 3)
    np.testing.assert_allclose(d[0], [0, 111.195, 222.39], atol=0.01)


@settings(max_examples=200, deadline=None)
@given(lat_s, lon_s, lat_s, lon_s)
def test_haversine_torch_matches_numpy(a, b, c, d):
    t = geo.haversine_km_torch(*(torch.tensor(v, dtype=torch.float64) for v in (a, b, c, d)))
    assert float(t) == pytest.approx(float(geo.haversine_km(a, b, c, d)), abs=1e-6)


def test_equal_earth_matches_geoclip():
    from geoclip.model.location_encoder import equal_earth_projection

    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-90, 90, 1000), rng.uniform(-180, 180, 1000)])
    ref = equal_earth_projection(torch.tensor(pts, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(geo.equal_earth(pts[:, 0], pts[:, 1]), ref, atol=1e-12)
    np.testing.assert_allclose(geo.equal_earth_torch(torch.tensor(pts)).numpy(), ref, atol=1e-12)


def test_equal_earth_extremes():
    xy = geo.equal_earth([0, 90, -90, 0], [0, 0, 0, 180])
    assert xy[0] == pytest.approx([0, 0])
    # GeoCLIP's scaling maps the pole to y ~ 0.487 and the equator at 180 deg to x ~ 1.0.
    assert xy[1, 1] == pytest.approx(-xy[2, 1]) and xy[1, 1] == pytest.approx(0.4866, abs=1e-3)
    assert xy[3, 0] == pytest.approx(1.0, abs=1e-3)


@settings(max_examples=200, deadline=None)
@given(lat_s, lon_s, st.floats(0, 360), st.floats(0.001, 5000))
def test_destination_point_distance_roundtrip(lat, lon, bearing, dist):
    lat2, lon2 = geo.destination_point(lat, lon, bearing, dist)
    assert -180 <= lon2 < 180
    assert geo.haversine_km(lat, lon, lat2, lon2) == pytest.approx(dist, rel=1e-6, abs=1e-6)


def test_destination_point_over_the_pole_and_antimeridian():
    lat2, lon2 = geo.destination_point(89.0, 10.0, 0.0, 2 * geo.KM_PER_DEG_LAT)
    assert lat2 == pytest.approx(89.0) and lon2 == pytest.approx(-170.0)
    lat2, lon2 = geo.destination_point(0.0, 179.95, 90.0, 0.1 * geo.KM_PER_DEG_LAT)
    assert lon2 == pytest.approx(-179.95)


@settings(max_examples=200, deadline=None)
@given(st.floats(-80, 80), lon_s, st.floats(-20, 20), st.floats(-20, 20))
def test_offset_km_moves_the_requested_distance(lat, lon, north, east):
    lat2, lon2 = geo.offset_km(lat, lon, north, 0.0)
    assert geo.haversine_km(lat, lon, lat2, lon2) == pytest.approx(abs(north), rel=1e-9, abs=1e-9)
    lat3, lon3 = geo.offset_km(lat2, lon2, 0.0, east)
    # Along a parallel, the arc is |east|; the great circle is a hair shorter.
    assert geo.haversine_km(lat2, lon2, lat3, lon3) == pytest.approx(abs(east), rel=1e-3, abs=1e-9)


def test_offset_km_at_the_pole_keeps_longitude():
    lat2, lon2 = geo.offset_km(90.0, 12.0, 0.0, 5.0)
    assert lat2 == 90.0 and lon2 == pytest.approx(12.0)


def test_bounding_box_plain_and_antimeridian():
    box = geo.bounding_box([10, 12, 11], [20, 21, 22])
    assert (box.lat_min, box.lat_max, box.lon_min, box.lon_max) == (10, 12, 20, 22)
    assert not box.crosses_antimeridian
    fiji = geo.bounding_box([-17, -18, -16.5], [177.0, 179.5, -179.2])
    assert fiji.crosses_antimeridian
    assert (fiji.lon_min, fiji.lon_max) == (177.0, -179.2)
    assert fiji.lon_span_deg == pytest.approx(3.8)
    assert fiji.contains(-17, 180.0 - 1e-9) and fiji.contains(-17, -179.5) and not fiji.contains(-17, 0)
    assert fiji.width_km == pytest.approx(3.8 * geo.km_per_deg_lon(-18))


def test_bounding_box_padding_wraps_and_saturates():
    box = geo.bounding_box([0], [179.99]).padded(10.0)
    assert box.crosses_antimeridian and box.contains(0, -179.95)
    assert box.height_km == pytest.approx(20.0)
    polar = geo.bounding_box([89.99], [0]).padded(50.0)
    assert polar.lat_max == 90.0 and polar.lon_span_deg == pytest.approx(360.0)


def test_bounding_box_rejects_bad_input():
    with pytest.raises(ValueError):
        geo.bounding_box([], [])
    with pytest.raises(ValueError):
        geo.bounding_box([np.nan], [0])


def test_validate_latlon():
    ok = geo.validate_latlon([0, 91, np.nan, -90], [0, 0, 0, 180.0])
    assert ok.tolist() == [True, False, False, True]


def test_latlon_problems_tell_unknown_from_bad():
    import polars as pl

    lat = pl.Series([1.0, None, float("nan"), 95.0, None, float("inf")])
    lon = pl.Series([2.0, None, 3.0, 0.0, 4.0, 0.0])
    assert geo.latlon_problems(lat, lon).tolist() == [
        None, None, "lat/lon is NaN or missing", "lat/lon out of range [-90, 90] x [-180, 180]",
        "lat/lon is NaN or missing", "lat/lon out of range [-90, 90] x [-180, 180]"]
    assert geo.latlon_problems(lat, lon, unknown_ok=False)[1] == "no coordinates"
    # Arrays have no null: NaN is always bad.
    assert geo.latlon_problems(np.array([np.nan]), np.array([np.nan])).tolist() == ["lat/lon is NaN or missing"]


def test_check_latlon_names_the_source_and_first_bad_row():
    from vidtag.errors import GalleryError, ManifestError

    geo.check_latlon([1.0, 2.0], [3.0, 4.0], source="x.csv")
    with pytest.raises(ManifestError, match=r"^x.csv row 1 and 1 more row\(s\): lat/lon out of range"):
        geo.check_latlon([1.0, 91.0, -91.0], [3.0, 4.0, 5.0], source="x.csv")
    with pytest.raises(GalleryError, match=r"^g line 3: lat/lon is NaN"):
        geo.check_latlon([np.nan], [0.0], source="g", row_name=lambda i: f"line {i + 3}", error=GalleryError)


def test_torch_unit_vectors_match_numpy_and_round_trip_at_poles_and_antimeridian():
    ll = torch.tensor([[0.0, 0.0], [48.85, 2.35], [-33.9, 151.2], [89.999, -179.9], [-45.0, 180.0], [10.0, -179.999]],
                      dtype=torch.float64)
    v = geo.unit_vectors_torch(ll)
    np.testing.assert_allclose(v.numpy(), geo.unit_vectors(ll[:, 0].numpy(), ll[:, 1].numpy()), atol=1e-15)
    back = geo.latlon_from_vectors_torch(3.0 * v)  # any length: only the direction counts
    np.testing.assert_allclose(back[:, 0].numpy(), ll[:, 0].numpy(), atol=1e-9)
    assert np.abs(geo.wrap_lon(back[:, 1].numpy() - ll[:, 1].numpy())).max() < 1e-9  # 180 and -180 are one meridian
