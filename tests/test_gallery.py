"""Galleries (App. D): square km cells, N ≈ disLat·disLon/res², training split only, antimeridian-safe."""

import numpy as np
import polars as pl
import pytest

from vidtag.gallery import GalleryError, build_gallery, cluster_regions, grid_points, read_gallery, write_gallery
from vidtag.geo import KM_PER_DEG_LAT, BBox, haversine_km, offset_km


def _manifest(lat, lon, split="train", city=None):
    d = {"lat": lat, "lon": lon, "split": [split] * len(lat)}
    if city is not None:
        d["city"] = city
    return pl.DataFrame(d)


def test_grid_spacing_is_resolution_km_at_high_latitude():
    box = BBox(60.0, 60.0 + 5 / 111.19, 10.0, 10.0 + 5 / 55.6)
    lat, lon = grid_points(box, 0.5)
    first_row = lat == lat.min()
    lo = np.sort(lon[first_row])
    assert haversine_km(lat[0], lo[0], lat[0], lo[1]) == pytest.approx(0.5, rel=1e-3)
    rows = np.unique(lat)
    assert haversine_km(rows[0], 10.0, rows[1], 10.0) == pytest.approx(0.5, rel=1e-6)
    assert lat.size == pytest.approx(box.height_km * box.width_km / 0.25, rel=0.25)


def test_million_points_vectorised():
    box = BBox(40.0, 40.0 + 100 / 111.19, -74.0, -74.0 + 100 / 85.0)
    lat, lon = grid_points(box, 0.1)
    assert 0.9e6 < lat.size < 1.1e6
    assert np.isfinite(lat).all() and np.isfinite(lon).all()


def test_grid_uses_train_split_only_and_city_regions():
    rng = np.random.default_rng(0)
    la1, lo1 = offset_km(52.37, 4.89, rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50))
    la2, lo2 = offset_km(35.68, 139.69, rng.uniform(-1, 1, 50), rng.uniform(-1, 1, 50))
    train = _manifest(np.r_[la1, la2].tolist(), np.r_[lo1, lo2].tolist(), city=["ams"] * 50 + ["tyo"] * 50)
    val = _manifest([48.85], [2.35], split="val", city=["par"])  # Paris only in val: must not appear
    df, meta = build_gallery(pl.concat([train, val]), "grid", resolution_km=0.25, padding_km=0.5)
    assert [r["name"] for r in meta["regions"]] == ["ams", "tyo"]
    assert haversine_km(48.85, 2.35, df["lat"].to_numpy(), df["lon"].to_numpy()).min() > 100
    # Every training point has a gallery point within half a cell diagonal.
    pts = np.c_[np.r_[la1, la2], np.r_[lo1, lo2]]
    nearest = [haversine_km(a, b, df["lat"].to_numpy(), df["lon"].to_numpy()).min() for a, b in pts]
    assert max(nearest) <= 0.25 * np.sqrt(2) / 2 + 1e-6


def test_clusters_across_the_antimeridian():
    lat = np.array([-17.0, -17.02, -16.99, 40.0])
    lon = np.array([179.99, -179.99, 179.97, 0.0])
    comp = cluster_regions(lat, lon, cluster_km=10.0)
    assert comp[0] == comp[1] == comp[2] != comp[3]
    df, meta = build_gallery(_manifest(lat.tolist(), lon.tolist()), "grid", resolution_km=1.0, padding_km=1.0, region_column=None,
                             cluster_km=10.0)
    fiji = df.filter(pl.col("lat") < 0)
    assert fiji.height < 100  # a few km wide, not a band around the world
    assert ((fiji["lon"] > 179) | (fiji["lon"] < -179)).all()


def test_trim_drops_outliers():
    lat = [10.0 + 0.001 * i for i in range(200)] + [10.5]
    df_all, _ = build_gallery(_manifest(lat, [20.0] * 201, city=["a"] * 201), resolution_km=0.5, padding_km=0.0)
    df_trim, _ = build_gallery(_manifest(lat, [20.0] * 201, city=["a"] * 201), resolution_km=0.5, padding_km=0.0, trim_quantile=0.01)
    assert df_trim["lat"].max() < 10.25 < df_all["lat"].max()


