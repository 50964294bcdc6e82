"""vidtag.outputs: GeoJSON (RFC 7946) and GPX validity, table round trips, atomic writes, offline place names."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import gpxpy
import numpy as np
import polars as pl
import pytest

from vidtag import outputs
from vidtag.errors import ConfigError, PredictError, VidtagError
from vidtag.outputs import candidates_path, places, to_geojson, write_predictions

# lat 10, lon 100: a swapped pair would put lat out of [-90, 90], so order is unambiguous.
LAT = [10.0, 10.5, None, 11.0]
LON = [100.0, 100.25, None, 100.75]


def _preds(**extra) -> pl.DataFrame:
    return pl.DataFrame({
        "frame_index": [0, 1, 2, 3],
        "timestamp_s": [0.0, 0.5, 1.0, 61.25],
        "lat": pl.Series(LAT, dtype=pl.Float64),
        "lon": pl.Series(LON, dtype=pl.Float64),
        "phase1_lat": [10.1, 10.4, None, 11.1],
        "phase1_lon": [100.1, 100.2, None, 100.7],
        "confidence": [0.9, 0.5, 0.0, float("nan")],
        "valid": [True, True, False, True],
        **extra,
    })


def _cands() -> pl.DataFrame:
    rows = [(f, r, 10.0 + f + r / 10, 100.0 + r / 10, 1.0 / r) for f in (0, 1, 3) for r in (2, 1, 3)]  # unsorted ranks
    return pl.DataFrame(rows, schema=["frame_index", "rank", "lat", "lon", "score"], orient="row")


# --- GeoJSON -------------------------------------------------------------------------------------------


def test_geojson_is_an_rfc7946_feature_collection(tmp_path):
    path = tmp_path / "pred.geojson"
    written = write_predictions(_preds(), path)
    assert written == [path]
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    assert all(f["type"] == "Feature" and set(f) >= {"type", "geometry", "properties"} for f in doc["features"])
    lines = [f for f in doc["features"] if f["properties"]["kind"] == "trajectory"]
    points = [f for f in doc["features"] if f["properties"]["kind"] == "frame"]
    assert len(lines) == 1 and len(points) == 4

    line = lines[0]["geometry"]
    assert line["type"] == "LineString"
    assert line["coordinates"] == [[100.0, 10.0], [100.25, 10.5], [100.75, 11.0]]  # [lon, lat]; null frame skipped
    assert len(line["coordinates"]) >= 2
    assert lines[0]["properties"] == {"kind": "trajectory", "n_frames": 4, "n_located": 3}

    assert points[0]["geometry"] == {"type": "Point", "coordinates": [100.0, 10.0]}
    assert points[2]["geometry"] is None  # unlocated frame: RFC 7946 Sec. 3.2
    p = points[3]["properties"]
    assert p["frame_index"] == 3 and p["timestamp_s"] == 61.25 and p["valid"] is True
    assert p["confidence"] is None  # NaN -> null: JSON has no NaN
    assert "lat" not in p and "lon" not in p
    for f in points:
        if f["geometry"]:
            lon, lat = f["geometry"]["coordinates"]
            assert -90 <= lat <= 90 and -180 <= lon <= 180


def test_geojson_round_trips_through_json(tmp_path):
    path = tmp_path / "pred.json"  # .json is GeoJSON too
    write_predictions(_preds(), path, candidates=_cands())
    assert json.loads(path.read_text()) == json.loads(json.dumps(to_geojson(_preds(), _cands())))
    assert not list(tmp_path.glob("*.candidates*"))  # kept inside the GeoJSON


def test_geojson_candidates_are_a_property_list_sorted_by_rank():
    doc = to_geojson(_preds(), _cands())
    points = [f for f in doc["features"] if f["properties"]["kind"] == "frame"]
    c0 = points[0]["properties"]["candidates"]
    assert [c["rank"] for c in c0] == [1, 2, 3]
    assert c0[0] == {"rank": 1, "lat": 10.1, "lon": 100.1, "score": 1.0}
    assert points[2]["properties"]["candidates"] == []


def test_geojson_one_trajectory_per_sequence_and_short_ones_left_out():
    df = pl.concat([_preds(sequence_id=["a"] * 4), _preds(sequence_id=["b"] * 4).with_columns(
        lat=pl.Series([None, None, None, 5.0]), lon=pl.Series([None, None, None, 6.0]))])
    doc = to_geojson(df)
    lines = [f for f in doc["features"] if f["properties"]["kind"] == "trajectory"]
    assert [f["properties"]["sequence_id"] for f in lines] == ["a"]  # "b" has one position: no LineString
    assert sum(f["properties"]["kind"] == "frame" for f in doc["features"]) == 8


def test_geojson_line_is_cut_at_the_antimeridian():
    df = pl.DataFrame({"frame_index": [0, 1, 2], "lat": [0.0, 2.0, 4.0], "lon": [179.0, -179.0, -178.0]})
    geom = next(f["geometry"] for f in to_geojson(df)["features"] if f["properties"]["kind"] == "trajectory")
    assert geom["type"] == "MultiLineString"
    assert geom["coordinates"] == [[[179.0, 0.0], [180.0, 1.0]], [[-180.0, 1.0], [-179.0, 2.0], [-178.0, 4.0]]]


# --- GPX -----------------------------------------------------------------------------------------------


def test_gpx_parses_with_gpxpy(tmp_path):
    path = tmp_path / "pred.gpx"
    write_predictions(_preds(), path)
    gpx = gpxpy.parse(path.read_text())
    assert len(gpx.tracks) == 1 and len(gpx.tracks[0].segments) == 1
    pts = gpx.tracks[0].segments[0].points
    assert len(pts) == 3  # the frame without coordinates is left out
    assert [(p.latitude, p.longitude) for p in pts] == [(10.0, 100.0), (10.5, 100.25), (11.0, 100.75)]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert [p.time for p in pts] == [epoch, epoch + timedelta(seconds=0.5), epoch + timedelta(seconds=61.25)]
    ext = {e.tag.split("}")[1]: e.text for e in pts[0].extensions}
    assert ext["frame_index"] == "0" and ext["valid"] == "true" and float(ext["confidence"]) == 0.9


def test_gpx_start_time_and_unknown_timestamps(tmp_path):
    path = tmp_path / "pred.gpx"
    write_predictions(_preds(), path, start_time="2024-05-01T12:00:00Z")
    times = [p.time for p in gpxpy.parse(path.read_text()).tracks[0].segments[0].points]
    assert times[-1] == datetime(2024, 5, 1, 12, 1, 1, 250000, tzinfo=timezone.utc)

    folder = _preds().with_columns(timestamp_s=pl.lit(None, dtype=pl.Float64))  # a folder of frames: no PTS
    write_predictions(folder, path)
    pts = gpxpy.parse(path.read_text()).tracks[0].segments[0].points
    assert len(pts) == 3 and all(p.time is None for p in pts)


def test_gpx_one_track_per_sequence_and_candidates_beside_it(tmp_path):
    df = pl.concat([_preds(sequence_id=["a"] * 4), _preds(sequence_id=["b"] * 4)])
    cands = pl.concat([_cands().with_columns(sequence_id=pl.lit(s)) for s in "ab"])
    path = tmp_path / "pred.gpx"
    written = write_predictions(df, path, candidates=cands)
    assert written == [path, tmp_path / "pred.candidates.csv"]
    gpx = gpxpy.parse(path.read_text())
    assert [t.name for t in gpx.tracks] == ["a", "b"]
    assert all(len(t.segments) == 1 and len(t.segments[0].points) == 3 for t in gpx.tracks)
    assert pl.read_csv(written[1]).shape == cands.shape


# --- tables --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_table_round_trip_with_candidates(tmp_path, ext):
    df, cands = _preds(sequence_id=["clip"] * 4), _cands().with_columns(sequence_id=pl.lit("clip"))
    path = tmp_path / f"pred{ext}"
    written = write_predictions(df, path, candidates=cands)
    side = tmp_path / f"pred.candidates{ext}"
    assert written == [path, side] and candidates_path(path) == side
    read = pl.read_csv if ext == ".csv" else pl.read_parquet
    back = read(path)
    assert back.columns == df.columns
    assert back["lat"].to_list() == LAT and back["lon"].to_list() == LON  # nulls kept, floats exact
    assert back["frame_index"].to_list() == [0, 1, 2, 3] and back["valid"].to_list() == df["valid"].to_list()
    assert read(side).sort("frame_index", "rank").equals(cands.sort("frame_index", "rank"))


def test_unsupported_extension_is_refused(tmp_path):
    for name in ("pred.txt", "pred", "pred.csv.gz", "pred.kml"):
        with pytest.raises(PredictError, match=r"supported: \.csv, \.parquet, \.geojson, \.json, \.gpx"):
            write_predictions(_preds(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    assert issubclass(PredictError, VidtagError)


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(PredictError, match="lacks column"):
        write_predictions(_preds().drop("lon"), tmp_path / "p.csv")
    with pytest.raises(PredictError, match="lat must lie"):
        write_predictions(_preds().with_columns(lat=pl.Series([100.0, 1.0, None, 2.0])), tmp_path / "p.csv")
    with pytest.raises(PredictError, match="candidates table lacks"):
        write_predictions(_preds(), tmp_path / "p.csv", candidates=_cands().drop("score"))
    two = pl.concat([_preds(sequence_id=["a"] * 4), _preds(sequence_id=["b"] * 4)])
    with pytest.raises(PredictError, match="sequence_id"):
        write_predictions(two, tmp_path / "p.csv", candidates=_cands())
    with pytest.raises(PredictError, match="ISO 8601"):
        write_predictions(_preds(), tmp_path / "p.gpx", start_time="yesterday")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ext, failing", [
    (".csv", "_write_csv"), (".parquet", "_write_parquet"), (".geojson", "_write_text"), (".gpx", "_write_text"),
    (".gpx", "_write_csv"),  # the GPX is complete, its candidates table fails: neither replaces the old files
])
def test_a_failed_write_leaves_the_old_files_and_no_partial_one(tmp_path, monkeypatch, ext, failing):
    path = tmp_path / f"pred{ext}"
    side = candidates_path(path)
    old = {path: b"old\n"} | ({side: b"old candidates\n"} if side is not None else {})
    for p, content in old.items():
        p.write_bytes(content)

    def half_then_fail(*args):
        target = next(a for a in args if isinstance(a, Path))  # _write_csv(df, path) / _write_text(path, text)
        target.write_text('{"type": "Feat')  # a partial file...
        raise OSError("disk full")  # ...then the failure

    monkeypatch.setattr(outputs, failing, half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_predictions(_preds(), path, candidates=_cands())
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == old  # old files intact, no temporaries

    fresh = tmp_path / f"new{ext}"
    with pytest.raises(OSError):
        write_predictions(_preds(), fresh, candidates=_cands())
    assert sorted(tmp_path.iterdir()) == sorted(old)


# --- places --------------------------------------------------------------------------------------------


def test_places_names_known_cities():
    got = places([48.8566, -33.8688, 40.7128, 35.6762], [2.3522, 151.2093, -74.0060, 139.6503])
    assert got.columns == ["place", "admin1", "country_code", "distance_km"]
    assert got["country_code"].to_list() == ["FR", "AU", "US", "JP"]
    # The nearest populated place, which may be a district: GeoNames' "Paris 04 Hôtel-de-Ville" here.
    assert got["place"][0].startswith("Paris") and got["admin1"][0] == "11"  # admin1 code 11: Ile-de-France
    assert got["place"][1] == "Sydney"
    assert got["admin1"][2] == "NY"
    assert (got["distance_km"] < 10).all()


def test_places_nulls_sea_and_antimeridian():
    got = places(np.array([np.nan, 0.0, -17.7]), np.array([np.nan, -140.0, 179.99]))
    assert got.row(0) == (None, None, None, None)
    assert got["distance_km"][1] > 500  # mid-Pacific: nearest city, far away
    assert got["country_code"][2] == "FJ"  # Fiji straddles +-180


def test_places_numpy_fallback_matches_kdtree():
    pytest.importorskip("scipy")
    gaz = outputs._gazetteer(15000)
    rng = np.random.default_rng(0)
    q = outputs._unit(rng.uniform(-80, 80, 500), rng.uniform(-180, 180, 500))
    i_tree, d_tree = outputs._nearest(gaz["xyz"], q, tree=gaz["tree"])
    i_np, d_np = outputs._nearest(gaz["xyz"], q, tree=None, chunk=128)
    assert np.allclose(d_tree, d_np, atol=1e-6)
    assert (i_tree == i_np).mean() > 0.99  # exact distance ties aside


def test_places_refuses_bad_input():
    with pytest.raises(ConfigError, match="min_population"):
        places([0.0], [0.0], min_population=42)
    with pytest.raises(PredictError, match="one length"):
        places([0.0, 1.0], [0.0])
