"""vidtag.features.store: sharded Zarr v3 layout, whole-unit writes, refusal to mix, load_features."""

import json

import numpy as np
import pytest

from vidtag.features.store import (
    FeatureStore,
    FeatureStoreError,
    StoreLayout,
    load_features,
    open_store,
    store_key,
)

LAYOUT = StoreLayout(shard_rows=8, chunk_rows=4)


def _fp(seed=0, mean=0.5):
    return {"config": {"seed": seed}, "clip": {"dim": 3, "weights_sha256": f"c{seed}"},
            "dino": {"dim": 5, "weights_sha256": f"d{seed}"},
            "preprocessing": {"clip": {"mean": [mean] * 3}, "dino": {"mean": [0.4] * 3}},
            "compute_dtype": "float32"}


def _key(n=20, **kw):
    return store_key(_fp(**kw), "manifest-abc", n, LAYOUT)


def _fill(store, bad_rows=()):
    for u in range(store.n_units):
        a, b = store.unit_rows(u)
        rows = np.arange(a, b)
        valid = ~np.isin(rows, bad_rows)
        clip = np.where(valid[:, None], rows[:, None] + np.zeros((1, 3)), 0)
        dino = np.where(valid[:, None], -rows[:, None] + np.zeros((1, 5)), 0)
        store.write_unit(u, clip, dino, valid, [(int(r), "corrupt") for r in rows[~valid]])
    return store.finalize()


