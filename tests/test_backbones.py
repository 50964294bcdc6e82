"""vidtag.features.backbones: the tiny preset is a real, seeded, frozen dual encoder; real weights fail clearly offline."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vidtag.features.backbones import (
    DINOV2_LARGE,
    BackboneConfig,
    BackboneError,
    Preprocessor,
    build_backbones,
)

TINY = BackboneConfig(preset="tiny", image_size=32)


@pytest.fixture(scope="module")
def tiny():
    return build_backbones(TINY)


def _image(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tiny_dims_frozen_and_eval(tiny):
    assert tiny.dims == (32, 48)
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()  # asking for training mode changes nothing: the backbones stay frozen in eval
    assert not tiny.training and not tiny.clip.training and not tiny.dino.training


def test_same_seed_same_weights_and_features_other_seed_differs(tiny):
    again = build_backbones(TINY)
    other = build_backbones(BackboneConfig(preset="tiny", image_size=32, seed=1))
    assert again.weights_sha256() == tiny.weights_sha256()
    assert other.weights_sha256()["clip"] != tiny.weights_sha256()["clip"]
    c, d = tiny.preprocess(_image())
    a_clip, a_dino = tiny.encode(c[None], d[None])
    b_clip, b_dino = again.encode(c[None], d[None])
    assert torch.equal(a_clip, b_clip) and torch.equal(a_dino, b_dino)
    assert not torch.equal(a_clip, other.encode(c[None], d[None])[0])


def test_building_does_not_move_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_backbones(TINY)
    assert torch.equal(torch.rand(3), expected)


def test_preprocess_gives_two_uint8_crops_from_one_image(tiny):
    c, d = tiny.preprocess(_image(40, 56).convert("L"))  # greyscale in, RGB out
    assert c.shape == d.shape == (3, 32, 32) and c.dtype == d.dtype == torch.uint8
    pp = tiny.fingerprint()["preprocessing"]
    assert pp["clip"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's own statistics
    assert pp["dino"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet, DINOv2's processor
    assert pp["dino"]["resize_px"] == round(32 * 256 / 224) and pp["clip"]["resize_px"] == 32
    # DINOv2 resizes larger then crops, so its crop sees less of the frame than CLIP's.
    assert not torch.equal(c, d)


def test_encode_matches_float_input_and_is_deterministic(tiny):
    imgs = [tiny.preprocess(_image(seed=s)) for s in range(3)]
    clip_u8 = torch.stack([c for c, _ in imgs])
    dino_u8 = torch.stack([d for _, d in imgs])
    f1 = tiny.encode(clip_u8, dino_u8)
    f2 = tiny.encode(clip_u8.float() / 255.0, dino_u8.float() / 255.0)
    assert f1[0].shape == (3, 32) and f1[1].shape == (3, 48) and f1[0].dtype == torch.float32
    assert torch.allclose(f1[0], f2[0], atol=1e-6) and torch.allclose(f1[1], f2[1], atol=1e-6)
    assert torch.equal(tiny.encode(clip_u8, dino_u8)[1], f1[1])


def test_dino_output_is_pooler_output_the_normed_cls(tiny):
    _, d = tiny.preprocess(_image())
    x = (d[None].float() / 255 - tiny.dino_mean) / tiny.dino_std
    out = tiny.dino(pixel_values=x)
    assert torch.allclose(tiny.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), d[None])[1], out.pooler_output)
    assert torch.allclose(out.pooler_output, out.last_hidden_state[:, 0])  # HF: layernormed CLS


def test_fingerprint_names_weights_dims_and_dtype(tiny):
    fp = tiny.fingerprint()
    assert fp["clip"]["dim"] == 32 and fp["dino"]["dim"] == 48
    assert fp["clip"]["weights"] == "random(seed=0)" and len(fp["clip"]["weights_sha256"]) == 64
    assert fp["compute_dtype"] == "float32"
    tiny.set_precision(True)  # bf16 is a CUDA-only setting: on CPU the features stay fp32
    assert tiny.fingerprint()["compute_dtype"] == "float32"


def test_preprocessor_pickles_for_worker_processes(tiny):
    clone = pickle.loads(pickle.dumps(tiny.preprocessor))
    assert isinstance(clone, Preprocessor)
    img = _image()
    assert all(torch.equal(a, b) for a, b in zip(clone(img), tiny.preprocess(img)))


def test_config_from_params_form():
    cfg = BackboneConfig.from_dict({"preset": "tiny", "clip": {"arch": "ViT-B-16", "pretrained": "openai"},
                                    "dino": {"name": "/models/dinov2"}, "image_size": 64})
    assert (cfg.clip_arch, cfg.dino_name, cfg.image_size) == ("ViT-B-16", "/models/dinov2", 64)
    with pytest.raises(ValueError, match="unknown backbone setting"):
        BackboneConfig.from_dict({"preset": "tiny", "batch_sizee": 3})
    with pytest.raises(ValueError, match="must be one of"):
        BackboneConfig(preset="huge")


def test_missing_clip_checkpoint_file_says_where_to_put_it(tmp_path):
    cfg = BackboneConfig(preset="real", clip_pretrained=str(tmp_path / "ViT-L-14.safetensors"))
    with pytest.raises(BackboneError, match="does not exist.*local open_clip checkpoint"):
        build_backbones(cfg)


def test_missing_local_dino_dir_names_it(tmp_path):
    from vidtag.features import backbones

    with pytest.raises(BackboneError) as err:
        backbones._build_dino(BackboneConfig(preset="real", dino_name=str(tmp_path / "no-dinov2")))
    msg = str(err.value)
    assert str(tmp_path / "no-dinov2") in msg and "backbone.dino.name" in msg
    assert "\n" not in msg and err.value.__context__ is None  # one clear line, no traceback soup


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and a hub that fails the test if anything calls it."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the lookup must not rely on the hub being offline

    def no_hub(*a, **k):
        raise AssertionError("the hub was called")

    import open_clip.factory

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_hub)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_hub)  # open_clip's own download step
    return tmp_path / "hf" / "hub"


def test_missing_dino_in_hf_cache_says_what_to_fetch_at_once(empty_hf_cache):
    import time

    from vidtag.features import backbones

    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        backbones._build_dino(BackboneConfig(preset="real"))
    msg = str(err.value)
    assert time.perf_counter() - t0 < 5
    assert str(empty_hf_cache / "models--facebook--dinov2-large") in msg
    assert "`hf download facebook/dinov2-large config.json model.safetensors preprocessor_config.json`" in msg
    assert "\n" not in msg and err.value.__context__ is None


def test_real_arch_dino_config_is_dinov2_large():
    from transformers import Dinov2Config

    c = Dinov2Config(**DINOV2_LARGE)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size) == (1024, 24, 16, 14)


def test_missing_clip_tag_weights_say_which_file_and_how_to_fetch_it_at_once(empty_hf_cache):
    import time

    from vidtag.features import backbones

    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as err:  # the real model's tag: open_clip reads it from the hub cache
        backbones._build_clip(BackboneConfig(preset="real", clip_arch="ViT-L-14", clip_pretrained="openai"))
    msg = str(err.value)
    assert time.perf_counter() - t0 < 5  # no hub call, no network timeout
    assert f"open_clip_model.safetensors in {empty_hf_cache / 'models--timm--vit_large_patch14_clip_224.openai'}" in msg
    assert "`hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors`" in msg
    assert "HF_HOME" in msg
    assert "\n" not in msg and err.value.__context__ is None


def test_unknown_clip_tag_lists_the_known_ones():
    from vidtag.features import backbones

    with pytest.raises(BackboneError, match="no pretrained tag 'nope' for ViT-L-14 .*openai"):
        backbones.clip_weights_file("ViT-L-14", "nope")


def test_clip_only_backbone_has_no_dino_and_the_same_clip(tiny):
    clip_only = build_backbones(TINY, dino=False)
    assert clip_only.dims == (32, 0) and clip_only.dino is None and not clip_only.has_dino
    img = _image()
    c, d = clip_only.preprocess(img)
    assert d is None and torch.equal(c, tiny.preprocess(img)[0])
    f_clip, f_dino = clip_only.encode(c[None], None)
    assert f_dino.shape == (1, 0) and torch.equal(f_clip, tiny.encode(*[x[None] for x in tiny.preprocess(img)])[0])
    fp = clip_only.fingerprint()
    assert fp["clip"]["weights_sha256"] == tiny.weights_sha256()["clip"]
    assert fp["dino"]["dim"] == 0 and fp["dino"]["weights_sha256"] is None and fp["dino"]["name"] is None


# --- backbone.resize: each backbone's centre crop vs. the whole frame squashed (App. A) ---------------------


def test_squash_keeps_the_whole_frame_and_crop_cuts_the_sides(tiny):
    from torchvision import transforms as T

    squash = build_backbones(BackboneConfig(preset="tiny", image_size=32, resize="squash"))
    assert squash.weights_sha256() == tiny.weights_sha256()  # same encoders, other input
    img = _image(40, 72)  # 16:9-ish, as BDD frames are
    s_clip, s_dino = squash.preprocess(img)
    c_clip, c_dino = tiny.preprocess(img)
    whole = T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC)(img)
    expected = torch.from_numpy(np.asarray(whole).copy()).permute(2, 0, 1)
    assert torch.equal(s_clip, expected) and torch.equal(s_dino, expected)  # both backbones see the whole frame
    centre = T.CenterCrop(32)(T.Resize(32, interpolation=T.InterpolationMode.BICUBIC)(img))
    assert torch.equal(c_clip, torch.from_numpy(np.asarray(centre).copy()).permute(2, 0, 1))
    assert not torch.equal(s_clip, c_clip) and not torch.equal(s_dino, c_dino)
    # A frame's left edge shows in the squashed input and is cut from the crop.
    marked = np.asarray(img).copy()
    marked[:, :6] = 255
    assert squash.preprocess(Image.fromarray(marked))[0][:, :, 0].float().mean() > 250
    assert tiny.preprocess(Image.fromarray(marked))[0][:, :, 0].float().mean() < 200


def test_resize_is_part_of_the_fingerprint_and_crop_keeps_old_keys(tiny):
    squash = build_backbones(BackboneConfig(preset="tiny", image_size=32, resize="squash"))
    fc, fs = tiny.fingerprint(), squash.fingerprint()
    assert "resize" not in fc["config"]  # stores made before the option existed keep their key
    assert fs["config"]["resize"] == "squash" and fc != fs
    assert {fs["preprocessing"][b]["resize_mode"] for b in ("clip", "dino")} == {"squash"}
    assert {fc["preprocessing"][b]["resize_mode"] for b in ("clip", "dino")} == {"shortest"}
    assert BackboneConfig.from_dict({**fs["config"]}).resize == "squash"  # what a bundle's config rebuilds
    assert BackboneConfig.from_dict({**fc["config"]}).resize == "crop"
    assert BackboneConfig.from_dict({"preset": "tiny", "resize": "squash"}).resize == "squash"  # params form
    with pytest.raises(ValueError, match="resize must be one of"):
        BackboneConfig(preset="tiny", resize="stretch")


def three_frame_manifest(tmp_path):
    """A one-sequence manifest of three 60x36 PNG frames under tmp_path/f, and an in-process extraction config."""
    import polars as pl

    from vidtag.data.manifest import write_manifest
    from vidtag.features.extract import ExtractConfig
    from vidtag.features.store import StoreLayout

    (tmp_path / "f").mkdir()
    for t in range(3):
        _image(36, 60, seed=t).save(tmp_path / "f" / f"{t}.png")
    df = pl.DataFrame({"sequence_id": ["s"] * 3, "frame_index": [0, 1, 2], "image_path": [f"{t}.png" for t in range(3)],
                       "lat": [1.0] * 3, "lon": [2.0] * 3, "split": ["train"] * 3}, schema_overrides={"frame_index": pl.Int32})
    m = write_manifest(df, tmp_path / "m.parquet", tmp_path / "f")
    return m, ExtractConfig(batch_size=3, num_workers=0, device="cpu", layout=StoreLayout(shard_rows=4, chunk_rows=4))


def test_a_resize_change_reextracts_and_predict_uses_the_bundles(tmp_path):
    from test_inference import grid, tiny_bundle
    from vidtag.errors import FeatureStoreError
    from vidtag.features.extract import extract_features
    from vidtag.features.store import load_features
    from vidtag.predict import backbones_for_bundle

    m, run = three_frame_manifest(tmp_path)
    crop_cfg, squash_cfg = BackboneConfig(preset="tiny", image_size=32), BackboneConfig(preset="tiny", image_size=32, resize="squash")
    extract_features(m, tmp_path / "s.zarr", crop_cfg, run, progress=False)
    with pytest.raises(FeatureStoreError, match="backbones.config.resize.*differ|differ.*resize"):
        extract_features(m, tmp_path / "s.zarr", squash_cfg, run, progress=False)
    extract_features(m, tmp_path / "s.zarr", squash_cfg, run, progress=False, overwrite=True)
    squashed = load_features(tmp_path / "s.zarr")
    assert squashed.attrs["backbones"]["config"]["resize"] == "squash"
    extract_features(m, tmp_path / "c.zarr", crop_cfg, run, progress=False)
    assert not np.array_equal(np.asarray(squashed.clip), np.asarray(load_features(tmp_path / "c.zarr").clip))

    # The bundle records the store's backbones; predict rebuilds them with the same preprocessing.
    bundle = tiny_bundle(tmp_path / "model", grid(), backbones=dict(squashed.attrs["backbones"]), dims=(32, 48))
    bb = backbones_for_bundle(bundle, torch.device("cpu"))
    assert bb.cfg.resize == "squash" and bb.fingerprint()["preprocessing"] == squashed.attrs["preprocessing"]
