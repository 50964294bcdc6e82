"""The second backbone slot filled by an open_clip image tower (Table 6: CLIP + SigLIP instead of CLIP + DINOv2)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vidtag.features.backbones import BackboneConfig, BackboneError, build_backbones

TINY = BackboneConfig(preset="tiny", image_size=32)
TINY_SIGLIP = BackboneConfig(preset="tiny", image_size=32, dino_kind="open_clip")

# A small open_clip architecture registered under a test-only name, saved as a Hugging Face copy of an open_clip
# model is laid out (weights + open_clip_config.json with SigLIP's preprocessing: mean/std 0.5, the whole frame
# squashed), so the real loading path runs without a 200M-parameter model.
TEST_ARCH = "vidtag-test-siglip"
TEST_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}


def _image(h=40, w=56, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_an_open_clip_tower_fills_the_second_slot_and_keeps_dinov2s_shapes():
    dino, siglip = build_backbones(TINY), build_backbones(TINY_SIGLIP)
    assert siglip.dims == dino.dims == (32, 48)
    assert siglip.weights_sha256()["clip"] == dino.weights_sha256()["clip"]  # the first slot is untouched
    assert siglip.weights_sha256()["dino"] != dino.weights_sha256()["dino"]
    assert siglip.weights_sha256()["dino"] != siglip.weights_sha256()["clip"]  # its own seed: not a copy of CLIP
    crops = [x[None] for x in siglip.preprocess(_image())]
    f_clip, f_second = siglip.encode(*crops)
    assert f_second.shape == (1, 48) and torch.isfinite(f_second).all()
    assert torch.equal(f_clip, dino.encode(*crops)[0])
    assert torch.equal(f_second, siglip.dino(siglip._normalise(crops[1], siglip.dino_mean, siglip.dino_std)))
    assert torch.equal(f_second, siglip.encode(*crops)[1])  # deterministic


def test_the_fingerprint_says_what_fills_the_slot_and_dinov2_stores_keep_their_key():
    fd, fs = build_backbones(TINY).fingerprint(), build_backbones(TINY_SIGLIP).fingerprint()
    assert not {"dino_kind", "dino_arch", "dino_pretrained"} & set(fd["config"])  # stores made before the option
    assert fd["config"]["dino_name"] == "facebook/dinov2-large" and fd["dino"]["output"] == "pooler_output"
    assert fs["config"]["dino_kind"] == "open_clip" and "dino_name" not in fs["config"]
    assert fs["dino"]["output"] == "projected image embedding" and fs["dino"]["name"] == "vidtag-tiny-vit-2"
    rebuilt = BackboneConfig.from_dict(fs["config"])  # what a bundle rebuilds for `vidtag predict`
    assert rebuilt == TINY_SIGLIP
    assert BackboneConfig.from_dict({"preset": "tiny", "dino": {"kind": "open_clip", "arch": "ViT-B-16-SigLIP"}}).second_is_open_clip
    with pytest.raises(ValueError, match="dino.kind must be one of"):
        BackboneConfig(dino_kind="siglip")


@pytest.fixture
def local_checkpoint(tmp_path, monkeypatch):
    """A random-weight checkpoint of TEST_ARCH in a local file, as a downloaded open_clip checkpoint is."""
    import open_clip
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TEST_ARCH, TEST_CONFIG)
    torch.manual_seed(3)
    model = open_clip.create_model(TEST_ARCH, pretrained=None)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TEST_CONFIG, "preprocess_cfg": SIGLIP_PREPROCESS}))
    return path, model


def test_a_local_open_clip_checkpoint_loads_into_the_second_slot(local_checkpoint):
    path, model = local_checkpoint
    cfg = BackboneConfig(preset="real", image_size=32, clip_arch=TEST_ARCH, clip_pretrained=str(path),
                         dino_kind="open_clip", dino_arch=TEST_ARCH, dino_pretrained=str(path))
    bb = build_backbones(cfg)
    assert bb.dims == (24, 24)
    pp = bb.preprocessor.dino_cfg
    assert pp["mean"] == [0.5, 0.5, 0.5] and pp["resize_mode"] == "squash"  # the checkpoint's own preprocessing
    assert bb.preprocessor.clip_cfg["mean"] == pp["mean"]  # the first slot reads it from beside its file too
    img = _image(40, 72)
    crops = [x[None] for x in bb.preprocess(img)]
    x = (crops[1].float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        expected = model.visual.eval()(x)
    assert torch.allclose(bb.encode(*crops)[1], expected, atol=1e-6)
    assert bb.fingerprint()["dino"]["weights"] == str(path)


def test_a_missing_second_checkpoint_names_the_setting(tmp_path, local_checkpoint):
    cfg = BackboneConfig(preset="real", image_size=32, clip_arch=TEST_ARCH, clip_pretrained=str(local_checkpoint[0]),
                         dino_kind="open_clip", dino_arch=TEST_ARCH, dino_pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(BackboneError, match=r"backbone\.dino\.pretrained"):
        build_backbones(cfg)


def test_extraction_with_siglip_in_the_second_slot_records_it(tmp_path):
    from test_backbones import three_frame_manifest
    from vidtag.features.extract import extract_features
    from vidtag.features.store import load_features

    m, run = three_frame_manifest(tmp_path)
    extract_features(m, tmp_path / "s.zarr", TINY_SIGLIP, run, progress=False)
    store = load_features(tmp_path / "s.zarr")
    assert store.attrs["backbones"]["config"]["dino_kind"] == "open_clip" and np.asarray(store.dino).shape == (3, 48)
    bb = build_backbones(TINY_SIGLIP)
    expected = bb.encode(*[torch.stack(c) for c in zip(*(bb.preprocess(Image.open(tmp_path / "f" / f"{t}.png")) for t in range(3)))])[1]
    np.testing.assert_allclose(np.asarray(store.dino, dtype=np.float32), expected.numpy(), rtol=1e-2, atol=1e-2)
