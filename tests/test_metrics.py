import json

import numpy as np
import polars as pl
import pytest
import similaritymeasures
from frechetdist import frdist
from hypothesis import given, settings
from hypothesis import strategies as st

from vidtag import metrics
from pipeline.summary import format_metrics
from vidtag.geo import KM_PER_DEG_LAT, haversine_km, km_per_deg_lon, offset_km, pairwise_haversine_km
from vidtag.metrics import (
    THRESHOLDS_KM,
    discrete_frechet,
    discrete_frechet_many,
    distinct_cells,
    distinct_points,
    evaluate,
    evaluate_with_sequences,
    mean_range_difference,
    nearest_gallery_index,
    path_length_ratios,
    path_lengths_km,
    per_sequence,
)

# Curves of (lat, lon) points away from the poles and the antimeridian, where deg-Euclidean is meaningful.
point_s = st.tuples(st.floats(-60, 60), st.floats(-170, 170))
curve_s = st.lists(point_s, min_size=1, max_size=10).map(lambda pts: np.array(pts, dtype=np.float64))
metric_s = st.sampled_from(["deg", "km"])


def reference_frechet_km(a, b):
    """Textbook Eiter-Mannila table with great-circle distances, one cell at a time."""
    n, m = len(a), len(b)
    ca = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            d = haversine_km(a[i, 0], a[i, 1], b[j, 0], b[j, 1])
            if i == 0 and j == 0:
                ca[i, j] = d
            elif i == 0:
                ca[i, j] = max(ca[i, j - 1], d)
            elif j == 0:
                ca[i, j] = max(ca[i - 1, j], d)
            else:
                ca[i, j] = max(min(ca[i - 1, j], ca[i, j - 1], ca[i - 1, j - 1]), d)
    return ca[-1, -1]


# ---------------------------------------------------------------------------------------------
# Distance accuracy and centroids


def test_accuracy_at_counts_errors_up_to_and_including_the_threshold():
    acc = metrics.accuracy_at([0.05, 0.25, 0.4, 0.5, 0.9, 4.0, 30.0, 100.0])
    assert acc == {"acc_0.1km": 12.5, "acc_0.25km": 25.0, "acc_0.5km": 50.0, "acc_1km": 62.5, "acc_5km": 75.0,
                   "acc_25km": 75.0, "median_km": 0.7}


def test_one_set_of_thresholds_holds_the_paper_ones_and_the_sub_km_ones():
    # Sec. 4.3 reports 0.5 / 1 / 5 / 25 km; 0.1 and 0.25 km resolve per-frame placement on short drives.
    assert THRESHOLDS_KM == tuple(sorted(THRESHOLDS_KM))
    assert {0.1, 0.25, 0.5, 1.0, 5.0, 25.0} == set(THRESHOLDS_KM)
    keys = list(metrics.accuracy_at([1.0]))
    assert keys == ["acc_0.1km", "acc_0.25km", "acc_0.5km", "acc_1km", "acc_5km", "acc_25km", "median_km"]


def test_accuracy_at_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one"):
        metrics.accuracy_at([])


def test_spherical_centroid_is_antimeridian_and_pole_safe():
    lat, lon = metrics.spherical_centroid([0.0, 0.0], [179.0, -179.0])
    assert lat == pytest.approx(0.0, abs=1e-9)
    assert abs(lon) == pytest.approx(180.0)  # a mean of degrees would give 0, the far side of Earth
    lat, _ = metrics.spherical_centroid([89.0, 89.0], [0.0, 180.0])
    assert lat == pytest.approx(90.0)
    lat, lon = metrics.spherical_centroid([0.0, 0.0, 0.0], [0.0, 0.01, 0.02])
    assert (lat, lon) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.01, abs=1e-12))


# ---------------------------------------------------------------------------------------------
# Discrete Fréchet distance


def test_frechet_hand_computed():
    # frechetdist's own docstring example.
    assert discrete_frechet([[1, 1], [2, 1], [2, 2]], [[2, 2], [0, 1], [2, 4]]) == pytest.approx(2.0)
    # Parallel lines one unit apart: every coupling pairs points at distance 1.
    assert discrete_frechet([[0, 0], [1, 0], [2, 0]], [[0, 1], [1, 1], [2, 1]]) == pytest.approx(1.0)
    # The middle point of a must wait at one end of b: sqrt(2).
    assert discrete_frechet([[0, 0], [1, 0], [2, 0]], [[0, 1], [2, 1]]) == pytest.approx(np.sqrt(2))
    # Two single points: their distance, in degrees or in km.
    assert discrete_frechet([[0, 0]], [[3, 4]]) == pytest.approx(5.0)
    assert discrete_frechet([[0, 0]], [[1, 0]], "km") == pytest.approx(KM_PER_DEG_LAT)


