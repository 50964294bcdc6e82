"""vidtag.features.extract: a manifest of JPEGs and video frames becomes a complete, deterministic store;
bad frames are masked and listed; runs resume after kill -9 and split into shards byte-identically."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from media import write_h264
from PIL import Image
from typer.testing import CliRunner

from vidtag.data.manifest import manifest_fingerprint, read_manifest, write_manifest
from vidtag.features import load_features
from vidtag.features.backbones import BackboneConfig, build_backbones
from vidtag.features.extract import ExtractConfig, configs_from_params, extract_features, parse_shard
from vidtag.features.store import FeatureStoreError, StoreLayout

REPO = Path(__file__).resolve().parents[1]
BACKBONE = BackboneConfig(preset="tiny", image_size=32)
RUN = ExtractConfig(batch_size=3, num_workers=0, device="cpu", layout=StoreLayout(shard_rows=8, chunk_rows=4))


@pytest.fixture(scope="module")
def tiny():
    return build_backbones(BACKBONE)


def make_video(path, n_frames=10, fps=10, size=(48, 32)):
    """Frame k is a flat grey 20*k, so every frame's features differ."""
    return write_h264(path, n_frames, fps, size, draw=lambda k, wh: np.full((wh[1], wh[0], 3), 20 * k, np.uint8))


def make_world(root: Path, n_seq=3, n_frames=7, corrupt=(), video=False) -> Path:
    """JPEG sequences under root/, a manifest at root/../manifest.parquet; ``corrupt`` = (seq, frame) pairs."""
    rows = []
    for s in range(n_seq):
        (root / f"s{s}").mkdir(parents=True)
        for t in range(n_frames):
            rng = np.random.default_rng([s, t])
            Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / f"s{s}" / f"{t}.jpg")
            rows.append({"sequence_id": f"s{s}", "frame_index": t, "image_path": f"s{s}/{t}.jpg",
                         "lat": 10.0 + s, "lon": 20.0 + t / 100, "split": "train" if s else "val"})
    for s, t in corrupt:
        p = root / f"s{s}" / f"{t}.jpg"
        p.write_bytes(p.read_bytes()[:150])  # a truncated JPEG: the header parses, the pixels do not
    if video:
        make_video(root / "drive.mp4")
        for k, ts in enumerate([0.0, 0.3, 0.3, 0.5, 5.0]):  # a repeated time, and one past the end
            rows.append({"sequence_id": "v0", "frame_index": k, "video_path": "drive.mp4", "timestamp_s": ts,
                         "lat": 1.0, "lon": 2.0, "split": "train"})
    df = pl.DataFrame(rows, schema_overrides={"frame_index": pl.Int32})
    write_manifest(df, root.parent / "manifest.parquet", root, source="test")
    return root.parent / "manifest.parquet"


def files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_extract_fills_store_row_aligned_with_encode(tmp_path, tiny):
    manifest = read_manifest(make_world(tmp_path / "data"))
    res = extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False)
    assert res.status == "complete" and res.n_bad == 0 and res.frames_written == 21 and res.units_written == 3
    f = load_features(tmp_path / "f.zarr", expect_fingerprint=manifest_fingerprint(manifest.df))
    assert f.clip.shape == (21, 32) and f.dino.shape == (21, 48) and f.valid.all()
    # Row 9 is frame 2 of s1: the store holds what the backbone gives for that very image.
    assert manifest.df.row(9, named=True)["image_path"] == "s1/2.jpg"
    c, d = tiny.preprocess(Image.open(manifest.root / "s1/2.jpg"))
    want_c, want_d = tiny.encode(c[None], d[None])
    np.testing.assert_allclose(f.clip[9].astype(np.float32), want_c[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(f.dino[9].astype(np.float32), want_d[0].numpy(), rtol=2e-3, atol=2e-3)
    assert f.attrs["backbones"]["clip"]["weights_sha256"] == tiny.weights_sha256()["clip"]
    assert f.attrs["preprocessing"]["dino"]["crop_px"] == 32
    assert f.attrs["manifest_fingerprint"] == manifest_fingerprint(manifest.df)


def test_rerun_is_a_noop_and_other_backbones_are_refused_until_forced(tmp_path, tiny):
    manifest = read_manifest(make_world(tmp_path / "data", n_seq=1))
    extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False)
    before = files(tmp_path / "f.zarr")
    again = extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False)
    assert again.status == "up-to-date" and "nothing to do" in again.summary()
    assert files(tmp_path / "f.zarr") == before
    other = BackboneConfig(preset="tiny", image_size=32, seed=1)
    with pytest.raises(FeatureStoreError, match="weights_sha256.*--force"):
        extract_features(manifest, tmp_path / "f.zarr", other, RUN, progress=False)
    forced = extract_features(manifest, tmp_path / "f.zarr", other, RUN, overwrite=True, progress=False)
    assert forced.status == "complete" and files(tmp_path / "f.zarr") != before


