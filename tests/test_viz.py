"""vidtag.viz: plot data and templates for DVC, and trajectory maps that read with no network."""

import inspect
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from vidtag import metrics, viz
from vidtag.errors import VidtagError, VizError
from vidtag.geo import offset_km
from vidtag.viz import accuracy_by_threshold, error_cdf, nice_length_km, threshold_grid_km, trajectory_map

REPO = Path(__file__).resolve().parents[1]


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


def test_accuracy_curve_runs_from_10_m_to_20000_km_log_spaced_with_the_metrics_thresholds_on_it():
    grid = threshold_grid_km()
    assert grid[0] == viz.CURVE_MIN_KM == 0.01 and grid[-1] == viz.CURVE_MAX_KM == 20000.0
    assert np.all(np.diff(grid) > 0)
    assert set(metrics.THRESHOLDS_KM) <= set(grid.tolist())  # every reported threshold lies on the curve exactly
    steps = np.diff(np.log10(grid))
    assert steps.max() <= 1.0 / viz.CURVE_POINTS_PER_DECADE * 1.34 and steps.min() > 0.2 / viz.CURVE_POINTS_PER_DECADE
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
    assert acc["final"][-1] == 100.0  # nothing on Earth is farther than the axis' end


def test_accuracy_by_threshold_refuses_names_that_clash_with_its_columns():
    with pytest.raises(ValueError, match="reserved"):
        accuracy_by_threshold({"label": np.array([1.0])})


@pytest.mark.parametrize(("km", "text"), [(0.01, "10 m"), (0.25, "250 m"), (1.0, "1 km"), (25.0, "25 km"), (20000.0, "20,000 km")])
def test_distance_label(km, text):
    assert viz.distance_label(km) == text


@pytest.mark.parametrize(("span", "bar"), [(0.3, 0.05), (1.0, 0.2), (7.0, 1.0), (60.0, 10.0), (2400.0, 200.0)])
def test_scale_bar_is_a_round_fifth(span, bar):
    assert nice_length_km(span) == pytest.approx(bar)


# --- DVC templates and dvc.yaml ------------------------------------------------------------------


def test_committed_dvc_templates_are_the_generated_ones():
    for name, spec in viz.dvc_templates().items():
        committed = REPO / ".dvc" / "plots" / f"{name}.json"
        assert json.loads(committed.read_text()) == spec, f"{committed} is stale: run vidtag.viz.write_dvc_templates('.dvc/plots')"


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_dvc_templates_put_distances_on_a_log_axis_and_mark_the_thresholds():
    for name, spec in viz.dvc_templates().items():
        scales = [n["scale"] for n in _walk(spec) if isinstance(n, dict) and isinstance(n.get("scale"), dict) and n["scale"].get("type") == "log"]
        assert scales and all(s["domain"] == [0.01, 20000.0] for s in scales), name
        marked = [v["threshold_km"] for n in _walk(spec) if isinstance(n, dict) and "values" in n and isinstance(n["values"], list)
                  for v in n["values"] if isinstance(v, dict) and "threshold_km" in v]
        assert marked == list(metrics.THRESHOLDS_KM), name
        text = json.dumps(spec)
        for anchor in ("DATA", "X", "Y", "X_LABEL", "Y_LABEL", "TITLE"):
            assert f"<DVC_METRIC_{anchor}>" in text, (name, anchor)


def test_dvc_renders_the_templates_with_the_axis_titles_of_dvc_yaml(tmp_path):
    """dvc-render fills each template as `dvc plots show` does: the fields and labels of dvc.yaml land in the spec."""
    from dvc_render import VegaRenderer

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    defs = {k: v for p in plots if isinstance(p, dict) for k, v in p.items() if v and v.get("template") in viz.DVC_TEMPLATE_NAMES}
    assert {d["template"] for d in defs.values()} == set(viz.DVC_TEMPLATE_NAMES)
    errors = np.random.default_rng(1).lognormal(0.0, 1.5, 200)
    tables = {"error_cdf": error_cdf({"final": errors, "phase1": 2 * errors}),
              "accuracy_by_threshold": accuracy_by_threshold({"final": errors, "phase1": 2 * errors})}
    for title, d in defs.items():
        assert d["x_label"] and d["y_label"] and d["y_label"] != "y"
        (csv, fields), = d["y"].items()
        df = tables[d["template"]]
        rows = [{**{k: str(v) for k, v in r.items()}, "rev": "workspace", "filename": csv, "field": f, "dvc_inferred_y_value": str(r[f])}
                for f in fields for r in df.iter_rows(named=True)]
        spec = VegaRenderer(rows, title, template=d["template"], template_dir=str(REPO / ".dvc" / "plots"), x=d["x"],
                            y="dvc_inferred_y_value", x_label=d["x_label"], y_label=d["y_label"], title=title).get_filled_template()
        text = json.dumps(spec)
        assert "<DVC_METRIC_" not in text and d["x_label"] in text and d["y_label"] in text
        assert len(spec["data"]["values"]) == len(rows)


