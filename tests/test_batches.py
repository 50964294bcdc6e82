"""Streamed features: batches read from the Zarr store by chunk equal the resident ones,
the memory check picks a mode, and training gives the same weights in both modes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_train import P1, P2, RT1, RT2, TINY_MODEL, make_world

from vidtag.features.store import ChunkReader, FeatureStoreError, StoreLayout, load_features, open_store, store_key
from vidtag.features.sequences import build_sequences, padded_chunks
from vidtag.features.source import FeatureTensors, StreamedFeatures, choose_resident, feature_bytes, feature_source
from vidtag.models.config import GeoRefinerConfig
from vidtag.train.phase1 import train_phase1
from vidtag.train.phase2 import train_phase2
from vidtag.train.checkpoint import load_checkpoint

LAYOUT = StoreLayout(shard_rows=64, chunk_rows=8)
CPU = torch.device("cpu")


def write_store(world, path):
    """The world's features through the real writer, in small shards/chunks so batches span many chunks."""
    fp = {"config": {"preset": "synthetic"}, "clip": {"dim": world.clip.shape[1]}, "dino": {"dim": world.dino.shape[1]},
          "preprocessing": {}}
    store, _ = open_store(path, store_key(fp, "synthetic", len(world.valid), LAYOUT))
    for u in range(store.n_units):
        a, b = store.unit_rows(u)
        store.write_unit(u, world.clip[a:b], world.dino[a:b], world.valid[a:b], [])
    store.finalize()
    return load_features(path, lazy=True)


@pytest.fixture(scope="module")
def world():
    return make_world(n_seq=24)


@pytest.fixture(scope="module")
def lazy(world, tmp_path_factory):
    return write_store(world, tmp_path_factory.mktemp("store") / "f.zarr")


def test_lazy_features_are_zarr_backed_and_read_back_exactly(world, lazy):
    assert not isinstance(lazy.clip, np.ndarray) and lazy.clip.chunks[0] == 8
    assert np.array_equal(lazy.clip[:], world.clip) and np.array_equal(lazy.valid, world.valid)
    resident = FeatureTensors.from_arrays(lazy.clip, lazy.dino, world.manifest, CPU)  # block-by-block load
    assert torch.equal(resident.dino, torch.from_numpy(world.dino))