def test_corrupt_missing_and_undecodable_frames_are_masked_listed_and_the_run_goes_on(tmp_path, tiny):
    path = make_world(tmp_path / "data", n_seq=2, corrupt=[(0, 3)], video=True)
    manifest = read_manifest(path)
    (manifest.root / "s1" / "5.jpg").unlink()  # vanished after ingest
    res = extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False)
    f = load_features(tmp_path / "f.zarr")
    rows = {b["row"]: b["reason"] for b in f.attrs["bad_rows"]}
    df = manifest.df.with_row_index("row")
    row_of = {(r["sequence_id"], r["frame_index"]): r["row"] for r in df.iter_rows(named=True)}
    assert set(rows) == {row_of[("s0", 3)], row_of[("s1", 5)], row_of[("v0", 4)]}
    assert "s0/3.jpg" in rows[row_of[("s0", 3)]] or "decode" in rows[row_of[("s0", 3)]]
    assert "not found" in rows[row_of[("s1", 5)]] and "5.000 s" in rows[row_of[("v0", 4)]]
    assert res.n_bad == f.attrs["n_bad"] == 3 and int((~f.valid).sum()) == 3
    for r in rows:
        assert not f.valid[r] and not f.clip[r].any() and not f.dino[r].any()  # zeros, never a neighbour's features
    v = [row_of[("v0", k)] for k in range(4)]
    assert f.valid[v].all()
    assert np.array_equal(f.clip[v[1]], f.clip[v[2]])  # the same video frame asked twice
    assert not np.array_equal(f.clip[v[0]], f.clip[v[1]])


def test_worker_processes_give_the_same_bytes_and_shards_fill_one_store(tmp_path, tiny):
    manifest = read_manifest(make_world(tmp_path / "data", n_seq=4))  # 28 rows = 4 units of 8
    extract_features(manifest, tmp_path / "one.zarr", tiny, RUN, progress=False)
    workers = ExtractConfig(batch_size=3, num_workers=2, device="cpu", layout=RUN.layout)
    extract_features(manifest, tmp_path / "workers.zarr", tiny, workers, progress=False)
    assert files(tmp_path / "workers.zarr") == files(tmp_path / "one.zarr")

    first = extract_features(manifest, tmp_path / "sharded.zarr", tiny, RUN, shard=(1, 2), progress=False)
    assert first.status == "partial" and first.units_written == 2 and first.units_left == 2
    with pytest.raises(FeatureStoreError, match="incomplete"):
        load_features(tmp_path / "sharded.zarr")
    second = extract_features(manifest, tmp_path / "sharded.zarr", tiny, RUN, shard=(0, 2), progress=False)
    assert second.status == "complete" and second.units_written == 2
    assert files(tmp_path / "sharded.zarr") == files(tmp_path / "one.zarr")


