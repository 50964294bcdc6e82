import json

import numpy as np
import polars as pl
import pytest
import similaritymeasures
from frechetdist import frdist
from hypothesis import given, settings
from hypothesis import strategies as st

from vidtag import metrics
from vidtag.geo import KM_PER_DEG_LAT, haversine_km, km_per_deg_lon
from vidtag.metrics import discrete_frechet, discrete_frechet_many, evaluate, mean_range_difference, per_sequence

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
    acc = metrics.accuracy_at([0.4, 0.5, 0.9, 4.0, 30.0])
    assert acc == {"acc_0.5km": 40.0, "acc_1km": 60.0, "acc_5km": 80.0, "acc_25km": 80.0, "median_km": 0.9}


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
    assert set(out) == {"frame", "video", "trajectory", "n_frames", "n_sequences", "n_frames_excluded"}
    assert (out["n_frames"], out["n_sequences"], out["n_frames_excluded"]) == (4, 2, 1)
    # Frame errors: 0, 0, far_km, s2_km.
    assert out["frame"] == {
        "acc_0.5km": 50.0,
        "acc_1km": 50.0,
        "acc_5km": 50.0,
        "acc_25km": 50.0,
        "median_km": pytest.approx(s2_km / 2),
    }
    # Video: s1's predicted centroid is nearest its (0, 0.01) prediction = its GT centroid; s2 has one frame.
    assert out["video"]["acc_0.5km"] == 50.0
    assert out["video"]["median_km"] == pytest.approx(s2_km / 2)
    # Trajectory, mean over the two sequences: DFD is set by the last s1 frame and by s2's lone frame;
    # s1's longitude range is 1.0 vs 0.02 (latitude ranges are 0), s2's ranges are 0.
    assert out["trajectory"]["dfd_deg"] == pytest.approx((0.98 + 0.5) / 2)
    assert out["trajectory"]["dfd_km"] == pytest.approx((far_km + s2_km) / 2)
    assert out["trajectory"]["mrd_deg"] == pytest.approx((0.98 / 2 + 0.0) / 2)
    assert out["trajectory"]["mrd_km"] == pytest.approx((far_km / 2 + 0.0) / 2)


def test_per_sequence_table():
    table = per_sequence(tiny_predictions())
    assert table.columns == ["sequence_id", "n_frames", "median_km", "video_error_km", "dfd_deg", "dfd_km", "mrd_deg", "mrd_km"]
    assert table["sequence_id"].to_list() == ["s1", "s2"]
    assert table["n_frames"].to_list() == [3, 1]
    assert table["median_km"][0] == 0.0
    assert table["video_error_km"][0] == pytest.approx(0.0, abs=1e-6)
    assert table["dfd_deg"].to_list() == pytest.approx([0.98, 0.5])


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
    assert set(out) == {"frame", "video", "trajectory", "city", "n_frames", "n_sequences", "n_frames_excluded"}
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
