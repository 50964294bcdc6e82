"""The bad-input table: every input a careless or hostile user gives ends in one clear line (or a skip listed
in the skip report), never a traceback, a partial output, a read outside the dataset, or a trusted corrupted
cache. Failures that surface at the command line are run through it (``vidtag.cli.app``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from media import write_h264
from PIL import Image
from typer.testing import CliRunner

from vidtag.cli import app
from vidtag.errors import BundleError, LockError, ManifestError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_failure(result, *, out: Path | None = None, match: str | None = None) -> str:
    """Non-zero exit through the CLI's own error path (no exception escaped), at most a few lines, no
    traceback, and no output file (or temp file beside it) left behind."""
    text = result.output
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__} escaped: {result.exception}"
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, text
    if match:
        assert match in text, text
    if out is not None:
        assert not out.exists(), f"partial output {out}"
        assert not [p.name for p in out.parent.glob(f".{out.name}*")], "temp files left beside the output"
    return text


# --- ingest: empty and malformed files, bad coordinates, conflicting duplicates -------------------------------

def msls_tree(root: Path, keys=("a", "b"), raw_rows=None) -> Path:
    d = root / "train_val" / "zurich" / "query"
    (d / "images").mkdir(parents=True)
    (d / "seq_info.csv").write_text(",key,sequence_key,frame_number\n"
                                    + "".join(f"{i},{k},s0,{i}\n" for i, k in enumerate(keys)))
    raw_rows = raw_rows if raw_rows is not None else [(k, 8.54 + i * 1e-4, 47.37) for i, k in enumerate(keys)]
    (d / "raw.csv").write_text(",key,lon,lat,ca,captured_at,pano\n"
                               + "".join(f"{i},{k},{lo},{la},0,0,False\n" for i, (k, lo, la) in enumerate(raw_rows)))
    for k in keys:
        if "/" not in k:
            Image.new("RGB", (8, 8)).save(d / "images" / f"{k}.jpg")
    return d


def frames_tree(root: Path, n_seq=1, n=3) -> Path:
    for s in range(n_seq):
        (root / f"s{s}").mkdir(parents=True)
        for t in range(n):
            Image.new("RGB", (8, 8), (10 * t, 0, 0)).save(root / f"s{s}" / f"{t}.jpg")
    return root


def cityguessr_tree(root: Path, frames_dir="videos/v1", cities="city_id,name,lat,lon\n0,Tokyo,35.68,139.69\n") -> list:
    (root / "videos" / "v1").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (8, 8)).save(root / "videos" / "v1" / f"{k}.jpg")
    (root / "train.txt").write_text(",".join([frames_dir, "0", "0", "0", "0"] + ["0.1"] * 528) + "\n")
    (root / "cities.csv").write_text(cities)
    return ["ingest", "cityguessr", root, "--cities", root / "cities.csv", "--train", root / "train.txt"]


def video_with_track(root: Path, track_name: str, track_text: str) -> list:
    root.mkdir(parents=True, exist_ok=True)
    write_h264(root / "drive.mp4", 10, fps=5)
    (root / track_name).write_text(track_text)
    return ["ingest", "video", root / "drive.mp4", "--track", root / track_name]


def bdd_tree(root: Path, fixes) -> list:
    (root / "videos/100k/train").mkdir(parents=True)
    (root / "info/100k/train").mkdir(parents=True)
    write_h264(root / "videos/100k/train/v1.mov", 10, fps=5)
    start = 1_503_828_163_000
    locations = [{"timestamp": start + 1000 * k, "latitude": la, "longitude": lo} for k, (la, lo) in enumerate(fixes)]
    (root / "info/100k/train/v1.json").write_text(json.dumps({"startTime": start, "locations": locations}))
    return ["ingest", "bdd", root]


def _msls_empty(name):
    def make(tmp):
        d = msls_tree(tmp / "msls")
        (d / name).write_text("")
        return ["ingest", "msls", tmp / "msls"], f"{name} is empty"
    return make


def _cityguessr_case(**kw):
    def make(tmp):
        return cityguessr_tree(tmp / "cg", **kw), None
    return make


def _video_case(name, text, match):
    def make(tmp):
        return video_with_track(tmp / "vid", name, text), match
    return make


def _bdd_case(fixes, match):
    def make(tmp):
        return bdd_tree(tmp / "bdd", fixes), match
    return make


def _frames_empty_coords(tmp):
    root = frames_tree(tmp / "frames")
    (tmp / "coords.csv").write_text("")
    return ["ingest", "frames", root, "--coords", tmp / "coords.csv"], "coords.csv is empty"


def _msls_conflicting_key(tmp):
    msls_tree(tmp / "msls", raw_rows=[("a", 8.54, 47.37), ("a", 8.60, 47.40), ("b", 8.54, 47.37)])
    return ["ingest", "msls", tmp / "msls"], "conflicting coordinates in raw.csv (rows 2 and 3)"


INGEST_CASES = {
    "msls: 0-byte seq_info.csv": _msls_empty("seq_info.csv"),
    "msls: 0-byte raw.csv": _msls_empty("raw.csv"),
    "msls: duplicate raw.csv key, conflicting coordinates": _msls_conflicting_key,
    "frames: 0-byte coords CSV": _frames_empty_coords,
    "cityguessr: 0-byte cities.csv": _cityguessr_case(cities=""),
    "cityguessr: duplicate city_id, conflicting coordinates":
        _cityguessr_case(cities="city_id,name,lat,lon\n0,Tokyo,35.68,139.69\n0,Tokyo,36.0,139.0\n"),
    "cityguessr: city latitude not a number": _cityguessr_case(cities="city_id,name,lat,lon\n0,Tokyo,north,139.69\n"),
    "cityguessr: city longitude out of range": _cityguessr_case(cities="city_id,name,lat,lon\n0,Tokyo,35.68,200\n"),
    "video: 0-byte track CSV": _video_case("track.csv", "", "track.csv is empty"),
    "video: GPX with malformed XML": _video_case("t.gpx", "<gpx><trk><trkseg><trkpt lat='1' lon='2'><time>", "cannot read as GPX"),
    "video: GPX trkpt without lat": _video_case(
        "t.gpx", "<gpx><trk><trkseg><trkpt lon='2'><time>2020-01-01T00:00:00Z</time></trkpt></trkseg></trk></gpx>",
        "trkpt 0: lat is missing"),
    "video: track latitude not a number": _video_case("track.csv", "t_s,lat,lon\n0,abc,2\n1,1,2\n", "row 2: lat 'abc' is not a number"),
    "video: track longitude 200": _video_case("track.csv", "t_s,lat,lon\n0,1,200\n1,1,2\n", "row 2: lat/lon out of range"),
    "bdd: longitude 200 in every fix": _bdd_case([(40.0, 200.0)] * 3, "locations[0]: lat/lon out of range"),
    "bdd: longitude -540 in every fix": _bdd_case([(40.0, -540.0)] * 3, "locations[0]: lat/lon out of range"),
    "bdd: latitude as a string": _bdd_case([("40.1", -73.0)] * 3, "latitude '40.1' is not a number"),
}


@pytest.mark.parametrize("case", list(INGEST_CASES))
def test_bad_ingest_input_is_one_line_and_writes_nothing(tmp_path, case):
    args, match = INGEST_CASES[case](tmp_path)
    out = tmp_path / "out" / "manifest.parquet"
    assert_one_line_failure(cli(*args, "--out", out), out=out, match=match)


def test_bad_track_fixes_and_bdd_fixes_are_dropped_and_listed_with_skip_bad(tmp_path):
    out = tmp_path / "m.parquet"
    args = video_with_track(tmp_path / "vid", "track.csv", "t_s,lat,lon\n0,1,2\n1,1,200\n2,1,2.001\n")
    r = cli(*args, "--out", out, "--skip-bad")
    assert r.exit_code == 0, r.output
    skipped = pl.read_csv(out.with_name(out.name + ".skipped.csv"))
    assert skipped.select("row", "reason").rows() == [(3, "GPS fix row 3: lat/lon out of range [-90, 90] x [-180, 180]")]
    lat = pl.read_parquet(out)["lat"]
    assert lat.is_not_null().all() and (lat == 1.0).all()  # located by the two good fixes, not the bad one

    out = tmp_path / "bdd.parquet"
    r = cli(*bdd_tree(tmp_path / "bdd", [(40.0, 200.0)] * 3), "--out", out, "--skip-bad")
    assert r.exit_code == 0, r.output
    reasons = pl.read_csv(out.with_name(out.name + ".skipped.csv"))["reason"].to_list()
    assert sum(x.startswith("GPS fix locations[") for x in reasons) == 3  # every fix dropped and listed ...
    assert any(x.startswith("no GPS") for x in reasons)  # ... so the video's frames are unlocated, and listed


# --- paths outside the dataset root ---------------------------------------------------------------------

def _escape(n=12):
    return "/".join([".."] * n) + "/outside/secret"


def test_paths_leaving_the_root_are_refused_by_every_reader(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.jpg")
    (outside / "frames").mkdir()
    Image.new("RGB", (8, 8)).save(outside / "frames" / "0.jpg")

    msls_tree(tmp_path / "msls", keys=("a", _escape()))
    r = cli("ingest", "msls", tmp_path / "msls", "--out", tmp_path / "m1.parquet")
    assert_one_line_failure(r, out=tmp_path / "m1.parquet", match="image path resolves outside the dataset root")
    assert "--allow-outside-root" in r.output

    root = frames_tree(tmp_path / "frames")
    os.symlink(outside / "secret.jpg", root / "s0" / "9.jpg")  # a symlinked frame pointing out
    assert_one_line_failure(cli("ingest", "frames", root, "--out", tmp_path / "m2.parquet"), out=tmp_path / "m2.parquet",
                            match="s0/9.jpg: image path resolves outside the dataset root")
    (root / "s0" / "9.jpg").unlink()
    os.symlink(outside / "frames", root / "s1")  # a symlinked sequence folder
    assert_one_line_failure(cli("ingest", "frames", root, "--out", tmp_path / "m3.parquet"), out=tmp_path / "m3.parquet",
                            match="sequence folder path resolves outside the dataset root")

    for i, frames_dir in enumerate(["../outside/frames", str(outside / "frames")]):  # ../ and absolute
        args = cityguessr_tree(tmp_path / f"cg{i}", frames_dir=frames_dir)
        out = tmp_path / f"cg{i}.parquet"
        assert_one_line_failure(cli(*args, "--out", out), out=out, match="frames_dir path resolves outside the dataset root")

    vids = tmp_path / "vids"
    vids.mkdir()
    write_h264(vids / "in.mp4", 5)
    write_h264(outside / "out.mp4", 5)
    os.symlink(outside / "out.mp4", vids / "link.mp4")
    assert_one_line_failure(cli("ingest", "video", vids, "--out", tmp_path / "v.parquet"), out=tmp_path / "v.parquet",
                            match="video path resolves outside the dataset root")


def test_outside_paths_are_listed_with_skip_bad_and_read_only_when_allowed(tmp_path):
    from vidtag.data.ingest import ingest
    from vidtag.data.manifest import read_manifest

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(outside / "secret.jpg")
    root = frames_tree(tmp_path / "frames")
    os.symlink(outside / "secret.jpg", root / "s0" / "9.jpg")

    out = tmp_path / "skip.parquet"
    assert cli("ingest", "frames", root, "--out", out, "--skip-bad").exit_code == 0
    skipped = pl.read_csv(out.with_name(out.name + ".skipped.csv"))
    assert skipped["reason"].to_list() == ["image path resolves outside the dataset root"]
    assert "s0/9.jpg" not in pl.read_parquet(out)["image_path"].to_list()

    allowed = ingest("frames", root, tmp_path / "allowed.parquet", allow_outside_root=True)
    assert "s0/9.jpg" in allowed.df["image_path"].to_list()
    assert read_manifest(tmp_path / "allowed.parquet").allow_outside_root is True
    assert read_manifest(out).allow_outside_root is False


def test_extraction_does_not_read_manifest_paths_outside_the_root(tmp_path):
    """A hand-made manifest with ``../`` paths: those frames are refused per frame, never opened."""
    from vidtag.data.manifest import write_manifest
    from vidtag.features.backbones import Preprocessor
    from vidtag.features.dataset import FrameBatches, FrameSource

    root = frames_tree(tmp_path / "data")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.jpg")
    df = pl.DataFrame({"sequence_id": ["s0"] * 2, "frame_index": [0, 1], "image_path": ["s0/0.jpg", "../secret.jpg"],
                       "lat": [1.0, 1.0], "lon": [2.0, 2.0], "split": ["train"] * 2}, schema_overrides={"frame_index": pl.Int32})
    m = write_manifest(df, tmp_path / "m.parquet", root)
    pp = {"crop_px": 8, "resize_px": 8, "resize_mode": "squash", "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    _, _, _, ok, reasons = FrameBatches(FrameSource.from_manifest(m.df, m.root), [(0, 2)], Preprocessor(pp, pp))[0]
    assert ok.tolist() == [True, False] and "outside the dataset root" in reasons[1]
    _, _, _, ok, _ = FrameBatches(FrameSource.from_manifest(m.df, m.root, allow_outside_root=True), [(0, 2)],
                                  Preprocessor(pp, pp))[0]
    assert ok.tolist() == [True, True]


# --- the manifest and its skip report are one unit ------------------------------------------------------

def test_a_full_disk_while_writing_keeps_the_old_manifest_and_report(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    root = frames_tree(tmp_path / "frames", n_seq=2)
    out = tmp_path / "m.parquet"
    report = out.with_name(out.name + ".skipped.csv")
    assert cli("ingest", "frames", root, "--out", out, "--skip-bad").exit_code == 0
    before = out.read_bytes(), report.read_bytes()
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    (root / "s1" / "9.jpg").symlink_to(tmp_path / "x.jpg")  # the next run would skip a row: a new report

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    r = cli("ingest", "frames", root, "--out", out, "--skip-bad")
    assert_one_line_failure(r, match="No space left on device")
    assert (out.read_bytes(), report.read_bytes()) == before  # neither file replaced: they still agree
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "m.parquet", "m.parquet.skipped.csv", "x.jpg"]


# --- model bundles ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from test_inference import grid, tiny_bundle

    d = tmp_path_factory.mktemp("bundle") / "model"
    tiny_bundle(d, grid())
    return d


def _config(d):
    return json.loads((d / "config.json").read_text())


def _set_config(d, cfg):
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_model(change):
    def edit(d):
        cfg = _config(d)
        change(cfg["model"])
        _set_config(d, cfg)
    return edit


def _resave_weights(d, change):
    """Rewrite the weights (and their sha256 in config.json, as a careful forger would)."""
    from safetensors.torch import load_file, save_file

    from vidtag.fingerprint import sha256_file

    state = load_file(d / "model.safetensors")
    change(state)
    save_file(state, d / "model.safetensors")
    cfg = _config(d)
    cfg["model_sha256"] = sha256_file(d / "model.safetensors")
    _set_config(d, cfg)


def _pickle_weights(d):
    from vidtag.fingerprint import sha256_file

    torch.save({"frame_encoder.x": torch.zeros(2)}, d / "model.safetensors")  # a pickle, renamed
    cfg = _config(d)
    cfg["model_sha256"] = sha256_file(d / "model.safetensors")
    _set_config(d, cfg)


def _weights_outside(d):
    shutil.move(d / "model.safetensors", d.parent / "elsewhere.safetensors")
    os.symlink(d.parent / "elsewhere.safetensors", d / "model.safetensors")


BUNDLE_CASES = {
    "config.json empty": (lambda d: (d / "config.json").write_text(""), "config.json: not valid JSON"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{model: nope"), "config.json: not valid JSON"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "holds a JSON list"),
    "config.json without model": (lambda d: _set_config(d, {k: v for k, v in _config(d).items() if k != "model"}),
                                  "'model' is missing"),
    "config.json model with an extra key": (_edit_model(lambda m: m["frame"].update(bogus=1)), "unknown key(s) ['bogus']"),
    "config.json negative dims": (_edit_model(lambda m: m["frame"].update(clip_dim=-5)), "describes no buildable"),
    "config.json huge dims": (_edit_model(lambda m: m["location"].update(hidden_dim=10**9)), "config.json and the weights disagree"),
    "config.json NaN": (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"dropout": 0.1', '"dropout": NaN', 1)), "NaN is not a finite number"),
    "weights a pickle renamed .safetensors": (_pickle_weights, "not a safetensors file"),
    "weights with a NaN logit_scale": (lambda d: _resave_weights(d, lambda s: s.update(logit_scale=torch.tensor(float("nan")))),
                                       "tensor 'logit_scale' holds NaN"),
    "weights with an inf parameter": (lambda d: _resave_weights(d, lambda s: next(v for v in s.values() if v.ndim == 2).fill_(float("inf"))),
                                      "holds NaN or infinite values"),
    "weights a symlink out of the bundle": (_weights_outside, "resolves outside the bundle"),
}


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_a_bad_bundle_is_refused_in_one_line_by_predict(tmp_path, bundle_dir, case):
    bad = tmp_path / "model"
    shutil.copytree(bundle_dir, bad)
    damage, match = BUNDLE_CASES[case]
    damage(bad)
    write_h264(tmp_path / "clip.mp4", 5)
    out = tmp_path / "pred.csv"
    r = cli("predict", tmp_path / "clip.mp4", "--model", bad, "--out", out, "--cache-dir", tmp_path / "cache", "--no-progress")
    assert_one_line_failure(r, out=out, match=match)
    with pytest.raises(BundleError):  # the library says the same
        from vidtag.models.bundle import load_bundle

        load_bundle(bad)


def _safetensors_full_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "/x/.tmpeECw0h"')


def _raise_os(code, text):
    def fail(*args, **kwargs):
        raise OSError(code, text)
    return fail


BUNDLE_WRITE_FAILURES = {  # (what fails, how) -> the reason the one line gives
    "weights, ENOSPC": ("save_file", _raise_os(errno.ENOSPC, "No space left on device"), "No space left on device"),
    "weights, safetensors' own I/O error": ("save_file", _safetensors_full_disk, "No space left on device"),
    "gallery copy, EACCES": ("shutil.copyfile", _raise_os(errno.EACCES, "Permission denied"), "Permission denied"),
}


@pytest.mark.parametrize("case", list(BUNDLE_WRITE_FAILURES))
def test_a_failed_bundle_write_is_one_line_through_a_stage_and_keeps_the_old_bundle(tmp_path, bundle_dir, monkeypatch, case):
    import vidtag.models.bundle as bundle_mod
    from pipeline.common import run_stage

    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    bundle = bundle_mod.load_bundle(target)
    what, fail, reason = BUNDLE_WRITE_FAILURES[case]
    monkeypatch.setattr(bundle_mod.shutil if what == "shutil.copyfile" else bundle_mod, what.split(".")[-1], fail)
    monkeypatch.delenv("VIDTAG_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:  # what `evaluate` (and `train_phase2`) end with: `error: ...`, non-zero
        run_stage(lambda: bundle_mod.save_bundle(target, replace(bundle, gallery_path=bundle_dir / "gallery.parquet")))
    message = str(exit_info.value.code)
    assert message == f"error: cannot write model bundle {target}: {reason}; the previous bundle there is kept"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old bundle, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary directory left beside it
    assert bundle_mod.load_bundle(target).kind == "vidtag"


def test_a_full_disk_while_caching_the_builtin_model_is_one_line_from_predict(tmp_path, monkeypatch):
    import vidtag.models.bundle as bundle_mod

    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    monkeypatch.setattr(bundle_mod, "save_file", _raise_os(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "pred.csv"
    r = cli("predict", tmp_path / "x.jpg", "--model", "geoclip", "--out", out, "--cache-dir", tmp_path / "cache", "--no-progress")
    text = assert_one_line_failure(r, out=out, match="No space left on device; nothing was written there")
    assert "cannot write model bundle " + str(tmp_path / "cache" / "models" / "geoclip-") in text
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # no partial bundle to be trusted later


# --- caches: verified, not trusted ------------------------------------------------------------------------

def _tampered_caches(npy: Path, emb: np.ndarray):
    """Ways a gallery-embedding cache file goes wrong; the last also forges its record's sha256."""
    from vidtag.fingerprint import sha256_file

    def truncated():
        npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])

    def zeros():
        np.save(npy, np.zeros_like(emb))

    def random_with_forged_record():
        rng = np.random.default_rng(0)
        fake = rng.normal(size=emb.shape).astype(np.float32)
        np.save(npy, fake / np.linalg.norm(fake, axis=1, keepdims=True))
        meta = json.loads(npy.with_suffix(".json").read_text())
        meta["sha256"] = sha256_file(npy)
        npy.with_suffix(".json").write_text(json.dumps(meta))

    def record_deleted():
        npy.with_suffix(".json").unlink()

    return {"truncated": truncated, "zeros": zeros, "random vectors, forged record": random_with_forged_record,
            "record deleted": record_deleted}


