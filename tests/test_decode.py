import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidtag import geo
from vidtag.decode import (
    DecodeConfig,
    DecodeError,
    _half_angle_trig,
    _pairwise_km,
    decode_candidates,
    emissions_from_scores,
    step_scale_km,
    transition_scales_km,
    viterbi,
)
from vidtag.errors import VidtagError

PARIS = (48.8566, 2.3522)
LONDON = (51.5074, -0.1278)  # ~344 km from Paris: the look-alike city


def drive_lattice(n_frames=5, spacing_km=1.0):
    """A drive east from Paris, one frame per ``spacing_km``; each frame has 3 candidates:
    0 = on the drive, 1 = 200 m off it, 2 = London. Emissions favour the drive except frame 2,
    whose top-1 is London (a near-miss confusion, App. L)."""
    lat, lon = np.broadcast_arrays(*geo.offset_km(PARIS[0], PARIS[1], 0.0, spacing_km * np.arange(n_frames)))
    off_lat, off_lon = geo.offset_km(lat, lon, 0.2, 0.0)
    cand = np.stack(
        [np.stack([lat, lon], -1), np.stack([off_lat, off_lon], -1), np.broadcast_to(LONDON, (n_frames, 2))], axis=1
    )  # (T, 3, 2)
    prob = np.tile([0.7, 0.2, 0.1], (n_frames, 1))
    prob[2] = [0.3, 0.1, 0.6]  # frame 2: London is top-1, the drive second
    return torch.log(torch.tensor(prob))[None], torch.tensor(cand)[None]  # (1, T, 3), (1, T, 3, 2)


def test_far_top1_is_replaced_by_the_on_drive_candidate():
    log_e, cand = drive_lattice()
    assert log_e[0].argmax(-1).tolist() == [0, 0, 2, 0, 0]  # per frame: a 344 km jump and back
    out = viterbi(log_e, cand, step_km=1.0)
    assert out.index.tolist() == [[0, 0, 0, 0, 0]]
    # The path score: its emissions minus one nat per km driven (step_km = 1).
    step_km = geo.haversine_km(*cand[0, :-1, 0].T, *cand[0, 1:, 0].T)  # 1 km along the parallel, a hair less on the great circle
    expected = float(log_e[0, :, 0].sum()) - step_km.sum()
    assert float(out.log_score[0]) == pytest.approx(expected, rel=1e-9)


def test_strong_emission_is_kept_when_the_scale_allows_the_jump():
    log_e, cand = drive_lattice()
    # 1000 km per step: the 2 x 344 km detour costs < 1 nat, less than the emission gain (log 2).
    assert viterbi(log_e, cand, step_km=1000.0).index.tolist() == [[0, 0, 2, 0, 0]]
    # Weight 0 drops transitions altogether: the per-frame argmax.
    assert viterbi(log_e, cand, step_km=1.0, transition_weight=0.0).index.tolist() == [[0, 0, 2, 0, 0]]


def test_bigger_dt_allows_bigger_jumps():
    log_e, cand = drive_lattice()
    prob = torch.tensor([0.7, 0.2, 0.1]).log()
    log_e[0, 2] = prob
    log_e[0, 3:] = torch.tensor([0.2, 0.1, 0.7]).log()  # a video cut before frame 3: London is top-1 from then on
    dt_short = torch.full((1, 5), 120.0)  # 2 min at <= 130 km/h: ~4 km, London out of reach
    assert viterbi(log_e, cand, dt_s=dt_short, max_speed_kmh=130.0).index.tolist() == [[0, 0, 0, 0, 0]]
    dt_cut = dt_short.clone()
    dt_cut[0, 3] = 3 * 3600.0  # three hours between frames 2 and 3: a 344 km trip fits
    assert viterbi(log_e, cand, dt_s=dt_cut, max_speed_kmh=130.0).index.tolist() == [[0, 0, 0, 2, 2]]


