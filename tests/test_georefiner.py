"""GeoRefiner: shapes, unit norm, no causal mask, padding, that it reads the frame memory, and that query t
knows frame t (positions and frame link) so a collapsed sequence can be un-collapsed."""

import pytest
import torch
import torch.nn.functional as F

from vidtag.errors import ConfigError
from vidtag.models import FrameEncoderConfig, GeoRefiner, GeoRefinerConfig, TempGeo
from vidtag.models.positions import interpolated_positions

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


# --- query t knows its frame (GeoRefinerConfig.query_link) -------------------------------------------

LINKS = ("none", "position", "frame", "both")


def _refiner(link, seed=0, **kw):
    """Eval-mode refiner; the frame link (zero at init, so a fresh one starts as the literal refiner)
    gets random weights, as after training, so the structural properties show without a training run."""
    torch.manual_seed(seed)
    ref = GeoRefiner(GeoRefinerConfig(**{**CFG.__dict__, "query_link": link, **kw}))
    if ref.frame_link is not None:
        torch.nn.init.normal_(ref.frame_link.weight, std=0.5)
    return ref.eval()


def _collapsed(b=1, t=5, seed=0):
    frames, gps = _inputs(b, t, seed)
    return frames, gps[:, :1].expand(b, t, 16)  # every query the same point (Appendix A's collapse)


def _spread(out):
    return torch.cdist(out, out).amax().item()  # largest distance between two frames' outputs


@pytest.mark.parametrize("link", LINKS)
def test_identical_queries_over_different_frames_give_different_outputs_unless_literal(link):
    frames, gps = _collapsed()
    out = _refiner(link)(frames, gps)
    if link == "none":
        assert _spread(out) < 1e-5  # the literal refiner cannot un-collapse
    else:
        assert _spread(out) > 1e-2


@pytest.mark.parametrize("link", LINKS)
def test_reversing_the_frames_changes_the_outputs_unless_literal(link):
    ref = _refiner(link)
    frames, gps = _inputs(b=1, t=6)
    base = ref(frames, gps)
    # frames reversed under the same queries: the literal refiner's cross-attention is a set operation
    memory_reversed = ref(frames.flip(1), gps)
    assert torch.allclose(memory_reversed, base, atol=1e-5) == (link == "none")
    # frames and queries reversed together: only positions make the refiner order-aware
    both_reversed = ref(frames.flip(1), gps.flip(1)).flip(1)
    assert torch.allclose(both_reversed, base, atol=1e-5) == (link in ("none", "frame"))


@pytest.mark.parametrize("link", LINKS)
def test_padding_anywhere_equals_dropping_the_frame(link):
    """Positions rank the unmasked frames, so a masked frame at the start, middle or end (junk inside) gives
    the valid frames what they get without it, also beside a sequence longer than the table."""
    ref = _refiner(link, max_positions=4)
    short_f, short_g = _inputs(b=1, t=5, seed=1)
    long_f, long_g = _inputs(b=1, t=9, seed=2)
    t = 12
    pad = torch.ones(2, t, dtype=torch.bool)
    slots = [torch.tensor([1, 2, 5, 9, 11]), torch.tensor([0, 2, 3, 4, 5, 7, 8, 10, 11])]
    junk_f, junk_g = _inputs(b=2, t=t, seed=9)
    frames, gps = junk_f * 7, junk_g * 3  # (2, 12, 16)
    for i, (f, g) in enumerate([(short_f, short_g), (long_f, long_g)]):
        pad[i, slots[i]] = False
        frames[i, slots[i]], gps[i, slots[i]] = f[0], g[0]
    out = ref(frames, gps, pad)
    for i, (f, g) in enumerate([(short_f, short_g), (long_f, long_g)]):
        torch.testing.assert_close(out[i, slots[i]], ref(f, g)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("link", ["position", "both"])
def test_a_sequence_longer_than_the_table_interpolates_it(link):
    ref = _refiner(link, max_positions=4)
    frames, gps = _collapsed(b=1, t=40)
    out = ref(frames, gps)
    assert out.shape == (1, 40, 16) and torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(1, 40), atol=1e-5)
    assert torch.cdist(out[0], out[0]).add(torch.eye(40)).amin() > 1e-4  # every frame its own output
    pos = interpolated_positions(ref.pos, None, 40)[0].detach()  # (40, 16)
    table = ref.pos.detach()
    assert torch.equal(pos[0], table[0]) and torch.allclose(pos[-1], table[-1])
    assert torch.allclose(pos[13], table[1], atol=1e-6)  # 13 * (4 - 1) / (40 - 1) = 1


