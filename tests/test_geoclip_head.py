"""GeoCLIPHead: parity with geoclip's own image MLP, and zero-shot top-k equal to geoclip's forward.

geoclip's model is built with its shipped MLP, location encoder and logit scale and no CLIP weights fetched:
``GeoCLIP(from_pretrained=True, clip_pretrained=False)`` where the installed geoclip has that switch (CLIP
ViT-L/14 architecture, random CLIP initialisation skipped with transformers' ``no_init_weights``); where it
does not (PyPI's geoclip 1.2.1 always fetches ``openai/clip-vit-large-patch14`` from the hub), its image
encoder's two hub calls are answered locally with the stand-in tower below. Either way the CLIP tower is
replaced by an identity on features, so what is compared is geoclip's own MLP, normalisation and logits.
"""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidtag.errors import BackboneError, InferenceError, VidtagError
from vidtag.models.geoclip_head import GeoCLIPHead, geoclip_weights_dir, load_geoclip_gallery
from vidtag.models.location_encoder import LocationEncoder

K = 5


class _FeaturesAsPixels(nn.Module):
    """Stands in for geoclip's CLIP tower: its "pixel values" are already the projected CLIP features, so
    geoclip's own ``forward`` runs its MLP, normalisation and logits on the features we give it."""

    def get_image_features(self, pixel_values):
        return pixel_values


@pytest.fixture(scope="module")
def ref():
    import inspect
    from unittest import mock

    from geoclip import GeoCLIP

    if "clip_pretrained" in inspect.signature(GeoCLIP.__init__).parameters:
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older transformers: a slower random init, same model
            no_init_weights = contextlib.nullcontext
        with no_init_weights():
            model = GeoCLIP(from_pretrained=True, clip_pretrained=False)
    else:  # this geoclip fetches CLIP from the hub, which is unreachable: its two hub calls answered locally
        import geoclip.model.image_encoder as image_encoder

        with mock.patch.object(image_encoder.CLIPModel, "from_pretrained", lambda *a, **k: _FeaturesAsPixels()), \
                mock.patch.object(image_encoder.AutoProcessor, "from_pretrained", lambda *a, **k: None):
            model = GeoCLIP(from_pretrained=True)
    model.image_encoder.CLIP = _FeaturesAsPixels()
    return model.eval()


@pytest.fixture(scope="module")
def head():
    return GeoCLIPHead.from_geoclip()


@pytest.fixture(scope="module")
def ours_loc():
    return LocationEncoder.from_geoclip(sigmas=(2**0, 2**4, 2**8)).eval()


@pytest.fixture(scope="module")
def gallery():
    return load_geoclip_gallery()


def _clip_like(n: int, seed: int = 0) -> torch.Tensor:
    # Projected CLIP ViT-L/14 image features are un-normalised, norm ~ O(1) per 768 dims times a few.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 768, generator=g) * 0.5


