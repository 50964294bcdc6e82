"""vidtag.api (load_model / Model.predict) and `vidtag predict` on top of it: one table for both, outputs by
extension, candidates, places, folders of videos resumed after an interruption, galleries from files.

The model is of kind ``geoclip`` (GeoCLIP's location encoder with its shipped weights, no refiner) on the tiny
CLIP backbone with a random 32 -> 512 head, so every path is the real one and the file stays fast."""

import json
import os
import subprocess
import sys

import gpxpy
import numpy as np
import polars as pl
import pytest
from PIL import Image
from media import write_h264
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from vidtag.api import candidates_table, input_kind, load_model, read_gallery_file
from vidtag.cli import app
from vidtag.errors import GalleryError, PredictError
from vidtag.features.backbones import BackboneConfig
from vidtag.models.bundle import save_bundle
from vidtag.models.geoclip_model import GeoCLIPFrameConfig, GeoCLIPFrameEncoder, geoclip_bundle
from vidtag.models.location_encoder import GEOCLIP_SIGMAS, LocationEncoder
from vidtag.seeding import seeded

runner = CliRunner()
COLUMNS = ["frame_index", "timestamp_s", "lat", "lon", "phase1_lat", "phase1_lon", "confidence", "valid",
           "place", "admin1", "country_code", "place_distance_km"]


def world(n_lat=9, n_lon=16):
    lat, lon = np.meshgrid(np.linspace(-50, 65, n_lat), np.linspace(-170, 170, n_lon), indexing="ij")
    return np.stack([lat.ravel(), lon.ravel()], axis=1)


def tiny_geoclip_dir(directory, gallery=None, seed=0):
    """A geoclip-kind bundle on the tiny backbones (CLIP only), saved with save_bundle."""
    gallery = world() if gallery is None else gallery
    gallery_file = directory.parent / f"{directory.name}-gallery.parquet"
    pl.DataFrame({"lat": gallery[:, 0], "lon": gallery[:, 1]}).write_parquet(gallery_file)
    with seeded(seed):
        frame = GeoCLIPFrameEncoder(GeoCLIPFrameConfig(clip_dim=32, hidden_dim=32))
    bundle = geoclip_bundle(gallery_file, backbones=BackboneConfig(preset="tiny", image_size=32), frame_encoder=frame,
                            location_encoder=LocationEncoder.from_geoclip(sigmas=GEOCLIP_SIGMAS))
    return save_bundle(directory, bundle)


def frame_image(i, size=(64, 48)):
    """Frames that differ a lot, so they land on different gallery points."""
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def make_video(path, seconds=2.0, fps=10):
    return write_h264(path, int(seconds * fps), fps, (64, 48), draw=lambda k, size: frame_image(k // 5, size))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_geoclip_dir(tmp_path_factory.mktemp("geo") / "model")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model(model_dir, cache):
    return load_model(model_dir, device="cpu", cache_dir=cache)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("v") / "drive.mp4")


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def test_import_vidtag_stays_light():
    code = "import sys, vidtag; assert 'torch' not in sys.modules and 'polars' not in sys.modules; print(vidtag.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr


def test_backbones_load_only_when_pixels_arrive(model_dir, cache, monkeypatch):
    m = load_model(model_dir, device="cpu", cache_dir=cache)
    assert m.kind == "geoclip" and m.bundle.refiner is None and m._backbones is None
    df = m.predict_features(np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32), top_k=2)
    assert m._backbones is None  # features in, no backbone built
    assert df["sequence_id"].to_list() == ["0"] * 5 and df["candidates"].list.len().to_list() == [2] * 5
    img = Image.fromarray(frame_image(0))
    m.predict([img])
    assert m._backbones is not None and m.backbones.dims == (32, 0) and not m.backbones.has_dino


def test_predict_video_columns_candidates_and_places(model, video):
    df = model.predict(video, top_k=3, fps=2)
    assert df.columns == COLUMNS + ["candidates"]
    assert df.height == 4 and df["valid"].all()
    np.testing.assert_allclose(df["timestamp_s"], [0, 0.5, 1.0, 1.5], atol=1e-6)
    # Phase I only: the answer is the Phase I top-1, which is candidate rank 1.
    assert df["lat"].to_list() == df["phase1_lat"].to_list() and df["lon"].to_list() == df["phase1_lon"].to_list()
    long = candidates_table(df)
    assert long.columns == ["frame_index", "rank", "lat", "lon", "score"] and long.height == 4 * 3
    first = long.filter(pl.col("rank") == 1).sort("frame_index")
    assert first["lat"].to_list() == df["lat"].to_list() and first["lon"].to_list() == df["lon"].to_list()
    for part in long.partition_by("frame_index"):
        assert part["rank"].to_list() == [1, 2, 3] and (part["score"].diff().drop_nulls() <= 0).all()
    gallery = {tuple(p) for p in np.round(world(), 9)}
    assert all(tuple(p) in gallery for p in np.round(long.select("lat", "lon").to_numpy(), 9))
    assert df["country_code"].str.len_chars().to_list() == [2] * 4 and df["place"].is_not_null().all()
    assert ((df["confidence"] >= 0) & (df["confidence"] <= 1)).all()