def test_parse_shard_reads_spec_then_torchrun_env():
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard(None, env={"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)
    assert parse_shard(None, env={}) == (0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from vidtag.data.manifest import read_manifest
    from vidtag.features.backbones import BackboneConfig
    from vidtag.features.extract import ExtractConfig, extract_features
    from vidtag.features.store import FeatureStore, StoreLayout

    manifest, out, mode = sys.argv[1:4]
    if mode == "kill":  # die by SIGKILL half-way through unit 2: its clip shard written, nothing else
        write = FeatureStore.write_unit
        def dying_write(self, u, clip, dino, valid, bad):
            if u == 2:
                a, b = self.unit_rows(u)
                self.group["clip"][a:b] = clip
                (self.path / "dino" / "c" / "2").mkdir(parents=True, exist_ok=True)
                (self.path / "dino" / "c" / "2" / "0.0123abcd.partial").write_bytes(b"half a shard")
                os.kill(os.getpid(), signal.SIGKILL)
            write(self, u, clip, dino, valid, bad)
        FeatureStore.write_unit = dying_write
    cfg = ExtractConfig(batch_size=3, num_workers=1, device="cpu", layout=StoreLayout(shard_rows=8, chunk_rows=4))
    r = extract_features(read_manifest(manifest), out, BackboneConfig(preset="tiny", image_size=32), cfg, progress=False)
    print(r.summary())
""")


@pytest.mark.slow
def test_kill_9_mid_unit_then_rerun_is_byte_identical_to_a_clean_run(tmp_path):
    manifest = make_world(tmp_path / "data", n_seq=4, corrupt=[(2, 1)])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(out, mode):
        return subprocess.run([sys.executable, str(script), str(manifest), str(out), mode], env=env,
                              capture_output=True, text=True, timeout=120)

    clean_cfg = ExtractConfig(batch_size=3, num_workers=1, device="cpu", layout=RUN.layout)  # as in CHILD
    extract_features(read_manifest(manifest), tmp_path / "clean.zarr", BACKBONE, clean_cfg, progress=False)
    killed = run(tmp_path / "resumed.zarr", "kill")
    assert killed.returncode == -9, killed.stderr
    done = json.loads((tmp_path / "resumed.zarr" / "zarr.json").read_text())["attributes"]
    assert done["complete"] is False and (tmp_path / "resumed.zarr" / "done" / "c" / "1").exists()
    assert not (tmp_path / "resumed.zarr" / "done" / "c" / "2").exists()
    resumed = run(tmp_path / "resumed.zarr", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote 12 frames in 2 unit(s)" in resumed.stdout  # units 2 and 3 only
    assert files(tmp_path / "resumed.zarr") == files(tmp_path / "clean.zarr")
    assert load_features(tmp_path / "clean.zarr").attrs["n_bad"] == 1


def test_cli_and_params_configs(tmp_path):
    from vidtag.cli import app

    bcfg, ecfg = configs_from_params({"preset": "tiny", "clip": {"arch": "ViT-L-14", "pretrained": "openai"},
                                      "dino": {"name": "facebook/dinov2-large"}, "image_size": 32, "seed": 0,
                                      "batch_size": 3, "num_workers": 0, "device": "cpu", "bf16": True,
                                      "compile": False, "shard_rows": 8, "chunk_rows": 4})
    assert bcfg == BACKBONE and ecfg == RUN

    manifest = make_world(tmp_path / "data", n_seq=1, corrupt=[(0, 0)])
    args = ["extract", str(manifest), "--out", str(tmp_path / "f.zarr"), "--preset", "tiny", "--image-size", "32",
            "--num-workers", "0", "--device", "cpu", "--shard-rows", "8", "--no-progress"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "store complete, 7 rows, 1 bad frame(s) masked" in first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = CliRunner().invoke(app, [*args, "--seed", "3"])
    assert other.exit_code == 1 and "error:" in other.output and "--force" in other.output
    assert "Traceback" not in other.output


def test_pipeline_stage_reads_backbone_params(tmp_path, monkeypatch, capsys):
    import yaml

    import pipeline.common
    from pipeline.extract import main

    params = {"seed": 0, "backbone": {"preset": "tiny", "clip": {"arch": "ViT-L-14", "pretrained": "openai"},
                                      "dino": {"name": "facebook/dinov2-large"}, "image_size": 32, "seed": 0,
                                      "batch_size": 3, "num_workers": 0, "device": "cpu", "bf16": True,
                                      "compile": False, "shard_rows": 8, "chunk_rows": 4}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(pipeline.common, "PARAMS_FILE", tmp_path / "params.yaml")
    manifest = make_world(tmp_path / "data", n_seq=1)
    main(["--manifest", str(manifest), "--out", str(tmp_path / "f.zarr")])
    assert "store complete, 7 rows" in capsys.readouterr().out
    assert load_features(tmp_path / "f.zarr").attrs["backbones"]["config"]["preset"] == "tiny"
    with pytest.raises(SystemExit, match="error: .*shard"):  # the stage runner reports a VidtagError in one line
        pipeline.common.run_stage(lambda: main(["--manifest", str(manifest), "--out", str(tmp_path / "f.zarr"),
                                                "--shard", "3/2"]))