def test_a_tampered_gallery_embedding_cache_is_detected_and_recomputed(tmp_path, bundle_dir, capsys):
    from test_inference import grid

    from vidtag.models.bundle import load_bundle
    from vidtag.retrieval import gallery_embeddings

    enc = load_bundle(bundle_dir).location_encoder
    emb = gallery_embeddings(enc, grid(), tmp_path)
    (npy,) = tmp_path.glob("*.npy")
    for name, tamper in _tampered_caches(npy, emb).items():
        tamper()
        capsys.readouterr()
        again = gallery_embeddings(enc, grid(), tmp_path)
        np.testing.assert_allclose(again, emb, rtol=1e-6, err_msg=name)
        assert "not used, embedding the gallery again" in capsys.readouterr().err, name
        assert np.array_equal(np.load(npy), emb), name  # the cache is whole again


def test_predict_with_a_truncated_gallery_cache_recomputes_it_and_says_so(tmp_path, tiny):
    from test_inference import grid, tiny_bundle

    fp = tiny.fingerprint()
    model = tmp_path / "model"
    tiny_bundle(model, grid(), backbones={k: v for k, v in fp.items() if k != "preprocessing"}, dims=tiny.dims)
    write_h264(tmp_path / "clip.mp4", 10, fps=5)
    args = ["predict", tmp_path / "clip.mp4", "--model", model, "--cache-dir", tmp_path / "cache", "--no-progress"]
    first = cli(*args, "--out", tmp_path / "a.csv")
    assert first.exit_code == 0, first.output
    (npy,) = (tmp_path / "cache").rglob("gallery_emb-*.npy")
    npy.write_bytes(npy.read_bytes()[:200])
    again = cli(*args, "--out", tmp_path / "b.csv")
    assert again.exit_code == 0 and "not used, embedding the gallery again" in again.output, again.output
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