def test_positions_are_tempgeos():
    """One rule for both modules: the shared function reproduces TempGeo's positions, padded or not."""
    torch.manual_seed(0)
    tempgeo = TempGeo(16, FrameEncoderConfig(tempgeo_heads=2, max_positions=4))
    pad = torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) < 0.3
    pad[2] = False  # 11 frames > 4 rows: interpolated
    for mask, t in ((pad, 11), (None, 3), (None, 9)):
        torch.testing.assert_close(interpolated_positions(tempgeo.pos, mask, t), tempgeo.positions(t, mask), atol=0, rtol=0)


def test_literal_variant_has_the_literal_weights_and_bad_links_are_refused():
    literal = set(GeoRefiner(GeoRefinerConfig(**{**CFG.__dict__, "query_link": "none"})).state_dict())
    linked = set(GeoRefiner(CFG).state_dict())
    assert linked - literal == {"pos", "frame_link.weight", "frame_link.bias"} and literal <= linked
    assert GeoRefiner(CFG).pos.shape == (16, 16)  # max_positions defaults to Appendix A's 16 frames
    with pytest.raises(ConfigError, match="query_link"):
        GeoRefinerConfig(query_link="frames")


def _uncollapse_task(gen, rot, b=16, t=6, w=16):
    """Distinct targets (b, t, w); frames that encode them through a fixed rotation; all queries one
    target of the sequence (collapsed, as Appendix A's noise does)."""
    target = F.normalize(torch.randn(b, t, w, generator=gen), dim=-1)
    frames = F.normalize(target @ rot, dim=-1)
    anchor = torch.randint(0, t, (b,), generator=gen)
    return frames, target[torch.arange(b), anchor][:, None].expand(b, t, w), target


