"""Real weights, proven offline: the exact Hugging Face cache layouts that open_clip (``ViT-L-14``, ``openai``)
and transformers (``facebook/dinov2-large``) read, holding the real architectures with random weights (float16,
as small as the loaders accept), loaded through vidtag's real path with the hub offline; then
``vidtag predict --model geoclip`` on a real H.264 file end to end against that cache.

Slow (about 3-5 minutes on 2 CPU cores, ~1.5 GB of temporary files): the layouts are built once per session.
open_clip resolves the tag to ``timm/vit_large_patch14_clip_224.openai`` and reads
``open_clip_model.safetensors`` (an open_clip state dict) from ``models--timm--vit_large_patch14_clip_224.openai``;
transformers reads ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` from
``models--facebook--dinov2-large``; both through ``refs/main`` -> ``snapshots/<revision>/`` -> ``blobs/``.
"""

import hashlib
import json
import logging

import gpxpy
import numpy as np
import polars as pl
import pytest
import torch
from media import write_h264
from polars.testing import assert_frame_equal
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vidtag.cli import app

pytestmark = pytest.mark.slow

CLIP_REPO, CLIP_FILE = "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"
DINO_REPO = "facebook/dinov2-large"
REVISION = "0123456789abcdef0123456789abcdef01234567"
# facebook/dinov2-large's config.json and preprocessor_config.json, as the hub serves them.
DINO_CONFIG = {
    "architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "hidden_size": 1024, "image_size": 518, "initializer_range": 0.02,
    "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4, "model_type": "dinov2", "num_attention_heads": 16,
    "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14, "qkv_bias": True, "torch_dtype": "float32",
    "transformers_version": "4.32.0.dev0", "use_swiglu_ffn": False,
}
DINO_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}


def _put(hub, repo_id, filename, write):
    """Store one file as the hub does: blobs/<sha256>, snapshots/<rev>/<name> a relative link to it, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    tmp = repo / "blobs" / f".{filename}.incomplete"
    write(tmp)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    blob = repo / "blobs" / h.hexdigest()
    tmp.rename(blob)
    link = repo / "snapshots" / REVISION / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"../../blobs/{blob.name}")
    return link


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    """A Hugging Face home whose hub cache holds CLIP ViT-L/14 and DINOv2-large (real shapes, random weights)."""
    import open_clip
    from transformers import Dinov2Config, Dinov2Model

    home = tmp_path_factory.mktemp("hf")
    hub = home / "hub"
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that a model without pretrained weights is random: intended
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
            state = {k: v.half().contiguous() for k, v in clip.state_dict().items()}  # the whole CLIP, both towers
            del clip
            _put(hub, CLIP_REPO, CLIP_FILE, lambda p: save_file(state, str(p)))
            del state
            torch.manual_seed(1)
            dino = Dinov2Model(Dinov2Config(**{k: v for k, v in DINO_CONFIG.items() if k != "transformers_version"}))
            dstate = {k: v.half().contiguous() for k, v in dino.state_dict().items()}
            del dino
    finally:
        logging.disable(previous)
    _put(hub, DINO_REPO, "config.json", lambda p: p.write_text(json.dumps(DINO_CONFIG, indent=2)))
    _put(hub, DINO_REPO, "preprocessor_config.json", lambda p: p.write_text(json.dumps(DINO_PREPROCESSOR, indent=2)))
    _put(hub, DINO_REPO, "model.safetensors", lambda p: save_file(dstate, str(p), metadata={"format": "pt"}))
    return home


@pytest.fixture
def offline(hf_home, monkeypatch):
    """That cache, the hubs offline, and any hub download failing the test."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = huggingface_hub.file_download.hf_hub_download

    def offline_only(*a, **k):
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            raise AssertionError("the hub was called while online")
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_only)
    return hf_home / "hub"


def test_the_layouts_are_the_ones_open_clip_and_transformers_resolve(offline):
    """Their own resolvers, not vidtag's, find our files (hub offline): the layout is the real one."""
    import huggingface_hub
    import open_clip
    from open_clip.pretrained import download_pretrained
    from transformers.utils import cached_file

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest sets it before the hub is imported
    tag = open_clip.get_pretrained_cfg("ViT-L-14", "openai")
    assert tag["hf_hub"] == CLIP_REPO + "/"
    found = download_pretrained(tag, cache_dir=str(offline))  # open_clip's own download step, offline
    assert found.endswith(f"snapshots/{REVISION}/{CLIP_FILE}")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        path = cached_file(DINO_REPO, name, cache_dir=str(offline), local_files_only=True)
        assert path.endswith(f"snapshots/{REVISION}/{name}")


