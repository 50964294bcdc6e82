"""Plots of an evaluation: error CDF and accuracy-by-threshold data for ``dvc plots``, and trajectory
maps (ground truth vs. prediction, like the paper's Fig. 6) drawn offline with matplotlib.

Maps use a local kilometre projection (equirectangular about the trajectory's centre, exact enough
for the tens of kilometres a video spans) so that the scale bar is true; no tile server is needed.
HTML maps (folium) are the one exception: the file is written offline, the browser loads the tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from vidtag.geo import KM_PER_DEG_LAT, km_per_deg_lon
from vidtag.io import atomic_path
from vidtag.metrics import THRESHOLDS_KM, acc_key

CDF_POINTS = 200  # rows in the error-CDF data file: enough for a smooth curve, small for DVC
# The accuracy curve runs on a log-spaced grid from the smallest reported threshold up to 2500 km (the
# continent scale of image geolocation), with every threshold of metrics.THRESHOLDS_KM on it exactly.
CURVE_MAX_KM = 2500.0
CURVE_POINTS_PER_DECADE = 8


def threshold_grid_km(max_km: float = CURVE_MAX_KM, per_decade: int = CURVE_POINTS_PER_DECADE) -> np.ndarray:
    """Sorted thresholds for the accuracy curve: log-spaced from min(THRESHOLDS_KM) to ``max_km``,
    plus THRESHOLDS_KM exactly (a grid point within a third of a grid step of one gives way to it)."""
    marks = np.asarray(THRESHOLDS_KM, dtype=np.float64)
    lo = float(marks.min())
    n = max(2, int(round(per_decade * math.log10(max_km / lo))) + 1)
    grid = np.geomspace(lo, max_km, n)
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


def local_km(lat, lon, lat0: float, lon0: float) -> tuple[np.ndarray, np.ndarray]:
    """(east_km, north_km) of points relative to (lat0, lon0), equirectangular; longitudes unwrapped."""
    dlon = (np.asarray(lon, np.float64) - lon0 + 180.0) % 360.0 - 180.0
    return dlon * km_per_deg_lon(lat0), (np.asarray(lat, np.float64) - lat0) * KM_PER_DEG_LAT


def nice_length_km(span_km: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^n km) about a fifth of ``span_km``."""
    target = max(span_km / 5.0, 1e-3)
    base = 10.0 ** math.floor(math.log10(target))
    return max(m * base for m in (1, 2, 5) if m * base <= target)


def _scale_label(length_km: float) -> str:
    return f"{length_km * 1000:g} m" if length_km < 1 else f"{length_km:g} km"


def trajectory_map_png(
    path: str | Path,
    lat,
    lon,
    gt_lat=None,
    gt_lon=None,
    *,
    title: str = "",
    phase1: tuple | None = None,
    dpi: int = 110,
) -> Path:
    """Draw a predicted trajectory (and the ground truth when given) in local km with a scale bar; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    tracks = [("prediction", lat, lon, "tab:red", "-")]
    if phase1 is not None:
        tracks.append(("Phase I", np.asarray(phase1[0], np.float64), np.asarray(phase1[1], np.float64), "tab:orange", ":"))
    if gt_lat is not None:
        tracks.insert(0, ("ground truth", np.asarray(gt_lat, np.float64), np.asarray(gt_lon, np.float64), "tab:green", "-"))
    ref_lat = tracks[0][1]
    ref_lon = tracks[0][2]
    ok = np.isfinite(ref_lat) & np.isfinite(ref_lon)
    if not ok.any():
        raise ValueError(f"nothing to draw for {title or path}: every coordinate is missing")
    lat0 = float(np.mean(ref_lat[ok]))
    lon0 = float(np.degrees(np.arctan2(np.sin(np.radians(ref_lon[ok])).mean(), np.cos(np.radians(ref_lon[ok])).mean())))

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    xs, ys = [], []
    for label, la, lo, color, style in tracks:
        x, y = local_km(la, lo, lat0, lon0)
        ax.plot(x, y, style, color=color, lw=1.8, label=label, marker="." if len(x) < 60 else None, ms=4)
        ax.plot(x[:1], y[:1], "o", color=color, ms=7, mfc="white")  # start
        xs.append(x[np.isfinite(x)]), ys.append(y[np.isfinite(y)])
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    span = max(float(np.ptp(x_all)), float(np.ptp(y_all)), 0.05)
    pad = 0.12 * span
    cx, cy = (x_all.min() + x_all.max()) / 2, (y_all.min() + y_all.max()) / 2
    ax.set_xlim(cx - span / 2 - pad, cx + span / 2 + pad)
    ax.set_ylim(cy - span / 2 - pad, cy + span / 2 + pad)
    ax.set_aspect("equal")
    bar = nice_length_km(span)
    x0, y0 = cx - span / 2, cy - span / 2 - 0.6 * pad
    ax.plot([x0, x0 + bar], [y0, y0], color="black", lw=3, solid_capstyle="butt")
    ax.text(x0 + bar / 2, y0 + 0.15 * pad, _scale_label(bar), ha="center", va="bottom", fontsize=9)
    ax.set_xlabel("east (km)")
    ax.set_ylabel("north (km)")
    ax.set_title(f"{title}\ncentre {lat0:.4f}, {lon0:.4f}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def trajectory_map_html(path: str | Path, lat, lon, *, title: str = "", confidence=None) -> Path:
    """An interactive folium map of a predicted trajectory (tiles load in the browser, not here)."""
    import folium

    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    ok = np.isfinite(lat) & np.isfinite(lon)
    if not ok.any():
        raise ValueError(f"nothing to draw for {title or path}: every coordinate is missing")
    pts = np.stack([lat[ok], lon[ok]], axis=1).tolist()
    m = folium.Map(location=[float(lat[ok].mean()), float(lon[ok].mean())], zoom_start=13, control_scale=True)
    folium.PolyLine(pts, color="red", weight=3, tooltip=title or "prediction").add_to(m)
    conf = np.asarray(confidence, np.float64)[ok] if confidence is not None else None
    for i, (la, lo) in enumerate(pts):
        tip = f"frame {int(np.flatnonzero(ok)[i])}" + (f", confidence {conf[i]:.2f}" if conf is not None else "")
        folium.CircleMarker([la, lo], radius=3, color="red", fill=True, tooltip=tip).add_to(m)
    m.fit_bounds([[min(p[0] for p in pts), min(p[1] for p in pts)], [max(p[0] for p in pts), max(p[1] for p in pts)]])
    if title:
        m.get_root().html.add_child(folium.Element(f"<title>{title}</title>"))
    path = Path(path)
    with atomic_path(path) as tmp:
        m.save(str(tmp))
    return path


def trajectory_map(path: str | Path, lat, lon, **kwargs) -> Path:
    """PNG, or HTML when ``path`` ends in .html (``gt_lat``/``gt_lon``/``phase1`` only drawn in PNGs)."""
    if str(path).lower().endswith((".html", ".htm")):
        return trajectory_map_html(path, lat, lon, title=kwargs.get("title", ""), confidence=kwargs.get("confidence"))
    kwargs.pop("confidence", None)
    return trajectory_map_png(path, lat, lon, **kwargs)