def _train_to_uncollapse(link, steps=200):
    torch.manual_seed(0)
    ref = GeoRefiner(GeoRefinerConfig(**{**CFG.__dict__, "query_link": link, "max_positions": 8}))
    gen = torch.Generator().manual_seed(1)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for _ in range(steps):
        frames, queries, target = _uncollapse_task(gen, rot)
        sim = ref(frames, queries) @ target.transpose(1, 2) / 0.1  # (B, T, T) output t vs every target
        loss = F.cross_entropy(sim.flatten(0, 1), torch.arange(6).repeat(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    frames, queries, target = _uncollapse_task(torch.Generator().manual_seed(99), rot)  # unseen sequences
    with torch.no_grad():
        out = ref.eval()(frames, queries)
    return out, out @ target.transpose(1, 2)  # (B, T, W), (B, T, T)


def test_training_un_collapses_a_collapsed_sequence_only_with_a_query_link():
    """A few seconds of training on collapsed sequences: with the link (default) every output ends closest
    to its own frame's target; the literal refiner's outputs stay one point, whatever it learns."""
    out, sim = _train_to_uncollapse("both")
    assert (sim.argmax(dim=-1) == torch.arange(6)).all()
    assert torch.cdist(out, out).add(torch.eye(6)).amin() > 0.1
    out, sim = _train_to_uncollapse("none")
    assert torch.cdist(out, out).amax() < 1e-5
    assert (sim.argmax(dim=-1) == torch.arange(6)).float().mean() < 0.5


# --- output "offset": a bounded GPS correction re-embedded by the location encoder (beyond the paper) ---

def _location_encoder(width=16):
    """A small random location encoder of the real class (the refiner only calls it)."""
    from vidtag.models.config import LocationEncoderConfig
    from vidtag.models.location_encoder import LocationEncoder
    return LocationEncoder.fresh(LocationEncoderConfig(sigmas=[1.0, 256.0, 4096.0], out_dim=width, hidden_dim=32), "random", 0).eval()


def _track(b=2, t=6):
    north = torch.linspace(0.0, 0.02, t)  # a drive of ~2 km
    lat = 52.37 + north[None, :].expand(b, t) + 0.1 * torch.arange(b)[:, None]
    lon = 4.90 + 0.5 * north[None, :].expand(b, t)
    return torch.stack([lat, lon], dim=-1)


def test_shift_km_moves_by_kilometres_and_relative_km_centres_each_sequence():
    from vidtag.geo import haversine_km
    from vidtag.models.georefiner import _relative_km, shift_km
    ll = torch.tensor([[52.0, 4.0]], dtype=torch.float64)
    moved = shift_km(ll, torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    assert haversine_km(52.0, 4.0, float(moved[0, 0]), float(moved[0, 1])) == pytest.approx(5.0, rel=1e-3)
    track = _track().double()
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, -2:] = False
    rel = _relative_km(track, valid)
    assert torch.allclose((rel * valid[..., None]).sum(1), torch.zeros(2, 2, dtype=torch.float64), atol=1e-9)
    assert (rel[1, -2:] == 0).all()
    assert rel[0, -1, 0] - rel[0, 0, 0] == pytest.approx(0.02 * 111.195, rel=1e-3)


def test_offset_refiner_starts_as_its_queries_and_needs_their_gps():
    torch.manual_seed(0)
    enc = _location_encoder()
    ref = GeoRefiner(GeoRefinerConfig(width=16, heads=2, ff_dim=32, dropout=0.0, output="offset")).eval()
    track = _track()
    g = enc(track.flatten(0, 1)).view(2, 6, -1)
    out = ref(torch.randn(2, 6, 16), g, None, gps_latlon=track, location_encoder=enc)
    assert torch.allclose((out * F.normalize(g, dim=-1)).sum(-1), torch.ones(2, 6), atol=1e-5)
    with pytest.raises(ValueError, match="gps_latlon"):
        ref(torch.randn(2, 6, 16), g)
    with pytest.raises(ConfigError, match="output"):
        GeoRefinerConfig(output="gps")


def test_offset_refiner_learns_a_correction_and_keeps_the_track_shape():
    """Trained to undo a sequence-wide shift, it moves every query, and the outputs stay a track, not a point."""
    from vidtag.geo import haversine_km
    from vidtag.models.georefiner import shift_km
    torch.manual_seed(0)
    enc = _location_encoder().requires_grad_(False)
    ref = GeoRefiner(GeoRefinerConfig(width=16, heads=2, ff_dim=32, dropout=0.0, output="offset"))
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    truth = _track()
    noisy = shift_km(truth, torch.tensor([1.0, 0.0]).expand(2, 6, 2))  # every query 1 km too far north
    frames = torch.zeros(2, 6, 16)
    g_noisy = enc(noisy.flatten(0, 1)).view(2, 6, -1)
    for _ in range(150):
        moved = ref.corrected_gps(frames, g_noisy, noisy)  # what forward re-embeds
        loss = ((moved - truth) ** 2).sum()  # a GPS-space target, to test the correction path itself
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref.eval()
    with torch.no_grad():
        out = ref(frames, g_noisy, None, gps_latlon=noisy, location_encoder=enc)
        truth_emb = F.normalize(enc(truth.flatten(0, 1)).view(2, 6, -1), dim=-1)
        after = ref.corrected_gps(frames, g_noisy, noisy)
    before_km = haversine_km(noisy[..., 0].numpy(), noisy[..., 1].numpy(), truth[..., 0].numpy(), truth[..., 1].numpy())
    after_km = haversine_km(after[..., 0].numpy(), after[..., 1].numpy(), truth[..., 0].numpy(), truth[..., 1].numpy())
    assert before_km.mean() == pytest.approx(1.0, rel=1e-2)
    assert after_km.max() < 0.2  # the 1 km shift undone, frame by frame
    # the outputs are the re-embedded corrected track: each is closest to its own frame's truth
    sim = torch.einsum("btd,bsd->bts", out, truth_emb)
    assert (sim.argmax(-1) == torch.arange(6)).float().mean() > 0.8