def test_frechet_km_is_geodesic_across_the_antimeridian():
    a, b = [[0.0, 179.95]], [[0.0, -179.95]]
    assert discrete_frechet(a, b, "km") == pytest.approx(0.1 * KM_PER_DEG_LAT)
    assert discrete_frechet(a, b, "deg") == pytest.approx(359.9)  # raw degrees, as documented


def test_frechet_matches_peer_packages_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, m = rng.integers(1, 30, size=2)
        a, b = rng.uniform(-50, 50, (n, 2)), rng.uniform(-50, 50, (m, 2))
        assert discrete_frechet(a, b) == pytest.approx(similaritymeasures.frechet_dist(a, b), rel=1e-12, abs=1e-12)
        c = rng.uniform(-50, 50, (n, 2))  # frdist needs equal lengths
        assert discrete_frechet(a, c) == pytest.approx(frdist(a, c), rel=1e-12, abs=1e-12)


def test_frechet_km_matches_cellwise_reference():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n, m = rng.integers(1, 12, size=2)
        a = np.column_stack([rng.uniform(-80, 80, n), rng.uniform(-180, 180, n)])
        b = np.column_stack([rng.uniform(-80, 80, m), rng.uniform(-180, 180, m)])
        assert discrete_frechet(a, b, "km") == pytest.approx(reference_frechet_km(a, b), rel=1e-12)


