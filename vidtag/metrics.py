"""Evaluation metrics of the paper (Sec. 4.3, Appendix E): distance accuracy, trajectory quality, plus
trajectory-shape diagnostics (path-length ratio, distinct points vs gallery cells, DFD/MRD over the
sequences placed in the right city) that are not in the paper.

Everything is pure numpy, vectorised over frames and sequences, and does no I/O.

Conventions (recorded here once, used by every function below):

- Accuracies are **percent** in [0, 100] (the paper's tables), floats, not rounded. A frame counts as
  correct at threshold t when its error is ``<= t`` km (GeoCLIP's ``distance_accuracy`` uses ``<=``).
- Distances in km are great-circle (``vidtag.geo.haversine_km``, mean Earth radius).
- ``deg`` metrics are Euclidean in raw (lat, lon) degrees, the paper's unit for DFD and MRD (its GAMa
  DFD of 0.39 beside a 0.88 km median error cannot be kilometres). Raw degrees are not
  antimeridian-safe for DFD; use the ``km`` variants for trajectories that cross ±180.
- Centroids (Appendix E.1) are the normalised mean of the points' unit vectors on the sphere: safe
  across the antimeridian and near the poles, unlike a mean of degrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from vidtag.geo import EARTH_RADIUS_KM, KM_PER_DEG_LAT, haversine_km, km_per_deg_lon, unit_vectors, validate_latlon, wrap_lon

# The one set of accuracy thresholds (vidtag.viz imports it): Sec. 4.3's 0.5 / 1 / 5 / 25 km (Tables 1-2)
# plus 0.1 and 0.25 km, which tell a per-frame trajectory from one point per video on drives of a few km.
THRESHOLDS_KM = (0.1, 0.25, 0.5, 1.0, 5.0, 25.0)
# A sequence is "placed in the right city" when its video-level error (Appendix E.1) is within Sec. 4.3's
# 25 km threshold, the city scale; counted with <= like the accuracies, so n_right_city equals
# video acc_25km x n_sequences / 100.
RIGHT_CITY_KM = 25.0
# Sequences whose true path is shorter than this (a parked camera, one frame) have no path-length ratio.
MIN_TRUE_PATH_KM = 1e-6
# Nearest-gallery search: at most this many (query x gallery) dot products held at once (8 bytes each).
NN_BLOCK = 1 << 22
LABEL_LEVELS = ("city", "state", "country", "continent")  # CityGuessr68k hierarchy (Table 3)
METRICS = ("deg", "km")
PREDICTION_COLUMNS = ("sequence_id", "frame_index", "lat", "lon", "gt_lat", "gt_lon")


def acc_key(threshold_km: float) -> str:
    """Metrics-format key of an accuracy threshold: 0.5 -> ``"acc_0.5km"``, 1.0 -> ``"acc_1km"``."""
    return f"acc_{threshold_km:g}km"


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


# ----------------------------------------------------------------------------------------------
# Distance accuracy (Sec. 4.3) and centroids (Appendix E.1)


def accuracy_at(dist_km, thresholds_km: Sequence[float] = THRESHOLDS_KM) -> dict[str, float]:
    """Percent of errors ``<= t`` for each threshold, plus the median error, as the metrics format keys."""
    d = np.asarray(dist_km, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("accuracy_at needs at least one distance, got an empty array")
    out = {acc_key(t): float(100.0 * np.mean(d <= t)) for t in thresholds_km}
    out["median_km"] = float(np.median(d))
    return out


def _segment_centroids(lat: np.ndarray, lon: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spherical centroid of each segment ``[starts[s], starts[s+1])`` of the point list -> (S,), (S,)."""
    xyz = np.add.reduceat(unit_vectors(lat, lon), starts, axis=0)  # (N, 3) -> (S, 3)
    norm = np.linalg.norm(xyz, axis=1)
    # Points symmetric about the Earth's centre have no centroid; we fall back to the segment's
    # first point rather than invent one (never happens for real trajectories).
    degenerate = norm < 1e-12
    xyz[degenerate] = unit_vectors(lat[starts[degenerate]], lon[starts[degenerate]])
    norm[degenerate] = 1.0
    xyz /= norm[:, None]
    c_lat = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0)))
    c_lon = wrap_lon(np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])))
    return c_lat, c_lon


def spherical_centroid(lat, lon) -> tuple[float, float]:
    """Centroid (lat, lon) in degrees of points on the sphere: normalised mean of unit vectors."""
    lat = np.asarray(lat, dtype=np.float64).ravel()
    lon = np.asarray(lon, dtype=np.float64).ravel()
    if lat.size == 0:
        raise ValueError("spherical_centroid needs at least one point")
    c_lat, c_lon = _segment_centroids(lat, lon, np.array([0]))
    return float(c_lat[0]), float(c_lon[0])