def test_padding_is_skipped_and_gets_index_0():
    log_e, cand = drive_lattice()
    pad = torch.tensor([[False, True, True, False, True]])
    cand[pad] = float("nan")  # padded steps are never read
    log_e[pad] = float("nan")
    out = viterbi(log_e, cand, pad, step_km=1.0)
    assert out.index.tolist() == [[0, 0, 0, 0, 0]]
    # Frames 0 and 3 are ~3 km and 3 steps apart: ~one nat of transition, no cost for padding.
    dist_km = geo.haversine_km(*cand[0, 0, 0], *cand[0, 3, 0])
    expected = float(log_e[0, 0, 0] + log_e[0, 3, 0]) - dist_km / 3.0
    assert float(out.log_score[0]) == pytest.approx(expected, rel=1e-9)
    all_pad = viterbi(log_e, cand, torch.ones(1, 5, dtype=torch.bool), step_km=1.0)
    assert all_pad.index.tolist() == [[0] * 5] and float(all_pad.log_score[0]) == 0.0


def test_missing_candidates_may_hold_nan_coordinates():
    log_e, cand = drive_lattice()
    log_e[0, 1, 2] = -math.inf  # frame 1 has only two candidates
    cand[0, 1, 2] = float("nan")
    assert viterbi(log_e, cand, step_km=1.0).index.tolist() == [[0, 0, 0, 0, 0]]


# --------------------------------------------------------------------------------------------
# Exactness: brute force over every path of small random lattices


def brute_force(log_e, cand, pad, dt_s, step_km, max_speed_kmh, weight, min_scale_km=1e-3, free=0.0):
    """Best score and the scores of all paths for one sequence, enumerating K^T_valid paths."""
    frames = [t for t in range(log_e.shape[0]) if not pad[t]]
    k = log_e.shape[1]
    scores = {}
    for choice in itertools.product(range(k), repeat=len(frames)):
        s = sum(log_e[t, i] for t, i in zip(frames, choice))
        if s == -math.inf:
            continue
        for (a, i), (b, j) in itertools.pairwise(zip(frames, choice)):
            gap_km = (b - a) * step_km if dt_s is None else dt_s[a + 1 : b + 1].sum() * max_speed_kmh / 3600
            d = geo.haversine_km(cand[a, i, 0], cand[a, i, 1], cand[b, j, 0], cand[b, j, 1])
            scale = max(gap_km, min_scale_km)
            s -= weight * max(0.0, d - free * scale) / scale
        path = [0] * log_e.shape[0]
        for t, i in zip(frames, choice):
            path[t] = i
        scores[tuple(path)] = s
    return scores


def random_lattice(rng, b, t, k, dt=False):
    log_e = torch.log_softmax(torch.tensor(rng.normal(0, 2, (b, t, k))), -1)
    lat = PARIS[0] + rng.normal(0, 0.02, (b, t, k))  # candidates within a few km: transitions matter
    lon = PARIS[1] + rng.normal(0, 0.03, (b, t, k))
    cand = torch.tensor(np.stack([lat, lon], -1))
    pad = torch.tensor(rng.random((b, t)) < 0.3)
    missing = torch.tensor(rng.random((b, t, k)) < 0.15)
    missing[..., 0] = False  # every frame keeps one candidate
    log_e[missing] = -math.inf
    cand[missing] = float("nan")
    dt_s = torch.tensor(rng.uniform(0, 120, (b, t))) if dt else None
    return log_e, cand, pad, dt_s


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    b, t, k = 3, int(rng.integers(1, 6)), int(rng.integers(1, 5))
    use_dt = seed % 2 == 1
    weight = float(rng.choice([0.0, 0.5, 1.0, 3.0]))
    free = float(rng.choice([0.0, 0.0, 1.0, 2.5]))  # the dead zone, in scales
    log_e, cand, pad, dt_s = random_lattice(rng, b, t, k, dt=use_dt)
    kw = dict(dt_s=dt_s, max_speed_kmh=60.0) if use_dt else dict(step_km=0.8)
    out = viterbi(log_e, cand, pad, transition_weight=weight, free_scales=free, **kw)
    for s in range(b):
        paths = brute_force(
            log_e[s].numpy(), cand[s].numpy(), pad[s].numpy(), None if dt_s is None else dt_s[s].numpy(),
            0.8, 60.0, weight, free=free,
        )
        ranked = sorted(paths.values(), reverse=True)
        assert float(out.log_score[s]) == pytest.approx(ranked[0], rel=1e-9, abs=1e-9)
        chosen = tuple(out.index[s].tolist())
        assert paths[chosen] == pytest.approx(ranked[0], rel=1e-9, abs=1e-9)  # the returned path scores the max
        if len(ranked) == 1 or ranked[0] - ranked[1] > 1e-9:
            assert paths[chosen] == ranked[0]