@pytest.mark.parametrize("max_cells", [1, 500, 1 << 21])
def test_frechet_many_equals_pairwise_for_mixed_lengths(max_cells):
    rng = np.random.default_rng(2)
    A = [rng.uniform(-10, 10, (rng.integers(1, 25), 2)) for _ in range(60)]
    B = [rng.uniform(-10, 10, (rng.integers(1, 25), 2)) for _ in range(60)]
    got = discrete_frechet_many(A, B, "deg", max_cells=max_cells)
    want = [similaritymeasures.frechet_dist(a, b) for a, b in zip(A, B)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    got_km = discrete_frechet_many(A, B, "km", max_cells=max_cells)
    np.testing.assert_allclose(got_km, [discrete_frechet(a, b, "km") for a, b in zip(A, B)], rtol=1e-12)


def test_frechet_rejects_bad_curves():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        discrete_frechet(np.zeros((3, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="n >= 1"):
        discrete_frechet(np.zeros((0, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        discrete_frechet([[0, np.nan]], [[0, 0]])
    with pytest.raises(ValueError, match=r"b\[1\] = \[95.0, 0.0\]"):
        discrete_frechet([[0, 0]], [[0, 0], [95, 0]], "km")
    with pytest.raises(ValueError, match=r"curves_a\[1\] contains NaN"):
        discrete_frechet_many([np.zeros((1, 2)), [[np.nan, 0.0]]], [np.zeros((1, 2))] * 2)
    with pytest.raises(ValueError, match="metric must be one of"):
        discrete_frechet([[0, 0]], [[0, 0]], "miles")
    with pytest.raises(ValueError, match="as many curves"):
        discrete_frechet_many([np.zeros((1, 2))], [])


@settings(max_examples=100, deadline=None)
@given(curve_s, curve_s, metric_s)
def test_frechet_is_symmetric_and_bounded_by_endpoints(a, b, metric):
    d = discrete_frechet(a, b, metric)
    assert d == pytest.approx(discrete_frechet(b, a, metric), rel=1e-12, abs=1e-12)
    ends = [discrete_frechet(a[:1], b[:1], metric), discrete_frechet(a[-1:], b[-1:], metric)]
    assert d >= max(ends) - 1e-12
    assert d >= 0.0


@settings(max_examples=100, deadline=None)
@given(curve_s, curve_s, curve_s, metric_s)
def test_frechet_triangle_inequality(a, b, c, metric):
    ab, bc, ac = (discrete_frechet(x, y, metric) for x, y in ((a, b), (b, c), (a, c)))
    assert ac <= ab + bc + 1e-9 * (1 + ab + bc)


@settings(max_examples=100, deadline=None)
@given(curve_s, st.data(), metric_s)
def test_frechet_zero_exactly_for_identical_curves(a, data, metric):
    assert discrete_frechet(a, a.copy(), metric) == 0.0
    i = data.draw(st.integers(0, len(a) - 1))
    b = a.copy()
    b[i, 0] += data.draw(st.floats(0.001, 5.0))
    assert discrete_frechet(a, b, metric) > 0.0


@settings(max_examples=100, deadline=None)
@given(curve_s, curve_s, st.floats(-20, 20), st.floats(-500, 500))
def test_frechet_deg_invariant_under_translation(a, b, dlat, dlon):
    shift = np.array([dlat, dlon])
    assert discrete_frechet(a + shift, b + shift) == pytest.approx(discrete_frechet(a, b), rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Mean range difference


def test_range_difference_hand_computed():
    a, b = np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([[0.0, 0.0], [0.0, 0.0]])
    assert metrics.range_differences([a], [b], "deg") == pytest.approx([1.5])  # (|1-0| + |2-0|) / 2
    # km: latitude range at 111.19 km/deg; longitude span at the sequence's own mean latitude (0.5°).
    want_km = 0.5 * (KM_PER_DEG_LAT + 2 * km_per_deg_lon(0.5))
    assert metrics.range_differences([a], [b], "km") == pytest.approx([want_km])
    # Across ±180: 179 -> -179 spans 2°, not 358°.
    c, d = np.array([[10.0, 179.0], [10.0, -179.0]]), np.array([[10.0, 0.0], [10.0, 1.0]])
    assert metrics.range_differences([c], [d], "deg") == pytest.approx([0.5])
    # MRD is the mean over sequences; single points have range 0.
    assert mean_range_difference([a, c, a[:1]], [b, d, b[:1]]) == pytest.approx((1.5 + 0.5 + 0.0) / 3)


def test_range_difference_ignores_order_and_length():
    a = np.array([[0.0, 0.0], [2.0, 1.0], [1.0, 3.0]])
    b = np.array([[5.0, 5.0], [6.0, 6.0]])
    assert mean_range_difference([a], [b]) == pytest.approx(mean_range_difference([a[::-1]], [b]))
    assert mean_range_difference([a], [b]) == pytest.approx(0.5 * (abs(2 - 1) + abs(3 - 1)))


def test_range_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="lists of"):
        mean_range_difference(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="same non-zero number"):
        mean_range_difference([np.zeros((3, 2))], [])
    with pytest.raises(ValueError, match=r"seqs_a\[0\]\[0\]"):
        mean_range_difference([np.array([[100.0, 0.0]])], [np.zeros((1, 2))])


@settings(max_examples=100, deadline=None)
@given(curve_s, curve_s, st.floats(-20, 20), st.floats(-360, 360))
def test_range_difference_deg_invariant_under_translation(a, b, dlat, dlon):
    def shift(x):
        y = x + np.array([dlat, dlon])
        y[:, 1] = (y[:, 1] + 180.0) % 360.0 - 180.0  # stay a valid longitude; spans are on the circle
        return y

    got = mean_range_difference([shift(a)], [shift(b)])
    assert got == pytest.approx(mean_range_difference([a], [b]), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(curve_s, curve_s, st.floats(-9, 9))
def test_range_difference_km_invariant_under_longitude_translation(a, b, dlon):
    got = mean_range_difference([a + [0.0, dlon]], [b + [0.0, dlon]], "km")
    assert got == pytest.approx(mean_range_difference([a], [b], "km"), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# evaluate() and per_sequence()


def tiny_predictions() -> pl.DataFrame:
    """s1: three frames on the equator, the last prediction 0.98° off; s2: one frame with GT, one without."""
    rows = [
        ("s2", 1, 10.0, 20.0, None, None),
        ("s1", 2, 0.0, 1.0, 0.0, 0.02),
        ("s1", 0, 0.0, 0.0, 0.0, 0.0),
        ("s2", 0, 10.0, 20.5, 10.0, 20.0),
        ("s1", 1, 0.0, 0.01, 0.0, 0.01),
    ]
    return pl.DataFrame(rows, schema=["sequence_id", "frame_index", "lat", "lon", "gt_lat", "gt_lon"], orient="row")


def test_evaluate_tiny_hand_made_frame():
    out = evaluate(tiny_predictions())
    assert json.loads(json.dumps(out)) == out  # goes straight into metrics/eval.json
    far_km = 0.98 * KM_PER_DEG_LAT  # 0.98° of longitude on the equator
    s2_km = float(haversine_km(10.0, 20.5, 10.0, 20.0))
    assert set(out) == {"frame", "video", "trajectory", "shape", "n_frames", "n_sequences", "n_frames_excluded"}
    assert (out["n_frames"], out["n_sequences"], out["n_frames_excluded"]) == (4, 2, 1)
    # Frame errors: 0, 0, far_km, s2_km.
    assert out["frame"] == {
        "acc_0.1km": 50.0,
        "acc_0.25km": 50.0,
        "acc_0.5km": 50.0,
        "acc_1km": 50.0,
        "acc_5km": 50.0,
        "acc_25km": 50.0,
        "median_km": pytest.approx(s2_km / 2),
    }
    # Video: s1's predicted centroid is nearest its (0, 0.01) prediction = its GT centroid; s2 has one frame.
    assert out["video"]["acc_0.5km"] == 50.0
    assert s2_km > 25.0
    assert out["video"]["median_km"] == pytest.approx(s2_km / 2)
    # Trajectory, mean over the two sequences: DFD is set by the last s1 frame and by s2's lone frame;
    # s1's longitude range is 1.0 vs 0.02 (latitude ranges are 0), s2's ranges are 0.
    assert out["trajectory"]["dfd_deg"] == pytest.approx((0.98 + 0.5) / 2)
    assert out["trajectory"]["dfd_km"] == pytest.approx((far_km + s2_km) / 2)
    assert out["trajectory"]["mrd_deg"] == pytest.approx((0.98 / 2 + 0.0) / 2)
    assert out["trajectory"]["mrd_km"] == pytest.approx((far_km / 2 + 0.0) / 2)
    # Shape: s1 moves 0.02° of longitude but its prediction 1°; s2 has one frame with GT, so no ratio.
    assert out["shape"] == {
        "path_length_ratio": pytest.approx(50.0),
        "n_path_length_ratio": 1,
        "distinct_points": 2.0,  # s1: 3 points, s2: 1
        # s1 in units of 0.01° (equal on both axes at the equator): truth 0, 1, 2 -> -1, 0, 1 from its mean
        # (SST 2); prediction 0, 1, 100 -> -101/3, -98/3, 199/3; their difference -98/3, -98/3, 196/3
        # (SSE 57624 / 9). s2 has no movement to reproduce.
        "r2_in_drive": pytest.approx(1 - 57624 / 18, rel=1e-9),
        "dfd_km_right_city": pytest.approx(far_km),  # s2 is placed s2_km (> 25 km) away: left out
        "mrd_km_right_city": pytest.approx(far_km / 2),
        "n_right_city": 1,
    }


def test_per_sequence_table():
    table = per_sequence(tiny_predictions())
    assert table.columns == ["sequence_id", "n_frames", "median_km", "video_error_km", "dfd_deg", "dfd_km", "mrd_deg", "mrd_km",
                             "path_length_km", "true_path_length_km", "path_length_ratio", "distinct_points", "r2_in_drive"]
    assert table["sequence_id"].to_list() == ["s1", "s2"]
    assert table["n_frames"].to_list() == [3, 1]
    assert table["median_km"][0] == 0.0
    assert table["video_error_km"][0] == pytest.approx(0.0, abs=1e-6)
    assert table["dfd_deg"].to_list() == pytest.approx([0.98, 0.5])
    assert table["path_length_km"].to_list() == pytest.approx([KM_PER_DEG_LAT, 0.0])
    assert table["true_path_length_km"].to_list() == pytest.approx([0.02 * KM_PER_DEG_LAT, 0.0])
    assert table["path_length_ratio"].to_list() == [pytest.approx(50.0), None]  # s2 did not move: no ratio
    assert table["distinct_points"].to_list() == [3, 1]
    assert table["r2_in_drive"].to_list() == [pytest.approx(1 - 57624 / 18), None]


def test_evaluate_with_sequences_is_evaluate_and_per_sequence_in_one_pass():
    pred = tiny_predictions()
    gallery = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    out, table = evaluate_with_sequences(pred, gallery)
    assert out == evaluate(pred, gallery)
    assert table.equals(per_sequence(pred, gallery)) and "distinct_true_cells" in table.columns
    no_truth = pred.with_columns(gt_lat=pl.lit(None, pl.Float64), gt_lon=pl.lit(None, pl.Float64), city=pl.lit("x"), pred_city=pl.lit("x"))
    out, table = evaluate_with_sequences(no_truth)
    assert table is None and out["city"] == {"city": 100.0}


def test_evaluate_length_one_sequences():
    df = pl.DataFrame(
        {
            "sequence_id": ["a", "b"],
            "frame_index": [0, 0],
            "lat": [1.0, 0.0],
            "lon": [0.0, 0.0],
            "gt_lat": [0.0, 0.0],
            "gt_lon": [0.0, 0.0],
        }
    )
    out = evaluate(df)
    assert out["trajectory"]["dfd_deg"] == pytest.approx(0.5)  # mean of 1° and 0°
    assert out["trajectory"]["dfd_km"] == pytest.approx(KM_PER_DEG_LAT / 2)
    assert out["trajectory"]["mrd_deg"] == 0.0 and out["trajectory"]["mrd_km"] == 0.0
    assert out["video"]["median_km"] == pytest.approx(KM_PER_DEG_LAT / 2)


def test_evaluate_city_labels_video_and_frame_level():
    df = pl.DataFrame(
        {
            "sequence_id": ["v1", "v1", "v1", "v2", "v2"],
            "frame_index": [0, 1, 2, 0, 1],
            # v1's centroid is nearest frame 0; v2's frames are tied, so its earliest frame represents it.
            "lat": [48.86, 48.80, 48.92, 35.0, 35.0],
            "lon": [2.35, 2.35, 2.35, 139.0, 139.0],
            "gt_lat": [None] * 5,  # CityGuessr68k has labels but no GPS
            "gt_lon": [None] * 5,
            "city": ["Paris", "Paris", "Paris", "Tokyo", "Tokyo"],
            "pred_city": ["Paris", "Lyon", "Lyon", "Osaka", "Tokyo"],
            "country": ["France"] * 3 + ["Japan"] * 2,
            "pred_country": ["France"] * 3 + ["Japan", None],
        },
        schema_overrides={"gt_lat": pl.Float64, "gt_lon": pl.Float64},
    )
    out = evaluate(df)
    assert out["city"] == {"city": 50.0, "country": 100.0}
    assert "frame" not in out and out["n_frames"] == 0 and out["n_frames_excluded"] == 5
    by_frame = evaluate(df, label_level="frame")
    assert by_frame["city"] == {"city": 40.0, "country": 80.0}


def test_evaluate_with_gps_and_labels_has_every_group():
    df = tiny_predictions().with_columns(
        pl.lit("Quito").alias("city"), pl.Series("pred_city", ["Quito", "Quito", "Lima", "Quito", "Lima"])
    )
    out = evaluate(df, label_level="frame")
    assert set(out) == {"frame", "video", "trajectory", "shape", "city", "n_frames", "n_sequences", "n_frames_excluded"}
    assert out["city"] == {"city": 60.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.drop("gt_lon"), r"lack columns \['gt_lon'\]"),
        (lambda df: df.head(0), "empty"),
        (lambda df: df.with_columns(pl.when(pl.col("frame_index") == 2).then(None).otherwise(pl.col("lat")).alias("lat")),
         r"sequence_id='s1', frame_index=2\).*every frame needs a prediction"),
        (lambda df: df.with_columns(pl.when(pl.col("sequence_id") == "s1").then(95.0).otherwise(pl.col("gt_lat")).alias("gt_lat")),
         "ground truth 95.0"),
        (lambda df: df.with_columns(pl.when(pl.col("frame_index") == 1).then(None).otherwise(pl.col("gt_lon")).alias("gt_lon")),
         "only one of gt_lat / gt_lon"),
        (lambda df: pl.concat([df, df.head(1)]), "duplicate"),
        (lambda df: df.filter(pl.col("gt_lat").is_null()), "nothing to evaluate"),
    ],
)
def test_evaluate_rejects_bad_input_with_the_row_named(change, message):
    with pytest.raises(ValueError, match=message):
        evaluate(change(tiny_predictions()))


def test_evaluate_rejects_unknown_label_level():
    with pytest.raises(ValueError, match="label_level"):
        evaluate(tiny_predictions(), label_level="city")


# ---------------------------------------------------------------------------------------------
# Trajectory shape: path length, distinct points, gallery cells, right-city DFD/MRD


def drive(n: int = 21, length_km: float = 2.0, lat0: float = 47.37, lon0: float = 8.54):
    """A straight drive north of ``length_km`` sampled at n evenly spaced frames -> lat, lon (n,)."""
    t = np.linspace(0.0, 1.0, n)
    return offset_km(lat0, lon0, north_km=length_km * t, east_km=np.zeros(n))


def street_gallery(lat0: float = 47.37, lon0: float = 8.54, spacing_km: float = 0.1):
    """Gallery points every ``spacing_km`` on a 1 km-wide, 4 km-long grid around the drive -> (G, 2)."""
    north, east = np.meshgrid(np.arange(-10, 31) * spacing_km, np.arange(-5, 6) * spacing_km, indexing="ij")
    lat, lon = offset_km(lat0, lon0, north_km=north.ravel(), east_km=east.ravel())
    return np.stack([lat, lon], axis=1)


def predictions_table(**seqs) -> pl.DataFrame:
    """sequence_id=(lat, lon, gt_lat, gt_lon) arrays -> a predictions DataFrame."""
    frames = [
        pl.DataFrame({"sequence_id": sid, "frame_index": np.arange(len(la)), "lat": la, "lon": lo, "gt_lat": gla, "gt_lon": glo})
        for sid, (la, lo, gla, glo) in seqs.items()
    ]
    return pl.concat(frames)


def test_one_point_per_video_has_ratio_zero_and_one_distinct_point():
    gt_lat, gt_lon = drive(21, 2.0)
    gallery = street_gallery()
    # The prediction is one gallery point (the drive's middle) for every frame: frame errors stay within
    # 1 km and the video-level error is 0, but the shape metrics see a single point.
    p_lat, p_lon = np.full(21, gt_lat[10]), np.full(21, gt_lon[10])
    df = predictions_table(v=(p_lat, p_lon, gt_lat, gt_lon))
    out = evaluate(df, gallery)
    assert out["frame"]["acc_5km"] == 100.0 and out["video"]["acc_0.1km"] == 100.0
    assert out["frame"]["acc_0.25km"] == pytest.approx(100 * 5 / 21)  # frames 8-12, within 200 m
    assert out["shape"]["path_length_ratio"] == 0.0
    assert out["shape"]["distinct_points"] == 1.0
    assert out["shape"]["distinct_true_cells"] == 21.0  # frames 100 m apart, gallery every 100 m
    assert out["shape"]["distinct_ratio"] == pytest.approx(1 / 21)
    # the same point moved by metres frame to frame (as smoothing or GPS corrections leave it): 21 distinct
    # coordinates, but still one gallery cell, and the ratio counts cells
    wobble = predictions_table(v=(p_lat + 1e-5 * np.arange(21), p_lon, gt_lat, gt_lon))
    moved = evaluate(wobble, gallery)["shape"]
    assert moved["distinct_points"] == 21.0 and moved["distinct_cells"] == 1.0
    assert moved["distinct_ratio"] == pytest.approx(1 / 21)
    row = per_sequence(df, gallery).row(0, named=True)
    assert row["path_length_km"] == 0.0 and row["true_path_length_km"] == pytest.approx(2.0, rel=1e-6)
    assert (row["path_length_ratio"], row["distinct_points"], row["distinct_true_cells"]) == (0.0, 1, 21)


def test_perfect_prediction_has_ratio_one_and_as_many_points_as_true_cells():
    # GPS 30 m off the gallery points; a perfect retrieval predicts each frame's nearest gallery point.
    gt_lat, gt_lon = drive(41, 2.0)
    gt_lat, gt_lon = offset_km(gt_lat, gt_lon, north_km=0.0, east_km=0.03)
    gallery = street_gallery()
    snapped = gallery[nearest_gallery_index(np.stack([gt_lat, gt_lon], axis=1), gallery)]
    df = predictions_table(v=(snapped[:, 0], snapped[:, 1], gt_lat, gt_lon))
    out = evaluate(df, gallery)["shape"]
    assert out["path_length_ratio"] == pytest.approx(1.0, abs=0.03)
    assert out["distinct_points"] == out["distinct_cells"] == out["distinct_true_cells"] == 21.0  # 41 frames every 50 m, cells every 100 m
    assert out["distinct_ratio"] == 1.0
    # The truth itself as the prediction: ratio exactly 1.
    exact = evaluate(predictions_table(v=(gt_lat, gt_lon, gt_lat, gt_lon)))["shape"]
    assert exact["path_length_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_jitter_gives_a_path_length_ratio_above_one():
    gt_lat, gt_lon = drive(21, 2.0)
    side = np.where(np.arange(21) % 2 == 0, 0.3, -0.3)  # alternating 300 m east / west of the truth
    p_lat, p_lon = offset_km(gt_lat, gt_lon, north_km=0.0, east_km=side)
    table = per_sequence(predictions_table(v=(p_lat, p_lon, gt_lat, gt_lon)))
    # Each 100 m step becomes a ~600 m zig-zag: ratio about sqrt(0.6^2 + 0.1^2) / 0.1.
    assert table["path_length_ratio"][0] == pytest.approx(np.hypot(0.6, 0.1) / 0.1, rel=1e-3)
    assert table["path_length_ratio"][0] > 1


def test_right_city_filter_excludes_a_sequence_placed_300_km_away():
    gt_lat, gt_lon = drive(21, 2.0)
    far_lat, far_lon = offset_km(gt_lat, gt_lon, north_km=300.0, east_km=0.0)
    df = predictions_table(near=(gt_lat, gt_lon, gt_lat, gt_lon), far=(far_lat, far_lon, gt_lat, gt_lon))
    out = evaluate(df)
    assert out["trajectory"]["dfd_km"] == pytest.approx(150.0, rel=1e-3)  # mean over both: 0 and 300 km
    assert out["shape"]["n_right_city"] == 1
    assert out["shape"]["dfd_km_right_city"] == pytest.approx(0.0, abs=1e-6)
    assert out["shape"]["mrd_km_right_city"] == pytest.approx(0.0, abs=1e-6)
    # The far drive has the right shape: ratio 1 for both, shape is independent of placement.
    assert out["shape"]["path_length_ratio"] == pytest.approx(1.0, rel=1e-3)
    # Nothing placed in the right city: None, not a mean over nothing.
    only_far = evaluate(df.filter(pl.col("sequence_id") == "far"))["shape"]
    assert only_far["n_right_city"] == 0
    assert only_far["dfd_km_right_city"] is None and only_far["mrd_km_right_city"] is None


def test_sequences_that_do_not_move_are_left_out_of_the_path_length_median():
    gt_lat, gt_lon = drive(21, 2.0)
    parked = (np.full(5, 47.0), np.full(5, 8.0), np.full(5, 47.0), np.full(5, 8.0))
    df = predictions_table(a_moving=(gt_lat, gt_lon, gt_lat, gt_lon), b_parked=parked)
    table = per_sequence(df)
    assert table["path_length_ratio"].to_list() == [pytest.approx(1.0), None]
    shape = evaluate(df)["shape"]
    assert shape["path_length_ratio"] == pytest.approx(1.0) and shape["n_path_length_ratio"] == 1
    parked_only = evaluate(df.filter(pl.col("sequence_id") == "b_parked"))["shape"]
    assert parked_only["path_length_ratio"] is None and parked_only["n_path_length_ratio"] == 0
    assert json.loads(json.dumps(parked_only)) == parked_only


def test_r2_in_drive_scores_the_shape_alone():
    """1 for the drive drawn anywhere, 0 for one point, below 0 for the drive run backwards or jitter."""
    gt_lat, gt_lon = drive(21, 2.0)
    far_lat, far_lon = offset_km(gt_lat, gt_lon, north_km=12.0, east_km=-7.0)
    mid = len(gt_lat) // 2
    noise = np.random.default_rng(0).normal(0.0, 1.0, (2, 21))
    n_lat, n_lon = offset_km(gt_lat, gt_lon, north_km=noise[0], east_km=noise[1])
    df = predictions_table(a_exact=(gt_lat, gt_lon, gt_lat, gt_lon), b_moved=(far_lat, far_lon, gt_lat, gt_lon),
                           c_point=(np.full(21, gt_lat[mid]), np.full(21, gt_lon[mid]), gt_lat, gt_lon),
                           d_reversed=(gt_lat[::-1], gt_lon[::-1], gt_lat, gt_lon),
                           e_noisy=(n_lat, n_lon, gt_lat, gt_lon),
                           f_parked=(np.full(5, 47.0), np.full(5, 8.0), np.full(5, 47.0), np.full(5, 8.0)))
    r2 = dict(zip(*per_sequence(df).select("sequence_id", "r2_in_drive").to_dict(as_series=False).values()))
    assert r2["a_exact"] == pytest.approx(1.0, abs=1e-12) and r2["b_moved"] == pytest.approx(1.0, abs=1e-5)  # 12 km north: the km per degree of longitude differs by ~1e-6
    assert r2["c_point"] == pytest.approx(0.0, abs=1e-12)
    assert r2["d_reversed"] == pytest.approx(-3.0, abs=1e-6)  # p = -t: SSE = 4 SST
    assert r2["e_noisy"] < 0.0  # 1 km noise on a 2 km drive: more spurious movement than the drive has
    assert r2["f_parked"] is None  # no movement to reproduce
    assert evaluate(df)["shape"]["r2_in_drive"] == pytest.approx(np.median([v for v in r2.values() if v is not None]))


def test_gallery_keys_only_with_a_gallery():
    df = tiny_predictions()
    assert {"distinct_true_cells", "distinct_ratio"}.isdisjoint(evaluate(df)["shape"])
    assert "distinct_true_cells" not in per_sequence(df).columns
    # A gallery with one point: every true frame falls in the same cell.
    out = evaluate(df, np.array([[0.0, 0.0]]))["shape"]
    assert out["distinct_true_cells"] == out["distinct_cells"] == 1.0 and out["distinct_ratio"] == 1.0
    assert per_sequence(df, np.array([[0.0, 0.0]]))["distinct_true_cells"].to_list() == [1, 1]


@pytest.mark.parametrize(
    ("gallery", "error", "message"),
    [
        ("frame", TypeError, "label_level is a keyword"),
        (np.zeros((0, 2)), ValueError, "n >= 1"),
        (np.zeros((3, 3)), ValueError, r"shape \(3, 3\)"),
        (np.array([[0.0, 0.0], [91.0, 0.0]]), ValueError, r"gallery_latlon\[1\]"),
    ],
)
def test_evaluate_rejects_a_bad_gallery(gallery, error, message):
    with pytest.raises(error, match=message):
        evaluate(tiny_predictions(), gallery)


@pytest.mark.parametrize("block", [1, 7, 1000, metrics.NN_BLOCK])
def test_nearest_gallery_index_is_exact_in_any_chunking(block):
    rng = np.random.default_rng(0)
    q = np.c_[rng.uniform(-90, 90, 300), rng.uniform(-180, 180, 300)]
    q = np.concatenate([q, q[:50]])  # repeated queries
    g = np.c_[rng.uniform(-90, 90, 700), rng.uniform(-180, 180, 700)]
    got = nearest_gallery_index(q, g, block=block)
    assert got.dtype == np.int64 and got.shape == (350,)
    np.testing.assert_array_equal(got, pairwise_haversine_km(q, g).argmin(axis=1))


def test_nearest_gallery_index_across_the_antimeridian_and_ties():
    g = np.array([[0.0, -179.9], [0.0, 179.0], [0.0, 170.0], [0.0, -179.9]])
    assert nearest_gallery_index([[0.0, 179.95], [0.0, 175.0]], g).tolist() == [0, 1]  # 0 over its duplicate 3
    assert nearest_gallery_index(np.zeros((0, 2)), g).shape == (0,)


def test_list_functions_agree_with_the_table():
    gt_lat, gt_lon = drive(11, 1.0)
    side = np.where(np.arange(11) % 2 == 0, 0.05, -0.05)
    p_lat, p_lon = offset_km(gt_lat, gt_lon, north_km=0.0, east_km=side)
    pred, true = np.stack([p_lat, p_lon], 1), np.stack([gt_lat, gt_lon], 1)
    table = per_sequence(predictions_table(a=(p_lat, p_lon, gt_lat, gt_lon), b=(gt_lat[:1], gt_lon[:1], gt_lat[:1], gt_lon[:1])),
                         street_gallery())
    assert path_lengths_km([pred, pred[:1]]).tolist() == pytest.approx(table["path_length_km"].to_list())
    ratios = path_length_ratios([pred, pred[:1]], [true, true[:1]])
    assert ratios[0] == pytest.approx(table["path_length_ratio"][0]) and np.isnan(ratios[1])
    assert distinct_points([pred, pred[:1]]).tolist() == table["distinct_points"].to_list() == [11, 1]
    assert distinct_cells([true, true[:1]], street_gallery()).tolist() == table["distinct_true_cells"].to_list() == [11, 1]
    with pytest.raises(ValueError, match="wrap a single sequence"):
        path_lengths_km(pred)


@settings(max_examples=50, deadline=None)
@given(curve_s, st.integers(0, 3))
def test_path_length_ratio_is_one_for_the_truth_and_zero_for_a_point(curve, k):
    if path_lengths_km([curve])[0] < metrics.MIN_TRUE_PATH_KM:
        assert np.isnan(path_length_ratios([curve], [curve])[0])
        return
    assert path_length_ratios([curve], [curve])[0] == pytest.approx(1.0)
    point = np.repeat(curve[k % len(curve)][None], len(curve), axis=0)
    assert path_length_ratios([point], [curve])[0] == 0.0
    assert distinct_points([point])[0] == 1


# ---------------------------------------------------------------------------------------------
# pipeline/summary.py prints every group, Phase I's shape too


def test_summary_prints_shape_for_final_and_phase1():
    gt_lat, gt_lon = drive(21, 2.0)
    one = (np.full(21, gt_lat[10]), np.full(21, gt_lon[10]), gt_lat, gt_lon)
    final = evaluate(predictions_table(v=(gt_lat, gt_lon, gt_lat, gt_lon)), street_gallery())
    p1 = evaluate(predictions_table(v=one), street_gallery())
    final["phase1"] = {k: p1[k] for k in ("frame", "video", "trajectory", "shape")}
    text = format_metrics(json.loads(json.dumps(final)))
    lines = {line.split()[0] + (" " + line.split()[1] if line.split()[0] == "phase1" else ""): line for line in text.splitlines()}
    assert "path_length_ratio=1.000" in lines["shape"] and "distinct_ratio=1.000" in lines["shape"]
    assert "path_length_ratio=0.000" in lines["phase1 shape"] and "distinct_points=1.000" in lines["phase1 shape"]
    assert "n_right_city=1" in lines["phase1 shape"]
    frame = lines["frame"]
    assert frame.index("acc_0.1km=") < frame.index("acc_0.25km=") < frame.index("acc_0.5km=") < frame.index("acc_1km=") \
        < frame.index("acc_25km=") < frame.index("median_km=")


def test_summary_shows_missing_shape_values_as_na():
    text = format_metrics({"shape": {"path_length_ratio": None, "n_path_length_ratio": 0, "distinct_points": 1.0,
                                     "dfd_km_right_city": None, "mrd_km_right_city": None, "n_right_city": 0}})
    assert "path_length_ratio=n/a" in text and "dfd_km_right_city=n/a" in text and "n_right_city=0" in text
