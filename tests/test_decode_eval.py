"""Temporal decoding and local refinement in the one inference path (Locator -> predict_sequences ->
run_evaluation), on a synthetic model whose answers are known: beyond the paper (App. L)."""

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_refine import SmoothEncoder, paris_grid
from vidtag.evaluation import EvalConfig, EvalRuntime, run_evaluation
from vidtag.gallery import write_gallery
from vidtag.geo import haversine_km, offset_km
from vidtag.inference import InferenceConfig, InferenceError, predict_sequences

PARIS = (48.8566, 2.3522)
LONDON = (51.5074, -0.1278)  # ~344 km away: the look-alike city


class QueryIsFeature(nn.Module):
    """A frame encoder that reads its query embedding straight from the CLIP features."""

    def __init__(self, dim):
        super().__init__()
        self.cfg = SimpleNamespace(clip_dim=dim, dino_dim=1)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, clip, dino, pad_mask=None):
        return F.normalize(clip, dim=-1)


class KeepFrame(nn.Module):
    """A GeoRefiner stand-in that returns the frame embedding: the final retrieval repeats Phase I's."""

    needs_gps = False  # an embedding-output refiner: it never sees the queries' GPS

    def forward(self, frame_emb, gps_emb, pad_mask=None):
        return frame_emb


