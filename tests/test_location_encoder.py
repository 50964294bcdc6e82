"""LocationEncoder: parity with geoclip's own encoder, sigma rescaling, the fixed Fourier matrix."""

import geoclip.model.location_encoder as geoclip_le
import pytest
import torch

from vidtag.models import LocationEncoder, LocationEncoderConfig

POINTS = torch.tensor([[40.7128, -74.0060], [0.0, 0.0], [-33.87, 151.21], [89.9, 179.9], [-89.5, -179.99], [51.5, -0.12]])


@pytest.fixture(scope="module")
def geoclip_encoder():
    return geoclip_le.LocationEncoder().eval()  # loads the shipped weights from the package; no hub


@pytest.fixture(scope="module")
def ours_geoclip_sigmas():
    return LocationEncoder.from_geoclip(sigmas=(2**0, 2**4, 2**8)).eval()


def test_capsules_match_geoclip_exactly_on_projected_input(geoclip_encoder, ours_geoclip_sigmas):
    with torch.no_grad():
        xy = geoclip_le.equal_earth_projection(POINTS)
        assert torch.allclose(ours_geoclip_sigmas.encode_projected(xy), geoclip_encoder(POINTS), atol=1e-6, rtol=0)


def test_full_forward_matches_geoclip(geoclip_encoder, ours_geoclip_sigmas):
    # vidtag.geo.equal_earth_torch uses geoclip's operation order, so the projection is bit-identical and
    # the whole encoder matches to the 1e-5 over 2000 random points.
    g = torch.Generator().manual_seed(0)
    latlon = torch.rand(2000, 2, generator=g) * torch.tensor([178.0, 358.0]) - torch.tensor([89.0, 179.0])
    latlon = torch.cat([POINTS, latlon])
    with torch.no_grad():
        ours, ref = ours_geoclip_sigmas(latlon), geoclip_encoder(latlon)
    assert ours.shape == (len(latlon), 512)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert (ours - ref).abs().mean() < 1e-6


def test_other_sigmas_rescale_the_pretrained_fourier_matrix(ours_geoclip_sigmas):
    paper = LocationEncoder.from_geoclip(sigmas=(2**0, 2**3, 2**8))
    b_old = ours_geoclip_sigmas.LocEnc1.capsule[0].b
    b_new = paper.LocEnc1.capsule[0].b
    assert torch.allclose(b_new, b_old * (2**3 / 2**4))
    assert torch.equal(paper.LocEnc0.capsule[0].b, ours_geoclip_sigmas.LocEnc0.capsule[0].b)
    assert torch.equal(paper.LocEnc1.capsule[1].weight, ours_geoclip_sigmas.LocEnc1.capsule[1].weight)
    assert paper.sigmas == (1.0, 8.0, 256.0)


def test_fourier_matrix_is_saved_but_not_trained():
    enc = LocationEncoder(cfg=LocationEncoderConfig(sigmas=(1.0, 8.0), hidden_dim=16, out_dim=8))
    assert "LocEnc0.capsule.0.b" in enc.state_dict()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert not any(n.endswith(".b") for n in trainable)
    out = enc(POINTS)
    out.sum().backward()
    assert enc.LocEnc0.capsule[0].b.grad is None
    assert out.shape == (len(POINTS), 8)


def test_from_geoclip_refuses_wrong_number_of_sigmas():
    with pytest.raises(ValueError, match="3 sigmas"):
        LocationEncoder.from_geoclip(sigmas=(1, 8))


def test_pretrained_config_with_non_geoclip_shape_is_refused():
    with pytest.raises(ValueError, match="init to random"):
        LocationEncoder.from_config(LocationEncoderConfig(hidden_dim=64), init="geoclip")
