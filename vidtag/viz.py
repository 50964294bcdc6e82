"""Plots of an evaluation and trajectory maps (the paper's Fig. 6), all readable with no network.

- Plot data for ``dvc plots``: the error CDF and accuracy by threshold, on a log-distance grid from
  10 m to 20,000 km (half the Earth's circumference) with Sec. 4.3's thresholds (metrics.THRESHOLDS_KM)
  on it exactly; :func:`dvc_templates` gives the Vega-Lite templates that draw them on log axes.
- Maps: ground truth, Phase I and final (two-stage, Fig. 5) predictions as distinct lines, final on
  top, over offline context (``vidtag.basemap``: country outlines, place names). Static maps (PNG, SVG
  or PDF by the file's extension) are drawn with matplotlib; HTML maps carry their map library
  (Leaflet, vendored in ``vidtag/assets``) and data inline, use OpenStreetMap tiles when the browser is
  online and show the drawn outline and place names beneath them when it is not.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from vidtag import basemap
from vidtag.errors import VizError
from vidtag.geo import KM_PER_DEG_LAT, bounding_box, km_per_deg_lon
from vidtag.io import atomic_path, write_json_atomic
from vidtag.metrics import THRESHOLDS_KM, acc_key

# --- plot data ----------------------------------------------------------------------------------

CDF_POINTS = 200  # rows in the error-CDF data file: enough for a smooth curve, small for DVC
# Distance axes run from 10 m (below GPS noise) to 20,000 km (no two points on Earth are farther apart),
# log-spaced, with every threshold of metrics.THRESHOLDS_KM on the accuracy curve exactly.
CURVE_MIN_KM = 0.01
CURVE_MAX_KM = 20000.0
CURVE_POINTS_PER_DECADE = 16  # ~100 rows from 10 m to 20,000 km: a smooth curve, a small file


def threshold_grid_km(min_km: float = CURVE_MIN_KM, max_km: float = CURVE_MAX_KM,
                      per_decade: int = CURVE_POINTS_PER_DECADE) -> np.ndarray:
    """Sorted thresholds for the accuracy curve: log-spaced from ``min_km`` to ``max_km``, plus
    THRESHOLDS_KM exactly (a grid point within a third of a grid step of one gives way to it)."""
    marks = np.asarray(THRESHOLDS_KM, dtype=np.float64)
    n = max(2, int(round(per_decade * math.log10(max_km / min_km))) + 1)
    grid = np.geomspace(min_km, max_km, n)
    near_mark = np.abs(np.log(grid[:, None] / marks[None, :])).min(axis=1) < math.log(10.0) / per_decade / 3
    return np.unique(np.concatenate([grid[~near_mark], marks]))


def error_cdf(errors_km: dict[str, np.ndarray], n_points: int = CDF_POINTS) -> pl.DataFrame:
    """Wide table ``percentile, <name>_km...``: the error below which each percentile of frames lies."""
    q = np.linspace(0.0, 100.0, n_points + 1)
    cols = {"percentile": q}
    for name, e in errors_km.items():
        e = np.asarray(e, dtype=np.float64)
        cols[f"{name}_km"] = np.percentile(e, q) if e.size else np.full_like(q, np.nan)
    return pl.DataFrame(cols)


def accuracy_by_threshold(errors_km: dict[str, np.ndarray], thresholds_km: Sequence[float] | None = None) -> pl.DataFrame:
    """Wide table ``threshold_km, <name>..., label``: percent of frames within each threshold (``<=``).

    The default thresholds are :func:`threshold_grid_km`. ``label`` names the rows at a threshold of
    metrics.THRESHOLDS_KM with its metrics key (``acc_1km``: the same number as in metrics/eval.json)
    and is null on the other grid points, which are only there to draw the curve.
    """
    clash = {"threshold_km", "label"} & set(errors_km)
    if clash:
        raise ValueError(f"errors_km names {sorted(clash)} are reserved for the table's own columns")
    t = threshold_grid_km() if thresholds_km is None else np.asarray(thresholds_km, dtype=np.float64)
    cols = {"threshold_km": t}
    for name, e in errors_km.items():
        e = np.sort(np.asarray(e, dtype=np.float64).ravel())
        # count of errors <= t by binary search, no (T, E) matrix; the same float operations as
        # metrics.accuracy_at, so a labelled row equals its metrics/eval.json value exactly
        cols[name] = 100.0 * (np.searchsorted(e, t, side="right") / e.size) if e.size else np.full_like(t, np.nan)
    marks = set(THRESHOLDS_KM)
    cols["label"] = pl.Series([acc_key(x) if x in marks else None for x in t.tolist()], dtype=pl.String)
    return pl.DataFrame(cols)


def distance_label(km: float) -> str:
    """A distance as people write it: 0.25 -> "250 m", 1 -> "1 km", 20000 -> "20,000 km"."""
    value, unit = (km * 1000, "m") if km < 1 else (km, "km")
    value = float(f"{value:.4g}")  # four significant digits, never an exponent
    return f"{value:,.0f} {unit}" if value.is_integer() else f"{value:,g} {unit}"


# --- DVC plot templates (Vega-Lite) -----------------------------------------------------------------

DVC_TEMPLATE_NAMES = ("error_cdf", "accuracy_by_threshold")  # .dvc/plots/<name>.json, named in dvc.yaml
PLOT_WIDTH, PLOT_HEIGHT = 460, 320  # pixels of a template's plot area
_A = "<DVC_METRIC_{}>".format  # dvc-render's anchors: DATA, TITLE, X, Y, X_LABEL, Y_LABEL
# Vega expression labelling a log distance axis in m / km, as distance_label does
_DISTANCE_AXIS_EXPR = "datum.value < 1 ? format(datum.value * 1000, '~r') + ' m' : format(datum.value, ',~r') + ' km'"
# Legend names of the two predictions (DVC puts each y column's name in the "field" of its rows)
_SERIES_EXPR = "replace(replace(datum.label, '_km', ''), 'phase1', 'Phase I')"


def _distance_scale() -> dict:
    return {"type": "log", "domain": [CURVE_MIN_KM, CURVE_MAX_KM], "clamp": True}


def _distance_axis() -> dict:
    ticks = [10.0 ** k for k in range(round(math.log10(CURVE_MIN_KM)), round(math.log10(CURVE_MAX_KM)) + 1)]
    return {"values": ticks, "labelExpr": _DISTANCE_AXIS_EXPR, "grid": True}


def _threshold_layer(channel: str) -> dict:
    """Dashed rules at the paper's thresholds across the plot along ``channel`` ("x" or "y"), named on
    an axis of their own opposite the distance axis (top or right)."""
    axis = {"orient": "top" if channel == "x" else "right", "values": list(THRESHOLDS_KM), "labelExpr": _DISTANCE_AXIS_EXPR,
            "title": "thresholds of Sec. 4.3", "grid": False, "labelFontSize": 10, "titleFontWeight": "normal",
            "titleColor": "#555", "labelColor": "#555", **({"labelAngle": -90, "labelAlign": "left"} if channel == "x" else {})}
    return {
        "data": {"values": [{"threshold_km": t} for t in THRESHOLDS_KM]},
        "mark": {"type": "rule", "color": "#888", "strokeDash": [3, 3], "strokeWidth": 1},
        "encoding": {channel: {"field": "threshold_km", "type": "quantitative", "scale": _distance_scale(), "axis": axis}},
    }


def _series_encoding() -> dict:
    return {
        "color": {"field": "field", "type": "nominal", "title": "prediction", "legend": {"labelExpr": _SERIES_EXPR},
                  "scale": {"range": [FINAL_COLOR, PHASE1_COLOR, "#7b3294", "#008837"]}},
        "strokeDash": {"field": "rev", "type": "nominal", "title": "revision"},
    }


def dvc_templates() -> dict[str, dict]:
    """Vega-Lite templates for ``dvc plots`` (dvc.yaml ``template: <name>``): distances on log axes from
    10 m to 20,000 km, the paper's thresholds drawn and named, one colour per prediction (final, Phase I)
    and one dash per revision, axes titled by dvc.yaml's ``x_label``/``y_label``.

    They are files in ``.dvc/plots`` because DVC reads them there; :func:`write_dvc_templates` writes
    them and the tests check the committed ones are these.
    """
    base = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": _A("TITLE"), "width": PLOT_WIDTH, "height": PLOT_HEIGHT,
            "data": {"values": _A("DATA")}}
    distance_x = {"field": _A("X"), "type": "quantitative", "title": _A("X_LABEL"), "scale": _distance_scale(), "axis": _distance_axis()}
    percent_y = {"field": _A("Y"), "type": "quantitative", "title": _A("Y_LABEL"), "scale": {"domain": [0, 100]}}
    tooltip = [{"field": "rev"}, {"field": "field", "title": "prediction"},
               {"field": _A("X"), "type": "quantitative", "format": ".4~g"}, {"field": _A("Y"), "type": "quantitative", "format": ".4~g"}]
    accuracy = base | {"layer": [
        {"layer": [  # the curves, and a point where each crosses a reported threshold (the metrics/eval.json value)
            {"mark": {"type": "line", "strokeWidth": 2}, "encoding": {"x": distance_x, "y": percent_y, **_series_encoding()}},
            {"transform": [{"filter": "isValid(datum.label) && datum.label != ''"}],
             "mark": {"type": "point", "filled": True, "size": 45},
             "encoding": {"x": distance_x, "y": percent_y, **_series_encoding(), "tooltip": [*tooltip, {"field": "label", "title": "metric"}]}},
        ]},
        _threshold_layer("x"),
    ], "resolve": {"axis": {"x": "independent"}}}
    percentile_x = {"field": _A("X"), "type": "quantitative", "title": _A("X_LABEL"), "scale": {"domain": [0, 100]}}
    distance_y = {"field": _A("Y"), "type": "quantitative", "title": _A("Y_LABEL"), "scale": _distance_scale(), "axis": _distance_axis()}
    cdf = base | {"layer": [
        {"mark": {"type": "line", "strokeWidth": 2}, "encoding": {"x": percentile_x, "y": distance_y, **_series_encoding(), "tooltip": tooltip}},
        _threshold_layer("y"),
    ], "resolve": {"axis": {"y": "independent"}}}
    return {"error_cdf": cdf, "accuracy_by_threshold": accuracy}


def write_dvc_templates(directory: str | Path) -> list[Path]:
    """Write :func:`dvc_templates` as ``<directory>/<name>.json`` (the repository keeps them in .dvc/plots)."""
    out = []
    for name, spec in dvc_templates().items():
        path = Path(directory) / f"{name}.json"
        write_json_atomic(path, spec)
        out.append(path)
    return out


# --- maps: what is drawn ----------------------------------------------------------------------------

TRUTH_COLOR = "#1a9641"  # green
PHASE1_COLOR = "#2b83ba"  # blue, dashed
FINAL_COLOR = "#d7191c"  # red; by confidence: CONFIDENCE_COLORS, low to high
CONFIDENCE_COLORS = ("#fed976", "#feb24c", "#fd8d3c", "#e31a1c", "#800026")  # ColorBrewer YlOrRd
SEA_COLOR, LAND_COLOR, BORDER_COLOR = "#aad3df", "#f2efe9", "#9a9a9a"  # OpenStreetMap's own palette
STATIC_FORMATS = ("png", "svg", "pdf")  # what matplotlib writes here; the extension picks one
HTML_SUFFIXES = (".html", ".htm")
MIN_VIEW_KM = 1.0  # a map is at least this wide, so a standing camera still shows its surroundings
OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
OSM_ATTRIBUTION = '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'


class _Track:
    """One line of a map: ``key`` in truth / phase1 / final, coordinates (N,) in degrees (NaN = no point)."""

    def __init__(self, key: str, label: str, lat, lon):
        self.key, self.label = key, label
        self.lat, self.lon = np.asarray(lat, np.float64).ravel(), np.asarray(lon, np.float64).ravel()
        if self.lat.shape != self.lon.shape:
            raise VizError(f"{label}: {self.lat.size} latitudes but {self.lon.size} longitudes")
        self.ok = np.isfinite(self.lat) & np.isfinite(self.lon)


def _tracks(lat, lon, gt_lat, gt_lon, phase1) -> list[_Track]:
    """The lines to draw, in drawing order: ground truth, Phase I, final (last: on top)."""
    tracks = []
    if (gt_lat is None) != (gt_lon is None):
        raise VizError("ground truth needs both gt_lat and gt_lon")
    if gt_lat is not None:
        tracks.append(_Track("truth", "ground truth", gt_lat, gt_lon))
    if phase1 is not None:
        tracks.append(_Track("phase1", "Phase I", phase1[0], phase1[1]))
    final = _Track("final", "final", lat, lon)
    tracks.append(final)
    for t in tracks:
        if t.lat.size != final.lat.size:
            raise VizError(f"{t.label} has {t.lat.size} points but the prediction {final.lat.size}; one per frame")
    return tracks


class _View:
    """A square map window about the tracks: centre (lat0, lon0), half-width in km and degrees.
    Longitudes are unwrapped to lon0 +- 180, so a track across the antimeridian stays one line."""

    def __init__(self, tracks: list[_Track], name: str):
        lat = np.concatenate([t.lat[t.ok] for t in tracks])
        lon = np.concatenate([t.lon[t.ok] for t in tracks])
        if lat.size == 0:
            raise VizError(f"nothing to draw for {name}: every coordinate is missing")
        box = bounding_box(lat, lon)
        self.lat0 = (box.lat_min + box.lat_max) / 2
        self.lon0 = float((box.lon_min + box.lon_span_deg / 2 + 180.0) % 360.0 - 180.0)
        kmpd_lon = max(float(km_per_deg_lon(self.lat0)), 1e-3)
        span_km = max(box.lon_span_deg * kmpd_lon, (box.lat_max - box.lat_min) * KM_PER_DEG_LAT, MIN_VIEW_KM)
        self.half_km = 0.5 * span_km * 1.2
        self.half_lat = self.half_km / KM_PER_DEG_LAT
        self.half_lon = min(self.half_km / kmpd_lon, 180.0)
        self.aspect = 1.0 / max(math.cos(math.radians(self.lat0)), 0.05)  # y/x data ratio: true shapes at lat0

    def unwrap(self, lon) -> np.ndarray:
        return (np.asarray(lon, np.float64) - self.lon0 + 180.0) % 360.0 - 180.0 + self.lon0

    @property
    def xlim(self) -> tuple[float, float]:
        return self.lon0 - self.half_lon, self.lon0 + self.half_lon

    @property
    def ylim(self) -> tuple[float, float]:
        return max(self.lat0 - self.half_lat, -90.0), min(self.lat0 + self.half_lat, 90.0)


def _place_label(p: basemap.Place) -> str:
    country = basemap.country_names().get(p.country_code, p.country_code)
    return f"{p.name}, {country}"


def _where(tracks: list[_Track], view: _View) -> tuple[tuple[float, float], str]:
    """The reference point of a map (centre of the ground truth when known, else of the final
    prediction) and where it is in words."""
    order = {"truth": 0, "final": 1, "phase1": 2}
    ref = min((t for t in tracks if t.ok.any()), key=lambda t: order[t.key])  # _View made sure one has a point
    near = (float(np.mean(ref.lat[ref.ok])), float(np.mean(view.unwrap(ref.lon[ref.ok]))))
    return near, basemap.describe(*near)


def _confidence_colors(confidence: np.ndarray) -> list[str]:
    """Hex colour per value in [0, 1] on CONFIDENCE_COLORS (linear between stops; NaN = lowest)."""
    stops = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in CONFIDENCE_COLORS], np.float64)  # (S, 3)
    x = np.clip(np.nan_to_num(np.asarray(confidence, np.float64), nan=0.0), 0.0, 1.0) * (len(stops) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(stops) - 2)
    rgb = stops[lo] + (x - lo)[:, None] * (stops[lo + 1] - stops[lo])  # (N, 3)
    return ["#{:02x}{:02x}{:02x}".format(*c) for c in np.round(rgb).astype(int)]


def map_format(path: str | Path) -> str:
    """``html`` or a static format of STATIC_FORMATS, from the file's extension; anything else is refused."""
    suffix = Path(path).suffix.lower()
    if suffix in HTML_SUFFIXES:
        return "html"
    if suffix.lstrip(".") in STATIC_FORMATS:
        return suffix.lstrip(".")
    raise VizError(f"cannot draw a map as {Path(path).name!r}: the file name must end in .html, "
                   + ", ".join(f".{f}" for f in STATIC_FORMATS))


