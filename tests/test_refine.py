"""vidtag.refine: candidates refined on a fine lattice within their gallery cell (beyond the paper, App. L)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vidtag.errors import VidtagError
from vidtag.gallery import grid_points
from vidtag.geo import BBox, EARTH_RADIUS_KM, haversine_km, offset_km
from vidtag.refine import FineLattice, LocalRefiner, RefineConfig, RefineError, gallery_spacing_km, refine_levels

PARIS = (48.8566, 2.3522)


class SmoothEncoder(nn.Module):
    """A location encoder whose cosine similarity is a smooth bump around each point: random Fourier
    features of the point's position in km on the sphere, wavelengths ``wavelength_km``. Within a quarter
    of the shortest wavelength the similarity falls strictly with distance; far apart it is ~0."""

    def __init__(self, n_freq=96, wavelength_km=(2.0, 8.0), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        direction = torch.nn.functional.normalize(torch.randn(n_freq, 3, generator=g, dtype=torch.float64), dim=1)
        lam = wavelength_km[0] + (wavelength_km[1] - wavelength_km[0]) * torch.rand(n_freq, 1, generator=g, dtype=torch.float64)
        self.register_buffer("w", direction * (2 * math.pi / lam))  # (F, 3) radians per km
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, latlon):
        lat, lon = torch.deg2rad(latlon.double()).unbind(-1)
        xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], -1) * EARTH_RADIUS_KM  # (N, 3) km
        phase = xyz @ self.w.T  # (N, F)
        return (torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(self.w.shape[0])).float()  # unit norm


def paris_grid(res_km=1.0, half_km=5.0):
    south, west = offset_km(*PARIS, -half_km, -half_km)
    north, east = offset_km(*PARIS, half_km, half_km)
    box = BBox(float(south), float(north), float(west), float(east))
    lat, lon = grid_points(box, res_km)
    return np.stack([lat, lon], 1)


def retrieve(enc, query, gallery, k):
    """Brute-force top-k over the gallery: (latlon (M, k, 2) f64, score (M, k), index (M, k))."""
    gal = torch.nn.functional.normalize(enc(torch.tensor(gallery)), dim=-1)
    s, i = (query @ gal.T).topk(k, dim=1)
    return torch.tensor(gallery)[i], s, i


def test_refinement_moves_predictions_to_the_truth():
    enc = SmoothEncoder()
    gallery = paris_grid(1.0)
    rng = np.random.default_rng(0)
    truth = np.stack(offset_km(*PARIS, rng.uniform(-3, 3, 40), rng.uniform(-3, 3, 40)), 1)  # (M, 2)
    query = torch.nn.functional.normalize(enc(torch.tensor(truth)), dim=-1)  # a perfect frame encoder
    latlon, score, index = retrieve(enc, query, gallery, k=6)
    before_km = haversine_km(*latlon[:, 0].numpy().T, *truth.T)
    refiner = LocalRefiner(enc, RefineConfig(step_km=0.05, top=3), radius_km=0.5)
    r_ll, r_s, r_i = refiner.refine(query, latlon, score, index)
    after_km = haversine_km(*r_ll[:, 0].numpy().T, *truth.T)
    assert before_km.mean() > 0.25  # a 1 km grid: a few hundred metres off on average
    assert after_km.max() < 0.06 and after_km.mean() < 0.04  # within about a lattice step of the truth
    # Retrieval's ranking and scores stay; moved candidates leave the gallery (index -1) but not their cell.
    assert torch.equal(r_s, score.float())
    assert (r_i[:, 0] == -1).all()
    assert (r_i[r_i >= 0] == index[r_i >= 0]).all()
    moved_km = haversine_km(*r_ll.reshape(-1, 2).numpy().T, *latlon.reshape(-1, 2).numpy().T)
    assert moved_km.max() <= math.sqrt(2) * (0.5 + 0.05 / 2)  # within the square of the cell (+ half a lattice step)
    # Only the first `top` candidates are refined; the others keep their gallery points.
    assert torch.equal(r_ll[:, 3:], latlon[:, 3:]) and (r_i[:, 3:] >= 0).all()


def test_rerank_rescores_the_candidates_and_sorts_them_by_their_refined_score():
    """``rerank=True``: a candidate takes its best lattice point's score (the encoder's own similarity there,
    never lower than its gallery point's) and the candidates are re-sorted by it. Here retrieval ranked a
    neighbouring cell above the truth's own: by default that cell stays first (placed at its edge nearest the
    truth), reranked the truth's cell wins."""
    enc = SmoothEncoder()
    truth = np.stack(offset_km(*PARIS, np.zeros(5), np.linspace(-0.2, 0.2, 5)), 1)  # in the cell of PARIS
    query = torch.nn.functional.normalize(enc(torch.tensor(truth)), dim=-1)
    near = np.asarray(PARIS)
    far = np.asarray(offset_km(*PARIS, 0.0, 1.0))  # the next cell east on a 1 km grid
    latlon = torch.tensor(np.broadcast_to(np.stack([far, near]), (5, 2, 2)).copy())  # retrieval's claim: far first
    score = torch.tensor([[0.9, 0.8]] * 5)
    index = torch.tensor([[1, 0]] * 5)
    kept_ll, kept_s, kept_i = LocalRefiner(enc, RefineConfig(step_km=0.05, top=2), radius_km=0.5).refine(query, latlon, score, index)
    r_ll, r_s, r_i = LocalRefiner(enc, RefineConfig(step_km=0.05, top=2, rerank=True), radius_km=0.5).refine(query, latlon, score, index)
    assert torch.equal(kept_s, score) and (haversine_km(*kept_ll[:, 0].numpy().T, *far) < 0.75).all()  # still the far cell
    assert (haversine_km(*r_ll[:, 0].numpy().T, *truth.T) < 0.04).all()  # the truth's cell, refined onto the truth
    assert (r_s[:, 0] >= r_s[:, 1]).all() and (r_i[:, 0] == -1).all()
    direct = (query * torch.nn.functional.normalize(enc(r_ll[:, 0]), dim=-1)).sum(-1)
    torch.testing.assert_close(r_s[:, 0], direct, atol=1e-5, rtol=0)