def test_images_list_folder_and_single_image_agree(model, tmp_path):
    arrays = [frame_image(i) for i in range(3)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"f_{i}.png")  # lossless: the same pixels as the list
    from_list = model.predict([Image.fromarray(a) for a in arrays], places=False)
    from_folder = model.predict(folder, places=False)
    assert_frame_equal(from_list, from_folder)
    one = model.predict(folder / "f_1.png", places=False)
    assert one.height == 1 and one["lat"][0] == from_list["lat"][1]


def test_cli_writes_the_api_table_and_its_candidates(model, video, model_dir, cache, tmp_path):
    out = tmp_path / "t.csv"
    r = cli("predict", video, "--model", model_dir, "--out", out, "--top-k", 5, "--fps", 2, "--cache-dir", cache, "--no-progress")
    assert r.exit_code == 0, r.output
    api = model.predict(video, top_k=5, fps=2)
    main = api.drop("candidates")
    assert_frame_equal(pl.read_csv(out, schema=main.schema), main)
    cands = pl.read_csv(tmp_path / "t.candidates.csv")
    assert cands.columns == ["frame_index", "rank", "lat", "lon", "score"]
    assert cands.group_by("frame_index").len()["len"].to_list() == [5] * api.height  # 5 candidates per frame
    assert_frame_equal(cands, candidates_table(api), check_dtypes=False)
    assert "(+ t.candidates.csv)" in r.output


def test_cli_geojson_and_gpx(model_dir, cache, video, tmp_path):
    gj, gpx = tmp_path / "t.geojson", tmp_path / "t.gpx"
    for out in (gj, gpx):
        r = cli("predict", video, "--model", model_dir, "--out", out, "--fps", 2, "--cache-dir", cache, "--no-progress",
                "--start-time", "2024-05-01T12:00:00Z")
        assert r.exit_code == 0, r.output
    doc = json.loads(gj.read_text())
    kinds = [f["properties"]["kind"] for f in doc["features"]]
    assert doc["type"] == "FeatureCollection" and kinds == ["trajectory"] + ["frame"] * 4
    line = doc["features"][0]["geometry"]
    points = [f for f in doc["features"] if f["properties"]["kind"] == "frame"]
    assert line["coordinates"] == [p["geometry"]["coordinates"] for p in points]  # [lon, lat] each
    assert all(-180 <= x <= 180 and -90 <= y <= 90 for x, y in line["coordinates"])
    props = points[1]["properties"]
    assert props["timestamp_s"] == pytest.approx(0.5) and 0 <= props["confidence"] <= 1 and len(props["country_code"]) == 2
    track = gpxpy.parse(gpx.read_text())
    pts = track.tracks[0].segments[0].points
    assert len(track.tracks) == 1 and len(pts) == 4
    assert [(p.longitude, p.latitude) for p in pts] == [tuple(c) for c in line["coordinates"]]
    assert [p.time.isoformat() for p in pts][:2] == ["2024-05-01T12:00:00+00:00", "2024-05-01T12:00:00.500000+00:00"]


def test_a_folder_of_videos_resumes_after_an_interruption(model_dir, cache, tmp_path, monkeypatch):
    import vidtag.outputs as outputs

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b", "c"):
        make_video(videos / f"{name}.mp4", seconds=1.0)
    out = tmp_path / "out"
    real_write = outputs._write_csv
    calls = []

    def crash_while_writing_the_second(df, path):
        calls.append(path)
        if len(calls) == 2:  # half a file on disk, then the machine goes away
            path.write_text(df.write_csv()[:40])
            raise KeyboardInterrupt
        real_write(df, path)

    monkeypatch.setattr(outputs, "_write_csv", crash_while_writing_the_second)
    r = cli("predict", videos, "--model", model_dir, "--out", out, "--cache-dir", cache, "--no-progress")
    assert r.exit_code == 130  # Ctrl-C
    assert sorted(p.name for p in out.iterdir()) == ["a.csv"]  # no partial b.csv, no temporary left behind
    done_at = (out / "a.csv").stat().st_mtime_ns

    monkeypatch.setattr(outputs, "_write_csv", real_write)
    r = cli("predict", videos, "--model", model_dir, "--out", out, "--cache-dir", cache, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "3 videos" in r.output and "2 written, 1 already done, 0 failed" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "b.csv", "c.csv"]
    assert (out / "a.csv").stat().st_mtime_ns == done_at  # finished work is not redone
    for name in "abc":
        df = pl.read_csv(out / f"{name}.csv")
        assert df.height == 1 and df["valid"].all()


