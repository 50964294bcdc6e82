"""Phase II noise (Appendix A): collapse with p = 0.1, jitter |U(0.001, 0.02)| with random sign, shift U(-0.2, 0.2)."""

import torch

from vidtag.train.noise import NoiseConfig, corrupt_gps


def _tracks(b=400, t=16):
    lat = torch.linspace(40.0, 40.01, t, dtype=torch.float64).repeat(b, 1)
    lon = torch.linspace(-74.0, -73.99, t, dtype=torch.float64).repeat(b, 1)
    return torch.stack([lat, lon], dim=-1)  # (B, T, 2)


def test_same_seed_same_noise_and_input_untouched():
    x = _tracks()
    before = x.clone()
    a = corrupt_gps(x, torch.Generator().manual_seed(3))
    b = corrupt_gps(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(x, before)
    assert not torch.equal(a, corrupt_gps(x, torch.Generator().manual_seed(4)))


def test_without_shift_jitter_magnitudes_and_signs_follow_the_paper():
    x = _tracks()
    noisy = corrupt_gps(x, torch.Generator().manual_seed(0), NoiseConfig(collapse_p=0.0, shift_max_deg=0.0))
    d = (noisy - x).abs()
    assert d.min() >= 0.001 - 1e-12 and d.max() <= 0.02 + 1e-12
    signs = torch.sign(noisy - x)
    assert 0.45 < (signs > 0).double().mean() < 0.55  # fair random sign per coordinate


def test_collapse_rate_and_collapsed_point_is_a_frame_of_the_sequence():
    x = _tracks(b=4000)
    noisy = corrupt_gps(x, torch.Generator().manual_seed(1), NoiseConfig(shift_max_deg=0.0))
    collapsed = (noisy == noisy[:, :1]).all(dim=2).all(dim=1)  # every frame at one point
    assert 0.08 < collapsed.double().mean() < 0.12
    anchors = noisy[collapsed, 0]  # (C, 2) must be one of the original frames
    dist = (anchors[:, None, :] - x[0][None]).abs().sum(-1).min(dim=1).values
    assert dist.max() < 1e-12


def test_shift_is_one_offset_per_sequence_and_coordinate_within_bounds():
    x = _tracks()
    noisy = corrupt_gps(x, torch.Generator().manual_seed(2), NoiseConfig(collapse_p=0.0, jitter_min_deg=0.0, jitter_max_deg=0.0))
    shift = noisy - x  # (B, T, 2)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-9)
    assert shift.abs().max() <= 0.2 and shift.abs().max() > 0.15
    assert not torch.allclose(shift[..., 0], shift[..., 1])


def test_padding_is_untouched_and_never_the_collapse_point():
    x = _tracks(b=200, t=6)
    pad = torch.zeros(200, 6, dtype=torch.bool)
    pad[:, 3:] = True
    x[pad] = 0.0
    noisy = corrupt_gps(x, torch.Generator().manual_seed(5), NoiseConfig(collapse_p=1.0, shift_max_deg=0.0), pad)
    assert torch.equal(noisy[pad], x[pad])
    assert (noisy[~pad][:, 0] > 39).all()


def test_coordinates_stay_valid_near_the_pole_and_antimeridian():
    x = torch.tensor([[[89.95, 179.95], [89.99, -179.99]]], dtype=torch.float64).repeat(50, 1, 1)
    noisy = corrupt_gps(x, torch.Generator().manual_seed(0))
    assert (noisy[..., 0] <= 90).all() and (noisy[..., 1] >= -180).all() and (noisy[..., 1] < 180).all()