def test_city_centres_and_roundtrip(tmp_path):
    m = _manifest([1.0, 1.0, 5.0], [2.0, 2.0, 6.0], city=["x", "x", "y"])
    df, meta = build_gallery(m, "city_centres")
    assert df.to_dicts() == [{"lat": 1.0, "lon": 2.0, "label": "x"}, {"lat": 5.0, "lon": 6.0, "label": "y"}]
    write_gallery(df, meta, tmp_path / "g.parquet")
    back, meta2 = read_gallery(tmp_path / "g.parquet")
    assert back.equals(df) and meta2["kind"] == "city_centres" and meta2["fingerprint"] == meta["fingerprint"]
    with pytest.raises(GalleryError, match="city"):
        build_gallery(_manifest([1.0], [2.0]), "city_centres")
    with pytest.raises(GalleryError, match="training"):
        build_gallery(_manifest([1.0], [2.0], split="val"), "grid")


def test_read_gallery_refuses_bad_coordinates(tmp_path):
    pl.DataFrame({"lat": [1.0, 95.0], "lon": [2.0, 3.0]}).write_parquet(tmp_path / "ext.parquet")  # no vidtag metadata
    with pytest.raises(GalleryError, match=r"ext.parquet row 1: lat/lon out of range"):
        read_gallery(tmp_path / "ext.parquet")


def test_geoclip_gallery():
    df, meta = build_gallery(None, "geoclip100k")
    assert df.height == 100_000 and df["lat"].abs().max() <= 90


# --- world: a land-only grid over the Earth (beyond the paper) ---------------------------------


@pytest.fixture(scope="module")
def world_200km():
    return build_gallery(None, "world", resolution_km=200.0)


def test_world_gallery_is_land_only_with_km_spacing(world_200km):
    from global_land_mask import globe

    df, meta = world_200km
    lat, lon = df["lat"].to_numpy(), df["lon"].to_numpy()
    assert meta["kind"] == "world" and meta["resolution_km"] == 200.0 and meta["n_points"] == df.height
    assert globe.is_land(lat, lon).all()  # only land, by the mask the package ships
    assert (np.abs(lat) <= 90).all() and (lon >= -180).all() and (lon < 180).all()
    # ~30 % of the Earth's surface, one point per 200 x 200 km cell
    assert df.height == pytest.approx(4 * np.pi * 6371.0**2 * 0.29 / 200.0**2, rel=0.15)
    # Neighbours along a parallel and across rows are 200 km apart, at any latitude.
    rows = np.unique(lat)
    row_steps = np.diff(rows) * KM_PER_DEG_LAT / 200.0  # rows with no land (Southern Ocean) leave gaps
    assert row_steps.min() == pytest.approx(1.0, rel=1e-6) and np.abs(row_steps - row_steps.round()).max() < 1e-6
    for r in rows[[len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4]]:
        lo = np.sort(lon[lat == r])
        steps = haversine_km(r, lo[:-1], r, lo[1:])
        assert steps.min() == pytest.approx(200.0, rel=1e-3)
    # Every land city has a gallery point within a cell's diagonal; the open ocean has none.
    for city in [(48.86, 2.35), (-33.87, 151.21), (35.68, 139.69), (-1.29, 36.82), (40.71, -74.01)]:
        assert haversine_km(*city, lat, lon).min() < 200.0 * np.sqrt(2)
    assert haversine_km(-30.0, -20.0, lat, lon).min() > 500.0  # the South Atlantic


def test_world_gallery_is_reproducible_and_refuses_a_too_fine_grid(world_200km, tmp_path):
    df, meta = world_200km
    again, meta2 = build_gallery(None, "world", resolution_km=200.0)
    assert again.equals(df) and meta2["fingerprint"] == meta["fingerprint"]
    write_gallery(df, meta, tmp_path / "world.parquet")
    back, back_meta = read_gallery(tmp_path / "world.parquet")
    assert back.equals(df) and back_meta["kind"] == "world"
    from vidtag.errors import ConfigError

    with pytest.raises(ConfigError, match="resolution_km >="):
        build_gallery(None, "world", resolution_km=0.5)
    with pytest.raises(ConfigError, match="resolution_km"):
        build_gallery(None, "world", resolution_km=0.0)


def test_val_set_gallery_is_the_validation_frames_own_gps():
    """App. D.2: the validation-set gallery holds each validation frame's GPS once; training validates on it."""
    import polars as pl

    from vidtag.gallery import build_gallery, split_points

    m = pl.DataFrame({"sequence_id": ["a", "a", "b", "c"], "frame_index": [0, 1, 0, 0],
                      "lat": [1.0, 1.0, 2.0, 3.0], "lon": [4.0, 4.0, 5.0, 6.0], "split": ["val", "val", "val", "train"]})
    assert split_points(m, "val").tolist() == [[1.0, 4.0], [2.0, 5.0]]
    df, meta = build_gallery(m, "val_set")
    assert df.select("lat", "lon").to_numpy().tolist() == [[1.0, 4.0], [2.0, 5.0]] and meta["splits"] == ["val"]