def test_layout_units_and_shards_one_file_per_unit(tmp_path):
    store, state = open_store(tmp_path / "f.zarr", _key(n=20))
    assert state == "created" and store.n_units == 3
    assert [store.unit_rows(u) for u in range(3)] == [(0, 8), (8, 16), (16, 20)]
    _fill(store)
    shards = sorted(p.relative_to(tmp_path / "f.zarr").as_posix() for p in (tmp_path / "f.zarr" / "clip" / "c").rglob("*")
                    if p.is_file())
    assert shards == ["clip/c/0/0", "clip/c/1/0", "clip/c/2/0"]  # one shard file per work unit, not per chunk
    meta = json.loads((tmp_path / "f.zarr" / "clip" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["data_type"] == "float16"
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [4, 3]


def test_written_features_read_back_with_bad_rows_masked_and_listed(tmp_path):
    store, _ = open_store(tmp_path / "f.zarr", _key(n=20))
    assert load_features_raises(tmp_path / "f.zarr", "incomplete")  # nothing written yet
    summary = _fill(store, bad_rows=[3, 17])
    assert summary["n_bad"] == 2
    f = load_features(tmp_path / "f.zarr", expect_fingerprint="manifest-abc")
    assert f.clip.dtype == np.float16 and f.clip.shape == (20, 3) and f.dino.shape == (20, 5)
    assert np.array_equal(f.clip[:, 0], np.where(np.isin(np.arange(20), [3, 17]), 0, np.arange(20)))
    assert f.valid.sum() == 18 and not f.valid[3] and not f.valid[17]
    assert f.attrs["bad_rows"] == [{"row": 3, "reason": "corrupt"}, {"row": 17, "reason": "corrupt"}]
    assert f.attrs["n_bad"] == 2 and f.attrs["complete"] is True
    assert "2 invalid" in repr(f)


def load_features_raises(path, match):
    with pytest.raises(FeatureStoreError, match=match):
        load_features(path)
    return True


def test_reopen_same_key_resumes_then_reports_complete(tmp_path):
    store, _ = open_store(tmp_path / "f.zarr", _key())
    store.write_unit(1, np.ones((8, 3)), np.ones((8, 5)), np.ones(8, bool), [])
    assert store.finalize() is None  # units 0 and 2 are missing
    again, state = open_store(tmp_path / "f.zarr", _key())
    assert state == "resumed" and again.done_mask().tolist() == [False, True, False]
    _fill(again)
    assert open_store(tmp_path / "f.zarr", _key())[1] == "complete"


@pytest.mark.parametrize("other, field", [
    (lambda: _key(seed=1), "backbones.clip.weights_sha256"),
    (lambda: _key(mean=0.1), "preprocessing.clip.mean"),
    (lambda: _key(n=21), "n_rows"),
    (lambda: store_key(_fp(), "manifest-xyz", 20, LAYOUT), "manifest_fingerprint"),
    (lambda: store_key(_fp(), "manifest-abc", 20, StoreLayout(16, 4)), "shard_rows"),
])
def test_mismatched_store_is_refused_naming_what_differs_and_force_rebuilds(tmp_path, other, field):
    store, _ = open_store(tmp_path / "f.zarr", _key())
    _fill(store)
    with pytest.raises(FeatureStoreError, match=rf"{field}.*--force"):
        open_store(tmp_path / "f.zarr", other())
    rebuilt, state = open_store(tmp_path / "f.zarr", other(), overwrite=True)
    assert state == "created" and not rebuilt.done_mask().any()


def test_load_with_wrong_manifest_fingerprint_is_refused(tmp_path):
    _fill(open_store(tmp_path / "f.zarr", _key())[0])
    with pytest.raises(FeatureStoreError, match="another manifest"):
        load_features(tmp_path / "f.zarr", expect_fingerprint="manifest-other")
    with pytest.raises(FeatureStoreError, match="does not exist.*vidtag extract"):
        load_features(tmp_path / "missing.zarr")


def test_second_creator_opens_the_existing_store(tmp_path):
    first = FeatureStore.create(tmp_path / "f.zarr", _key())
    first.write_unit(0, np.ones((8, 3)), np.ones((8, 5)), np.ones(8, bool), [])
    second = FeatureStore.create(tmp_path / "f.zarr", _key())  # e.g. a second --shard racing to create it
    assert second.done_mask().tolist() == [True, False, False]
    assert [p.name for p in tmp_path.iterdir()] == ["f.zarr"]  # no temp directory left behind


def test_clean_unit_removes_a_killed_writers_leftovers(tmp_path):
    store, _ = open_store(tmp_path / "f.zarr", _key())
    _fill(store)
    junk = [tmp_path / "f.zarr" / "clip" / "c" / "1" / "0.abc123.partial",
            tmp_path / "f.zarr" / "valid" / "c" / "1.abc123.partial",
            tmp_path / "f.zarr" / "_bad" / ".unit_000001.json.tmp"]
    for p in junk:
        p.write_bytes(b"half")
    keep = tmp_path / "f.zarr" / "clip" / "c" / "2" / "0.def456.partial"
    keep.write_bytes(b"another writer's")
    store.clean_unit(1)
    assert not any(p.exists() for p in junk) and keep.exists()


def test_write_unit_checks_row_count(tmp_path):
    store, _ = open_store(tmp_path / "f.zarr", _key())
    with pytest.raises(ValueError, match="unit 2 covers rows 16:20"):
        store.write_unit(2, np.ones((8, 3)), np.ones((8, 5)), np.ones(8, bool), [])


def test_layout_validation():
    with pytest.raises(ValueError, match="multiple of chunk_rows"):
        StoreLayout(shard_rows=10, chunk_rows=4)


def test_overwrite_keeps_a_matching_store_and_replaces_a_foreign_directory(tmp_path):
    store, _ = open_store(tmp_path / "f.zarr", _key())
    store.write_unit(0, np.ones((8, 3)), np.ones((8, 5)), np.ones(8, bool), [])
    again, state = open_store(tmp_path / "f.zarr", _key(), overwrite=True)  # --force never throws work away
    assert state == "resumed" and again.done_mask().tolist() == [True, False, False]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(FeatureStoreError, match="not a vidtag feature store"):
        open_store(tmp_path / "other", _key())
    assert (tmp_path / "other" / "notes.txt").exists()
    assert open_store(tmp_path / "other", _key(), overwrite=True)[1] == "created"


def test_importing_the_store_loads_neither_backbones_nor_torch():
    """Package __init__s are lazy: the store (and the stages reading it) do not depend on the backbones."""
    import subprocess
    import sys

    code = ("import sys, vidtag.features.store; "
            "assert not {'vidtag.features.backbones', 'open_clip', 'torch'} & set(sys.modules), sorted(sys.modules); "
            "from vidtag.features import FeatureStoreError, load_features; "
            "assert load_features is vidtag.features.store.load_features; "
            "assert 'vidtag.features.backbones' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