def _segment_representatives(lat: np.ndarray, lon: np.ndarray, starts: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Row index, per segment, of the point nearest the segment's centroid (Appendix E.1 step 3).

    Ties go to the earliest frame (lexsort is stable).
    """
    c_lat, c_lon = _segment_centroids(lat, lon, starts)
    d = haversine_km(lat, lon, c_lat[seg], c_lon[seg])
    order = np.lexsort((d, seg))  # by segment, then distance
    return order[starts]


def _segment_median(values: np.ndarray, seg: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    order = np.lexsort((values, seg))
    v = values[order]
    return 0.5 * (v[starts + (lengths - 1) // 2] + v[starts + lengths // 2])


# ----------------------------------------------------------------------------------------------
# Discrete Fréchet distance (Appendix E.2; Eiter & Mannila 1994)


def _as_curve(x, name: str, metric: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be an (n, 2) array of (lat, lon) with n >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates; drop or fix those points first")
    if metric == "km" and not validate_latlon(a[:, 0], a[:, 1]).all():
        bad = int(np.flatnonzero(~validate_latlon(a[:, 0], a[:, 1]))[0])
        raise ValueError(f"{name}[{bad}] = {a[bad].tolist()} is not a (lat, lon) in [-90, 90] x [-180, 180]")
    return a


def _cost_into(x: np.ndarray, a: np.ndarray, b: np.ndarray, metric: str) -> None:
    """DP costs of curve batches a (N, 2, P), b (M, 2, P) written into x (N, M, P).

    ``deg``: Euclidean distance. ``km``: the squared chord between unit vectors, a monotone function
    of the great-circle distance; min/max commute with monotone maps, so the DP runs on it and only
    the P answers are converted (:func:`_chord2_to_km`), sparing a trig call per cell.
    """
    if metric == "deg":
        dlat = a[:, None, 0, :] - b[None, :, 0, :]
        dlon = a[:, None, 1, :] - b[None, :, 1, :]
        np.sqrt(dlat * dlat + dlon * dlon, out=x)
        return
    ua, ub = unit_vectors(a[:, 0], a[:, 1]), unit_vectors(b[:, 0], b[:, 1])  # (N, P, 3), (M, P, 3)
    x[...] = 0.0
    for c in range(3):
        diff = ua[:, None, :, c] - ub[None, :, :, c]  # (N, M, P)
        x += diff * diff


def _chord2_to_km(chord2: np.ndarray) -> np.ndarray:
    """Great-circle km from the squared chord between unit vectors (haversine's a = chord2 / 4)."""
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.sqrt(chord2) / 2, 0.0, 1.0))


def _diagonals_from_grid(a: np.ndarray, b: np.ndarray, metric: str):
    """All anti-diagonals of the cost grid as a (K, N, P) view; memory N * K * P floats."""
    N, M, P = a.shape[0], b.shape[0], a.shape[2]
    K = N + M - 1
    # Cost grid (N, K, P), columns >= M set to inf. In the flat buffer, cell (i, k - i) sits at
    # k + i * (K - 1), so a strided view reads anti-diagonals without a copy; for i > k that address
    # falls in row i - 1 at a column >= M, i.e. on inf (off-grid cells never couple).
    grid = np.full((N, K, P), np.inf)
    _cost_into(grid[:, :M], a, b, metric)
    item = grid.itemsize
    return np.lib.stride_tricks.as_strided(grid, shape=(K, N, P), strides=(P * item, (K - 1) * P * item, item), writeable=False)


class _StreamedDiagonals:
    """Anti-diagonal k of the cost grid computed when asked: memory O(N * P) for very long curves."""

    def __init__(self, a: np.ndarray, b: np.ndarray, metric: str):
        self.metric, self.M = metric, b.shape[0]
        self.rows = np.arange(a.shape[0])
        if metric == "km":  # (3, N, P) / (3, M, P) unit vectors, as in _cost_into
            self.a = np.moveaxis(unit_vectors(a[:, 0], a[:, 1]), -1, 0)
            self.b = np.moveaxis(unit_vectors(b[:, 0], b[:, 1]), -1, 0)
        else:  # (2, N, P) / (2, M, P)
            self.a, self.b = np.moveaxis(a, 1, 0), np.moveaxis(b, 1, 0)

    def __getitem__(self, k: int) -> np.ndarray:
        j = k - self.rows
        off = (j < 0) | (j >= self.M)
        diff = self.a - self.b[:, np.clip(j, 0, self.M - 1)]  # (C, N, P)
        d = np.sum(diff * diff, axis=0)
        if self.metric == "deg":
            np.sqrt(d, out=d)
        d[off] = np.inf
        return d


