"""The built-in GeoCLIP model (vidtag.models.geoclip_model): a bundle of kind geoclip that loads like any bundle
and whose zero-shot answers are geoclip's own: the same top-k, the same probabilities, for the same CLIP features.

geoclip's reference is ``GeoCLIP(from_pretrained=True, clip_pretrained=False)`` (its shipped MLP, location encoder
and logit scale) with the CLIP tower replaced by an identity on features (as in test_geoclip_head), so its own
``forward`` scores our features against a gallery."""

import json

import numpy as np
import pytest
import torch

from test_geoclip_head import ref  # noqa: F401  (geoclip's own model, the reference)

from vidtag.api import load_model
from vidtag.errors import BundleError
from vidtag.geo import haversine_km
from vidtag.models.bundle import load_bundle, save_bundle
from vidtag.models.geoclip_head import GeoCLIPHead, load_geoclip_gallery
from vidtag.models.geoclip_model import GeoCLIPFrameConfig, GeoCLIPFrameEncoder, builtin_geoclip_dir
from vidtag.models.location_encoder import GEOCLIP_SIGMAS, LocationEncoder

K = 5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def builtin(cache):
    return builtin_geoclip_dir(cache)


def clip_features(n, seed=0):
    """CLIP-like projected features, already float16-exact: vidtag holds features in float16 (as its store does),
    so both models must see the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 768, generator=g) * 0.5).half().float()


def test_the_builtin_bundle_is_geoclip_as_shipped(builtin, cache):
    b = load_bundle(builtin)
    assert b.kind == "geoclip" and b.refiner is None
    cfg = json.loads((builtin / "config.json").read_text())
    assert cfg["backbones"]["config"]["clip_arch"] == "ViT-L-14" and cfg["backbones"]["config"]["clip_pretrained"] == "openai"
    assert cfg["feature_dims"] == {"clip": 768, "dino": 0} and cfg["source"]["package"] == "geoclip"
    head = GeoCLIPHead.from_geoclip()
    assert torch.equal(b.logit_scale, head.logit_scale)
    for k, v in head.mlp.state_dict().items():
        assert torch.equal(b.frame_encoder.head.mlp.state_dict()[k], v)
    loc = LocationEncoder.from_geoclip(sigmas=GEOCLIP_SIGMAS)
    assert b.location_encoder.sigmas == GEOCLIP_SIGMAS
    assert all(torch.equal(b.location_encoder.state_dict()[k], v) for k, v in loc.state_dict().items())
    from vidtag.inference import read_gallery_latlon

    np.testing.assert_array_equal(read_gallery_latlon(b.gallery_path), load_geoclip_gallery())
    written = (builtin / "model.safetensors").stat().st_mtime_ns
    assert builtin_geoclip_dir(cache) == builtin and (builtin / "model.safetensors").stat().st_mtime_ns == written


def test_frame_encoder_embeds_each_frame_on_its_own():
    torch.manual_seed(0)
    enc = GeoCLIPFrameEncoder(GeoCLIPFrameConfig(clip_dim=16, hidden_dim=8)).eval()
    x = torch.randn(2, 5, 16)
    out = enc(x, torch.zeros(2, 5, 0), torch.zeros(2, 5, dtype=torch.bool))  # (B, T, Dc) -> (B, T, 512)
    assert out.shape == (2, 5, 512) and torch.allclose(out.norm(dim=-1), torch.ones(2, 5), atol=1e-6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(enc(x[:, perm])[:, :], out[:, perm], atol=1e-6)  # no mixing across time
    assert torch.allclose(out.reshape(10, 512), enc.head(x.reshape(10, 16)), atol=1e-6)


def _ref_topk(ref, x, gallery_f32):
    with torch.no_grad():
        logits = ref(x, torch.from_numpy(gallery_f32))  # (N, G): geoclip's own forward
    probs = logits.softmax(dim=-1)
    top = torch.topk(probs, K, dim=1)
    return logits, top.indices.numpy(), top.values.numpy()


def _check_against_geoclip(df, ref, x, gallery):
    """Our candidates (lat, lon, score) vs geoclip's top-k over the same gallery, per frame."""
    g32 = gallery.astype(np.float32)
    logits, idx, prob = _ref_topk(ref, x, g32)
    assert df.height == len(x) and df["candidates"].list.len().to_list() == [K] * len(x)
    for i, cands in enumerate(df["candidates"].to_list()):
        ours = np.array([[c["lat"], c["lon"]] for c in cands], dtype=np.float32)
        np.testing.assert_array_equal(ours, g32[idx[i]])  # the same points, in the same order
        score = np.array([c["score"] for c in cands])
        np.testing.assert_allclose(score, prob[i] / prob[i].sum(), rtol=2e-4)  # geoclip's probabilities over the K
        assert (df["lat"][i], df["lon"][i]) == (cands[0]["lat"], cands[0]["lon"])  # top-1 is the answer
    return logits


def test_zero_shot_top_k_equals_geoclips_own(ref, cache):
    gallery = load_geoclip_gallery()[::20]  # 5000 of GeoCLIP's 100K points: the same code, a faster test
    model = load_model("geoclip", device="cpu", cache_dir=cache, gallery=gallery)
    x = clip_features(12)
    df = model.predict_features(x.numpy(), top_k=K, places=False)
    assert model._backbones is None  # features in: no CLIP needed
    logits = _check_against_geoclip(df, ref, x, gallery)

    # Phase I only, so the confidence is the mass of the top-256 (softmax at GeoCLIP's temperature) within
    # 1 km of the top-1 (vidtag.inference), computed here from geoclip's own logits.
    top = torch.topk(logits, 256, dim=1)
    p = top.values.softmax(dim=1).numpy()
    pts = gallery[top.indices.numpy()]  # (N, 256, 2)
    near = haversine_km(pts[:, :1, 0], pts[:, :1, 1], pts[..., 0], pts[..., 1]) <= 1.0
    np.testing.assert_allclose(df["confidence"].to_numpy(), (p * near).sum(axis=1), rtol=1e-4, atol=1e-6)


def test_a_saved_geoclip_bundle_predicts_the_same(builtin, cache, tmp_path, ref):
    b = load_bundle(builtin)
    gallery = load_geoclip_gallery()[::50]
    copy = save_bundle(tmp_path / "exported", b)  # a geoclip bundle round-trips like a trained one
    x = clip_features(4, seed=1).numpy()
    a = load_model(builtin, device="cpu", cache_dir=cache, gallery=gallery).predict_features(x, top_k=K, places=False)
    c = load_model(copy, device="cpu", cache_dir=cache, gallery=gallery).predict_features(x, top_k=K, places=False)
    assert a.equals(c)


def test_unknown_bundle_kind_is_one_line(builtin, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(builtin, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["kind"] = "wizard"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="kind 'wizard' is not one of"):
        load_bundle(bad)


@pytest.mark.slow
def test_zero_shot_top_k_equals_geoclips_own_on_the_full_100k(ref, cache):
    """The whole 100K gallery (embedding it takes ~1 min on one CPU thread, for us and for geoclip)."""
    gallery = load_geoclip_gallery()
    model = load_model("geoclip", device="cpu", cache_dir=cache)
    x = clip_features(6, seed=2)
    _check_against_geoclip(model.predict_features(x.numpy(), top_k=K, places=False), ref, x, gallery)