def test_batched_equals_per_sequence():
    rng = np.random.default_rng(7)
    log_e, cand, _, dt_s = random_lattice(rng, 4, 12, 6, dt=True)
    lengths = [12, 5, 9, 1]
    pad = torch.arange(12)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T) valid first, then padding
    out = viterbi(log_e, cand, pad, dt_s, max_speed_kmh=50.0)
    for s, n in enumerate(lengths):
        one = viterbi(log_e[s : s + 1, :n], cand[s : s + 1, :n], None, dt_s[s : s + 1, :n], max_speed_kmh=50.0)
        assert out.index[s, :n].tolist() == one.index[0].tolist()
        assert out.index[s, n:].eq(0).all()
        assert float(out.log_score[s]) == pytest.approx(float(one.log_score[0]), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Weight 0 is exactly the per-frame argmax, ties included


@st.composite
def lattices(draw):
    b, t, k = draw(st.integers(1, 3)), draw(st.integers(0, 6)), draw(st.integers(1, 5))
    # A few distinct values, some huge or tiny, so ties and rounding traps are common.
    value = st.sampled_from([-math.inf, -1e12, -3.0, -1.0, -1.0 + 1e-15, 0.0, 1e-300, 2.5, 1e12])
    log_e = torch.tensor(draw(st.lists(value, min_size=b * t * k, max_size=b * t * k)), dtype=torch.float64)
    log_e = log_e.reshape(b, t, k)
    log_e[..., -1] = torch.where(log_e[..., -1] == -math.inf, 0.0, log_e[..., -1])  # one finite per frame
    pad = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).reshape(b, t)
    seed = draw(st.integers(0, 2**32 - 1))
    return log_e, pad, seed


@settings(max_examples=150, deadline=None)
@given(lattices())
def test_weight_zero_is_the_per_frame_argmax(lattice):
    log_e, pad, seed = lattice
    rng = np.random.default_rng(seed)
    b, t, k = log_e.shape
    cand = torch.tensor(np.stack([rng.uniform(-90, 90, (b, t, k)), rng.uniform(-180, 180, (b, t, k))], -1))
    out = viterbi(log_e, cand, pad, step_km=0.01, transition_weight=0.0)
    expected = torch.where(pad, 0, log_e.argmax(-1)) if t else torch.zeros(b, 0, dtype=torch.long)
    assert torch.equal(out.index, expected)


lat_s, lon_s = st.floats(-90, 90), st.floats(-180, 180)


