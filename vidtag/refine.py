"""Local refinement of retrieval candidates on a fine grid: precision that does not cost gallery size.

Beyond the paper. App. L names the gallery's resolution as a bound on accuracy, and a finer gallery grows
quadratically (Table 5: 1 km -> 0.1 km is 100x the points). Here the gallery is a coarse index: after
retrieval, each frame's best ``top`` candidates are searched on a fine lattice (steps of tens of metres)
within their gallery cell, a square of half-width ``radius_km`` around the candidate. The lattice points
are embedded on the fly by the model's own location encoder (Sec. 3.3) and scored against the frame's
query embedding with the cosine similarity retrieval uses; a candidate moves to its best lattice point
when that scores higher than the gallery point itself. Temporal decoding (``vidtag.decode``) then runs on
the refined lattice.

Retrieval ranks the cells; refinement places each candidate within its own (``rerank=False``, the default).
A candidate keeps its rank and its retrieval score, because its best lattice point's score is the maximum of
some hundreds of noisy similarities, and comparing cells by those maxima favours a cell whose similarity
is rough over the one retrieval chose. Measured on the demo (1 km gallery, README "Refinement"): ranking
cells by their refined scores (``rerank=True``: the candidates re-scored and re-sorted) loses final
acc@0.5km against no refinement at all, keeping retrieval's ranking gains in every configuration tried.

The fine lattice is global, not one per candidate: rows every ``step_km`` of latitude and, in each row,
columns every ~``step_km`` along the parallel (an exact divisor of the circle, so it wraps at the
antimeridian), the gallery grid's square-km rule (``vidtag.gallery.grid_points``). Neighbouring frames,
candidates and sequences then ask for the same points, and :class:`LocalRefiner` embeds each point once
per run (its cache is keyed by the point's row and column; the model is fixed for the refiner's life).

Cost per frame: ``top * (2n + 1)^2`` dot products with ``n = floor(radius_km / step_km)``, plus one
location-encoder forward per lattice point not yet cached. A cell too large for one exhaustive search
(``max_points``; a coarse world gallery) is searched coarse to fine (:func:`refine_levels`). Neighbourhoods of adjacent gallery points
barely overlap (each covers its own cell), so two candidates rarely refine to the same point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidtag.errors import VidtagError
from vidtag.geo import EARTH_RADIUS_KM, KM_PER_DEG_LAT, unit_vectors


class RefineError(VidtagError, ValueError):
    """Refinement settings or inputs that cannot work (a neighbourhood too large, shapes that do not fit)."""


@dataclass(frozen=True)
class RefineConfig:
    """What local refinement computes."""

    step_km: float = 0.05  # fine lattice spacing: tens of metres, the precision refinement can reach
    radius_km: float | None = None  # half-width of the square searched around a candidate; None = half the gallery's spacing (its cell)
    top: int = 8  # candidates refined per frame, the best by retrieval score
    max_points: int = 10_000  # lattice points per candidate and search; a larger cell is searched coarse to fine
    rerank: bool = False  # True: candidates take their refined scores and are re-sorted by them (module docstring)

    def __post_init__(self):
        if not (math.isfinite(self.step_km) and self.step_km > 0):
            raise RefineError(f"refine step_km must be a positive number; found {self.step_km}")
        if self.radius_km is not None and not (math.isfinite(self.radius_km) and self.radius_km > 0):
            raise RefineError(f"refine radius_km must be a positive number or None (half the gallery spacing); found {self.radius_km}")
        if int(self.top) < 1:
            raise RefineError(f"refine top must be >= 1 candidate per frame; found {self.top}")


def gallery_spacing_km(latlon_deg, max_queries: int = 20_000) -> float:
    """The gallery's resolution in km, for any kind of gallery: the median distance from a point to its
    nearest neighbour (over at most ``max_queries`` points evenly spaced through the gallery)."""
    from scipy.spatial import cKDTree

    ll = np.asarray(latlon_deg, dtype=np.float64)
    if ll.ndim != 2 or ll.shape[1] != 2 or len(ll) < 2:
        raise RefineError(f"a gallery spacing needs at least two (lat, lon) points; found shape {ll.shape}")
    xyz = unit_vectors(ll[:, 0], ll[:, 1])
    pick = np.unique(np.linspace(0, len(ll) - 1, min(len(ll), max_queries)).round().astype(np.int64))
    chord, _ = cKDTree(xyz).query(xyz[pick], k=2)
    d = chord[:, 1]
    d = d[d > 0]  # repeated points are not a spacing
    if d.size == 0:
        raise RefineError("the gallery's points all coincide: no spacing to refine within; set refine_radius_km")
    return float(2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.median(d) / 2, 0.0, 1.0)))


class FineLattice:
    """The global lattice of :mod:`vidtag.refine`; a point is the int64 key ``(row + rows_half) << 32 | column``."""

    def __init__(self, step_km: float):
        self.step_km = float(step_km)
        self.dlat_deg = self.step_km / KM_PER_DEG_LAT
        self.rows_half = int(math.floor(90.0 / self.dlat_deg + 1e-9))  # rows -rows_half..rows_half stay within ±90°

    def _n_cols(self, row: torch.Tensor) -> torch.Tensor:
        """Columns in each row (int64, >= 1): the parallel's length over ``step_km``, rounded down."""
        lat = row.double() * self.dlat_deg
        km_around = 2 * math.pi * EARTH_RADIUS_KM * torch.cos(torch.deg2rad(lat)).clamp_min(0.0)
        return torch.floor(km_around / self.step_km + 1e-9).long().clamp_min(1)

    def neighbourhood(self, latlon_deg: torch.Tensor, n: int) -> torch.Tensor:
        """Keys (P, (2n+1)^2) of the lattice points within ``n`` rows and ``n`` columns of each of (P, 2) points.

        Rows beyond a pole are clamped onto the pole row (repeats there are harmless: the same key).
        """
        offs = torch.arange(-n, n + 1, device=latlon_deg.device)
        row0 = torch.round(latlon_deg[:, 0] / self.dlat_deg).long()  # (P,)
        row = (row0[:, None] + offs).clamp(-self.rows_half, self.rows_half)  # (P, R)
        n_cols = self._n_cols(row)  # (P, R)
        col0 = torch.round(latlon_deg[:, 1, None] * n_cols.double() / 360.0).long()  # (P, R) nearest column in each row
        col = torch.remainder(col0[..., None] + offs, n_cols[..., None])  # (P, R, C) wrapped around the circle
        keys = ((row + self.rows_half) << 32)[..., None] | col  # (P, R, C)
        return keys.reshape(len(latlon_deg), -1)

    def latlon(self, keys: torch.Tensor) -> torch.Tensor:
        """(U,) keys -> (U, 2) float64 degrees, longitude in [-180, 180)."""
        row = (keys >> 32) - self.rows_half
        col = keys & 0xFFFFFFFF
        lat = row.double() * self.dlat_deg
        lon = col.double() * (360.0 / self._n_cols(row).double())
        return torch.stack([lat, torch.remainder(lon + 180.0, 360.0) - 180.0], dim=-1)