def test_head_matches_geoclip_image_mlp(ref, head):
    x = _clip_like(64)
    with torch.no_grad():
        ours = head(x)
        theirs = F.normalize(ref.image_encoder.mlp(x), dim=1)
        theirs_fwd = F.normalize(ref.image_encoder(x), dim=1)  # geoclip's ImageEncoder.forward on features
    assert ours.shape == (64, 512)
    assert torch.allclose(ours.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(ours, theirs_fwd, atol=1e-5, rtol=0)


def test_logit_scale_is_geoclips(ref, head):
    assert head.logit_scale.shape == ()
    assert torch.allclose(head.logit_scale, ref.logit_scale.detach(), atol=0, rtol=0)
    assert 3.0 < float(head.logit_scale) < 5.0  # exp ~ 40, GeoCLIP's trained temperature


def test_constructor_builds_architecture_only(head):
    fresh = GeoCLIPHead()
    assert fresh.state_dict().keys() == head.state_dict().keys()
    assert not torch.equal(fresh.mlp[0].weight, head.mlp[0].weight)
    assert float(fresh.logit_scale) == pytest.approx(np.log(1 / 0.07))
    assert not head.training


def test_state_dict_round_trip(head):
    copy = GeoCLIPHead()
    copy.load_state_dict(head.state_dict())
    x = _clip_like(4, seed=3)
    with torch.no_grad():
        assert torch.equal(copy(x), head(x))


def test_gallery_is_geoclips(ref, gallery):
    assert gallery.shape == (100_000, 2) and gallery.dtype == np.float64
    assert np.all(np.abs(gallery[:, 0]) <= 90) and np.all(np.abs(gallery[:, 1]) <= 180)
    assert torch.equal(torch.from_numpy(gallery).float(), ref.gps_gallery)


def _assert_same_topk(ours: torch.Tensor, theirs: torch.Tensor, gallery: np.ndarray, k: int, tol: float = 1e-4):
    """Same top-k predictions as geoclip, as places and in order.

    The 100K gallery holds duplicate coordinates, whose logits tie exactly and whose index order topk leaves
    open, so the picks are compared as coordinates; a row whose top k+1 scores hold a near-tie (0 < gap < tol)
    between different points is undecidable at float32 and only checked by score.
    """
    top_theirs = theirs.topk(k + 1, dim=1)
    top_ours = ours.topk(k, dim=1).indices
    # geoclip's own score of each of our picks is its k best scores, in order
    assert torch.allclose(theirs.gather(1, top_ours), top_theirs.values[:, :k], atol=tol, rtol=0)
    gaps = -top_theirs.values.diff(dim=1)  # (N, k) consecutive gaps, >= 0
    decided = ((gaps == 0) | (gaps > tol)).all(dim=1).numpy()
    assert decided.mean() >= 0.75, "too many near-ties to compare; change the seed"
    ours_pts = gallery[top_ours.numpy()[decided]]  # (n, k, 2)
    theirs_pts = gallery[top_theirs.indices[:, :k].numpy()[decided]]
    np.testing.assert_array_equal(ours_pts, theirs_pts)


def _zero_shot(ref, head, ours_loc, gallery_latlon: np.ndarray, n_frames: int):
    x = _clip_like(n_frames, seed=1)
    with torch.no_grad():
        theirs = ref(x, torch.from_numpy(gallery_latlon).float())  # geoclip's own forward: (N, G) logits
        ours = head.logits(head(x), ours_loc(torch.from_numpy(gallery_latlon)))
    assert ours.shape == theirs.shape == (n_frames, len(gallery_latlon))
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)  # logits = exp(3.68) * cos ~ 40 * cos
    _assert_same_topk(ours, theirs, gallery_latlon, K)


def test_zero_shot_topk_matches_geoclip_forward(ref, head, ours_loc, gallery):
    # A fixed 5K subset of the 100K gallery keeps this fast (two location encoders on 100K points take
    # ~100 s on one CPU thread); the whole gallery is compared end to end, through `load_model("geoclip")`,
    # in tests/test_geoclip_model.py.
    idx = np.random.default_rng(0).choice(len(gallery), 5000, replace=False)
    _zero_shot(ref, head, ours_loc, gallery[idx], n_frames=16)


def test_wrong_feature_width_is_refused(head):
    with pytest.raises(InferenceError, match="768"):
        head(torch.zeros(2, 1024))


def test_missing_or_foreign_weights_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        GeoCLIPHead.from_geoclip(tmp_path / "nope.pth")
    bad = tmp_path / "image_encoder_mlp_weights.pth"
    torch.save({"0.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(VidtagError, match="not GeoCLIP"):
        GeoCLIPHead.from_geoclip(tmp_path)  # a folder: the MLP file inside it


def test_weights_folder_argument_and_default_logit_scale(tmp_path, head):
    mlp = tmp_path / "image_encoder_mlp_weights.pth"
    torch.save(head.mlp.state_dict(), mlp)  # no logit_scale_weights.pth beside it
    other = GeoCLIPHead.from_geoclip(mlp)
    assert torch.equal(other.mlp[2].bias, head.mlp[2].bias)
    assert float(other.logit_scale) == pytest.approx(np.log(1 / 0.07))
    assert (geoclip_weights_dir() / "image_encoder_mlp_weights.pth").is_file()