def trajectory_map(path: str | Path, lat, lon, gt_lat=None, gt_lon=None, **kwargs) -> Path:
    """A map of one trajectory; the format follows the extension (.html, .png, .svg, .pdf; others refused).

    ``gt_lat``/``gt_lon``: ground truth; keyword ``phase1=(lat, lon)``, ``confidence`` (per frame, in
    [0, 1]), ``title``; HTML maps also take ``candidates`` (the top-K table of vidtag.outputs),
    ``frame_index`` and ``timestamp_s`` for the frames' tooltips (static maps leave them out). All
    per-frame inputs are aligned.
    """
    fmt = map_format(path)
    if fmt == "html":
        return trajectory_map_html(path, lat, lon, gt_lat, gt_lon, **kwargs)
    html_only = ("candidates", "frame_index", "timestamp_s")  # interactive layers and tooltips
    return trajectory_map_static(path, lat, lon, gt_lat, gt_lon, **{k: v for k, v in kwargs.items() if k not in html_only})


# --- static maps (matplotlib) -----------------------------------------------------------------------


def _degree_formatter(axis: str, step_deg: float):
    from matplotlib.ticker import FuncFormatter

    decimals = max(0, min(5, -math.floor(math.log10(max(step_deg, 1e-9)))))

    def fmt(v, _pos=None):
        if axis == "lat":
            return f"{abs(v):.{decimals}f}°{'N' if v >= 0 else 'S'}"
        v = (v + 180.0) % 360.0 - 180.0
        return f"{abs(v):.{decimals}f}°{'E' if v >= 0 else 'W'}"

    return FuncFormatter(fmt)