def _frechet_batch(a: np.ndarray, b: np.ndarray, n: np.ndarray, m: np.ndarray, metric: str, max_cells: int) -> np.ndarray:
    """DFD of P zero-padded curve pairs a (N, 2, P), b (M, 2, P) with true lengths n, m -> (P,).

    The Eiter-Mannila recurrence ``ca[i, j] = max(d[i, j], min(ca[i-1, j], ca[i, j-1], ca[i-1, j-1]))``
    only links a cell to its up-left neighbours, so each anti-diagonal k = i + j depends on the two
    before it and is computed in one vectorised step over all its cells and all P pairs. Padding lies
    after each pair's last cell, so it never reaches the cell (n-1, m-1) that is read out.
    """
    N, M, P = a.shape[0], b.shape[0], a.shape[2]
    K = N + M - 1
    # A grid that would exceed max_cells (one curve of thousands of frames) is streamed instead.
    diagonals = _diagonals_from_grid(a, b, metric) if N * K * P <= max_cells else _StreamedDiagonals(a, b, metric)

    end_k = n + m - 2  # the diagonal holding each pair's answer
    finished = {int(k): np.flatnonzero(end_k == k) for k in np.unique(end_k)}
    out = np.empty(P)
    prev2 = np.full((N, P), np.inf)
    prev = np.array(diagonals[0])  # diagonal 0 is the single cell (0, 0)
    cur = np.empty((N, P))
    for k in range(1, K + 1):
        done = finished.get(k - 1)
        if done is not None:
            out[done] = prev[n[done] - 1, done]
        if k == K:
            break
        # cur[i] = max(d_k[i], min(left = prev[i], up = prev[i-1], diag = prev2[i-1]))
        np.minimum(prev[:-1], prev2[:-1], out=cur[1:])
        np.minimum(cur[1:], prev[1:], out=cur[1:])
        cur[0] = prev[0]
        np.maximum(cur, diagonals[k], out=cur)
        prev2, prev, cur = prev, cur, prev2
    return _chord2_to_km(out) if metric == "km" else out


def discrete_frechet_many(curves_a: Sequence, curves_b: Sequence, metric: str = "deg", max_cells: int = 1 << 21) -> np.ndarray:
    """DFD of each pair ``(curves_a[p], curves_b[p])`` -> (P,); curves are (n, 2) (lat, lon), any lengths.

    Pairs are sorted by size and run in batches of about ``max_cells`` DP cells (8 bytes each), so
    many short curves cost a few hundred numpy calls in total instead of a Python loop over every
    cell; a single pair larger than that is computed diagonal by diagonal in O(n) memory.
    """
    _check_metric(metric)
    if len(curves_a) != len(curves_b):
        raise ValueError(f"need as many curves in curves_a as in curves_b, got {len(curves_a)} and {len(curves_b)}")
    A = [_as_curve(x, f"curves_a[{p}]", metric) for p, x in enumerate(curves_a)]
    B = [_as_curve(x, f"curves_b[{p}]", metric) for p, x in enumerate(curves_b)]
    n = np.array([len(x) for x in A], dtype=np.int64)
    m = np.array([len(x) for x in B], dtype=np.int64)
    out = np.empty(len(A))
    order = np.lexsort((m, n))  # by n, so a batch's N is its last pair's n
    start = 0
    while start < len(order):
        stop, M = start + 1, m[order[start]]
        while stop < len(order):
            N2, M2 = n[order[stop]], max(M, m[order[stop]])
            if N2 * (N2 + M2 - 1) * (stop + 1 - start) > max_cells:
                break
            stop, M = stop + 1, M2
        sel = order[start:stop]
        N, M = int(n[sel[-1]]), int(M)
        a = np.zeros((N, 2, len(sel)))
        b = np.zeros((M, 2, len(sel)))
        for col, p in enumerate(sel):
            a[: n[p], :, col] = A[p]
            b[: m[p], :, col] = B[p]
        out[sel] = _frechet_batch(a, b, n[sel], m[sel], metric, max_cells)
        start = stop
    return out


def discrete_frechet(a, b, metric: str = "deg") -> float:
    """Discrete Fréchet distance between curves a (n, 2) and b (m, 2) of (lat, lon) degrees.

    ``deg``: Euclidean in degrees (paper's unit, equals ``similaritymeasures.frechet_dist``);
    ``km``: great-circle. Two single points give their distance.
    """
    _check_metric(metric)
    return float(discrete_frechet_many([_as_curve(a, "a", metric)], [_as_curve(b, "b", metric)], metric)[0])


# ----------------------------------------------------------------------------------------------
# Mean range difference (Appendix E.3)


def _segment_ranges(lat: np.ndarray, lon: np.ndarray, seg: np.ndarray, starts: np.ndarray, lengths: np.ndarray, metric: str):
    """Latitude range and longitude span of each segment -> (S,), (S,) in degrees or km.

    The longitude span is the shortest arc holding all the segment's longitudes (360° minus the
    largest gap between them on the circle), so a track crossing ±180 spans a few degrees, not ~360.
    When no gap is larger than the one across ±180 this is exactly max - min, as in Eq. 7.
    """
    lat_range = np.maximum.reduceat(lat, starts) - np.minimum.reduceat(lat, starts)
    lon = np.where((lon >= -180.0) & (lon < 180.0), lon, wrap_lon(lon))  # wrap only +180: keeps values exact
    order = np.lexsort((lon, seg))
    ls = lon[order]
    ends = starts + lengths - 1
    gaps = np.empty_like(ls)
    gaps[:-1] = ls[1:] - ls[:-1]
    wrap_gap = ls[starts] + 360.0 - ls[ends]
    gaps[ends] = wrap_gap  # each segment: its inner gaps, then the gap across ±180
    max_gap = np.maximum.reduceat(gaps, starts)
    lon_span = np.where(max_gap == wrap_gap, ls[ends] - ls[starts], 360.0 - max_gap)
    if metric == "km":
        # Longitude degrees shrink with cos(lat): each sequence converts at its own mean latitude.
        mean_lat = np.add.reduceat(lat, starts) / lengths
        return lat_range * KM_PER_DEG_LAT, lon_span * km_per_deg_lon(mean_lat)
    return lat_range, lon_span