def test_dvc_yaml_draws_only_the_training_curves_that_matter():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    files = [f for p in plots if isinstance(p, dict) for v in p.values() if v for f in (v.get("y") or {})]
    training = [f for f in files if f.startswith("dvclive/")]
    assert {Path(f).stem for f in training} == {"train_loss", "val_acc_1km", "val_p1_acc_1km", "val_p2_acc_1km", "lr"}
    assert [k for p in plots for k in (p if isinstance(p, dict) else [p]) if k.startswith("dvclive")] == []  # no whole folder


# --- maps ------------------------------------------------------------------------------------------


def _drive(n=30, lat=47.37, lon=8.54):
    t = np.linspace(0, 1, n)
    gt_lat, gt_lon = offset_km(lat, lon, north_km=3 * t, east_km=2 * t)
    return gt_lat, gt_lon, (gt_lat + 0.01, gt_lon), (gt_lat + 0.002, gt_lon)


@pytest.mark.parametrize(("ext", "magic"), [("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<?xml"), ("pdf", b"%PDF-")])
def test_static_map_format_follows_the_extension(tmp_path, ext, magic):
    gt_lat, gt_lon, phase1, (lat, lon) = _drive()
    out = trajectory_map(tmp_path / "maps" / f"seq-1.{ext}", lat, lon, gt_lat, gt_lon, title="seq-1", phase1=phase1)
    assert out.read_bytes()[: len(magic)] == magic
    assert [p.name for p in out.parent.iterdir()] == [f"seq-1.{ext}"]  # no temporary left behind
    if ext == "png":
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] > 300
            rgb = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
        land = np.array([int(viz.LAND_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - land).sum(axis=1) < 6).mean() > 0.2  # drawn land, not an empty axis


def test_svg_map_has_the_three_lines_final_on_top_and_names_the_place(tmp_path):
    gt_lat, gt_lon, phase1, (lat, lon) = _drive()
    out = trajectory_map(tmp_path / "m.svg", lat, lon, gt_lat, gt_lon, title="seq-1", phase1=phase1, confidence=np.linspace(0, 1, 30))
    svg = out.read_text()
    ET.fromstring(svg)  # well-formed
    order = [svg.index(f'id="track-{k}"') for k in ("truth", "phase1", "final")]
    assert order == sorted(order)  # painted in this order: final last, on top of Phase I
    texts = "".join(ET.fromstring(svg).itertext())
    assert "Zürich" in texts and "Switzerland" in texts and "confidence" in texts and "Natural Earth" in texts
    again = trajectory_map(tmp_path / "again.svg", lat, lon, gt_lat, gt_lon, title="seq-1", phase1=phase1, confidence=np.linspace(0, 1, 30))
    assert again.read_bytes() == out.read_bytes()  # no date or random ids: a DVC output changes only with the map


def test_static_map_over_thousands_of_km_names_the_countries(tmp_path):
    t = np.linspace(0, 1, 5)
    gt = offset_km(38.72, -9.14, north_km=t, east_km=t)  # Lisbon
    pred = offset_km(43.65, -79.38, north_km=t, east_km=t)  # Toronto
    texts = "\n".join(ET.fromstring(trajectory_map(tmp_path / "far.svg", *pred, *gt).read_text()).itertext())
    assert {"Portugal", "Spain", "Morocco", "Cuba"} <= set(texts.split("\n")) and "Lisbon" in texts and "New York City" in texts


@pytest.mark.parametrize("name", ["x.jpg", "x.gif", "x", "x.png.bak", "x.geojson"])
def test_unknown_map_extension_is_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(VizError, match="must end in .html, .png, .svg, .pdf") as e:
        trajectory_map(tmp_path / name, [47.37], [8.54])
    assert isinstance(e.value, VidtagError) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["x.png", "x.html"])
def test_map_without_any_coordinate_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="every coordinate is missing"):
        trajectory_map(tmp_path / name, [np.nan], [np.nan], title="empty")
    assert list(tmp_path.iterdir()) == []


def test_map_inputs_of_other_lengths_are_refused(tmp_path):
    with pytest.raises(VizError, match="one per frame"):
        trajectory_map(tmp_path / "x.png", [47.37, 47.38], [8.54, 8.55], gt_lat=[47.37], gt_lon=[8.54])
    with pytest.raises(VizError, match="confidence has 1 values"):
        trajectory_map(tmp_path / "x.html", [47.37, 47.38], [8.54, 8.55], confidence=[0.5])