@settings(max_examples=200, deadline=None)
@given(lat_s, lon_s, lat_s, lon_s, st.sampled_from([0.0, 1e-9, 1e-5, 1.0]))
def test_pairwise_distance_is_the_haversine(lat1, lon1, lat2, lon2, near_deg):
    # The decoder's per-candidate trigonometry against vidtag.geo, anywhere on the globe (antimeridian,
    # poles) and down to millimetres (near_deg moves the second point right next to the first).
    if near_deg:
        lat2, lon2 = np.clip(lat1 + near_deg, -90, 90), lon1 - near_deg
    a = torch.tensor([[[lat1, lon1]]], dtype=torch.float64)  # (1, 1, 2)
    b = torch.tensor([[[lat2, lon2]]], dtype=torch.float64)
    d = float(_pairwise_km(_half_angle_trig(a), _half_angle_trig(b))[0, 0, 0])
    assert d == pytest.approx(float(geo.haversine_km(lat1, lon1, lat2, lon2)), rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------------------------
# Emissions from retrieval scores, step scale, errors


def test_decode_candidates_uses_the_model_temperature():
    rng = np.random.default_rng(3)
    scores = torch.tensor(rng.uniform(0.2, 0.4, (2, 6, 4)))
    _, cand, pad, _ = random_lattice(rng, 2, 6, 4)
    cand = torch.where(cand.isnan(), torch.tensor(PARIS, dtype=torch.float64), cand)
    ls = math.log(100.0)
    idx = decode_candidates(scores, ls, cand, pad, step_km=0.5)
    ref = viterbi(torch.log_softmax(100.0 * scores, -1), cand, pad, step_km=0.5).index
    assert torch.equal(idx, ref)
    log_e = emissions_from_scores(scores, torch.tensor(ls), pad)
    assert torch.allclose(log_e.exp().sum(-1), torch.ones(2, 6, dtype=torch.float64))
    # A hot temperature makes the evidence dominate (per-frame argmax); a cold one flattens it and the
    # shortest path through the candidates wins.
    hot = decode_candidates(scores, math.log(1e6), cand, pad, step_km=0.5)
    assert torch.equal(hot, torch.where(pad, 0, scores.argmax(-1)))
    cold = decode_candidates(scores, math.log(1e-6), cand, pad, step_km=0.5)
    assert torch.equal(cold, viterbi(torch.zeros_like(scores), cand, pad, step_km=0.5).index)
    assert not torch.equal(hot, cold)


def straight_track(n, spacing_km, start=PARIS, bearing_deg=60.0):
    lat, lon = geo.destination_point(start[0], start[1], bearing_deg, spacing_km * np.arange(n))
    return np.stack([lat, lon], -1)


def test_step_scale_on_straight_tracks():
    a, b = straight_track(301, 0.05), straight_track(51, 0.05, start=LONDON, bearing_deg=200.0)
    latlon = np.concatenate([a, b])  # the Paris -> London splice between tracks is not a step
    assert step_scale_km(latlon, [0, 301, 352]) == pytest.approx(0.05, rel=1e-9)
    assert step_scale_km(latlon, lengths=[301, 51]) == pytest.approx(0.05, rel=1e-9)
    glitch = a.copy()
    glitch[40] = LONDON  # one GPS glitch: out 344 km and back, 2 of 300 steps
    assert step_scale_km(glitch, [0, 301], trim=0.0) > 2.0
    assert step_scale_km(glitch, [0, 301]) == pytest.approx(0.05, rel=1e-6)  # the top 1% is trimmed away
    repeated = np.repeat(a, 3, axis=0)  # each GPS fix held for 3 frames: the median step would be 0
    assert step_scale_km(repeated, [0, len(repeated)], trim=0.0) == pytest.approx(0.05 * 300 / 902, rel=1e-9)


def test_bad_inputs_raise_decode_errors():
    log_e, cand = drive_lattice()
    with pytest.raises(DecodeError, match="step_km"):
        viterbi(log_e, cand)
    with pytest.raises(DecodeError, match="max_speed_kmh"):
        viterbi(log_e, cand, dt_s=torch.ones(1, 5))
    with pytest.raises(DecodeError, match="cand_latlon"):
        viterbi(log_e, cand[:, :, :2], step_km=1.0)
    bad = log_e.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(DecodeError, match="NaN"):
        viterbi(bad, cand, step_km=1.0)
    bad[0, 1] = -math.inf
    with pytest.raises(DecodeError, match="no finite"):
        viterbi(bad, cand, step_km=1.0)
    dt = torch.ones(1, 5)
    dt[0, 3] = -1.0
    with pytest.raises(DecodeError, match="dt_s"):
        viterbi(log_e, cand, dt_s=dt, max_speed_kmh=100.0)
    with pytest.raises(VidtagError, match="two frames"):
        step_scale_km(straight_track(3, 1.0), lengths=[1, 1, 1])
    with pytest.raises(ValueError, match="exactly one"):
        step_scale_km(straight_track(3, 1.0))


# --------------------------------------------------------------------------------------------
# Per-step scales: timed and untimed frames in one batch


def test_per_step_scale_equals_dt_and_step_km_forms():
    rng = np.random.default_rng(3)
    log_e, cand, pad, dt_s = random_lattice(rng, 3, 7, 4, dt=True)
    by_dt = viterbi(log_e, cand, pad, dt_s, max_speed_kmh=60.0)
    as_scale = viterbi(log_e, cand, pad, scale_km=dt_s * 60.0 / 3600.0)
    assert torch.equal(by_dt.index, as_scale.index)
    assert torch.allclose(by_dt.log_score, as_scale.log_score, rtol=1e-12)
    by_step = viterbi(log_e, cand, pad, step_km=0.8)
    assert torch.equal(by_step.index, viterbi(log_e, cand, pad, scale_km=torch.full((3, 7), 0.8)).index)


def test_transition_scales_mix_timestamps_and_step_counts():
    cfg = DecodeConfig(step_km=0.02, max_speed_kmh=36.0)  # 36 km/h = 10 m/s
    dt = np.array([[np.nan, 2.0, np.nan, 0.0], [np.nan, np.nan, np.nan, np.nan]])
    steps = np.array([[0, 1, 3, 1], [0, 1, 2, 0]])  # row 1: a gap over two dropped frames, then padding
    got = transition_scales_km(dt, steps, cfg)
    np.testing.assert_allclose(got, [[0.0, 0.02, 0.06, 0.0], [0.0, 0.02, 0.04, 0.0]])
    with pytest.raises(DecodeError, match="step scale"):
        transition_scales_km(dt, steps, DecodeConfig())  # an untimed step and no step_km
    with pytest.raises(DecodeError, match="backwards"):
        transition_scales_km(np.array([[np.nan, -1.0]]), np.array([[0, 1]]), cfg)
    with pytest.raises(DecodeError, match="max_speed_kmh"):
        DecodeConfig(max_speed_kmh=0.0)
    with pytest.raises(DecodeError, match="scale_km"):
        viterbi(*drive_lattice(), scale_km=torch.ones(1, 4))


def test_dead_zone_lets_the_path_follow_the_camera():
    # Candidates 0 follow a drive 40 m per frame; candidates 1 stand still at the start, and the emissions
    # barely prefer the drive (tens of metres apart, nearly equal embeddings).
    n = 8
    lat, lon = np.broadcast_arrays(*geo.offset_km(PARIS[0], PARIS[1], 0.0, 0.04 * np.arange(n)))
    cand = torch.tensor(np.stack([np.stack([lat, lon], -1), np.broadcast_to(np.stack([lat[:1], lon[:1]], -1), (n, 2))], 1))[None]
    log_e = torch.log(torch.tensor([[0.52, 0.48]] * n, dtype=torch.float64))[None]
    assert viterbi(log_e, cand, step_km=0.04).index.tolist() == [[0] + [1] * (n - 1)]  # collapses onto the start
    assert viterbi(log_e, cand, step_km=0.04, free_scales=1.0).index.tolist() == [[0] * n]  # follows the drive
    far = cand.clone()
    far[0, 3, 1] = torch.tensor(LONDON)  # a look-alike city as the other candidate: still never taken
    log_far = log_e.clone()
    log_far[0, 3] = torch.log(torch.tensor([0.2, 0.8]))
    assert viterbi(log_far, far, step_km=0.04, free_scales=1.0).index[0, 3] == 0


def test_the_public_transitions_score_viterbis_path():
    """A path's log score is its emissions plus log_transitions of candidate_distances_km along it: the public pair
    is what Viterbi maximises (a study of other decoders over the same HMM uses them, benchmarks/decoder_study.py)."""
    from vidtag.decode import candidate_distances_km, log_transitions

    rng = np.random.default_rng(3)
    log_e, cand, _, _ = random_lattice(rng, 1, 9, 5)
    log_e, cand = log_e.clamp_min(-50.0), torch.nan_to_num(cand, nan=PARIS[0])  # every candidate real here
    out = viterbi(log_e, cand, step_km=0.3, transition_weight=1.7, free_scales=1.0)
    path = out.index[0]
    dist = candidate_distances_km(cand[0, :-1], cand[0, 1:])  # (T - 1, K, K)
    trans = log_transitions(dist.clone(), 0.3, 1.7, 1.0)
    score = log_e[0, torch.arange(9), path].sum() + trans[torch.arange(8), path[:-1], path[1:]].sum()
    assert float(out.log_score[0]) == pytest.approx(float(score), rel=1e-12, abs=1e-9)
    d = geo.haversine_km(cand[0, 0, :, 0].numpy()[:, None], cand[0, 0, :, 1].numpy()[:, None],
                         cand[0, 1, :, 0].numpy()[None], cand[0, 1, :, 1].numpy()[None])
    np.testing.assert_allclose(dist[0].numpy(), d, atol=1e-9)
