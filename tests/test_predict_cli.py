"""`vidtag predict` end to end: a real H.264 file made here, tiny backbones, a tiny saved bundle."""

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image
from media import remux, write_h264
from test_inference import grid, tiny_bundle
from typer.testing import CliRunner

from vidtag.cli import app
from vidtag.features.backbones import BackboneConfig, build_backbones

runner = CliRunner()
TINY_BACKBONES = BackboneConfig(preset="tiny", image_size=32)


def gradient(i, size):
    """A moving colour gradient, so frames differ."""
    x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    img = np.broadcast_to((x + 8 * i) % 256, (size[1], size[0], 3)).astype(np.uint8).copy()
    img[..., 1] = (i * 20) % 256
    return img


def make_clip(path, seconds=3.0, fps=10, size=(64, 48)):
    return write_h264(path, int(seconds * fps), fps, size, draw=gradient)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle") / "model"
    bb = build_backbones(TINY_BACKBONES, "cpu")
    fp = bb.fingerprint()
    tiny_bundle(d, grid(), backbones={k: v for k, v in fp.items() if k != "preprocessing"}, dims=bb.dims)
    return d


def run(*args):
    return runner.invoke(app, ["predict", *map(str, args), "--no-progress"])


def test_predict_video_writes_csv_and_png_map(tmp_path, model_dir):
    video = make_clip(tmp_path / "clip.mp4")
    out, png = tmp_path / "out" / "pred.csv", tmp_path / "map.png"
    r = run(video, "--model", model_dir, "--out", out, "--map", png, "--fps", 2, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    df = pl.read_csv(out)
    assert df.columns == ["frame_index", "timestamp_s", "lat", "lon", "phase1_lat", "phase1_lon", "confidence", "valid",
                          "place", "admin1", "country_code", "place_distance_km"]
    assert df["frame_index"].to_list() == list(range(6))
    np.testing.assert_allclose(df["timestamp_s"], np.arange(6) / 2, atol=1e-6)  # frames at 0, 0.5, ... 2.5 s
    assert df["valid"].all() and df["lat"].is_not_null().all()
    assert ((df["confidence"] >= 0) & (df["confidence"] <= 1)).all()
    gallery = {tuple(p) for p in np.round(grid(), 6)}
    assert all(tuple(p) in gallery for p in np.round(df.select("lat", "lon").to_numpy(), 6))
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert "6 frames (0 unreadable)" in r.output


def test_predict_frame_folder_with_html_map_and_an_unreadable_frame(tmp_path, model_dir):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 10):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"f_{i}.jpg")
    (folder / "f_3.jpg").write_bytes(b"not a jpeg")
    out, html = tmp_path / "p.csv", tmp_path / "map.html"
    r = run(folder, "--model", model_dir, "--out", out, "--map", html, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    df = pl.read_csv(out)
    assert df["valid"].to_list() == [True, True, False, True]  # natural order: f_1, f_2, f_3, f_10
    assert df["timestamp_s"].is_null().all() and df["confidence"][2] == 0.0
    assert "<title>frames</title>" in html.read_text()


def test_predict_a_single_image_is_one_frame(tmp_path, model_dir):
    rng = np.random.default_rng(1)
    for name, fmt in (("one.jpg", "JPEG"), ("one.png", "PNG"), ("one.photo", "JPEG")):  # by extension, else by content
        img = tmp_path / name
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img, format=fmt)
        out = tmp_path / f"{name}.csv"
        r = run(img, "--model", model_dir, "--out", out, "--cache-dir", tmp_path / "cache")
        assert r.exit_code == 0, r.output
        df = pl.read_csv(out)
        assert df.height == 1 and df["valid"].to_list() == [True] and df["lat"].is_not_null().all()
        assert df["timestamp_s"].is_null().all()  # a still image has no presentation time
        assert "1 frames (0 unreadable)" in r.output