def test_streamed_gather_equals_resident_and_reads_each_chunk_once(world, lazy):
    resident = FeatureTensors.from_arrays(world.clip, world.dino, world.manifest, CPU)
    streamed = StreamedFeatures(lazy.clip, lazy.dino, world.manifest, CPU)
    n = len(world.valid)
    rows = torch.from_numpy(np.random.default_rng(0).integers(0, n, (6, 10)))
    rows[0, 7:] = -1  # pads
    rows[1, :3] = rows[2, :3]  # duplicates
    for got, want in zip(streamed.gather(rows), resident.gather(rows)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    touched = len(np.unique(rows.clamp(min=0).numpy() // 8))
    assert (streamed.chunks_read, streamed.chunks_hit) == (touched, 0)
    streamed.gather(rows)  # all from the LRU now
    assert (streamed.chunks_read, streamed.chunks_hit) == (touched, touched)

    tiny = StreamedFeatures(lazy.clip, lazy.dino, world.manifest, CPU, cache_mb=1e-6)  # LRU of one chunk
    everything = torch.arange(n).view(1, n)  # one gather needing every chunk, far more than the LRU holds
    for got, want in zip(tiny.gather(everything), resident.gather(everything)):
        assert torch.equal(got, want)
    assert tiny.chunks_read == -(-n // 8) and len(tiny.cache) == 1


def test_chunk_reader_reads_what_zarr_reads_and_refuses_a_damaged_shard(tmp_path):
    # 50 rows: a partial last chunk (rows 48-49) and a chunk of zeros that zarr never writes (rows 16-23)
    fp = {"config": {}, "clip": {"dim": 3}, "dino": {"dim": 5}, "preprocessing": {}}
    store, _ = open_store(tmp_path / "f.zarr", store_key(fp, "m", 50, LAYOUT))
    rng = np.random.default_rng(0)
    for u in range(store.n_units):
        a, b = store.unit_rows(u)
        clip, dino = rng.standard_normal((b - a, 3)), rng.standard_normal((b - a, 5))
        clip[max(16 - a, 0):max(24 - a, 0)] = 0
        store.write_unit(u, clip, dino, np.ones(b - a, bool), [])
    store.finalize()
    lazy = load_features(tmp_path / "f.zarr", lazy=True)
    reader = ChunkReader.for_array(lazy.clip)
    got = reader.read(range(7))
    assert reader._index[0][2, 0] == np.iinfo(np.uint64).max  # the all-zero chunk really is absent from the shard
    assert np.array_equal(np.concatenate([got[c] for c in range(7)]), lazy.clip[:]) and got[6].shape == (2, 3)
    shard = tmp_path / "f.zarr" / "clip" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # flip a byte of the shard index
    shard.write_bytes(bytes(raw))
    with pytest.raises(FeatureStoreError, match="clip/c/0/0: the shard index is damaged"):
        ChunkReader.for_array(lazy.clip).read([0])


def test_zarr_fallback_equals_the_direct_reader(world, lazy):
    direct = StreamedFeatures(lazy.clip, lazy.dino, world.manifest, CPU)
    via_zarr = StreamedFeatures(lazy.clip, lazy.dino, world.manifest, CPU)
    assert direct.readers is not None
    via_zarr.readers = None  # what a store of another layout (or not on local disk) gets
    rows = torch.from_numpy(np.random.default_rng(1).integers(0, len(world.valid), (5, 9)))
    for got, want in zip(via_zarr.gather(rows), direct.gather(rows)):
        assert torch.equal(got, want)


def test_streamed_from_host_arrays_equals_resident(world):
    # features already in host memory but too big for the device are streamed from the numpy arrays
    resident = FeatureTensors.from_arrays(world.clip, world.dino, world.manifest, CPU)
    streamed = StreamedFeatures(world.clip.astype(np.float32), world.dino, world.manifest, CPU)
    rows = torch.tensor([[5, 3, -1], [0, 0, 7]])
    for got, want in zip(streamed.gather(rows), resident.gather(rows)):
        assert torch.equal(got, want)


def test_whole_val_set_embeds_the_same_when_streamed(world, lazy):
    val = build_sequences(world.manifest, world.valid, "val")
    streamed = StreamedFeatures(lazy.clip, lazy.dino, world.manifest, CPU, cache_mb=0.01)
    resident = FeatureTensors.from_arrays(world.clip, world.dino, world.manifest, CPU)
    for _, rows, _ in padded_chunks(val, max_frames=64):
        for got, want in zip(streamed.gather(rows), resident.gather(rows)):
            assert torch.equal(got, want)


def test_memory_check_picks_resident_or_streamed(world, lazy):
    need = feature_bytes(lazy)
    assert need == 2 * len(world.valid) * (16 + 24)
    assert choose_resident(world, CPU)[0]  # numpy on the CPU: already resident, nothing to copy
    fits, why = choose_resident(lazy, CPU, memory_gb=need / 2**30 * 0.99)
    assert not fits and "do not fit" in why and "streamed" in why
    assert choose_resident(lazy, CPU, memory_gb=need / 2**30 * 1.01)[0]
    assert not choose_resident(world, CPU, memory_gb=0.0)[0]  # an explicit budget applies to numpy too
    assert choose_resident(lazy, CPU, in_memory=True, memory_gb=0.0)[0]
    assert not choose_resident(world, CPU, in_memory=False)[0]
    source, _ = feature_source(lazy, world.manifest, CPU, "auto", memory_gb=0.0)
    assert isinstance(source, StreamedFeatures)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="features_in_memory"):
            choose_resident(lazy, CPU, in_memory=bad)


def _untimed(metrics):
    return {k: v for k, v in metrics.items() if k not in ("epoch_s", "frames_per_s", "steps_per_s")}


def _weights(directory):
    return load_checkpoint(directory).weights


def test_training_is_identical_resident_and_streamed(world, lazy, tmp_path):
    p1, rt = replace(P1, epochs=2), replace(RT1, eval_every=1, eval_max_frames=64)
    m_res = train_phase1(lazy, world.manifest, world.gallery, tmp_path / "res", p1, TINY_MODEL,
                         runtime=replace(rt, features_in_memory=True))
    m_str = train_phase1(lazy, world.manifest, world.gallery, tmp_path / "str", p1, TINY_MODEL,
                         runtime=replace(rt, features_in_memory=False))
    assert "val_acc_1km" in m_str
    assert _untimed(m_res) == _untimed(m_str)
    a, b = _weights(tmp_path / "res" / "checkpoint"), _weights(tmp_path / "str" / "checkpoint")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Phase II from the same Phase I, one epoch each way; its validation is the whole val set too
    import polars as pl

    gallery_path = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_path)
    p2, rt2 = replace(P2, epochs=1), replace(RT2, eval_max_frames=64)
    refiner = GeoRefinerConfig(**TINY_MODEL.refiner.__dict__)
    out = {}
    for name, mode in (("res", True), ("str", False)):
        out[name] = train_phase2(lazy, world.manifest, gallery_path, world.gallery, tmp_path / "res", tmp_path / f"model_{name}",
                                 tmp_path / f"p2_{name}", p2, refiner, runtime=replace(rt2, features_in_memory=mode))
    assert _untimed(out["res"]) == _untimed(out["str"])
    a, b = _weights(tmp_path / "p2_res"), _weights(tmp_path / "p2_str")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_switch_feature_mode(world, lazy, tmp_path):
    # the mode changes how features are read, never the result, so a resume may change it
    p1 = replace(P1, epochs=1)
    train_phase1(lazy, world.manifest, world.gallery, tmp_path, p1, TINY_MODEL, runtime=replace(RT1, features_in_memory=True))
    train_phase1(lazy, world.manifest, world.gallery, tmp_path, replace(p1, epochs=2), TINY_MODEL,
                 runtime=replace(RT1, features_in_memory=False))
    assert load_checkpoint(tmp_path / "checkpoint").state["epoch"] == 2


def test_lru_keeps_the_recently_used_chunk(world, lazy):
    two_chunks_mb = 2 * 8 * 2 * (16 + 24) / 2**20
    s = StreamedFeatures(lazy.clip, lazy.dino, world.manifest, CPU, cache_mb=two_chunks_mb)
    for chunk in (0, 1, 0, 2):  # chunk 1 is the least recently used when chunk 2 arrives
        s.gather(torch.tensor([[chunk * 8 + 3]]))
    assert list(s.cache) == [0, 2] and (s.chunks_read, s.chunks_hit) == (3, 1)