def trajectory_map_static(path: str | Path, lat, lon, gt_lat=None, gt_lon=None, *, title: str = "",
                          phase1: tuple | None = None, confidence=None, dpi: int = 110) -> Path:
    """Draw a trajectory over country outlines and place names with a scale bar; PNG, SVG or PDF by the
    extension. Ground truth, Phase I and final are distinct lines, final on top (coloured by
    ``confidence`` when given)."""
    fmt = map_format(path)
    if fmt not in STATIC_FORMATS:
        raise VizError(f"{Path(path).name}: a static map is one of {', '.join(STATIC_FORMATS)}; HTML maps come from trajectory_map")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath
    from matplotlib.ticker import MaxNLocator
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    tracks = _tracks(lat, lon, gt_lat, gt_lon, phase1)
    view = _View(tracks, title or str(path))
    (x0, x1), (y0, y1) = view.xlim, view.ylim
    # a pale box behind names keeps them legible over lines and borders, and text (not outlines) in SVG/PDF
    label_box = dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none", alpha=0.6)

    with matplotlib.rc_context({"svg.hashsalt": "vidtag", "svg.fonttype": "none"}):  # same file for the same map
        fig, ax = plt.subplots(figsize=(6.4, 6.4))
        ax.set_facecolor(SEA_COLOR)
        for c in basemap.countries():
            for k in (-360.0, 0.0, 360.0):  # the map may reach past ±180
                if c.lon_max + k < x0 or c.lon_min + k > x1 or c.lat_max < y0 or c.lat_min > y1:
                    continue
                for poly in c.polygons:
                    mpl_path = MplPath.make_compound_path(*[MplPath(ring + [k, 0.0], closed=True) for ring in poly])
                    ax.add_patch(PathPatch(mpl_path, facecolor=LAND_COLOR, edgecolor=BORDER_COLOR, lw=0.7, zorder=1))
                if view.half_km > 250:  # country names only where countries fit in the window
                    cx, cy = c.label_point()
                    if x0 < cx + k < x1 and y0 < cy < y1:
                        ax.text(cx + k, cy, c.name, fontsize=8, style="italic", color="#666", ha="center", va="center",
                                zorder=2, clip_on=True, bbox=label_box)
        near, where = _where(tracks, view)  # ground truth when known: name where the video really is
        places = basemap.places_in(y0, y1, x0, x1, max_places=10, near=near)
        for p in places:
            ax.plot([p.lon], [p.lat], "o", color="#333", ms=3, zorder=3, clip_on=True)
            ax.annotate(p.name, (p.lon, p.lat), xytext=(4, 3), textcoords="offset points", fontsize=8, color="#222",
                        zorder=3, annotation_clip=True, clip_on=True, bbox=label_box)

        style = {"truth": dict(color=TRUTH_COLOR, ls="-", lw=2.6), "phase1": dict(color=PHASE1_COLOR, ls="--", lw=1.8),
                 "final": dict(color=FINAL_COLOR, ls="-", lw=2.2)}
        conf = None if confidence is None else np.asarray(confidence, np.float64).ravel()
        if conf is not None and conf.size != tracks[-1].lat.size:
            raise VizError(f"confidence has {conf.size} values but the prediction {tracks[-1].lat.size} frames")
        for z, t in enumerate(tracks, start=4):
            x, y = view.unwrap(t.lon[t.ok]), t.lat[t.ok]
            marker = "." if len(x) < 60 and t.key == "truth" else None  # frames of the truth; Phase I stays a plain dash
            if t.key == "final" and conf is not None:
                cmap = LinearSegmentedColormap.from_list("confidence", CONFIDENCE_COLORS)
                pts = np.stack([x, y], axis=1)
                segs = np.stack([pts[:-1], pts[1:]], axis=1)  # (N-1, 2, 2)
                c = conf[t.ok]
                lc = LineCollection(segs, cmap=cmap, norm=plt.Normalize(0, 1), lw=2.6, zorder=z, gid=f"track-{t.key}")
                lc.set_array((c[:-1] + c[1:]) / 2)
                ax.add_collection(lc)
                sc = ax.scatter(x, y, c=c, cmap=cmap, vmin=0, vmax=1, s=14, zorder=z, edgecolors="#400", linewidths=0.3)
                ax.plot([], [], color=CONFIDENCE_COLORS[-2], lw=2.6, label="final (colour: confidence)")
                cbar = fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.02, shrink=0.6)
                cbar.set_label("confidence", fontsize=8)
                cbar.ax.tick_params(labelsize=7)
            else:
                ax.plot(x, y, marker=marker, ms=4, zorder=z, label=t.label, gid=f"track-{t.key}", **style[t.key])
            ax.plot(x[:1], y[:1], "o", color=style[t.key]["color"], ms=7, mfc="white", mew=1.8, zorder=z)
        ax.plot([], [], "o", color="#555", mfc="white", ms=6, label="start")

        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect(view.aspect, adjustable="box")
        for axis, name in ((ax.xaxis, "lon"), (ax.yaxis, "lat")):
            axis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(_degree_formatter("lon", view.half_lon / 2))
        ax.yaxis.set_major_formatter(_degree_formatter("lat", view.half_lat / 2))
        ax.tick_params(labelsize=8)
        bar_km = nice_length_km(2 * view.half_km)
        ax.add_artist(AnchoredSizeBar(ax.transData, bar_km / float(km_per_deg_lon(view.lat0)), distance_label(bar_km),
                                      "lower left", pad=0.4, borderpad=0.6, sep=3, frameon=True, size_vertical=0,
                                      fontproperties={"size": 8}))
        ax.text(0.995, 0.005, basemap.ATTRIBUTION, transform=ax.transAxes, fontsize=6, color="#444", ha="right", va="bottom",
                zorder=10, bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=1.5))
        ax.set_title(f"{title}\nnear {where}" if title else f"near {where}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        fig.tight_layout()
        path = Path(path)
        metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata)
        plt.close(fig)
    return path