def _page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="vidtag-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_html_map_is_self_contained(tmp_path):
    gt_lat, gt_lon, phase1, (lat, lon) = _drive()
    html = trajectory_map(tmp_path / "m.html", lat, lon, gt_lat, gt_lon, title="clip <1>", phase1=phase1).read_text()
    # nothing is fetched but the tiles: no script, style sheet, image or frame from elsewhere
    assert re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", html, re.I) is None
    assert 'version="1.9.4"' in html and ".leaflet-container" in html  # Leaflet and its CSS inline
    assert (viz.MAP_SCRIPT.read_text() in html) and "<title>clip &lt;1&gt;</title>" in html
    urls = set(re.findall(r"https?://[^\s\"'<>)\\]+", html.replace((viz.LEAFLET_DIR / "leaflet.js").read_text(), "")
                          .replace((viz.LEAFLET_DIR / "leaflet.css").read_text(), "")))
    assert urls == {viz.OSM_TILES, "https://www.openstreetmap.org/copyright"}  # the tile template and its credit


def test_html_map_carries_the_three_tracks_places_and_outline(tmp_path):
    gt_lat, gt_lon, phase1, (lat, lon) = _drive()
    conf = np.linspace(0.0, 1.0, 30)
    html = trajectory_map(tmp_path / "m.html", lat, lon, gt_lat, gt_lon, phase1=phase1, confidence=conf,
                          frame_index=np.arange(30) + 5, timestamp_s=np.arange(30) * 0.5).read_text()
    data = _page_data(html)
    assert [t["key"] for t in data["tracks"]] == ["truth", "phase1", "final"]  # drawn in this order, final on top
    for t, (la, lo) in zip(data["tracks"], [(gt_lat, gt_lon), phase1, (lat, lon)]):
        np.testing.assert_allclose(np.array(t["points"]), np.stack([la, lo], axis=1), atol=1e-6)
    final = data["tracks"][-1]
    assert final["colors"][0] == viz.CONFIDENCE_COLORS[0] and final["colors"][-1] == viz.CONFIDENCE_COLORS[-1]
    assert "final, frame 5, 0.0 s, confidence 0.00" in final["tips"][0] and "confidence 1.00" in final["tips"][-1]
    assert data["tracks"][0]["colors"] is None and data["candidates"] is None
    names = {p["name"] for p in data["places"]}
    assert "Zürich" in names and "Winterthur" in names  # the town itself and, zoomed out, its neighbours
    countries = {f["properties"]["name"] for f in data["countries"]["features"]}
    assert {"Switzerland", "Germany", "Japan"} <= countries
    assert data["where"].startswith("Zürich") and "Switzerland" in data["where"]


def test_html_map_offers_candidates_as_a_layer(tmp_path):
    cands = pl.DataFrame({"frame_index": [0, 0, 1], "rank": [1, 2, 1], "lat": [47.0, 47.1, 47.2], "lon": [8.0, 8.1, 8.2],
                          "score": [0.7, 0.2, 0.9]})
    html = trajectory_map(tmp_path / "m.html", [47.0, 47.2], [8.0, 8.2], candidates=cands).read_text()
    assert _page_data(html)["candidates"] == [[47.0, 8.0, "frame 0, candidate 1, score 0.700"],
                                              [47.1, 8.1, "frame 0, candidate 2, score 0.200"],
                                              [47.2, 8.2, "frame 1, candidate 1, score 0.900"]]
    assert "candidates (top-K per frame)" in html
    with pytest.raises(VizError, match="lacks column"):
        trajectory_map(tmp_path / "x.html", [47.0], [8.0], candidates=cands.drop("rank"))
    png = trajectory_map(tmp_path / "m.png", [47.0, 47.2], [8.0, 8.2], candidates=cands)  # static maps leave them out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_html_track_across_the_antimeridian_stays_one_line(tmp_path):
    lat, lon = offset_km(-17.8, 179.99, north_km=np.zeros(5), east_km=np.linspace(0, 4, 5))
    assert (lon < 0).any() and (lon > 0).any()
    data = _page_data(trajectory_map(tmp_path / "fiji.html", lat, lon).read_text())
    lons = np.array(data["tracks"][0]["points"])[:, 1]
    assert np.all(np.diff(lons) > 0) and np.ptp(lons) < 0.1
    assert "Fiji" in data["where"]


def test_a_map_is_named_after_the_truth_else_the_final_prediction(tmp_path):
    zurich, geneva = offset_km(47.37, 8.54, np.zeros(3), np.arange(3.0)), offset_km(46.20, 6.14, np.zeros(3), np.arange(3.0))
    both = _page_data(trajectory_map(tmp_path / "a.html", *zurich, *geneva, phase1=zurich).read_text())
    assert "Geneva" in both["where"]
    no_truth = _page_data(trajectory_map(tmp_path / "b.html", *zurich, phase1=geneva).read_text())
    assert "Zürich" in no_truth["where"]
    lost = np.full(3, np.nan)  # no final point at all: named after Phase I
    assert "Geneva" in _page_data(trajectory_map(tmp_path / "c.html", lost, lost, phase1=geneva).read_text())["where"]