def test_real_backbones_load_through_vidtag_offline(offline):
    from PIL import Image

    from vidtag.features.backbones import BackboneConfig, build_backbones

    bb = build_backbones(BackboneConfig(preset="real"), "cpu")
    assert bb.dims == (768, 1024)
    clip_file = load_file(str(offline / "models--timm--vit_large_patch14_clip_224.openai" / "snapshots" / REVISION / CLIP_FILE))
    dino_file = load_file(str(offline / "models--facebook--dinov2-large" / "snapshots" / REVISION / "model.safetensors"))
    for name in ("conv1.weight", "proj", "transformer.resblocks.23.mlp.c_proj.weight"):
        assert torch.equal(bb.clip.state_dict()[name], clip_file[f"visual.{name}"].float())  # float16 file -> float32
    for name in ("embeddings.cls_token", "encoder.layer.23.mlp.fc2.weight", "layernorm.weight"):
        assert bb.dino.state_dict()[name].dtype == torch.float32
        assert torch.equal(bb.dino.state_dict()[name], dino_file[name].float())
    fp = bb.fingerprint()
    assert fp["clip"]["weights"] == "openai" and fp["dino"]["weights"] == DINO_REPO
    assert fp["preprocessing"]["clip"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert (fp["preprocessing"]["dino"]["resize_px"], fp["preprocessing"]["dino"]["crop_px"]) == (256, 224)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    c, d = bb.preprocess(img)
    f_clip, f_dino = bb.encode(c[None], d[None])
    assert f_clip.shape == (1, 768) and f_dino.shape == (1, 1024) and torch.isfinite(f_clip).all() and torch.isfinite(f_dino).all()


def test_vidtag_predict_geoclip_end_to_end_on_a_real_h264_file(offline, tmp_path_factory):
    from vidtag.api import candidates_table, load_model

    tmp = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    video = write_h264(tmp / "clip.mp4", 30, 10, (320, 240), draw=lambda k, size: rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    cache = tmp / "cache"
    runner = CliRunner()

    def predict(out, *extra):
        r = runner.invoke(app, ["predict", str(video), "--model", "geoclip", "--out", str(out), "--cache-dir", str(cache),
                                "--no-progress", "--device", "cpu", *map(str, extra)])
        assert r.exit_code == 0, r.output
        return r

    predict(tmp / "t.geojson")  # 3 frames at 1 fps; embeds GeoCLIP's 100K gallery once into the cache
    doc = json.loads((tmp / "t.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    line = [f for f in doc["features"] if f["properties"]["kind"] == "trajectory"]
    points = [f for f in doc["features"] if f["properties"]["kind"] == "frame"]
    assert len(points) == 3 and all(p["geometry"]["type"] == "Point" for p in points)
    coords = [p["geometry"]["coordinates"] for p in points]  # RFC 7946: [lon, lat]
    assert all(-180 <= x <= 180 and -90 <= y <= 90 for x, y in coords)
    if len({tuple(c) for c in coords}) > 1:
        assert line and line[0]["geometry"]["type"] in ("LineString", "MultiLineString")
    assert [p["properties"]["timestamp_s"] for p in points] == pytest.approx([0.0, 1.0, 2.0])

    predict(tmp / "t.gpx")
    gpx = gpxpy.parse((tmp / "t.gpx").read_text())
    pts = gpx.tracks[0].segments[0].points
    assert [(p.longitude, p.latitude) for p in pts] == [tuple(c) for c in coords]

    predict(tmp / "t.csv", "--top-k", 5)
    cands = pl.read_csv(tmp / "t.candidates.csv")
    assert cands.group_by("frame_index").len().sort("frame_index")["len"].to_list() == [5, 5, 5]

    api = load_model("geoclip", device="cpu", cache_dir=cache).predict(video, top_k=5)
    main = api.drop("candidates")
    assert_frame_equal(pl.read_csv(tmp / "t.csv", schema=main.schema), main)
    assert_frame_equal(cands, candidates_table(api), check_dtypes=False)