# --- the feature store: checksums, verification, one writer -----------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from test_extract import BACKBONE

    from vidtag.features.backbones import build_backbones

    return build_backbones(BACKBONE)


def _store_files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _flip_byte(path: Path):
    b = bytearray(path.read_bytes())
    b[len(b) // 3] ^= 0xFF
    path.write_bytes(bytes(b))


STORE_DAMAGE = {
    "byte flipped in a finished shard": (lambda s: _flip_byte(s / "clip/c/0/0"), "does not match its sha256"),
    "finished shard truncated": (lambda s: (s / "dino/c/0/0").write_bytes((s / "dino/c/0/0").read_bytes()[:100]),
                                 "truncated or changed"),
    "finished shard deleted": (lambda s: (s / "clip/c/0/0").unlink(), "is missing (deleted)"),
    "checksum record deleted": (lambda s: (s / "_sums/unit_000000.json").unlink(), "no readable checksum record"),
}


@pytest.mark.parametrize("case", list(STORE_DAMAGE))
def test_a_damaged_finished_unit_is_found_on_resume_and_extracted_again(tmp_path, tiny, capsys, case):
    from test_extract import RUN, make_world

    from vidtag.data.manifest import read_manifest
    from vidtag.features.extract import extract_features

    manifest = read_manifest(make_world(tmp_path / "data", n_seq=3))  # 21 rows = 3 units of 8
    extract_features(manifest, tmp_path / "clean.zarr", tiny, RUN, progress=False)
    partial = extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False, max_units=2)
    assert partial.status == "partial"
    damage, match = STORE_DAMAGE[case]
    damage(tmp_path / "f.zarr")
    capsys.readouterr()
    resumed = extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False)
    assert f"unit 0 (rows 0:8) " in (err := capsys.readouterr().err) and match in err and "extracting it again" in err
    assert resumed.status == "complete" and resumed.units_redone == 1 and resumed.units_written == 2
    assert _store_files(tmp_path / "f.zarr") == _store_files(tmp_path / "clean.zarr")  # as if never damaged


