"""GeoRefiner: shapes, unit norm, no causal mask, padding, and that it reads the frame memory."""

import torch

from vidtag.models import GeoRefiner, GeoRefinerConfig

CFG = GeoRefinerConfig(width=16, heads=2, ff_dim=32, dropout=0.0)


def _inputs(b=2, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 16, generator=g), torch.randn(b, t, 16, generator=g)


def test_shapes_and_unit_norm():
    torch.manual_seed(0)
    ref = GeoRefiner(CFG).eval()
    frames, gps = _inputs()
    out = ref(frames, gps, torch.zeros(2, 5, dtype=torch.bool))
    assert out.shape == (2, 5, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 5), atol=1e-5)
    assert len(ref.encoder.layers) == 1 and len(ref.decoder.layers) == 2


def test_no_causal_mask_later_queries_affect_earlier_outputs():
    torch.manual_seed(0)
    ref = GeoRefiner(CFG).eval()
    frames, gps = _inputs(b=1)
    base = ref(frames, gps)
    gps2 = gps.clone()
    gps2[0, -1] += 5
    assert not torch.allclose(ref(frames, gps2)[0, 0], base[0, 0], atol=1e-5)


def test_output_depends_on_frames_through_cross_attention():
    torch.manual_seed(0)
    ref = GeoRefiner(CFG).eval()
    frames, gps = _inputs(b=1)
    assert not torch.allclose(ref(frames, gps), ref(frames * -1 + 1, gps), atol=1e-5)


def test_padding_is_ignored():
    torch.manual_seed(0)
    ref = GeoRefiner(CFG).eval()
    frames, gps = _inputs(b=1, t=3)
    alone = ref(frames, gps, torch.zeros(1, 3, dtype=torch.bool))
    junk_f, junk_g = _inputs(b=1, t=2, seed=9)
    padded = ref(torch.cat([frames, junk_f * 9], 1), torch.cat([gps, junk_g], 1), torch.tensor([[False] * 3 + [True] * 2]))
    assert torch.allclose(alone, padded[:, :3], atol=1e-5)