def test_a_bad_video_in_a_folder_is_reported_and_the_rest_written(model_dir, cache, tmp_path, monkeypatch):
    import vidtag.predict

    built = []
    real = vidtag.predict.backbones_for_bundle
    monkeypatch.setattr(vidtag.predict, "backbones_for_bundle", lambda *a: built.append(1) or real(*a))
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("good", "fine"):
        make_video(videos / f"{name}.mp4", seconds=1.0)
    (videos / "broken.mp4").write_bytes(b"\x00" * 4000)
    out = tmp_path / "out"
    r = cli("predict", videos, "--model", model_dir, "--out", out, "--format", "geojson", "--cache-dir", cache, "--no-progress")
    assert r.exit_code == 1 and len(built) == 1  # backbones built once for the whole folder
    assert "failed broken.mp4:" in r.output and "2 written, 0 already done, 1 failed" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["fine.geojson", "good.geojson"]


def test_the_api_predicts_a_folder_of_videos_as_one_table(model, tmp_path):
    for name in ("x", "y"):
        make_video(tmp_path / f"{name}.mov", seconds=1.0)
    df = model.predict(tmp_path, places=False)
    assert df.columns[0] == "sequence_id" and df["sequence_id"].to_list() == ["x", "y"]
    assert df["frame_index"].to_list() == [0, 0]


def test_folders_are_judged_by_their_files(tmp_path):
    (tmp_path / "frames").mkdir()
    Image.fromarray(frame_image(0)).save(tmp_path / "frames" / "0.jpg")
    assert input_kind(tmp_path / "frames") == "frames"
    (tmp_path / "frames" / "clip.mp4").write_bytes(b"")
    with pytest.raises(PredictError, match="both images"):
        input_kind(tmp_path / "frames")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no frames"):
        input_kind(tmp_path / "empty")


def test_gallery_from_a_csv_file(model_dir, cache, video, tmp_path):
    g = tmp_path / "g.csv"
    g.write_text("name,LAT,LON\nparis,48.8566,2.3522\nsydney,-33.8688,151.2093\nlima,-12.0464,-77.0428\n")  # GeoCLIP's header case
    assert read_gallery_file(g).shape == (3, 2)
    out = tmp_path / "p.parquet"
    r = cli("predict", video, "--model", model_dir, "--gallery", g, "--out", out, "--cache-dir", cache, "--no-progress")
    assert r.exit_code == 0, r.output
    df = pl.read_parquet(out)
    assert set(zip(df["lat"], df["lon"])) <= {(48.8566, 2.3522), (-33.8688, 151.2093), (-12.0464, -77.0428)}
    assert set(df["country_code"]) <= {"FR", "AU", "PE"}


def test_bad_gallery_and_bad_output_are_one_line_errors(model_dir, cache, video, tmp_path):
    g = tmp_path / "g.csv"
    g.write_text("lat,lon\n10,20\n95,20\n")
    with pytest.raises(GalleryError, match="line 3"):
        read_gallery_file(g)
    for args in (["--gallery", g, "--out", tmp_path / "p.csv"], ["--out", tmp_path / "p.xlsx"]):
        r = cli("predict", video, "--model", model_dir, *args, "--cache-dir", cache, "--no-progress")
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.xlsx").exists()


def test_missing_clip_weights_one_line_saying_what_to_fetch(video, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    def no_hub(*a, **k):
        raise AssertionError("the hub was called")

    import open_clip.factory

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_hub)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_hub)  # open_clip's own download step
    r = cli("predict", video, "--model", "geoclip", "--out", tmp_path / "t.geojson", "--cache-dir", tmp_path / "cache")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "open_clip_model.safetensors" in lines[0] and "models--timm--vit_large_patch14_clip_224.openai" in lines[0]
    assert "`hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors`" in lines[0]
    assert not (tmp_path / "t.geojson").exists()

    r = cli("weights")
    assert r.exit_code == 0
    assert "MISSING  CLIP ViT-L-14 'openai'" in r.output and "found    GeoCLIP image head" in r.output
    assert "hf download facebook/dinov2-large config.json model.safetensors preprocessor_config.json" in r.output


def test_bad_arguments(model, video):
    from vidtag.errors import ConfigError, VidtagError

    with pytest.raises(ConfigError, match="top_k"):
        model.predict(video, top_k=-1)
    with pytest.raises(ConfigError, match="fps"):
        model.predict(video, fps=0)
    with pytest.raises(PredictError, match="PIL image"):
        model.predict([np.zeros((4, 4, 3))])
    with pytest.raises(VidtagError, match="decode"):
        model.predict(video, decode="psychic")
