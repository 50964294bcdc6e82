"""vidtag.viz: plot data for DVC and offline trajectory maps."""

import inspect

import numpy as np
import pytest
from PIL import Image

from vidtag import metrics, viz
from vidtag.geo import offset_km
from vidtag.viz import accuracy_by_threshold, error_cdf, local_km, nice_length_km, threshold_grid_km, trajectory_map


def test_error_cdf_percentiles():
    cdf = error_cdf({"final": np.arange(101.0), "phase1": np.arange(101.0) * 2}, n_points=4)
    assert cdf.columns == ["percentile", "final_km", "phase1_km"]
    assert cdf["percentile"].to_list() == [0, 25, 50, 75, 100]
    assert cdf["final_km"].to_list() == [0, 25, 50, 75, 100]
    assert cdf["phase1_km"].to_list() == [0, 50, 100, 150, 200]


def test_accuracy_by_threshold_counts_inclusive():
    acc = accuracy_by_threshold({"final": np.array([0.2, 0.5, 3.0, 30.0])}, thresholds_km=(0.5, 1.0, 25.0, 100.0))
    assert acc["final"].to_list() == [50.0, 50.0, 75.0, 100.0]
    assert acc["label"].to_list() == ["acc_0.5km", "acc_1km", "acc_25km", None]  # 100 km is not a reported threshold


def test_viz_uses_the_one_set_of_thresholds_from_metrics():
    assert viz.THRESHOLDS_KM is metrics.THRESHOLDS_KM
    assert "THRESHOLDS_KM =" not in inspect.getsource(viz)  # imported, not defined a second time


def test_accuracy_curve_is_log_spaced_and_labels_exactly_the_metrics_thresholds():
    grid = threshold_grid_km()
    assert np.all(np.diff(grid) > 0) and grid[0] == min(metrics.THRESHOLDS_KM) and grid[-1] == viz.CURVE_MAX_KM
    assert set(metrics.THRESHOLDS_KM) <= set(grid.tolist())  # every reported threshold lies on the curve exactly
    steps = np.diff(np.log10(grid))
    assert steps.max() <= 1.0 / viz.CURVE_POINTS_PER_DECADE * 1.34 and steps.min() > 0.02  # evenly log-spaced, no near-duplicates
    errors = np.random.default_rng(0).lognormal(0.0, 2.0, 1000)
    acc = accuracy_by_threshold({"final": errors, "phase1": 2 * errors})
    assert acc.columns == ["threshold_km", "final", "phase1", "label"]
    labelled = acc.filter(acc["label"].is_not_null())
    # The labelled points are the very numbers evaluate() writes to metrics/eval.json.
    expected = metrics.accuracy_at(errors)
    assert labelled["label"].to_list() == [metrics.acc_key(t) for t in metrics.THRESHOLDS_KM]
    assert labelled["final"].to_list() == [expected[k] for k in labelled["label"]]
    assert labelled["threshold_km"].to_list() == list(metrics.THRESHOLDS_KM)
    assert np.all(np.diff(acc["final"].to_numpy()) >= 0)  # a CDF: never decreases


def test_accuracy_by_threshold_refuses_names_that_clash_with_its_columns():
    with pytest.raises(ValueError, match="reserved"):
        accuracy_by_threshold({"label": np.array([1.0])})


def test_local_km_is_true_to_scale_and_unwraps_the_dateline():
    lat, lon = offset_km(10.0, 179.99, north_km=2.0, east_km=3.0)
    east, north = local_km(lat, lon, 10.0, 179.99)
    assert east == pytest.approx(3.0, rel=1e-3) and north == pytest.approx(2.0, rel=1e-3)
    assert lon < 0  # crossed the dateline, still 3 km east


@pytest.mark.parametrize(("span", "bar"), [(0.3, 0.05), (1.0, 0.2), (7.0, 1.0), (60.0, 10.0), (2400.0, 200.0)])
def test_scale_bar_is_a_round_fifth(span, bar):
    assert nice_length_km(span) == pytest.approx(bar)


def test_png_map_with_ground_truth(tmp_path):
    t = np.linspace(0, 1, 30)
    gt_lat, gt_lon = offset_km(47.37, 8.54, north_km=3 * t, east_km=2 * t)
    out = trajectory_map(tmp_path / "maps" / "seq-1.png", gt_lat + 0.002, gt_lon, gt_lat=gt_lat, gt_lon=gt_lon,
                         title="seq-1", phase1=(gt_lat + 0.01, gt_lon))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300
        assert len(set(im.convert("RGB").getdata())) > 20  # something was drawn
    assert [p.name for p in out.parent.iterdir()] == ["seq-1.png"]  # no temporary left behind


def test_html_map_holds_the_track(tmp_path):
    out = trajectory_map(tmp_path / "m.html", [47.37, 47.38], [8.54, 8.55], title="clip", confidence=[0.9, 0.4])
    html = out.read_text()
    assert "47.37" in html and "8.55" in html and "confidence 0.40" in html


def test_map_without_any_coordinate_is_refused(tmp_path):
    with pytest.raises(ValueError, match="every coordinate is missing"):
        trajectory_map(tmp_path / "x.png", [np.nan], [np.nan], title="empty")
