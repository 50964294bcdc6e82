"""Losses: Eq. 1 contrastive CE with near-duplicate positives, Eqs. 2-5 weighted hinge."""

import math

import torch
import torch.nn.functional as F

from vidtag.train.losses import contrastive_loss, positive_targets, weighted_hinge_loss


def test_contrastive_is_cross_entropy_against_identity():
    g = torch.Generator().manual_seed(0)
    v, gps = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * F.normalize(v, dim=-1) @ F.normalize(gps, dim=-1).T
    assert torch.allclose(contrastive_loss(v, gps, scale), F.cross_entropy(logits, torch.arange(6)))
    aligned = contrastive_loss(gps, gps, torch.tensor(math.log(100.0)))
    assert aligned < 0.05 < contrastive_loss(v, gps, torch.tensor(math.log(100.0)))


def test_logit_scale_is_clamped_at_100():
    v = torch.randn(4, 8)
    assert torch.allclose(contrastive_loss(v, v.flip(0), torch.tensor(9.0)), contrastive_loss(v, v.flip(0), torch.tensor(math.log(100.0))))


def test_positive_targets_spread_over_nearby_gps():
    latlon = torch.tensor([[40.0, -74.0], [40.0001, -74.0], [40.0, -74.0], [41.0, -74.0]], dtype=torch.float64)
    t0 = positive_targets(latlon, 0.0)  # exact duplicates only
    assert torch.allclose(t0[0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert torch.allclose(t0[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    t = positive_targets(latlon, 0.05)  # 11 m apart -> positives
    assert torch.allclose(t[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    assert torch.allclose(t.sum(1), torch.ones(4)) and t[3, 3] == 1.0


def test_weighted_hinge_matches_equations_by_hand():
    refined = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # (1, 2, 2) unit
    truth = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # frame matrix G'G^T = [[1, 0], [0.6, 0.8]] -> (M - I)^2 = [[0, 0], [0.36, 0.04]]
    loss, parts = weighted_hinge_loss(refined, truth, alpha=10.0, beta=1.0)
    assert torch.isclose(parts["frame"], torch.tensor(10 * (0.0 + 0.36) + 1 * (0 + 0.04) / 2))
    # one video: 1x1 matrix, only the diagonal
    r = F.normalize(torch.tensor([1.6, 0.8]), dim=0)
    gt = F.normalize(torch.tensor([1.0, 1.0]), dim=0)
    assert torch.isclose(parts["video"], (r @ gt - 1) ** 2)
    assert torch.isclose(loss, parts["frame"] + parts["video"])


def test_weighted_hinge_ignores_padding_and_prefers_the_truth():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(3, 4, 16, generator=g)
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[0, 3] = True
    noisy = truth + torch.randn(3, 4, 16, generator=g)
    perfect, _ = weighted_hinge_loss(truth, truth, pad)
    worse, _ = weighted_hinge_loss(noisy, truth, pad)
    assert worse > perfect
    junk = truth.clone()
    junk[0, 3] = 100.0
    assert torch.isclose(weighted_hinge_loss(junk, truth, pad)[0], perfect)