def synthetic_bundle(enc, gallery, directory):
    path = directory / "gallery.parquet"
    write_gallery(pl.DataFrame({"lat": gallery[:, 0], "lon": gallery[:, 1]}), {"kind": "external"}, path)
    dim = 2 * enc.w.shape[0]
    return SimpleNamespace(frame_encoder=QueryIsFeature(dim), location_encoder=enc, refiner=KeepFrame(),
                           logit_scale=torch.tensor(math.log(100.0)), gallery_path=path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic bundle whose location embeddings fall off within ~200 m (so a look-alike city fills only
    a few of a frame's candidates), a 0.1 km gallery around Paris and London, and a drive in Paris."""
    enc = SmoothEncoder(wavelength_km=(0.5, 2.0))
    gallery = np.concatenate([paris_grid(0.1, half_km=1.5), paris_grid(0.1, half_km=1.0) + np.subtract(LONDON, PARIS)])
    bundle = synthetic_bundle(enc, gallery, tmp_path_factory.mktemp("g"))
    return SimpleNamespace(enc=enc, gallery=gallery, bundle=bundle, dim=2 * enc.w.shape[0])


def embed(enc, latlon):
    return F.normalize(enc(torch.tensor(np.asarray(latlon, np.float64))), dim=-1)


def drive(n=12, spacing_km=0.1):
    lat, lon = np.broadcast_arrays(*offset_km(*PARIS, 0.0, spacing_km * np.arange(n) - 0.6))
    return np.stack([lat, lon], 1)


def jump_features(world, truth, jump_at=(5,)):
    """Query features of a drive where the frames ``jump_at`` look more like a London street than like their own."""
    q = embed(world.enc, truth)
    london = embed(world.enc, np.broadcast_to(LONDON, (len(jump_at), 2)))
    q[list(jump_at)] = F.normalize(0.8 * london + 0.6 * q[list(jump_at)], dim=-1)
    clip = q.numpy().astype(np.float32)
    return clip, np.zeros((len(clip), 1), np.float32)


def errors_km(out, truth, cols=("lat", "lon")):
    return haversine_km(out[cols[0]].to_numpy(), out[cols[1]].to_numpy(), truth[:, 0], truth[:, 1])


def test_viterbi_recovers_a_frame_whose_top1_jumps_to_another_city(world):
    truth = drive()
    clip, dino = jump_features(world, truth)
    offsets = np.array([0, len(truth)])
    run = dict(gallery=world.gallery, gallery_emb=embed(world.enc, world.gallery).numpy(), device="cpu")
    argmax = predict_sequences(world.bundle, clip, dino, None, offsets, **run)
    viterbi = predict_sequences(world.bundle, clip, dino, None, offsets, cfg=InferenceConfig(decode="viterbi", step_km=0.1), **run)
    for cols in (("lat", "lon"), ("phase1_lat", "phase1_lon")):
        e_arg, e_vit = errors_km(argmax, truth, cols), errors_km(viterbi, truth, cols)
        assert e_arg[5] > 300 and np.delete(e_arg, 5).max() < 0.1  # argmax: one frame in London
        assert e_vit.max() < 0.1  # the decoded path stays on the drive
    # Timestamps set the scale: three hours either side of frame 5 make the London detour affordable.
    ts = np.arange(len(truth), dtype=np.float64)
    timed = predict_sequences(world.bundle, clip, dino, None, offsets, timestamps_s=ts,
                              cfg=InferenceConfig(decode="viterbi"), **run)
    assert errors_km(timed, truth).max() < 0.1
    ts[5:] += 3 * 3600.0
    ts[6:] += 3 * 3600.0
    cut = predict_sequences(world.bundle, clip, dino, None, offsets, timestamps_s=ts, cfg=InferenceConfig(decode="viterbi"), **run)
    assert errors_km(cut, truth)[5] > 300
    # Without timestamps or a step scale the decoder has no transition scale: a one-line error.
    with pytest.raises(InferenceError, match="step"):
        predict_sequences(world.bundle, clip, dino, None, offsets, cfg=InferenceConfig(decode="viterbi"), **run)
    with pytest.raises(InferenceError, match="backwards"):
        predict_sequences(world.bundle, clip, dino, None, offsets, timestamps_s=-ts, cfg=InferenceConfig(decode="viterbi"), **run)


def test_flat_transitions_give_the_argmax_through_the_full_path(world):
    rng = np.random.default_rng(0)
    truth = drive(20)
    clip, dino = jump_features(world, truth, jump_at=(3, 9, 10))
    clip = clip + rng.normal(0, 0.01, clip.shape).astype(np.float32)  # noisy queries: many near-ties
    offsets = np.array([0, 7, 20])
    valid = np.ones(20, bool)
    valid[[4, 15]] = False
    run = dict(gallery=world.gallery, gallery_emb=embed(world.enc, world.gallery).numpy(), device="cpu")
    argmax = predict_sequences(world.bundle, clip, dino, valid, offsets, **run)
    flat = predict_sequences(world.bundle, clip, dino, valid, offsets,
                             cfg=InferenceConfig(decode="viterbi", step_km=0.1, transition_weight=0.0), **run)
    assert flat.equals(argmax)
    decoded = predict_sequences(world.bundle, clip, dino, valid, offsets, cfg=InferenceConfig(decode="viterbi", step_km=0.1), **run)
    assert not decoded.equals(argmax)


def test_refinement_in_the_inference_path_moves_answers_within_their_cell(tmp_path):
    enc = SmoothEncoder()  # smooth at the 1 km gallery's scale, so retrieval finds the right cell
    coarse = paris_grid(1.0, half_km=2.0)
    world = SimpleNamespace(enc=enc, bundle=synthetic_bundle(enc, coarse, tmp_path))
    truth = drive(10, spacing_km=0.037)
    clip, dino = jump_features(world, truth, jump_at=())
    offsets = np.array([0, len(truth)])
    run = dict(gallery=coarse, gallery_emb=embed(enc, coarse).numpy(), device="cpu")
    plain = predict_sequences(world.bundle, clip, dino, None, offsets, **run)
    refined = predict_sequences(world.bundle, clip, dino, None, offsets, cfg=InferenceConfig(refine=True, refine_step_km=0.025), **run)
    both = predict_sequences(world.bundle, clip, dino, None, offsets,
                             cfg=InferenceConfig(refine=True, refine_step_km=0.025, decode="viterbi", step_km=0.037), **run)
    assert errors_km(plain, truth).mean() > 0.2
    for out in (refined, both):
        for cols in (("lat", "lon"), ("phase1_lat", "phase1_lon")):
            assert errors_km(out, truth, cols).max() < 0.04
    # The candidates column holds the refined lattice, best first.
    cands = predict_sequences(world.bundle, clip, dino, None, offsets, cfg=InferenceConfig(refine=True, refine_step_km=0.025),
                              top_k=5, **run)["candidates"]
    first = cands.to_list()[0]
    assert [c["rank"] for c in first] == [1, 2, 3, 4, 5]
    assert haversine_km(first[0]["lat"], first[0]["lon"], *truth[0]) < 0.04
    assert first[0]["score"] >= first[1]["score"]


def test_with_refinement_the_decoder_still_lets_the_path_move_a_cell_a_step(tmp_path):
    """Refinement moves candidates within their cells only, so the decoder's dead zone stays the gallery's spacing
    (not the lattice's step): a drive whose refined answers scatter by a few hundred metres, with weak emissions,
    is followed as argmax follows it instead of being frozen in place by the distance cost."""
    enc = SmoothEncoder()
    coarse = paris_grid(1.0, half_km=3.0)
    bundle = synthetic_bundle(enc, coarse, tmp_path)
    bundle.logit_scale = torch.tensor(math.log(3.0))  # weak emissions: the transitions weigh
    rng = np.random.default_rng(0)
    n = 30
    along = 0.1 * np.arange(n) - 1.5
    truth = np.stack(offset_km(*PARIS, np.zeros(n), along), 1)
    seen = np.stack(offset_km(*PARIS, rng.normal(0, 0.3, n), along + rng.normal(0, 0.3, n)), 1)  # imprecise frames
    clip, dino = embed(enc, seen).numpy(), np.zeros((n, 1), np.float32)
    run = dict(gallery=coarse, gallery_emb=embed(enc, coarse).numpy(), device="cpu")
    cfg = dict(refine=True, refine_step_km=0.025, step_km=0.1)
    argmax = predict_sequences(bundle, clip, dino, None, np.array([0, n]), cfg=InferenceConfig(**cfg), **run)
    viterbi = predict_sequences(bundle, clip, dino, None, np.array([0, n]), cfg=InferenceConfig(decode="viterbi", **cfg), **run)
    assert errors_km(viterbi, truth).mean() <= errors_km(argmax, truth).mean() + 0.02
    east_km = haversine_km(PARIS[0], viterbi["lon"].min(), PARIS[0], viterbi["lon"].max())
    assert east_km > 0.9 * (along[-1] - along[0])  # the path spans the drive


def test_evaluation_reports_the_chosen_decode_and_compares_both(world, tmp_path):
    rng = np.random.default_rng(1)
    val = [drive(12), drive(12, spacing_km=0.08)]
    train_lat, train_lon = offset_km(*PARIS, rng.uniform(-1, 1), 0.1 * np.arange(30) - 1.5)  # a train track, 100 m steps
    rows = []
    for s, tr in enumerate(val):
        rows += [dict(sequence_id=f"v{s}", frame_index=i, lat=la, lon=lo, split="val") for i, (la, lo) in enumerate(tr)]
    rows += [dict(sequence_id="t0", frame_index=i, lat=la, lon=lo, split="train")
             for i, (la, lo) in enumerate(zip(np.broadcast_to(train_lat, 30), train_lon))]
    manifest = pl.DataFrame(rows).with_columns(pl.col("frame_index").cast(pl.Int32))
    clip_v = [jump_features(world, tr, jump_at=(4, 5))[0] for tr in val]
    clip = np.concatenate(clip_v + [np.zeros((30, world.dim), np.float32)]).astype(np.float16)
    features = SimpleNamespace(clip=clip, dino=np.zeros((len(clip), 1), np.float16), valid=np.ones(len(clip), bool))
    run = dict(runtime=EvalRuntime(device="cpu"), cache_dir=tmp_path)
    plain = run_evaluation(world.bundle, features, manifest, EvalConfig(), **run).metrics
    chosen = run_evaluation(world.bundle, features, manifest, EvalConfig(decode="viterbi"), **run).metrics
    assert plain["decode"]["step_km"] == pytest.approx(0.1, rel=1e-3)  # measured on the train track
    for m in (plain, chosen):
        assert set(m["compare"]) == {"argmax", "viterbi"} and set(m["compare"]["viterbi"]) == {"final", "phase1"}
        vit, arg = m["compare"]["viterbi"]["final"], m["compare"]["argmax"]["final"]
        assert arg["frames_off_25km_pct"] == pytest.approx(100 * 4 / 24) and vit["frames_off_25km_pct"] == 0.0
        assert vit["dfd_km"] < 1.0 < arg["dfd_km"]
        assert vit["frame_acc_1km"] >= arg["frame_acc_1km"]
    assert plain["compare"] == chosen["compare"]  # one run computes both, whichever is reported
    for m, name in ((plain, "argmax"), (chosen, "viterbi")):
        assert m["frame"]["acc_1km"] == m["compare"][name]["final"]["frame_acc_1km"]
        assert m["trajectory"]["dfd_km"] == pytest.approx(m["compare"][name]["final"]["dfd_km"])
        assert m["phase1"]["frame"]["median_km"] == m["compare"][name]["phase1"]["frame_median_km"]
    assert plain["cost"]["gallery_points"] == len(world.gallery) and plain["cost"]["refined_points_embedded"] == 0
    refined = run_evaluation(world.bundle, features, manifest, EvalConfig(refine=True, refine_step_km=0.05), **run).metrics
    assert set(refined["compare"]) == {"argmax", "viterbi", "gallery_top1"} and refined["cost"]["refined_points_embedded"] > 0
    assert refined["compare"]["gallery_top1"] == plain["compare"]["argmax"]  # before refinement: Fig. 5's answer
    # With smoothing too, gallery_top1 is the smoothed gallery top-1, not the smoothed refined answer.
    smoothed = run_evaluation(world.bundle, features, manifest, EvalConfig(smooth_frames=2), **run).metrics
    both = run_evaluation(world.bundle, features, manifest, EvalConfig(smooth_frames=2, refine=True, refine_step_km=0.05), **run).metrics
    assert both["compare"]["gallery_top1"] == smoothed["compare"]["argmax"]
    assert both["compare"]["argmax"] != both["compare"]["gallery_top1"]