def test_each_lattice_point_is_embedded_once_per_run():
    enc = SmoothEncoder()
    gallery = paris_grid(1.0)
    truth = np.stack(offset_km(*PARIS, np.linspace(0, 0.3, 8), np.zeros(8)), 1)  # a short drive: shared cells
    query = torch.nn.functional.normalize(enc(torch.tensor(truth)), dim=-1)
    latlon, score, index = retrieve(enc, query, gallery, k=4)
    refiner = LocalRefiner(enc, RefineConfig(step_km=0.1, top=2), radius_km=0.5)
    first = refiner.refine(query, latlon, score, index)
    n_first = refiner.n_embedded
    lattice, n, _ = refiner.levels[0]
    keys = lattice.neighbourhood(latlon[:, :2].reshape(-1, 2), n)
    assert n_first == len(torch.unique(keys))  # every distinct point once, however many frames ask
    again = refiner.refine(query, latlon, score, index)
    assert refiner.n_embedded == n_first  # all cached
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_lattice_keys_round_trip_with_square_km_spacing_and_wrap_at_the_antimeridian():
    lattice = FineLattice(0.05)
    for lat, lon in [(48.85, 2.35), (-33.9, 151.2), (64.1, -21.9), (0.0, 179.999), (-51.7, -179.99)]:
        keys = lattice.neighbourhood(torch.tensor([[lat, lon]], dtype=torch.float64), 3)[0]  # (49,)
        pts = lattice.latlon(keys).numpy()
        assert len(np.unique(keys.numpy())) == 49
        assert (pts[:, 1] >= -180).all() and (pts[:, 1] < 180).all()
        d = haversine_km(lat, lon, pts[:, 0], pts[:, 1])
        assert d.min() < 0.05 and d.max() < 3.5 * 0.05 * math.sqrt(2) + 1e-3
        # Neighbours along a row and along a column are one step apart.
        grid = pts.reshape(7, 7, 2)
        along = haversine_km(*grid[3, 3], *grid[3, 4])
        across = haversine_km(*grid[3, 3], grid[4, 3, 0], grid[3, 3, 1])
        assert along == pytest.approx(0.05, rel=1e-3) and across == pytest.approx(0.05, rel=1e-6)
        # A lattice point snaps to itself: the same place always has the same key (a cache hit from any candidate).
        assert torch.equal(lattice.neighbourhood(torch.tensor(pts), 0)[:, 0], keys)


def test_a_large_cell_is_searched_coarse_to_fine():
    assert refine_levels(0.05, 0.5, 10_000) == [(0.05, 10)]  # one exhaustive search
    levels = refine_levels(0.05, 12.5, 300)
    assert [n for _, n in levels][:-1] == [8, 8] and levels[-1][0] == 0.05
    assert all((2 * n + 1) ** 2 <= 300 for _, n in levels)
    enc = SmoothEncoder(wavelength_km=(20.0, 60.0))  # smooth at the coarse step
    gallery = paris_grid(8.0, half_km=40.0)
    rng = np.random.default_rng(1)
    truth = np.stack(offset_km(*PARIS, rng.uniform(-20, 20, 12), rng.uniform(-20, 20, 12)), 1)
    query = torch.nn.functional.normalize(enc(torch.tensor(truth)), dim=-1)
    latlon, score, index = retrieve(enc, query, gallery, k=2)
    refiner = LocalRefiner(enc, RefineConfig(step_km=0.05, top=1, max_points=300), radius_km=4.0)
    assert len(refiner.levels) > 1
    r_ll, _, _ = refiner.refine(query, latlon, score, index)
    after_km = haversine_km(*r_ll[:, 0].numpy().T, *truth.T)
    assert haversine_km(*latlon[:, 0].numpy().T, *truth.T).mean() > 1.5
    assert after_km.max() < 0.1


def test_gallery_spacing_is_the_grid_resolution():
    assert gallery_spacing_km(paris_grid(1.0)) == pytest.approx(1.0, rel=1e-3)
    assert gallery_spacing_km(paris_grid(0.25, half_km=2.0)) == pytest.approx(0.25, rel=1e-3)


def test_bad_settings_raise_one_line_errors():
    enc = SmoothEncoder()
    with pytest.raises(RefineError, match="step_km"):
        RefineConfig(step_km=0.0)
    with pytest.raises(RefineError, match="radius_km"):
        RefineConfig(radius_km=-1.0)
    with pytest.raises(RefineError, match="top"):
        RefineConfig(top=0)
    with pytest.raises(RefineError, match="too small"):
        LocalRefiner(enc, RefineConfig(max_points=10), radius_km=5.0)
    with pytest.raises(RefineError, match="at least two"):
        gallery_spacing_km(np.zeros((1, 2)))
    refiner = LocalRefiner(enc, RefineConfig(), radius_km=0.5)
    with pytest.raises(RefineError, match="refine needs"):
        refiner.refine(torch.zeros(2, 192), torch.zeros(2, 3, 2, dtype=torch.float64), torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))
    assert issubclass(RefineError, VidtagError)