def _concat(curves: list[np.ndarray]):
    """Curves (n_s, 2) -> lat (N,), lon (N,), segment of each point, segment starts and lengths."""
    lengths = np.array([len(c) for c in curves], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    seg = np.repeat(np.arange(len(curves)), lengths)
    pts = np.concatenate(curves, axis=0)
    return pts[:, 0], pts[:, 1], seg, starts, lengths


def range_differences(seqs_a: Sequence, seqs_b: Sequence, metric: str = "deg") -> np.ndarray:
    """Range difference (Eq. 7) of each sequence pair, mean over lat and lon -> (S,).

    Eq. 7 is 1-D; the paper adapts it to 2-D by computing it per dimension and taking the mean.
    Sequences are (n, 2) (lat, lon) in degrees, of any lengths; a single point has range 0.
    """
    _check_metric(metric)
    if isinstance(seqs_a, np.ndarray) or isinstance(seqs_b, np.ndarray):
        raise ValueError("seqs_a and seqs_b must be lists of (n, 2) arrays, one per sequence; wrap a single sequence in [ ]")
    if len(seqs_a) != len(seqs_b) or len(seqs_a) == 0:
        raise ValueError(f"need the same non-zero number of sequences on both sides, got {len(seqs_a)} and {len(seqs_b)}")
    A = [_as_curve(x, f"seqs_a[{s}]", "km") for s, x in enumerate(seqs_a)]
    B = [_as_curve(x, f"seqs_b[{s}]", "km") for s, x in enumerate(seqs_b)]
    ra = _segment_ranges(*_concat(A), metric)
    rb = _segment_ranges(*_concat(B), metric)
    return 0.5 * (np.abs(ra[0] - rb[0]) + np.abs(ra[1] - rb[1]))


def mean_range_difference(seqs_a: Sequence, seqs_b: Sequence, metric: str = "deg") -> float:
    """MRD (Appendix E.3): per-dimension range difference, averaged over lat and lon, then over sequences.

    ``deg`` uses degree ranges; ``km`` converts the latitude range with KM_PER_DEG_LAT and the
    longitude span with ``km_per_deg_lon`` at each sequence's own mean latitude.
    """
    return float(np.mean(range_differences(seqs_a, seqs_b, metric)))


# ----------------------------------------------------------------------------------------------
# Trajectory shape: path length, distinct points, nearest gallery cell
#
# DFD and MRD (Appendix E.2-E.3) do not tell a trajectory from one point per video on a drive of a few
# km, and the accuracies of Sec. 4.3 are dominated by how far off the video is. These metrics look at
# the shape alone: how far the prediction travels against the truth, and how many distinct gallery
# points it uses against the gallery cells the true drive passes through (predictions are gallery
# points, Sec. 3.1's frame-to-GPS retrieval, so a perfect prediction uses exactly those cells).


def _segment_path_km(lat: np.ndarray, lon: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum of consecutive great-circle steps within each segment -> (S,); a one-point segment has 0."""
    step = np.zeros(lat.shape, dtype=np.float64)
    step[1:] = haversine_km(lat[:-1], lon[:-1], lat[1:], lon[1:])
    step[starts] = 0.0  # no step across a segment boundary
    return np.add.reduceat(step, starts)


def _segment_n_unique(keys: Sequence[np.ndarray], seg: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Number of distinct key tuples in each segment -> (S,) int64; ``seg`` must be sorted."""
    order = np.lexsort((*keys, seg))  # segment first, so segment s still occupies [starts[s], starts[s+1])
    new = np.zeros(len(seg), dtype=bool)
    for k in keys:
        ks = k[order]
        new[1:] |= ks[1:] != ks[:-1]
    new[starts] = True
    return np.add.reduceat(new.astype(np.int64), starts)


def _path_ratio(pred_km: np.ndarray, true_km: np.ndarray) -> np.ndarray:
    """pred / true, NaN where the true path is shorter than MIN_TRUE_PATH_KM (undefined ratio)."""
    moving = true_km >= MIN_TRUE_PATH_KM
    return np.divide(pred_km, true_km, out=np.full(pred_km.shape, np.nan), where=moving)


def _as_latlon(x, name: str, allow_empty: bool = False) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or (a.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{name} must be an (n, 2) array of (lat, lon) degrees with n >= 1, got shape {a.shape}")
    bad = ~validate_latlon(a[:, 0], a[:, 1])
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{r}] = {a[r].tolist()} is NaN or not a (lat, lon) in [-90, 90] x [-180, 180]")
    return a


def path_lengths_km(seqs: Sequence) -> np.ndarray:
    """Length in km of each sequence's path, the sum of great-circle steps between consecutive points -> (S,).

    Sequences are (n, 2) (lat, lon) arrays in frame order; a single point has length 0.
    """
    if isinstance(seqs, np.ndarray) or len(seqs) == 0:
        raise ValueError("seqs must be a non-empty list of (n, 2) arrays, one per sequence; wrap a single sequence in [ ]")
    lat, lon, _, starts, _ = _concat([_as_latlon(x, f"seqs[{s}]") for s, x in enumerate(seqs)])
    return _segment_path_km(lat, lon, starts)


def path_length_ratios(pred_seqs: Sequence, true_seqs: Sequence) -> np.ndarray:
    """Predicted path length / true path length of each sequence pair -> (S,).

    1 is the true amount of movement, 0 a single predicted point, > 1 jitter between distant points.
    NaN where the true path is shorter than ``MIN_TRUE_PATH_KM`` (a camera that did not move, one frame):
    the ratio is undefined there, and aggregates leave such sequences out.
    """
    if len(pred_seqs) != len(true_seqs):
        raise ValueError(f"need as many predicted as true sequences, got {len(pred_seqs)} and {len(true_seqs)}")
    return _path_ratio(path_lengths_km(pred_seqs), path_lengths_km(true_seqs))


def distinct_points(seqs: Sequence) -> np.ndarray:
    """Number of distinct (lat, lon) points of each sequence -> (S,) int64 (exact equality)."""
    if isinstance(seqs, np.ndarray) or len(seqs) == 0:
        raise ValueError("seqs must be a non-empty list of (n, 2) arrays, one per sequence; wrap a single sequence in [ ]")
    lat, lon, seg, starts, _ = _concat([_as_latlon(x, f"seqs[{s}]") for s, x in enumerate(seqs)])
    return _segment_n_unique((lat, lon), seg, starts)


def nearest_gallery_index(latlon, gallery_latlon, block: int = NN_BLOCK) -> np.ndarray:
    """Index of the great-circle nearest gallery point of each (lat, lon) -> (N,) int64; exact.

    Nearest on the sphere is the largest dot product of unit vectors (the chord is monotone in the
    great-circle distance). Work is O(N x G); memory is bounded by ``block`` dot products at a time
    (32 MiB by default) plus the gallery's unit vectors, so a 1M-point gallery stays small. Repeated
    query points are looked up once. Ties go to the lowest gallery index.
    """
    q = _as_latlon(latlon, "latlon", allow_empty=True)
    g = _as_latlon(gallery_latlon, "gallery_latlon")
    if q.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    uq, inv = np.unique(q, axis=0, return_inverse=True)
    qv = unit_vectors(uq[:, 0], uq[:, 1])  # (U, 3)
    gv = unit_vectors(g[:, 0], g[:, 1])  # (G, 3)
    q_chunk = max(1, min(len(qv), int(np.sqrt(block))))
    g_chunk = max(1, min(len(gv), block // q_chunk))
    best = np.empty(len(qv), dtype=np.int64)
    for qs in range(0, len(qv), q_chunk):
        qb = qv[qs : qs + q_chunk]
        best_dot = np.full(len(qb), -np.inf)
        best_idx = np.zeros(len(qb), dtype=np.int64)
        for gs in range(0, len(gv), g_chunk):
            dots = qb @ gv[gs : gs + g_chunk].T  # (q_chunk, g_chunk)
            j = np.argmax(dots, axis=1)
            d = dots[np.arange(len(qb)), j]
            better = d > best_dot  # strict: an equal dot in a later chunk keeps the lower index
            best_dot[better] = d[better]
            best_idx[better] = gs + j[better]
        best[qs : qs + q_chunk] = best_idx
    return best[inv.reshape(-1)]


def distinct_cells(seqs: Sequence, gallery_latlon, block: int = NN_BLOCK) -> np.ndarray:
    """Number of distinct nearest gallery points over each sequence's points -> (S,) int64.

    For the ground truth this is how many distinct gallery points a perfect retrieval would predict
    along the drive, the yardstick for :func:`distinct_points` of the prediction.
    """
    if isinstance(seqs, np.ndarray) or len(seqs) == 0:
        raise ValueError("seqs must be a non-empty list of (n, 2) arrays, one per sequence; wrap a single sequence in [ ]")
    lat, lon, seg, starts, _ = _concat([_as_latlon(x, f"seqs[{s}]") for s, x in enumerate(seqs)])
    cell = nearest_gallery_index(np.stack([lat, lon], axis=1), gallery_latlon, block)
    return _segment_n_unique((cell,), seg, starts)


def _segment_r2_in_drive(lat, lon, gt_lat, gt_lon, starts: np.ndarray, true_path_km: np.ndarray) -> np.ndarray:
    """How much of the movement within each sequence the prediction reproduces -> (S,): 1 - SSE / SST.

    Both tracks are taken as km offsets (equirectangular around the true track's mean, longitudes unwrapped)
    from their own mean, so a drive drawn right but placed 10 km off still scores 1: it is the shape alone.
    1 = the drive's movement recovered, 0 = one point (or any track uncorrelated with it, at no extra
    spread), < 0 = movement that is not the drive's. NaN where the true path is shorter than MIN_TRUE_PATH_KM.
    """
    n = np.diff(np.append(starts, len(lat)))

    def seg_mean(x):
        return np.repeat(np.add.reduceat(x, starts) / n, n)

    lat0, lon0 = seg_mean(gt_lat), gt_lon[np.repeat(starts, n)]  # longitudes unwrapped around each first truth
    cos0 = np.cos(np.deg2rad(lat0))

    def offsets(la, lo):
        d_lon = (lo - lon0 + 180.0) % 360.0 - 180.0
        xy = np.stack([(la - lat0) * KM_PER_DEG_LAT, d_lon * KM_PER_DEG_LAT * cos0], axis=1)
        return xy - np.stack([seg_mean(xy[:, 0]), seg_mean(xy[:, 1])], axis=1)

    p, t = offsets(lat, lon), offsets(gt_lat, gt_lon)
    sse = np.add.reduceat(((p - t) ** 2).sum(1), starts)
    sst = np.add.reduceat((t ** 2).sum(1), starts)
    moving = true_path_km >= MIN_TRUE_PATH_KM
    return np.divide(sst - sse, sst, out=np.full(len(starts), np.nan), where=moving & (sst > 0))


def _mean_or_none(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if x.size else None


def shape_summary(table: pl.DataFrame) -> dict:
    """The ``shape`` group of :func:`evaluate` from a :func:`per_sequence` table.

    - ``path_length_ratio``: median over sequences of predicted / true path length; sequences whose
      true path is shorter than ``MIN_TRUE_PATH_KM`` are left out, ``n_path_length_ratio`` counts the
      rest (None when there are none).
    - ``distinct_points``: mean number of distinct predicted points per sequence.
    - ``r2_in_drive``: median over the same sequences of how much of the true movement within the
      sequence the prediction reproduces (1 - SSE / SST of both tracks' offsets from their own means: 1 the
      drive's shape, 0 a point, < 0 movement that is not the drive's).
    - ``distinct_cells`` and ``distinct_true_cells``: mean number of distinct nearest gallery points under the
      predicted and the true drive, and ``distinct_ratio`` = their ratio (only when a gallery was given).
    - ``dfd_km_right_city``, ``mrd_km_right_city``: mean DFD / MRD in km (Appendix E.2-E.3) over the
      ``n_right_city`` sequences whose video-level error is ``<= RIGHT_CITY_KM`` (None when there are
      none), to read beside the all-sequence ``trajectory`` figures.
    """
    ratio = table["path_length_ratio"].drop_nulls().drop_nans().to_numpy()
    out: dict = {
        "path_length_ratio": float(np.median(ratio)) if ratio.size else None,
        "n_path_length_ratio": int(ratio.size),
        "distinct_points": float(table["distinct_points"].mean()),
    }
    if "r2_in_drive" in table.columns:
        r2 = table["r2_in_drive"].drop_nulls().drop_nans().to_numpy()
        out["r2_in_drive"] = float(np.median(r2)) if r2.size else None
    if "distinct_true_cells" in table.columns:
        true_cells = float(table["distinct_true_cells"].mean())
        out["distinct_cells"] = float(table["distinct_cells"].mean())
        out["distinct_true_cells"] = true_cells
        out["distinct_ratio"] = out["distinct_cells"] / true_cells  # >= 1 cell per sequence: never 0
    right = table.filter(pl.col("video_error_km") <= RIGHT_CITY_KM)
    out["dfd_km_right_city"] = _mean_or_none(right["dfd_km"].to_numpy())
    out["mrd_km_right_city"] = _mean_or_none(right["mrd_km"].to_numpy())
    out["n_right_city"] = right.height
    return out


# ----------------------------------------------------------------------------------------------
# Predictions table -> per-sequence and aggregate metrics


def _first_bad_row(df: pl.DataFrame, mask: np.ndarray) -> str:
    r = int(np.flatnonzero(mask)[0])
    row = df.row(r, named=True)
    return f"row (sequence_id={row['sequence_id']!r}, frame_index={row['frame_index']})"  # sorted: name, not number


def _prepare(predictions: pl.DataFrame) -> pl.DataFrame:
    """Checked copy sorted by (sequence_id, frame_index), with a boolean ``_has_gt`` column."""
    if not isinstance(predictions, pl.DataFrame):
        raise TypeError(f"predictions must be a polars.DataFrame, got {type(predictions).__name__}")
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}; expected {list(PREDICTION_COLUMNS)}, found {predictions.columns}")
    if predictions.height == 0:
        raise ValueError("predictions is empty: nothing to evaluate")
    df = predictions.sort(["sequence_id", "frame_index"], maintain_order=True)
    dup = df.select(pl.struct("sequence_id", "frame_index").is_duplicated()).to_series().to_numpy()
    if dup.any():
        raise ValueError(f"predictions has duplicate (sequence_id, frame_index) at {_first_bad_row(df, dup)}; keep one row per frame")
    lat = df["lat"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    lon = df["lon"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    bad = ~validate_latlon(lat, lon)
    if bad.any():
        raise ValueError(
            f"predictions {_first_bad_row(df, bad)}: predicted lat/lon {lat[bad][0]}, {lon[bad][0]} is missing or "
            "outside [-90, 90] x [-180, 180]; every frame needs a prediction (a dropped frame would inflate accuracy)"
        )
    gt_lat_null = df["gt_lat"].is_null().to_numpy()
    gt_lon_null = df["gt_lon"].is_null().to_numpy()
    half = gt_lat_null != gt_lon_null
    if half.any():
        raise ValueError(f"predictions {_first_bad_row(df, half)}: only one of gt_lat / gt_lon is null; give both or neither")
    has_gt = ~gt_lat_null
    gt_lat = df["gt_lat"].cast(pl.Float64).fill_null(0.0).to_numpy()
    gt_lon = df["gt_lon"].cast(pl.Float64).fill_null(0.0).to_numpy()
    bad = has_gt & ~validate_latlon(gt_lat, gt_lon)
    if bad.any():
        raise ValueError(
            f"predictions {_first_bad_row(df, bad)}: ground truth {gt_lat[bad][0]}, {gt_lon[bad][0]} is NaN or outside "
            "[-90, 90] x [-180, 180]; use null for an unknown location"
        )
    return df.with_columns(pl.Series("_has_gt", has_gt))


def _segments(ids: pl.Series):
    """Segment index per row and segment starts for a column sorted by sequence."""
    change = ids.ne_missing(ids.shift(1)).fill_null(True).to_numpy()
    change[0] = True
    starts = np.flatnonzero(change).astype(np.int64)
    seg = np.cumsum(change) - 1
    lengths = np.diff(np.append(starts, len(ids)))
    return seg, starts, lengths


def _sequence_table(df: pl.DataFrame, gallery: np.ndarray | None = None) -> tuple[pl.DataFrame, np.ndarray]:
    """Per-sequence metrics over the rows with ground truth, and every such row's error in km."""
    g = df.filter(pl.col("_has_gt"))
    lat, lon = g["lat"].cast(pl.Float64).to_numpy(), g["lon"].cast(pl.Float64).to_numpy()
    gt_lat, gt_lon = g["gt_lat"].cast(pl.Float64).to_numpy(), g["gt_lon"].cast(pl.Float64).to_numpy()
    seg, starts, lengths = _segments(g["sequence_id"])
    dist_km = haversine_km(lat, lon, gt_lat, gt_lon)

    # Appendix E.1: GT centroid vs. the prediction nearest the predicted centroid.
    c_lat, c_lon = _segment_centroids(gt_lat, gt_lon, starts)
    rep = _segment_representatives(lat, lon, starts, seg)
    video_km = haversine_km(c_lat, c_lon, lat[rep], lon[rep])

    pred = np.stack([lat, lon], axis=1)
    gt = np.stack([gt_lat, gt_lon], axis=1)
    pred_seqs = np.split(pred, starts[1:])
    gt_seqs = np.split(gt, starts[1:])
    path_km = _segment_path_km(lat, lon, starts)
    true_path_km = _segment_path_km(gt_lat, gt_lon, starts)
    cols = {
        "sequence_id": g["sequence_id"].gather(starts),
        "n_frames": lengths,
        "median_km": _segment_median(dist_km, seg, starts, lengths),
        "video_error_km": video_km,
        "dfd_deg": discrete_frechet_many(pred_seqs, gt_seqs, "deg"),
        "dfd_km": discrete_frechet_many(pred_seqs, gt_seqs, "km"),
        "mrd_deg": range_differences(pred_seqs, gt_seqs, "deg"),
        "mrd_km": range_differences(pred_seqs, gt_seqs, "km"),
        "path_length_km": path_km,
        "true_path_length_km": true_path_km,
        # null (not NaN) where the true path is too short for a ratio: written as an empty CSV cell
        "path_length_ratio": pl.Series(_path_ratio(path_km, true_path_km)).fill_nan(None),
        "distinct_points": _segment_n_unique((lat, lon), seg, starts),
        "r2_in_drive": pl.Series(_segment_r2_in_drive(lat, lon, gt_lat, gt_lon, starts, true_path_km)).fill_nan(None),
    }
    if gallery is not None:
        # predicted and true points both counted as gallery cells: answers off the gallery (GeoRefiner offsets,
        # refinement, smoothing) count once per cell they visit, not once per distinct float
        cols["distinct_cells"] = _segment_n_unique((nearest_gallery_index(pred, gallery),), seg, starts)
        cols["distinct_true_cells"] = _segment_n_unique((nearest_gallery_index(gt, gallery),), seg, starts)
    return pl.DataFrame(cols), dist_km


def _check_gallery(gallery_latlon) -> np.ndarray | None:
    if gallery_latlon is None:
        return None
    if isinstance(gallery_latlon, str):
        raise TypeError(f"gallery_latlon must be a (G, 2) array of (lat, lon), got the string {gallery_latlon!r} "
                        "(label_level is a keyword argument)")
    return _as_latlon(gallery_latlon, "gallery_latlon")


def per_sequence(predictions: pl.DataFrame, gallery_latlon=None) -> pl.DataFrame:
    """One row per sequence with ground truth.

    Columns: ``sequence_id, n_frames, median_km, video_error_km, dfd_deg, dfd_km, mrd_deg, mrd_km,
    path_length_km, true_path_length_km, path_length_ratio, distinct_points, r2_in_drive`` and, when the gallery
    (G, 2) (lat, lon) is given, ``distinct_true_cells`` (see :func:`shape_summary`).
    ``path_length_ratio`` and ``r2_in_drive`` are null where the true path is shorter than ``MIN_TRUE_PATH_KM``.
    Only frames with ground truth count, in frame order; a sequence without any is left out.
    """
    gallery = _check_gallery(gallery_latlon)
    df = _prepare(predictions)
    if not df["_has_gt"].any():
        raise ValueError("no row of predictions has gt_lat/gt_lon: there is no trajectory to compare with")
    return _sequence_table(df, gallery)[0]


def _labels_accuracy(df: pl.DataFrame, level: str, label_level: str) -> float | None:
    """Percent of correct ``pred_<level>`` labels; None when no row has a ground-truth label."""
    gt, pred = level, f"pred_{level}"
    if label_level == "frame":
        rows = df.filter(pl.col(gt).is_not_null())
        if rows.height == 0:
            return None
        hit = rows[gt].cast(pl.String) == rows[pred].cast(pl.String)
        return float(100.0 * hit.fill_null(False).mean())
    # Video level: the sequence's label is its most common ground-truth label (ties: alphabetical);
    # the prediction is the label of the E.1 representative frame (nearest the predicted centroid).
    seg, starts, _ = _segments(df["sequence_id"])
    rep = _segment_representatives(df["lat"].to_numpy(), df["lon"].to_numpy(), starts, seg)
    pred_labels = df[pred].cast(pl.String).gather(rep)
    gt_labels = (
        df.with_columns(pl.Series("_seg", seg))
        .group_by("_seg")
        .agg(pl.col(gt).cast(pl.String).drop_nulls().mode().sort().first())
        .sort("_seg")[gt]
    )
    known = gt_labels.is_not_null()
    if not known.any():
        return None
    hit = (gt_labels == pred_labels).fill_null(False).filter(known)
    return float(100.0 * hit.mean())


def evaluate(predictions: pl.DataFrame, gallery_latlon=None, label_level: str = "video") -> dict:
    """All metrics of the paper (Sec. 4.3: accuracies, median, DFD, MRD) for a predictions table, as metrics/eval.json holds them.

    Input columns: ``sequence_id, frame_index, lat, lon, gt_lat, gt_lon`` and optionally ground-truth
    ``city, state, country, continent`` with ``pred_city, ...``. Returns::

        {"frame": {"acc_0.1km", "acc_0.25km", "acc_0.5km", "acc_1km", "acc_5km", "acc_25km", "median_km"},
         "video": {same keys}, "trajectory": {"dfd_deg", "mrd_deg", "dfd_km", "mrd_km"},
         "shape": {"path_length_ratio", "n_path_length_ratio", "distinct_points", "r2_in_drive",
                   "distinct_true_cells", "distinct_ratio",   # only with gallery_latlon
                   "dfd_km_right_city", "mrd_km_right_city", "n_right_city"},
         "city": {"city", "state", ...},   # only the levels with both columns present
         "n_frames", "n_sequences", "n_frames_excluded"}

    Accuracies are percent. Rows whose gt_lat/gt_lon are null are excluded from the distance and
    trajectory metrics and counted in ``n_frames_excluded``; ``n_frames``/``n_sequences`` count what
    was evaluated. ``trajectory`` values are means over sequences (the paper reports means); for a
    one-frame sequence DFD is the distance between the two points and MRD is 0. Label accuracy is
    per video by default (CityGuessr68k is scored per video), or per frame with ``label_level="frame"``.
    ``shape`` is :func:`shape_summary` of the :func:`per_sequence` table; ``gallery_latlon`` (G, 2) is
    the retrieval gallery, needed only for the true-cell counts. Values that have no sequence to be
    computed over (no moving sequence, none in the right city) are None.
    """
    return evaluate_with_sequences(predictions, gallery_latlon, label_level)[0]


def evaluate_with_sequences(predictions: pl.DataFrame, gallery_latlon=None,
                            label_level: str = "video") -> tuple[dict, pl.DataFrame | None]:
    """:func:`evaluate` and the :func:`per_sequence` table it summarises (None without ground truth), from one
    pass: a caller that reports both (the `evaluate` stage) computes each sequence's Fréchet distance and
    nearest gallery cells once, not twice."""
    gallery = _check_gallery(gallery_latlon)
    if label_level not in ("video", "frame"):
        raise ValueError(f"label_level must be 'video' or 'frame', got {label_level!r}")
    df = _prepare(predictions)
    levels = [lvl for lvl in LABEL_LEVELS if lvl in df.columns and f"pred_{lvl}" in df.columns]
    n_gt = int(df["_has_gt"].sum())
    if n_gt == 0 and not levels:
        raise ValueError(
            "no row of predictions has gt_lat/gt_lon and there are no label columns "
            f"(pairs {[(lvl, 'pred_' + lvl) for lvl in LABEL_LEVELS]}): nothing to evaluate"
        )
    out: dict = {}
    n_sequences = 0
    table = None
    if n_gt:
        table, dist_km = _sequence_table(df, gallery)
        n_sequences = table.height
        out["frame"] = accuracy_at(dist_km)
        out["video"] = accuracy_at(table["video_error_km"].to_numpy())
        out["trajectory"] = {k: float(table[k].mean()) for k in ("dfd_deg", "mrd_deg", "dfd_km", "mrd_km")}
        out["shape"] = shape_summary(table)
    accs = {lvl: _labels_accuracy(df, lvl, label_level) for lvl in levels}
    accs = {k: v for k, v in accs.items() if v is not None}
    if accs:
        out["city"] = accs
    out["n_frames"] = n_gt
    out["n_sequences"] = n_sequences
    out["n_frames_excluded"] = df.height - n_gt
    return out, table