# The evaluation stage draws its sample maps through this name.
trajectory_map_png = trajectory_map_static


def nice_length_km(span_km: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^n km) about a fifth of ``span_km``."""
    target = max(span_km / 5.0, 1e-3)
    base = 10.0 ** math.floor(math.log10(target))
    return max(m * base for m in (1, 2, 5) if m * base <= target)


# --- HTML maps (Leaflet, inline) --------------------------------------------------------------------

LEAFLET_DIR = basemap.ASSETS_DIR / "leaflet"
MAP_SCRIPT = basemap.ASSETS_DIR / "trajectory_map.js"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<!-- Leaflet 1.9.4 (BSD-2-Clause, (c) Volodymyr Agafonkin), inlined: this page needs no network but for tiles -->
<style>
{leaflet_css}
</style>
<style>
html, body, #map {{ height: 100%; margin: 0; }}
#map {{ background: {sea}; font: 13px/1.4 system-ui, sans-serif; }}
.vidtag-place span {{ white-space: nowrap; font-size: 12px; color: #222; text-shadow: 0 0 2px #fff, 0 0 2px #fff, 0 0 3px #fff; }}
.vidtag-place i {{ display: inline-block; width: 6px; height: 6px; border-radius: 3px; background: #333; margin-right: 3px; }}
.vidtag-legend {{ background: rgba(255,255,255,0.92); padding: 6px 9px; border-radius: 4px; box-shadow: 0 1px 4px rgba(0,0,0,0.3); }}
.vidtag-legend .swatch {{ display: inline-block; width: 28px; height: 0; vertical-align: middle; margin-right: 6px; }}
.vidtag-legend .ramp {{ display: inline-block; width: 90px; height: 9px; vertical-align: middle; margin: 0 4px; }}
.vidtag-legend .status {{ color: #555; font-size: 11px; margin-top: 3px; max-width: 260px; }}
</style>
</head>
<body>
<div id="map"></div>
<script>
{leaflet_js}
</script>
<script type="application/json" id="vidtag-data">{data}</script>
<script>
{map_js}
</script>
</body>
</html>
"""


