"""The paper's baselines and ablations as model kinds of the one pipeline (Table 4, App. F): a frame encoder on one
backbone, GeoCLIP fine-tuned (App. F.4) and GeoCLIP zero-shot (App. F.1) trained or written by Phase I, passed on
by `train_phase2` without a GeoRefiner, evaluated as Fig. 5's first stage, and predicted with from a bundle."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
from test_train import TINY_MODEL, World, make_world

from pipeline.train_phase2 import pass_on_phase1, phase1_kind
from vidtag.errors import ConfigError
from vidtag.features.source import FeatureTensors
from vidtag.features.sequences import build_sequences
from vidtag.inference import predict_sequences
from vidtag.models.bundle import load_bundle, save_bundle
from vidtag.models.config import FrameEncoderConfig, VidTAGConfig
from vidtag.models.frame_encoder import FrameEncoder
from vidtag.models.geoclip_head import GeoCLIPFrameEncoder, GeoCLIPHead, clip_features_only, zero_shot_unavailable
from vidtag.models.location_encoder import GEOCLIP_SIGMAS, LocationEncoder
from vidtag.train.checkpoint import read_state
from vidtag.train.loop import RuntimeConfig
from vidtag.train.phase1 import (
    Phase1Config,
    build_geoclip_phase1_model,
    has_phase2,
    load_phase1,
    train_phase1,
    validate_phase1,
)

FT = Phase1Config(seq_len=8, batch_size=8, epochs=10, lr=3e-3, warmup_steps=5, lr_gamma=0.97, positive_radius_km=0.05,
                  location_init="random", kind="geoclip_finetune")
RT = RuntimeConfig(device="cpu", eval_every=0, progress=False)


# ----------------------------------------------------------------------------- one backbone (Table 4's DINOv2 rows)


def test_backbones_option_is_checked_and_has_one_order():
    assert FrameEncoderConfig(backbones=["dino", "clip"]).backbones == ("clip", "dino")
    cfg = FrameEncoderConfig(clip_dim=16, dino_dim=24, backbones=["dino"])
    assert cfg.backbones == ("dino",) and cfg.in_dim == 24
    for bad in ([], ["clip", "clip"], ["siglip"]):
        with pytest.raises(ConfigError, match="backbones"):
            FrameEncoderConfig(backbones=bad)
    # bundles written before the option read as both backbones
    old = {k: v for k, v in VidTAGConfig().to_dict()["frame"].items() if k != "backbones"}
    assert VidTAGConfig.from_dict({"frame": old}).frame.backbones == ("clip", "dino")


def test_a_one_backbone_encoder_reads_only_that_backbone():
    torch.manual_seed(0)
    cfg = FrameEncoderConfig(clip_dim=16, dino_dim=24, tempgeo_heads=2, tempgeo_ff_dim=32, mlp_dims=(32,), out_dim=16,
                             dropout=0.0, backbones=("dino",))
    enc = FrameEncoder(cfg).eval()
    assert enc.mlp[0].in_features == 24 and enc.tempgeo.pos.shape == (16, 24)  # TempGeo and MLP at DINOv2's width
    clip, dino = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    out = enc(clip, dino)
    assert torch.equal(out, enc(torch.randn(2, 5, 16), dino))  # CLIP features change nothing
    assert not torch.allclose(out, enc(clip, torch.randn(2, 5, 24)))
    with pytest.raises(ValueError, match="do not match"):  # but both are still checked against the training dims
        enc(torch.randn(2, 5, 8), dino)


# ----------------------------------------------------------------------------- GeoCLIP fine-tuned (App. F.4)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def ft_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    train_phase1(world, world.manifest, world.gallery, out, FT, TINY_MODEL, runtime=RT)
    return out


def test_kind_is_checked():
    with pytest.raises(ConfigError, match="phase1.kind 'geoclip'"):
        Phase1Config(kind="geoclip")
    assert has_phase2("vidtag") and not has_phase2("geoclip_finetune") and not has_phase2("geoclip_zero_shot")


def test_geoclip_finetune_trains_geoclips_head_frame_by_frame(world, ft_dir):
    model, config = load_phase1(ft_dir)
    assert config["train"]["kind"] == "geoclip_finetune" and phase1_kind(ft_dir) == "geoclip_finetune"
    assert isinstance(model.frame_encoder, GeoCLIPFrameEncoder)
    # a fresh head of GeoCLIP's architecture on the 16-d features: 16 -> 768 -> location width, CLIP only
    assert config["model"]["frame"] == {"clip_dim": 16, "dino_dim": 0, "hidden_dim": 768, "out_dim": 32}
    location = dataclasses.asdict(TINY_MODEL.location)
    assert config["model"]["location"] == {**location, "sigmas": list(location["sigmas"])}  # VidTAG's Phase I location encoder
    data = FeatureTensors.from_arrays(world.clip, world.dino, world.manifest, torch.device("cpu"))
    val = build_sequences(world.manifest, world.valid, "val")
    trained = validate_phase1(model, data, val, world.gallery)
    untrained, _ = build_geoclip_phase1_model("geoclip_finetune", 16, TINY_MODEL.location, "random", seed=0)
    before = validate_phase1(untrained.eval(), data, val, world.gallery)
    assert trained["median_km"] < 0.5 * before["median_km"], (trained, before)
    # frames are independent images: a frame's embedding does not depend on its neighbours or their order
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        out = model.frame_encoder(x, torch.zeros(1, 6, 0))
        assert torch.allclose(model.frame_encoder(x[:, [5, 0, 3]], torch.zeros(1, 3, 0))[0], out[0, [5, 0, 3]], atol=1e-6)


def test_a_model_without_refiner_is_passed_on_and_predicts_phase1(world, ft_dir, tmp_path):
    out, ckpt, live = tmp_path / "model", tmp_path / "model.ckpt", tmp_path / "dvclive"
    attrs = {**world.attrs, "backbones": {"config": {"preset": "tiny"}, "clip": {"dim": 16}, "dino": {"dim": 24}},
             "preprocessing": {"clip": {"crop_px": 32}, "dino": {"crop_px": 32}}}
    pass_on_phase1(str(ft_dir), "geoclip_finetune", attrs, out, ckpt, str(live))
    bundle = load_bundle(out)
    model, _ = load_phase1(ft_dir)
    assert bundle.kind == "geoclip" and bundle.refiner is None and bundle.gallery_path is None
    assert bundle.config["backbones"]["dino"] is None and bundle.config["feature_dims"] == {"clip": 16, "dino": 0}
    assert torch.equal(bundle.logit_scale, model.logit_scale.detach()) and bundle.config["training"]["phase2"] is None
    for k, v in model.frame_encoder.head.mlp.state_dict().items():
        assert torch.equal(bundle.frame_encoder.head.mlp.state_dict()[k], v)
    # DVC finds Phase II's outputs; a later Phase II run sees a finished, delivered checkpoint and starts afresh
    state = read_state(ckpt)
    assert state["complete"] and state["delivered"] and (live / "phase2.json").is_file()

    # evaluate's view of the store: CLIP only; Fig. 5 stops after Phase I, so the answer is Phase I's
    features = clip_features_only(world)
    assert features.dino.shape == (len(world.clip), 0) and features.clip is world.clip
    rows = np.flatnonzero((world.manifest["split"] == "val").to_numpy())
    ids = world.manifest["sequence_id"].to_numpy()[rows]
    offsets = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1, [len(rows)]])
    df = predict_sequences(bundle, features.clip[rows], features.dino[rows], None, offsets, world.gallery, device="cpu")
    assert df.height == len(rows) and (df["lat"] == df["phase1_lat"]).all() and (df["lon"] == df["phase1_lon"]).all()


def test_a_finetuned_geoclip_bundle_predicts_from_frames(tmp_path):
    """The whole way a user takes: tiny backbones -> features -> GeoCLIP fine-tuned -> passed on -> packed with a
    gallery (as `evaluate` does) -> `vidtag predict --model <bundle>` on an image, with the CLIP tower alone."""
    from PIL import Image
    from typer.testing import CliRunner

    from vidtag.cli import app
    from vidtag.features.backbones import BackboneConfig, build_backbones

    bb = build_backbones(BackboneConfig(preset="tiny", image_size=32), "cpu")
    fp = bb.fingerprint()
    w = make_world(n_seq=12, clip_dim=bb.dims[0], dino_dim=bb.dims[1])
    w.attrs = {"manifest_fingerprint": "synthetic", "backbones": {k: v for k, v in fp.items() if k != "preprocessing"},
               "preprocessing": fp["preprocessing"]}
    p1 = tmp_path / "phase1"
    train_phase1(w, w.manifest, w.gallery, p1, dataclasses.replace(FT, epochs=1), TINY_MODEL, runtime=RT)
    pass_on_phase1(str(p1), "geoclip_finetune", w.attrs, tmp_path / "model", tmp_path / "model.ckpt", None)
    gallery_file = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": w.gallery[:, 0], "lon": w.gallery[:, 1]}).write_parquet(gallery_file)
    bundle = load_bundle(tmp_path / "model")
    save_bundle(tmp_path / "bundle", dataclasses.replace(bundle, gallery_path=gallery_file))

    img = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(app, ["predict", str(img), "--model", str(tmp_path / "bundle"), "--out", str(out),
                                 "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    df = pl.read_csv(out)
    assert df.height == 1 and df["lat"][0] == df["phase1_lat"][0] and df["valid"][0]


# ----------------------------------------------------------------------------- GeoCLIP zero-shot (App. F.1)


def test_zero_shot_refuses_features_its_head_cannot_read(world, tmp_path):
    assert zero_shot_unavailable(768, {"preset": "real", "clip_arch": "ViT-L-14"}) is None
    assert "768-d" in zero_shot_unavailable(32, {"preset": "tiny"})
    assert "preset 'real-arch'" in zero_shot_unavailable(768, {"preset": "real-arch", "clip_arch": "ViT-L-14"})
    with pytest.raises(ConfigError, match="needs real CLIP ViT-L/14 features .768-d.*these are 16-d"):
        train_phase1(world, world.manifest, world.gallery, tmp_path, dataclasses.replace(FT, kind="geoclip_zero_shot"),
                     TINY_MODEL, runtime=RT)
    assert not (tmp_path / "checkpoint").exists()


def test_zero_shot_writes_geoclip_as_shipped_without_training(tmp_path):
    w = make_world(n_seq=8, clip_dim=768, dino_dim=8)
    w.attrs = {"manifest_fingerprint": "synthetic", "backbones": {"config": {"preset": "real", "clip_arch": "ViT-L-14"}}}
    cfg = dataclasses.replace(FT, kind="geoclip_zero_shot", epochs=5)
    train_phase1(w, w.manifest, w.gallery, tmp_path / "p1", cfg, TINY_MODEL, runtime=RT)
    state = read_state(tmp_path / "p1" / "checkpoint")
    assert state["complete"] and state["step"] == 0 and state["config"]["train"]["epochs"] == 0  # no training step
    pass_on_phase1(str(tmp_path / "p1"), "geoclip_zero_shot", w.attrs, tmp_path / "model", tmp_path / "model.ckpt", None)
    bundle = load_bundle(tmp_path / "model")
    head, loc = GeoCLIPHead.from_geoclip(), LocationEncoder.from_geoclip(sigmas=GEOCLIP_SIGMAS)
    assert bundle.kind == "geoclip" and bundle.refiner is None and torch.equal(bundle.logit_scale, head.logit_scale)
    assert all(torch.equal(bundle.frame_encoder.head.mlp.state_dict()[k], v) for k, v in head.mlp.state_dict().items())
    assert bundle.location_encoder.sigmas == GEOCLIP_SIGMAS  # its own sigmas, not phase1.model.location's
    assert all(torch.equal(bundle.location_encoder.state_dict()[k], v) for k, v in loc.state_dict().items())
