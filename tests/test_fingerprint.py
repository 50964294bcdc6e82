"""One fingerprint family: the same thing hashes the same way everywhere, and stored hashes stay stable."""

import hashlib

import numpy as np
import polars as pl
import pytest
import torch

from vidtag.data.manifest import manifest_fingerprint
from vidtag.fingerprint import sha256_arrays, sha256_file, sha256_frame, sha256_json, sha256_state
from vidtag.gallery import gallery_fingerprint
from vidtag.retrieval import latlon_fingerprint, module_fingerprint

# Values computed by the hashing code these helpers replaced: manifest fingerprints are stored in
# feature stores and gallery fingerprints in gallery files, so they must not drift.
MANIFEST = pl.DataFrame({
    "sequence_id": ["a", "a", None, ""], "frame_index": pl.Series([0, 1, None, 0], dtype=pl.Int32),
    "image_path": ["x", None, "y", "z"], "timestamp_s": [None, 1.5, float("nan"), 0.0],
    "lat": [1.0, 2.0, None, 3.0], "lon": [4.0, 5.0, 6.0, None],
})
GALLERY = pl.DataFrame({"lat": [1.0, 2.5, -3.0], "lon": [10.0, 20.0, 179.0]})


def test_manifest_fingerprint_is_stable():
    assert manifest_fingerprint(MANIFEST) == "a5ebbe696507b51c09e7305fa327649e88a36bfe791ab24f788b295f69e183ea"
    assert manifest_fingerprint(MANIFEST.head(0)) == "b6793f8bce870435af5703fbf5b8012b3bcb0ec3c17fac35cd2cef964c8f38bb"
    assert manifest_fingerprint(MANIFEST.select("sequence_id", "frame_index")) == (
        "d0185942e5310a019e2c8fe09147294ee34f6d40e8506906edd69e50f1ac067f")  # absent columns count
    # Columns that do not shape features (lat, lon, split, ...) are left out.
    assert manifest_fingerprint(MANIFEST.with_columns(pl.col("lat") + 1)) == manifest_fingerprint(MANIFEST)


def test_gallery_fingerprint_is_stable_and_matches_latlon_fingerprint():
    assert gallery_fingerprint(GALLERY) == "17def2688088d8da437f6787162dbe7ae4d8fdd2762b17b004d74ce5c9d0e1e6"
    labelled = GALLERY.with_columns(pl.Series("label", ["a", None, "c"]))
    assert gallery_fingerprint(labelled) == "be3acc2153858509736093ab91c8c9ddcba6bcf1736db4961a0d3002c2c0ea35"
    assert latlon_fingerprint(GALLERY.to_numpy()) == gallery_fingerprint(GALLERY)
    assert latlon_fingerprint(GALLERY.to_numpy().astype(np.float32)) != latlon_fingerprint(GALLERY.to_numpy() + 1e-3)


def test_state_hash_is_the_same_for_a_module_and_its_state_dict():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    m.register_buffer("scale", torch.tensor(2.0))  # 0-d tensors hash too
    m.register_buffer("bf16", torch.randn(2, 3).to(torch.bfloat16))
    fp = sha256_state(m)
    assert fp == sha256_state(m.state_dict()) == sha256_state(dict(reversed(list(m.state_dict().items()))))
    assert fp == module_fingerprint(m)
    with torch.no_grad():
        m[0].weight[0, 0] += 1e-6
    assert sha256_state(m) != fp


def test_backbone_weight_hashes_are_stable():
    from vidtag.features.backbones import BackboneConfig, build_backbones

    sha = build_backbones(BackboneConfig(preset="tiny", image_size=32)).weights_sha256()  # stored in feature stores
    assert sha == {"clip": "9f3618f3fda86c78fbcfb7c515d362649534e0e59333723a9d91201aa2d8c121",
                   "dino": "49d4ea38d912d5a775589d15578ff5c5c960f31d5fbd539c6daed3d9a3d877ad"}


def test_json_file_and_column_hashes(tmp_path):
    assert sha256_json({"a": (1, 2), "b": {"y": 1, "x": "é"}}) == sha256_json({"b": {"x": "é", "y": 1}, "a": [1, 2]})
    with pytest.raises(ValueError):
        sha256_json({"a": float("nan")})
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * (3 << 20))
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    # polars, numpy and lists encode a column alike; null and "" differ.
    assert sha256_arrays(pl.Series(["a", None])) == sha256_arrays(["a", None]) != sha256_arrays(["a", ""])
    assert sha256_arrays(pl.Series([1, 2], dtype=pl.Int32)) == sha256_arrays(np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="one length"):
        sha256_arrays([1.0, 2.0], [1.0])
    df = pl.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    assert sha256_frame(df) == sha256_frame(df, ["a", "b"]) != sha256_frame(df, ["b", "a"])