def _json_for_script(obj) -> str:
    """JSON safe inside a <script> element (no "</script>" or "<!--" can appear)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _frame_tips(n: int, label: str, frame_index, timestamp_s, confidence, lat, lon) -> list[str]:
    idx = np.arange(n) if frame_index is None else np.asarray(frame_index).ravel()
    parts = [f"{label}, frame {int(i)}" for i in idx]
    if timestamp_s is not None:
        parts = [f"{p}, {t:.1f} s" for p, t in zip(parts, np.asarray(timestamp_s, np.float64).ravel())]
    if confidence is not None:
        parts = [f"{p}, confidence {c:.2f}" for p, c in zip(parts, np.asarray(confidence, np.float64).ravel())]
    return [f"{p}<br>{la:.5f}, {lo:.5f}" for p, la, lo in zip(parts, lat, lon)]


def _candidates_data(candidates, view: _View) -> list:
    """[[lat, lon, tooltip], ...] of a top-K table (frame_index, rank, lat, lon, score), as vidtag.outputs writes."""
    need = {"frame_index", "rank", "lat", "lon"}
    missing = need - set(candidates.columns)
    if missing:
        raise VizError(f"candidates table lacks column(s) {sorted(missing)}; it needs frame_index, rank, lat, lon (score optional)")
    c = candidates.filter(pl.col("lat").is_not_null() & pl.col("lon").is_not_null()).sort("frame_index", "rank")
    score = c["score"].to_list() if "score" in c.columns else [None] * c.height
    return [[round(la, 6), round(float(view.unwrap(lo)), 6),
             f"frame {int(f)}, candidate {int(r)}" + (f", score {s:.3f}" if s is not None else "")]
            for f, r, la, lo, s in zip(c["frame_index"].to_list(), c["rank"].to_list(), c["lat"].to_list(), c["lon"].to_list(), score)]


def trajectory_map_html(path: str | Path, lat, lon, gt_lat=None, gt_lon=None, *, title: str = "", phase1: tuple | None = None,
                        confidence=None, candidates: pl.DataFrame | None = None, frame_index=None, timestamp_s=None) -> Path:
    """A self-contained interactive map: Leaflet, its CSS, the outline, places and tracks inline.

    OpenStreetMap tiles are the base when the browser is online; beneath them (and alone offline) the
    drawn land, sea, borders and place names. Ground truth, Phase I and final are layers in that order
    (final on top, coloured by ``confidence`` when given); ``candidates`` (top-K per frame) is a layer
    switched off until asked for.
    """
    tracks = _tracks(lat, lon, gt_lat, gt_lon, phase1)
    view = _View(tracks, title or str(path))
    final = tracks[-1]
    conf = None if confidence is None else np.asarray(confidence, np.float64).ravel()
    if conf is not None and conf.size != final.lat.size:
        raise VizError(f"confidence has {conf.size} values but the prediction {final.lat.size} frames")
    for name, v in (("frame_index", frame_index), ("timestamp_s", timestamp_s)):
        if v is not None and np.asarray(v).size != final.lat.size:
            raise VizError(f"{name} has {np.asarray(v).size} values but the prediction {final.lat.size} frames")

    layers = []
    color = {"truth": TRUTH_COLOR, "phase1": PHASE1_COLOR, "final": FINAL_COLOR}
    for t in tracks:
        lon_u = view.unwrap(t.lon)
        pts = [[round(float(a), 6), round(float(b), 6)] for a, b in zip(t.lat[t.ok], lon_u[t.ok])]
        sel = lambda v: None if v is None else np.asarray(v).ravel()[t.ok]  # noqa: E731
        tips = _frame_tips(int(t.ok.sum()), t.label, sel(frame_index), sel(timestamp_s),
                           sel(conf) if t.key == "final" else None, t.lat[t.ok], t.lon[t.ok])
        layers.append({"key": t.key, "label": t.label, "color": color[t.key], "points": pts, "tips": tips,
                       "colors": _confidence_colors(conf[t.ok]) if (t.key == "final" and conf is not None) else None})
    (x0, x1), (y0, y1) = view.xlim, view.ylim
    # place names for the first view (a box 3x the map's) and for zooming out (the largest places
    # within 50 and 300 km at least), so the map stays named at every scale a person looks at
    near, where = _where(tracks, view)
    places: dict[tuple, basemap.Place] = {}
    for scale, half_km, n, sep in ((3.0, 0.0, 24, 0.05), (10.0, 50.0, 12, 0.1), (30.0, 300.0, 16, 0.1)):
        h_lat = max(scale * view.half_km, half_km) / KM_PER_DEG_LAT
        h_lon = min(max(scale * view.half_km, half_km) / max(float(km_per_deg_lon(view.lat0)), 1e-3), 180.0)
        for p in basemap.places_in(max(view.lat0 - h_lat, -90), min(view.lat0 + h_lat, 90), view.lon0 - h_lon,
                                   view.lon0 + h_lon, max_places=n, min_separation=sep, near=near):
            places.setdefault((p.name, p.lat, p.lon), p)
    data = {
        "title": title,
        "where": where,
        "tiles": {"url": OSM_TILES, "attribution": OSM_ATTRIBUTION},
        "attribution": basemap.ATTRIBUTION,
        "colors": {"sea": SEA_COLOR, "land": LAND_COLOR, "border": BORDER_COLOR, "confidence": list(CONFIDENCE_COLORS)},
        "countries": basemap.countries_geojson(),
        "places": [{"name": p.name, "lat": round(p.lat, 5), "lon": round(p.lon, 5),
                    "tip": f"{_place_label(p)} ({p.population:,} people)"} for p in places.values()],
        "tracks": layers,
        "candidates": None if candidates is None else _candidates_data(candidates, view),
        "bounds": [[y0, x0], [y1, x1]],
    }
    page = _PAGE.format(
        title=html.escape(title or "vidtag trajectory"), sea=SEA_COLOR,
        leaflet_css=(LEAFLET_DIR / "leaflet.css").read_text(encoding="utf-8"),
        leaflet_js=(LEAFLET_DIR / "leaflet.js").read_text(encoding="utf-8"),
        data=_json_for_script(data), map_js=MAP_SCRIPT.read_text(encoding="utf-8"),
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
