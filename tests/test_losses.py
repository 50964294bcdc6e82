"""Losses: Eq. 1 contrastive CE with near-duplicate positives, Eqs. 2-5 weighted hinge."""

import math

import pytest

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


def _hinge_by_boolean_mask(refined, truth, pad, alpha, beta, video_weight):
    """Eqs. 2-5 as first written: the valid frames selected with a boolean mask, plain means (the reference)."""
    def term(a, b):
        n = len(a)
        m = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T - torch.eye(n, dtype=a.dtype)) ** 2
        if n < 2:
            return beta * m.diagonal().mean()
        iu = torch.triu_indices(n, n, offset=1)
        return alpha * (m[iu[0], iu[1]].mean() + m[iu[1], iu[0]].mean()) + beta * m.diagonal().mean()

    valid = ~pad
    r, g = F.normalize(refined, dim=-1), F.normalize(truth, dim=-1)
    w = valid[..., None].to(r.dtype)
    video = term((r * w).sum(1) / w.sum(1).clamp(min=1), (g * w).sum(1) / w.sum(1).clamp(min=1))
    return term(r[valid], g[valid]) + video_weight * video


def test_weighted_hinge_over_padded_frames_equals_the_boolean_mask_selection():
    """Pads weighted 0 over all B x T positions give the loss (and gradients) of the valid frames selected
    alone: random lengths, one batch with a single valid frame, and no padding at all."""
    gen = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for lengths in ([5, 1, 3, 7], [1], [2, 2], [1, 1, 1], [7, 7, 7]):
            b, t = len(lengths), 7
            pad = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)
            refined = torch.randn(b, t, 16, generator=gen, dtype=dtype).requires_grad_()
            truth = torch.randn(b, t, 16, generator=gen, dtype=dtype)
            with torch.no_grad():
                refined[pad] = 50.0  # junk in the pads must not count
            alpha, beta, vw = 10.0, 0.7, 0.3
            loss, _ = weighted_hinge_loss(refined, truth, pad, alpha, beta, vw)
            ref = _hinge_by_boolean_mask(refined, truth, pad, alpha, beta, vw)
            assert torch.allclose(loss, ref, rtol=tol, atol=0), (lengths, float(loss), float(ref))
            grad, = torch.autograd.grad(loss, refined)
            grad_ref, = torch.autograd.grad(ref, refined)
            assert torch.allclose(grad, grad_ref, rtol=tol, atol=tol) and not grad[pad].any()
    no_pad, _ = weighted_hinge_loss(refined, truth, None, alpha, beta, vw)
    assert torch.allclose(no_pad, _hinge_by_boolean_mask(refined, truth, torch.zeros(b, t, dtype=torch.bool), alpha, beta, vw))


def test_weighted_hinge_does_not_wait_for_the_device():
    """No op of the loss or its backward sizes a result from device data (boolean indexing, nonzero, item)."""
    from test_loop import SyncRecorder

    pad = torch.arange(6)[None, :] >= torch.tensor([6, 2, 4])[:, None]
    refined = torch.randn(3, 6, 8, requires_grad=True)
    rec = SyncRecorder()
    with rec:
        loss, _ = weighted_hinge_loss(refined, torch.randn(3, 6, 8), pad)
        loss.backward()
    assert rec.syncs == []


def test_gps_km_loss_is_the_mean_distance_over_valid_frames():
    from vidtag.geo import haversine_km
    from vidtag.train.losses import gps_km_loss
    truth = torch.tensor([[[52.0, 4.0], [52.01, 4.0], [0.0, 0.0]]], dtype=torch.float64)
    moved = truth.clone()
    moved[0, 0, 0] += 0.01  # ~1.1 km north
    moved[0, 2] = torch.tensor([10.0, 10.0])  # a pad: ignored
    pad = torch.tensor([[False, False, True]])
    loss, _ = gps_km_loss(moved, truth, pad)
    assert float(loss) == pytest.approx(haversine_km(52.0, 4.0, 52.01, 4.0) / 2, rel=1e-3)


def test_an_unknown_phase2_loss_is_refused():
    from vidtag.errors import ConfigError
    from vidtag.train.phase2 import Phase2Config
    with pytest.raises(ConfigError, match="gps_km"):
        Phase2Config(loss="mae")