def test_a_complete_store_is_checked_by_size_always_and_by_sha256_when_verifying(tmp_path, tiny, capsys):
    from test_extract import RUN, make_world

    from vidtag.data.manifest import read_manifest
    from vidtag.features.extract import extract_features
    from vidtag.features.store import FeatureStoreError, StoreLayout, load_features, verify_store

    path = make_world(tmp_path / "data", n_seq=2)
    store = tmp_path / "f.zarr"
    manifest = read_manifest(path)
    run = replace(RUN, layout=StoreLayout(shard_rows=8, chunk_rows=8))  # what the CLI below asks for
    extract_features(manifest, store, tiny, run, progress=False)
    clean = _store_files(store)
    assert verify_store(store) == {}

    (store / "dino/c/1/0").write_bytes((store / "dino/c/1/0").read_bytes()[:64])  # truncated
    with pytest.raises(FeatureStoreError, match=r"unit 1 \(rows 8:14\) shard dino/c/1/0 has 64 bytes"):
        load_features(store)  # never read
    args = ["extract", path, "--out", store, "--preset", "tiny", "--image-size", "32", "--num-workers", "0",
            "--device", "cpu", "--shard-rows", "8", "--batch-size", "3", "--no-progress"]
    r = cli(*args)
    assert r.exit_code == 0 and "unit 1 (rows 8:14) shard dino/c/1/0 has 64 bytes" in r.output, r.output
    assert _store_files(store) == clean

    _flip_byte(store / "clip/c/0/0")  # same size: only the sha256 tells
    assert set(verify_store(store)) == {0} and verify_store(store, full=False) == {}
    assert extract_features(manifest, store, tiny, run, progress=False).status == "up-to-date"
    fixed = extract_features(manifest, store, tiny, run, progress=False, verify=True)
    assert fixed.units_redone == 1 and "does not match its sha256" in capsys.readouterr().err
    assert _store_files(store) == clean and verify_store(store) == {}
    again = extract_features(manifest, store, tiny, run, progress=False, verify=True)
    assert again.status == "up-to-date" and again.units_verified == 2 and "match their checksums" in again.summary()


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from vidtag.lock import writer_lock
    with writer_lock(sys.argv[1], slot=sys.argv[2], what="vidtag extract, held by a test"):
        print("held", flush=True)
        time.sleep(120)
