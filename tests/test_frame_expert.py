"""The per-frame expert (vidtag.models.frame_expert): saved in the bundle, read back, and combined with the
main model in both retrievals of Fig. 5 as a product of experts; smoothing of the answers in inference."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_inference import DC, DD, TINY_MODEL, features, grid

from vidtag.errors import BundleError, InferenceError
from vidtag.inference import InferenceConfig, predict_sequences
from vidtag.models.bundle import Bundle, build_models, load_bundle, save_bundle
from vidtag.models.config import VidTAGConfig
from vidtag.models.frame_expert import FrameExpert, expert_config
from vidtag.smoothing import smooth_tracks


def expert_bundle(directory, gallery, with_expert=True, expert_scale=1.5):
    import polars as pl

    cfg = VidTAGConfig.from_dict(TINY_MODEL)
    frame, loc, refiner = build_models(cfg, seed=0)
    expert = None
    if with_expert:
        e_frame, e_loc, _ = build_models(expert_config(cfg), seed=7)
        expert = FrameExpert(e_frame, e_loc, torch.tensor(expert_scale))
    gallery_file = directory.parent / f"{directory.name}-gallery.parquet"
    pl.DataFrame({"lat": gallery[:, 0], "lon": gallery[:, 1]}).write_parquet(gallery_file)
    config = {"model": cfg.to_dict(), "feature_dims": {"clip": DC, "dino": DD}}
    if expert is not None:
        config["expert"] = {"model": expert_config(cfg).to_dict()}
    save_bundle(directory, Bundle(frame, loc, refiner, torch.tensor(2.0), config, gallery_file, expert))
    return load_bundle(directory)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert")
    return expert_bundle(root / "with", grid()), expert_bundle(root / "without", grid(), with_expert=False)


def test_the_expert_is_saved_and_read_back(pair, tmp_path):
    with_expert, without = pair
    assert without.expert is None
    e = with_expert.expert
    assert e.frame_encoder.tempgeo is None and float(e.logit_scale) == pytest.approx(1.5)
    again = expert_bundle(tmp_path / "again", grid())
    for (name, a), (_, b) in zip(e.state_dict().items(), again.expert.state_dict().items()):
        assert torch.equal(a, b), name
    # the main model is the same as in a bundle without an expert
    for (name, a), (_, b) in zip(with_expert.frame_encoder.state_dict().items(), without.frame_encoder.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_expert_with_tempgeo_is_refused(tmp_path):
    expert_bundle(tmp_path / "b", grid())
    path = tmp_path / "b" / "config.json"
    config = json.loads(path.read_text())
    config["expert"]["model"]["frame"]["tempgeo_layers"] = 2
    path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match="tempgeo_layers 0"):
        load_bundle(tmp_path / "b")
    with pytest.raises(ValueError, match="tempgeo_layers: 0"):
        cfg = VidTAGConfig.from_dict(TINY_MODEL)
        FrameExpert(build_models(cfg)[0], build_models(cfg)[1], torch.tensor(0.0))


def brute_force_phase1(bundle, clip, dino, gallery, w):
    """argmax over the gallery of exp(s) cos(q, g) + w exp(s') cos(q', g'), one sequence, written out."""
    with torch.no_grad():
        c, d = torch.tensor(clip, dtype=torch.float32)[None], torch.tensor(dino, dtype=torch.float32)[None]
        g = torch.tensor(gallery, dtype=torch.float32)
        main = bundle.logit_scale.exp() * bundle.frame_encoder(c, d)[0] @ F.normalize(bundle.location_encoder(g), dim=-1).T
        e = bundle.expert
        other = e.logit_scale.exp() * e.frame_encoder(c, d)[0] @ F.normalize(e.location_encoder(g), dim=-1).T
        return gallery[(main + w * other).argmax(dim=1).numpy()], (main + w * other) / bundle.logit_scale.exp()


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_phase1_retrieves_by_the_product_of_both_models(pair, w, tmp_path):
    bundle = pair[0]
    gallery = grid()
    clip, dino, offsets = features([6, 4], seed=5)
    cfg = InferenceConfig(expert_weight=w)
    out = predict_sequences(bundle, clip, dino, None, offsets, cache_dir=tmp_path, device="cpu", cfg=cfg, top_k=3)
    for s in range(2):
        sl = slice(offsets[s], offsets[s + 1])
        want, score = brute_force_phase1(bundle, clip[sl], dino[sl], gallery, w)
        np.testing.assert_allclose(out[sl].select("phase1_lat", "phase1_lon").to_numpy(), want)
    alone = predict_sequences(bundle, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(expert_weight=0.0))
    assert not alone.select("phase1_lat", "phase1_lon").equals(out.select("phase1_lat", "phase1_lon"))  # the expert counts
    assert len(list(tmp_path.glob("gallery_emb-*.npy"))) == 1  # the pair of embeddings, cached once


def test_weight_zero_is_fig5_and_a_weight_needs_an_expert(pair):
    with_expert, without = pair
    clip, dino, offsets = features([5, 3], seed=6)
    a = predict_sequences(with_expert, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(expert_weight=0.0))
    b = predict_sequences(without, clip, dino, None, offsets, device="cpu")
    assert a.equals(b)
    with pytest.raises(InferenceError, match="per-frame expert"):
        predict_sequences(without, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(expert_weight=1.0))
    with pytest.raises(InferenceError, match="expert_weight"):
        InferenceConfig(expert_weight=-1.0)


def test_smoothing_reports_the_median_of_the_answers_along_each_sequence(pair):
    bundle = pair[0]
    clip, dino, offsets = features([9, 1, 6], seed=7)
    raw = predict_sequences(bundle, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(expert_weight=1.0))
    out = predict_sequences(bundle, clip, dino, None, offsets, device="cpu",
                            cfg=InferenceConfig(expert_weight=1.0, smooth_frames=2))
    for s in range(3):
        sl = slice(offsets[s], offsets[s + 1])
        p1 = torch.as_tensor(raw[sl].select("phase1_lat", "phase1_lon").to_numpy())[None]
        want = smooth_tracks(p1, torch.ones(p1.shape[:2], dtype=torch.bool), 2)[0].numpy()
        np.testing.assert_allclose(out[sl].select("phase1_lat", "phase1_lon").to_numpy(), want, atol=1e-9)
    # the final answers are smoothed too (and the GeoRefiner read the smoothed Phase I): not Fig. 5's gallery points
    on_gallery = {tuple(p) for p in grid()}
    assert any(tuple(p) not in on_gallery for p in out.select("lat", "lon").to_numpy())


def test_predict_answers_as_the_bundle_was_evaluated_unless_told_otherwise(tmp_path):
    """`evaluate` records eval.expert_weight and eval.smooth_frames in the bundle (config.json "inference"); an
    InferenceConfig that leaves them None takes those, an explicit value wins, and a bundle without an expert
    answers as Fig. 5 whatever it records."""
    from dataclasses import replace

    from vidtag.inference import bundle_settings

    b = expert_bundle(tmp_path / "b", grid())
    recorded = replace(b, config={**b.config, "inference": {"expert_weight": 2.0, "smooth_frames": 3}})
    assert (bundle_settings(recorded, InferenceConfig()).expert_weight, bundle_settings(recorded, InferenceConfig()).smooth_frames) == (2.0, 3)
    told = bundle_settings(recorded, InferenceConfig(expert_weight=0.0, smooth_frames=0))
    assert (told.expert_weight, told.smooth_frames) == (0.0, 0)
    assert bundle_settings(b, InferenceConfig()).expert_weight == 0.0  # nothing recorded: Fig. 5
    no_expert = replace(recorded, expert=None)
    assert bundle_settings(no_expert, InferenceConfig()).expert_weight == 0.0
    clip, dino, offsets = features([7, 4], seed=8)
    by_default = predict_sequences(recorded, clip, dino, None, offsets, device="cpu")
    spelled_out = predict_sequences(b, clip, dino, None, offsets, device="cpu",
                                    cfg=InferenceConfig(expert_weight=2.0, smooth_frames=3))
    assert by_default.equals(spelled_out)