@pytest.mark.parametrize("edit", ["trim", "ts"])
def test_predict_trimmed_and_ts_files_give_every_frame_from_zero(tmp_path, model_dir, edit):
    # `ffmpeg -ss 0.5 -i in.mp4 -c copy out.mp4` (pre-roll at negative PTS) and an MPEG-TS remux starting at 1.4 s
    src = write_h264(tmp_path / "in.mp4", 30, 10, draw=gradient, gop=25)
    video = (remux(src, tmp_path / "trim.mp4", trim_s=0.5) if edit == "trim"
             else remux(src, tmp_path / "r.ts", shift_s=1.4))
    out = tmp_path / "p.csv"
    r = run(video, "--model", model_dir, "--out", out, "--fps", 2, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    df = pl.read_csv(out)
    n = 5 if edit == "trim" else 6  # 2.5 s of video left after the cut, 3 s in the remux
    assert df["valid"].all() and df.height == n and "(0 unreadable)" in r.output
    np.testing.assert_allclose(df["timestamp_s"], np.arange(n) / 2, atol=1e-6)


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty_folder", "missing"])
def test_bad_input_gives_one_line_error(tmp_path, model_dir, case):
    if case == "truncated":
        video = make_clip(tmp_path / "clip.mp4")
        data = video.read_bytes()
        video.write_bytes(data[: len(data) // 3])
        target = video
    elif case == "garbage":
        target = tmp_path / "clip.mkv"
        target.write_bytes(b"\x00" * 5000)
    elif case == "empty_folder":
        target = tmp_path / "empty"
        target.mkdir()
    else:
        target = tmp_path / "nope.mp4"
    out = tmp_path / "p.csv"
    r = run(target, "--model", model_dir, "--out", out, "--cache-dir", tmp_path / "cache")
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target.name) in lines[0], r.output
    assert not out.exists()


def test_bundle_that_does_not_match_its_backbones(tmp_path, model_dir):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["backbones"]["config"]["seed"] = 7  # other random weights than the model was trained on
    (bad / "config.json").write_text(json.dumps(cfg))
    video = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    r = run(video, "--model", bad, "--out", tmp_path / "p.csv", "--cache-dir", tmp_path / "cache")
    assert r.exit_code != 0 and "does not match its backbones" in r.output and "Traceback" not in r.output


def test_missing_bundle(tmp_path):
    video = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    r = run(video, "--model", tmp_path / "no-model", "--out", tmp_path / "p.csv")
    assert r.exit_code != 0 and r.output.startswith("error: ") and "incomplete" in r.output


def test_vidtag_debug_shows_the_traceback(tmp_path, monkeypatch):
    from vidtag.errors import BundleError

    video = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    r = run(video, "--model", tmp_path / "no-model", "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    monkeypatch.setenv("VIDTAG_DEBUG", "1")
    r = run(video, "--model", tmp_path / "no-model", "--out", tmp_path / "p.csv")
    assert isinstance(r.exception, BundleError) and "incomplete" in str(r.exception)


def test_vidtag_bundle_top_k_candidates_are_phase_one_and_sit_inside_geojson(tmp_path, model_dir):
    video = make_clip(tmp_path / "clip.mp4", seconds=2.0)
    out = tmp_path / "p.geojson"
    r = run(video, "--model", model_dir, "--out", out, "--top-k", 2, "--fps", 2, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    frames = [f["properties"] for f in doc["features"] if f["properties"]["kind"] == "frame"]
    assert len(frames) == 4
    for p in frames:
        assert [c["rank"] for c in p["candidates"]] == [1, 2] and p["candidates"][0]["score"] >= p["candidates"][1]["score"]
        assert (p["candidates"][0]["lat"], p["candidates"][0]["lon"]) == (p["phase1_lat"], p["phase1_lon"])


def test_viterbi_and_refinement_flags_write_a_trajectory(tmp_path, model_dir):
    """`--decode viterbi --refine` (beyond the paper: temporal decoding, local refinement) on a real H.264 file;
    the demo-backbone note tells the user what such a bundle's places are worth."""
    video = make_clip(tmp_path / "clip.mp4")
    plain, decoded = tmp_path / "plain.csv", tmp_path / "viterbi.csv"
    first = run(video, "--model", model_dir, "--out", plain, "--cache-dir", tmp_path / "cache")
    second = run(video, "--model", model_dir, "--out", decoded, "--decode", "viterbi", "--top-k", 8, "--refine",
                 "--refine-step-km", 50, "--cache-dir", tmp_path / "cache")
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert "tiny random demo backbones" in first.output
    a, b = pl.read_csv(plain), pl.read_csv(decoded)
    assert a.height == b.height == 3 and b["lat"].is_not_null().all()
    assert pl.read_csv(tmp_path / "viterbi.candidates.csv").height == 3 * 8
