"""Training from cached features on a tiny synthetic world: sampling, Phase I learning, resume, NaN, Phase II, bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pytest
import torch

from vidtag.errors import BundleError, TrainingError
from vidtag.features.sequences import build_sequences
from vidtag.features.source import FeatureTensors
from vidtag.models.bundle import load_bundle
from vidtag.models.config import GeoRefinerConfig, VidTAGConfig
from vidtag.train.batches import epoch_order, sample_frames
from vidtag.train.checkpoint import load_checkpoint
from vidtag.train.loop import RuntimeConfig
from vidtag.train.phase1 import Phase1Config, build_phase1_model, load_phase1, train_phase1, validate_phase1
from vidtag.train.phase2 import Phase2Config, train_phase2

CITIES = np.array([[40.71, -74.00], [48.85, 2.35], [35.68, 139.69]])


@dataclass
class World:
    clip: np.ndarray
    dino: np.ndarray
    valid: np.ndarray
    manifest: pl.DataFrame
    gallery: np.ndarray
    attrs: dict = field(default_factory=lambda: {"manifest_fingerprint": "synthetic", "backbones": {"preset": "synthetic"}})


def make_world(n_seq: int = 36, seed: int = 0, clip_dim: int = 16, dino_dim: int = 24) -> World:
    """Drives of 10-30 frames (~40 m apart) in three cities; features are noisy random projections of
    multi-scale sinusoids of position, so location is learnable from them. Every 4th sequence is val."""
    rng = np.random.default_rng(seed)
    seq, idx, lat, lon, split = [], [], [], [], []
    for s in range(n_seq):
        n = int(rng.integers(10, 31))
        start = CITIES[s % 3] + rng.uniform(-0.03, 0.03, 2)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.15, n))
        pts = start + np.cumsum(0.0004 * np.stack([np.sin(heading), np.cos(heading)], 1), axis=0)
        seq += [f"s{s:03d}"] * n
        idx += list(range(n))
        lat += list(pts[:, 0])
        lon += list(pts[:, 1])
        split += ["val" if s % 4 == 3 else "train"] * n
    latlon = np.stack([lat, lon], 1)
    phi = [np.eye(3)[np.argmin(((latlon[:, None] - CITIES[None]) ** 2).sum(-1), 1)] * 2]
    for wavelength in (0.005, 0.015, 0.05):
        phi += [np.sin(2 * np.pi * latlon / wavelength), np.cos(2 * np.pi * latlon / wavelength)]
    phi = np.concatenate(phi, 1)
    clip = phi @ rng.normal(size=(phi.shape[1], clip_dim)) + rng.normal(0, 0.5, (len(phi), clip_dim))
    dino = phi @ rng.normal(size=(phi.shape[1], dino_dim)) + rng.normal(0, 0.5, (len(phi), dino_dim))
    g = np.arange(-0.04, 0.0401, 0.004)
    gallery = np.concatenate([np.stack(np.meshgrid(c[0] + g, c[1] + g, indexing="ij"), -1).reshape(-1, 2) for c in CITIES])
    manifest = pl.DataFrame({"sequence_id": seq, "frame_index": pl.Series(idx, dtype=pl.Int32), "lat": lat, "lon": lon, "split": split})
    return World(clip.astype(np.float16), dino.astype(np.float16), np.ones(len(seq), bool), manifest, gallery)


TINY_MODEL = VidTAGConfig.from_dict({
    "frame": {"tempgeo_heads": 2, "tempgeo_ff_dim": 64, "mlp_dims": [64], "out_dim": 32, "max_positions": 8, "dropout": 0.0},
    "location": {"hidden_dim": 64, "n_hidden": 2, "out_dim": 32, "rff_dim": 64},
    "refiner": {"width": 32, "heads": 2, "ff_dim": 64, "dropout": 0.0},
})
P1 = Phase1Config(seq_len=8, batch_size=8, epochs=12, lr=3e-3, warmup_steps=5, lr_gamma=0.97, positive_radius_km=0.05, location_init="random")
P2 = Phase2Config(seq_len=8, batch_size=8, epochs=3, lr=1e-3, warmup_steps=5)
RT1 = RuntimeConfig(device="cpu", eval_every=0, progress=False)
RT2 = RuntimeConfig(device="cpu", progress=False)


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def phase1_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("phase1")
    train_phase1(world, world.manifest, world.gallery, out, P1, TINY_MODEL, runtime=RT1)
    return out


def test_invalid_frames_are_dropped_and_subsets_are_sorted(world):
    valid = world.valid.copy()
    valid[[0, 5]] = False
    table = build_sequences(world.manifest, valid, "train")
    first = world.manifest.filter(pl.col("sequence_id") == "s000").height
    assert table.n_dropped_frames == 2 and table.lengths[0] == first - 2
    assert 0 not in table.rows[0].tolist() and 5 not in table.rows[0].tolist()
    gen = torch.Generator().manual_seed(0)
    rows, pad = sample_frames(table, torch.arange(len(table)), 8, gen, "subset")
    assert rows.shape == (len(table), 8) and not pad.any()  # every sequence has >= 8 frames
    assert (rows.diff(dim=1) > 0).all()  # temporal order kept
    spans = rows[:, -1] - rows[:, 0]
    assert spans.float().mean() > 8  # a subset spreads over the drive, unlike a window
    win, _ = sample_frames(table, torch.arange(len(table)), 8, gen, "window")
    assert (win.diff(dim=1) == 1).all()
    long, long_pad = sample_frames(table, torch.arange(3), 40, gen, "subset")
    width = table.rows.shape[1]  # asking for more frames than the longest sequence gives its length
    assert long.shape == (3, width) and (long[long_pad] == -1).all()
    assert (long_pad.sum(1) == width - table.lengths[:3]).all()


def test_epoch_order_covers_every_sequence_once():
    batches = epoch_order(21, 8, torch.Generator().manual_seed(0), "cpu")
    assert sorted(torch.cat(batches).tolist()) == list(range(21))


def test_phase1_beats_its_untrained_self(world, phase1_dir):
    model, _ = load_phase1(phase1_dir)
    data = FeatureTensors.from_arrays(world.clip, world.dino, world.manifest, torch.device("cpu"))
    val = build_sequences(world.manifest, world.valid, "val")
    trained = validate_phase1(model, data, val, world.gallery)
    untrained_model = build_phase1_model(VidTAGConfig.from_dict({**TINY_MODEL.to_dict(), "frame": {**TINY_MODEL.to_dict()["frame"], "clip_dim": 16, "dino_dim": 24}}))
    untrained = validate_phase1(untrained_model.eval(), data, val, world.gallery)
    assert trained["acc_5km"] >= untrained["acc_5km"] + 30, (trained, untrained)  # percent
    assert trained["median_km"] < 0.7 * untrained["median_km"], (trained, untrained)


def test_resume_repeats_an_uninterrupted_run(world, tmp_path):
    cfg2 = Phase1Config(**{**P1.__dict__, "epochs": 2})
    train_phase1(world, world.manifest, world.gallery, tmp_path / "a", cfg2, TINY_MODEL, runtime=RT1)
    train_phase1(world, world.manifest, world.gallery, tmp_path / "b", Phase1Config(**{**P1.__dict__, "epochs": 1}), TINY_MODEL, runtime=RT1)
    assert load_checkpoint(tmp_path / "b" / "checkpoint").state["epoch"] == 1  # "interrupted" after epoch 1
    train_phase1(world, world.manifest, world.gallery, tmp_path / "b", cfg2, TINY_MODEL, runtime=RT1)
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint"), load_checkpoint(tmp_path / "b" / "checkpoint")
    assert a.state["step"] == b.state["step"] and b.state["epoch"] == 2
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
    assert set(a.optimizer["state"]) == set(b.optimizer["state"])


def test_resume_with_a_different_model_is_refused(world, tmp_path):
    cfg1 = Phase1Config(**{**P1.__dict__, "epochs": 1})
    train_phase1(world, world.manifest, world.gallery, tmp_path, cfg1, TINY_MODEL, runtime=RT1)
    other = VidTAGConfig.from_dict({**TINY_MODEL.to_dict(), "logit_scale_init": 1.0})
    with pytest.raises(TrainingError, match="different model"):
        train_phase1(world, world.manifest, world.gallery, tmp_path, cfg1, other, runtime=RT1)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(world, tmp_path):
    train_phase1(world, world.manifest, world.gallery, tmp_path, Phase1Config(**{**P1.__dict__, "epochs": 1}), TINY_MODEL, runtime=RT1)
    before = (tmp_path / "checkpoint" / "weights.safetensors").read_bytes()
    broken = World(world.clip.copy(), world.dino, world.valid, world.manifest, world.gallery)
    broken.clip[:] = np.nan
    with pytest.raises(TrainingError, match="loss is nan.*last good checkpoint is kept"):
        train_phase1(broken, world.manifest, world.gallery, tmp_path, Phase1Config(**{**P1.__dict__, "epochs": 2}), TINY_MODEL, runtime=RT1)
    assert (tmp_path / "checkpoint" / "weights.safetensors").read_bytes() == before


def test_phase2_writes_a_bundle_that_reloads(world, phase1_dir, tmp_path):
    gallery_path = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_path)
    metrics = train_phase2(world, world.manifest, gallery_path, world.gallery, phase1_dir, tmp_path / "model", tmp_path / "p2ckpt",
                           P2, GeoRefinerConfig(**TINY_MODEL.refiner.__dict__), runtime=RT2)
    assert {"val_p1_acc_1km", "val_p2_acc_1km", "val_p1_dfd_deg", "val_p2_dfd_deg"} <= set(metrics)
    assert np.isfinite(metrics["train_loss"])
    bundle = load_bundle(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["feature_dims"] == {"clip": 16, "dino": 24} and config["backbones"] == {"preset": "synthetic"}
    assert len(config["model_sha256"]) == 64 and config["gallery"]["file"] == "gallery.parquet"
    phase1, _ = load_phase1(phase1_dir)
    x = torch.as_tensor(world.gallery[:5])
    assert torch.equal(bundle.location_encoder(x), phase1.location_encoder(x))  # Phase I frozen in Phase II
    assert not any(p.requires_grad is False for p in bundle.refiner.parameters())

    (tmp_path / "model" / "gallery.parquet").write_bytes(b"changed")
    with pytest.raises(BundleError, match="gallery were changed"):
        load_bundle(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        load_bundle(tmp_path / "model")


def test_phase2_refuses_an_unfinished_phase1(world, tmp_path):
    train_phase1(world, world.manifest, world.gallery, tmp_path / "p1", Phase1Config(**{**P1.__dict__, "epochs": 1}), TINY_MODEL, runtime=RT1)
    state = json.loads((tmp_path / "p1" / "checkpoint" / "state.json").read_text())
    state["complete"] = False
    (tmp_path / "p1" / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(TrainingError, match="unfinished"):
        load_phase1(tmp_path / "p1")


def test_zero_epochs_saves_the_untrained_model_as_a_baseline(world, tmp_path, phase1_dir):
    """epochs=0 writes the untrained (GeoCLIP-initialised) model, the baseline the pipeline can evaluate."""
    untrained_dir = tmp_path / "p1"
    train_phase1(world, world.manifest, world.gallery, untrained_dir, Phase1Config(**{**P1.__dict__, "epochs": 0}),
                 TINY_MODEL, runtime=RT1)
    assert load_checkpoint(untrained_dir / "checkpoint", torch.device("cpu")).state["epoch"] == 0
    data = FeatureTensors.from_arrays(world.clip, world.dino, world.manifest, torch.device("cpu"))
    val = build_sequences(world.manifest, world.valid, "val")
    untrained = validate_phase1(load_phase1(untrained_dir)[0], data, val, world.gallery)
    trained = validate_phase1(load_phase1(phase1_dir)[0], data, val, world.gallery)
    assert trained["median_km"] < untrained["median_km"], (trained, untrained)


def test_phase2_refuses_to_resume_on_top_of_another_phase1_run(world, phase1_dir, tmp_path):
    """A Phase II checkpoint belongs to the Phase I run it refined; a retrained Phase I invalidates it."""
    gallery_path = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_path)
    refiner = GeoRefinerConfig(**TINY_MODEL.refiner.__dict__)
    one_epoch = Phase2Config(**{**P2.__dict__, "epochs": 1})
    train_phase2(world, world.manifest, gallery_path, world.gallery, phase1_dir, tmp_path / "m", tmp_path / "ck", one_epoch,
                 refiner, runtime=RT2)
    other_p1 = tmp_path / "other_p1"
    train_phase1(world, world.manifest, world.gallery, other_p1, Phase1Config(**{**P1.__dict__, "lr": P1.lr / 2}), TINY_MODEL,
                 runtime=RT1)
    with pytest.raises(TrainingError, match="different phase1"):
        train_phase2(world, world.manifest, gallery_path, world.gallery, other_p1, tmp_path / "m", tmp_path / "ck", one_epoch,
                     refiner, runtime=RT2)


def test_phase2_refuses_to_resume_on_other_phase1_weights_with_the_same_config(world, phase1_dir, tmp_path):
    """Phase I retrained by changed code under the same params has other weights: Phase II starts afresh."""
    import shutil

    from vidtag.train.checkpoint import save_checkpoint

    gallery_path = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_path)
    refiner = GeoRefinerConfig(**TINY_MODEL.refiner.__dict__)
    one_epoch = Phase2Config(**{**P2.__dict__, "epochs": 1})
    p1 = tmp_path / "p1"
    shutil.copytree(phase1_dir, p1)
    train_phase2(world, world.manifest, gallery_path, world.gallery, p1, tmp_path / "m", tmp_path / "ck", one_epoch, refiner, runtime=RT2)
    ckpt = load_checkpoint(p1 / "checkpoint")
    model, _ = load_phase1(p1)
    with torch.no_grad():
        model.logit_scale.add_(0.01)
    save_checkpoint(p1 / "checkpoint", {"phase1": model}, None, ckpt.state)
    with pytest.raises(TrainingError, match="different phase1_weights"):
        train_phase2(world, world.manifest, gallery_path, world.gallery, p1, tmp_path / "m", tmp_path / "ck", one_epoch, refiner, runtime=RT2)


def test_code_fingerprint_follows_the_stage_code():
    from pipeline.training import code_fingerprint

    a, b = code_fingerprint("pipeline.train_phase1"), code_fingerprint("pipeline.train_phase2")
    assert a == code_fingerprint("pipeline.train_phase1") and a != b and len(a) == 64