def refine_levels(step_km: float, radius_km: float, max_points: int) -> list[tuple[float, int]]:
    """The (lattice step km, steps each side) of each search, coarse to fine.

    One exhaustive search of the cell when it has at most ``max_points`` lattice points; otherwise (a
    coarse gallery, e.g. a world grid) coarse to fine: the whole cell at the coarsest step that keeps a
    search within ``max_points``, then the coarse winner's own lattice cell at a finer step, down to
    ``step_km``. Each level searches at most ``max_points`` points.
    """
    n = int(math.floor(radius_km / step_km + 1e-9))
    if (2 * n + 1) ** 2 <= max_points:
        return [(step_km, n)]
    side = int((math.isqrt(max_points) - 1) // 2)  # steps each side a search can afford
    if side < 2:
        raise RefineError(f"refinement max_points={max_points} is too small for a search (needs >= 25)")
    levels, radius = [], radius_km
    while True:
        step = max(step_km, radius / side)
        levels.append((step, int(math.ceil(radius / step - 1e-9))))
        if step <= step_km:
            return levels
        radius = step  # the next level searches the winner's cell (+- one coarse step)


class _LatticeCache:
    """Embeddings of one lattice's points, each computed once while cached (sorted keys -> rows of a store)."""

    def __init__(self, embed, device, max_cached: int):
        self.embed, self.device, self.max_cached = embed, device, int(max_cached)
        self.reset()

    def reset(self) -> None:
        self.keys = torch.zeros(0, dtype=torch.long, device=self.device)  # sorted lattice keys in the cache
        self.slot = torch.zeros(0, dtype=torch.long, device=self.device)  # their rows in store
        self.store: torch.Tensor | None = None  # (capacity, D) unit embeddings
        self.size = 0

    def _append(self, emb: torch.Tensor) -> torch.Tensor:
        """Store (u, D) embeddings; returns their rows."""
        need = self.size + len(emb)
        if self.store is None or need > len(self.store):
            cap = min(max(need, 2 * (0 if self.store is None else len(self.store)), 4096), max(need, self.max_cached))
            store = torch.empty(cap, emb.shape[1], dtype=emb.dtype, device=self.device)
            if self.store is not None:
                store[: self.size] = self.store[: self.size]
            self.store = store
        rows = torch.arange(self.size, need, device=self.device)
        self.store[rows] = emb
        self.size = need
        return rows

    def get(self, keys: torch.Tensor, latlon_of) -> torch.Tensor:
        """(Q,) keys -> (Q, D) embeddings; ``latlon_of`` turns keys not cached yet into degrees to embed."""
        uniq, inv = torch.unique(keys, return_inverse=True)
        slot = torch.full_like(uniq, -1)
        if len(self.keys):
            pos = torch.searchsorted(self.keys, uniq).clamp_max(len(self.keys) - 1)
            slot = torch.where(self.keys[pos] == uniq, self.slot[pos], slot)
        miss = slot < 0
        if bool(miss.any()):
            if len(uniq) > self.max_cached:  # more than the cache holds in one call: embed without caching
                return self.embed(latlon_of(uniq))[inv]
            if self.size + int(miss.sum()) > self.max_cached:
                self.reset()
                slot = torch.full_like(uniq, -1)
                miss = slot < 0
            new = uniq[miss]
            rows = self._append(self.embed(latlon_of(new)))
            slot[miss] = rows
            keys_all = torch.cat([self.keys, new])
            order = torch.argsort(keys_all)
            self.keys, self.slot = keys_all[order], torch.cat([self.slot, rows])[order]
        return self.store[slot[inv]]


class LocalRefiner:
    """Local refinement for one run of one model: :meth:`refine` moves candidates onto the fine lattice.

    Each lattice point is embedded once (a cache of at most ``max_cached`` points per lattice, emptied
    when full); ``n_embedded`` counts the location-encoder forwards, the cost refinement adds to retrieval.
    """

    def __init__(self, location_encoder: nn.Module, cfg: RefineConfig, radius_km: float, *, device=None,
                 embed_batch: int = 8192, max_cached: int = 1 << 19, score_budget: int = 1 << 25):
        if not (math.isfinite(radius_km) and radius_km > 0):
            raise RefineError(f"refine radius_km must be a positive number; found {radius_km}")
        self.cfg = cfg
        self.radius_km = float(radius_km)
        self.encoder = location_encoder
        param = next(location_encoder.parameters(), None)
        self.encoder_device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device) if device is not None else self.encoder_device
        self.embed_batch = int(embed_batch)
        self.score_budget = int(score_budget)
        self.levels = [(FineLattice(step), n, _LatticeCache(self._embed, self.device, max_cached))
                       for step, n in refine_levels(cfg.step_km, self.radius_km, cfg.max_points)]
        self.n_embedded = 0

    @torch.no_grad()
    def _embed(self, latlon_deg: torch.Tensor) -> torch.Tensor:
        """(U, 2) degrees -> (U, D) unit embeddings on ``self.device``; the encoder's own mode restored after."""
        was = self.encoder.training
        self.encoder.eval()
        try:
            x = latlon_deg.to(self.encoder_device, torch.float32)
            out = [F.normalize(self.encoder(c).float(), dim=-1).to(self.device) for c in x.split(self.embed_batch)]
        finally:
            self.encoder.train(was)
        self.n_embedded += len(latlon_deg)
        return torch.cat(out)

    @torch.no_grad()
    def refine(self, query: torch.Tensor, latlon: torch.Tensor, score: torch.Tensor,
               index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Refined candidates: each moved to its best lattice point where that scores above its gallery point.

        query (M, D): the frames' unit query embeddings (frame embeddings for Phase I, the GeoRefiner's
        refined embeddings for the final retrieval); latlon (M, K, 2) float64, score (M, K) cosine and
        index (M, K) gallery rows of the retrieved candidates, best first. Returns (latlon, score, index)
        of the same shapes; a candidate moved onto the lattice gets index -1. The candidates keep their
        retrieval order and scores; with ``rerank`` they take their refined scores and are re-sorted by them
        (best first, ties keep retrieval order).
        """
        m_all, k = score.shape
        if tuple(latlon.shape) != (m_all, k, 2) or tuple(index.shape) != (m_all, k) or query.shape[0] != m_all:
            raise RefineError(f"refine needs query (M, D), latlon (M, K, 2), score and index (M, K); found "
                              f"{tuple(query.shape)}, {tuple(latlon.shape)}, {tuple(score.shape)}, {tuple(index.shape)}")
        dev = self.device
        q_all = query.to(dev, torch.float32)
        out_ll, out_s, out_i = latlon.to(dev, torch.float64).clone(), score.to(dev, torch.float32).clone(), index.to(dev).clone()
        r = min(int(self.cfg.top), k)
        for lattice, n, cache in self.levels:  # coarse to fine; one level when the cell is small enough
            p = (2 * n + 1) ** 2
            chunk = max(1, self.score_budget // max(1, r * p * q_all.shape[1]))  # frames per step: (m, r*p, D) floats in budget
            for m0 in range(0, m_all, chunk):
                sl = slice(m0, min(m0 + chunk, m_all))
                q = q_all[sl]  # (m, D)
                m = q.shape[0]
                keys = lattice.neighbourhood(out_ll[sl, :r].reshape(-1, 2), n).view(m, r, p)  # (m, r, p)
                emb = cache.get(keys.reshape(-1), lattice.latlon).view(m, r * p, -1)  # (m, r*p, D)
                s = torch.einsum("md,mpd->mp", q, emb).view(m, r, p)  # (m, r, p) cosine
                best, arg = s.max(dim=2)  # (m, r); ties to the first point
                better = best > out_s[sl, :r]
                best_key = keys.gather(2, arg[..., None]).squeeze(2)  # (m, r)
                moved = lattice.latlon(best_key.reshape(-1)).view(m, r, 2)
                out_ll[sl, :r] = torch.where(better[..., None], moved, out_ll[sl, :r])
                out_s[sl, :r] = torch.where(better, best, out_s[sl, :r])
                out_i[sl, :r] = torch.where(better, torch.full_like(out_i[sl, :r], -1), out_i[sl, :r])
        if not self.cfg.rerank:  # retrieval ranks the cells, refinement only places each candidate in its own
            return out_ll, score.to(dev, torch.float32), out_i
        order = torch.argsort(out_s, dim=1, descending=True, stable=True)  # (M, K)
        return out_ll.gather(1, order[..., None].expand(-1, -1, 2)), out_s.gather(1, order), out_i.gather(1, order)