""")


def _hold(target: Path, slot: str = "shard-0-of-1") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target), slot], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, tiny):
    from test_extract import RUN, make_world

    from vidtag.data.manifest import read_manifest
    from vidtag.features.extract import extract_features

    path = make_world(tmp_path / "data", n_seq=1)
    store = tmp_path / "f.zarr"
    first = _hold(store)
    try:
        with pytest.raises(LockError, match=rf"pid {first.pid} on {socket.gethostname()}, since .*held by a test"):
            extract_features(read_manifest(path), store, tiny, RUN, progress=False, overwrite=True)
        r = cli("extract", path, "--out", store, "--preset", "tiny", "--image-size", "32", "--num-workers", "0",
                "--device", "cpu", "--shard-rows", "8", "--force", "--no-progress")
        assert_one_line_failure(r, match=f"pid {first.pid}")
        assert not store.exists()  # the refused writer touched nothing
    finally:
        first.kill()  # SIGKILL: its lock file stays behind, naming a dead process
        first.wait()
    assert list((tmp_path / "f.zarr.lock").iterdir())
    assert extract_features(read_manifest(path), store, tiny, RUN, progress=False).status == "complete"
    assert not (tmp_path / "f.zarr.lock").exists()  # taken over, then released


def test_shards_of_one_split_write_together_anything_else_waits(tmp_path, tiny):
    from test_extract import RUN, make_world

    from vidtag.data.manifest import read_manifest
    from vidtag.features.extract import extract_features
    from vidtag.lock import writer_lock

    manifest = read_manifest(make_world(tmp_path / "data", n_seq=4))
    store = tmp_path / "f.zarr"
    with writer_lock(store, slot="shard-1-of-2", what="shard 1/2"):
        assert extract_features(manifest, store, tiny, RUN, shard=(0, 2), progress=False).status == "partial"
        for shard in ((0, 1), (0, 3)):
            with pytest.raises(LockError, match="shard 1/2"):
                extract_features(manifest, store, tiny, RUN, shard=shard, progress=False)


# --- pixels: normalised or refused per frame ----------------------------------------------------------------

def _png_claiming(path: Path, w: int, h: int) -> Path:
    """A PNG whose header says w x h (the pixel data of an 8 x 8 image): huge to open, cheap to make."""
    Image.new("L", (8, 8)).save(path)
    b = bytearray(path.read_bytes())
    b[16:20], b[20:24] = w.to_bytes(4, "big"), h.to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(b))
    return path


def test_pixel_formats_are_normalised_and_oversized_frames_refused(tmp_path):
    from vidtag.features.dataset import load_rgb

    ramp16 = (np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)  # 0 .. 61400
    Image.fromarray(ramp16).save(tmp_path / "gray16.png")
    rgb, err = load_rgb(str(tmp_path / "gray16.png"))
    want = ((ramp16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert err is None and rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], want)  # not all white

    upright = np.zeros((24, 40, 3), np.uint8)
    upright[:4, :10] = (255, 0, 0)  # a red mark top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)
    rgb, err = load_rgb(str(tmp_path / "rotated.png"))
    assert err is None and np.array_equal(np.asarray(rgb), upright)

    Image.fromarray(upright).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "palette.png")
    rgb, err = load_rgb(str(tmp_path / "palette.png"))
    assert err is None and np.array_equal(np.asarray(rgb), upright)

    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # pure cyan
    rgb, err = load_rgb(str(tmp_path / "cmyk.jpg"))
    assert err is None and np.abs(np.asarray(rgb)[8, 8].astype(int) - [0, 255, 255]).max() <= 3

    rgb, err = load_rgb(str(_png_claiming(tmp_path / "huge.png", 20000, 20000)))
    assert rgb is None and "above the limit" in err and "max_pixels" in err
    rgb, err = load_rgb(str(tmp_path / "cmyk.jpg"), max_pixels=100)
    assert rgb is None and "16 x 16 = 256 pixels, above the limit of 100" in err


def test_an_oversized_frame_is_recorded_bad_and_extraction_goes_on(tmp_path, tiny):
    from test_extract import RUN

    from vidtag.data.ingest import ingest
    from vidtag.features import load_features
    from vidtag.features.extract import extract_features

    root = frames_tree(tmp_path / "data", n=3)
    _png_claiming(root / "s0" / "3.png", 20000, 20000)
    ramp16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(ramp16).save(root / "s0" / "4.png")
    Image.fromarray(((ramp16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)).save(root / "s0" / "5.png")
    manifest = ingest("frames", root, tmp_path / "m.parquet")
    res = extract_features(manifest, tmp_path / "f.zarr", tiny, RUN, progress=False)
    f = load_features(tmp_path / "f.zarr")
    assert res.status == "complete" and f.valid.tolist() == [True, True, True, False, True, True]
    assert "20000 x 20000" in f.attrs["bad_rows"][0]["reason"] or "above the limit" in f.attrs["bad_rows"][0]["reason"]
    assert np.array_equal(f.clip[4], f.clip[5]) and np.array_equal(f.dino[4], f.dino[5])  # 16-bit = its 8-bit twin


# --- lost work --------------------------------------------------------------------------------------------

def test_a_finished_checkpoint_survives_a_failed_bundle_write(tmp_path):
    from pipeline.training import run_resumable
    from vidtag.train.checkpoint import read_state, save_checkpoint

    ckpt = tmp_path / "phase2.ckpt"
    epochs_trained = []

    def train(live, fail_write):
        state = read_state(ckpt)
        for epoch in range(state["epoch"] if state else 0, 3):
            epochs_trained.append(epoch)
            save_checkpoint(ckpt, {"m": torch.nn.Linear(1, 1)}, None, {"epoch": epoch + 1, "complete": epoch == 2})
        if fail_write:
            raise OSError(errno.ENOSPC, "No space left on device")  # while writing the bundle
        return {"done": 1.0}

    with pytest.raises(OSError):
        run_resumable(lambda live: train(live, True), ckpt, None)
    assert run_resumable(lambda live: train(live, False), ckpt, None) == {"done": 1.0}
    assert epochs_trained == [0, 1, 2]  # nothing retrained: the next run only wrote the bundle


def test_a_full_disk_during_extraction_is_one_line_and_the_rerun_resumes(tmp_path, tiny, monkeypatch):
    from test_extract import make_world

    from vidtag.features.store import FeatureStore

    path = make_world(tmp_path / "data", n_seq=3)
    args = ["extract", path, "--preset", "tiny", "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--shard-rows", "8", "--batch-size", "3", "--no-progress"]
    assert cli(*args, "--out", tmp_path / "clean.zarr").exit_code == 0
    write = FeatureStore.write_unit

    def disk_full_at_unit_1(self, u, *a):
        if u == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, u, *a)

    monkeypatch.setattr(FeatureStore, "write_unit", disk_full_at_unit_1)
    assert_one_line_failure(cli(*args, "--out", tmp_path / "f.zarr"), match="No space left on device")
    monkeypatch.setattr(FeatureStore, "write_unit", write)
    r = cli(*args, "--out", tmp_path / "f.zarr")
    assert r.exit_code == 0 and "in 2 unit(s)" in r.output, r.output  # unit 0 was kept
    assert _store_files(tmp_path / "f.zarr") == _store_files(tmp_path / "clean.zarr")


@pytest.mark.parametrize("fail", [_raise_os(errno.ENOSPC, "No space left on device"), _safetensors_full_disk],
                         ids=["ENOSPC", "safetensors' own I/O error"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail):
    import vidtag.train.checkpoint as checkpoint
    from vidtag.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    checkpoint.save_checkpoint(ckpt, {"m": torch.nn.Linear(1, 1)}, None, {"epoch": 1})
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(CheckpointError, match=r"\(No space left on device\); the previous checkpoint is kept"):
        checkpoint.save_checkpoint(ckpt, {"m": torch.nn.Linear(1, 1)}, None, {"epoch": 2})
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_directory_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    """The second rename of a directory swap fails: the old directory is renamed back, not left as `.NAME.old`."""
    from vidtag.io import atomic_path

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real_rename = Path.rename

    def fail_second(self, target):
        if Path(target) == out and self.name.endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_second)
    with pytest.raises(OSError, match="Input/output error"), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("target_survived", [False, True])
def test_a_backup_left_by_a_crash_mid_swap_is_recovered(tmp_path, target_survived):
    """A kill between the swap's two renames leaves `.NAME.old` (and maybe no NAME): the next write restores or drops it."""
    from vidtag.io import atomic_path

    out, backup = tmp_path / "out", tmp_path / ".out.old"
    backup.mkdir()
    (backup / "a").write_text("old")
    if target_survived:
        out.mkdir()
        (out / "a").write_text("newer")
    with pytest.raises(RuntimeError), atomic_path(out):
        raise RuntimeError("the writer fails: what is on disk must be the last complete directory")
    assert (out / "a").read_text() == ("newer" if target_survived else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
