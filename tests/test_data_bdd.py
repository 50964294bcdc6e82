"""BDD100K / GAMa reader on a fixture in the real layout: .mov videos made with PyAV + info JSONs."""

import json

import polars as pl
import pytest

from tests.test_data_frames_video import make_video
from vidtag.data.bdd import read_bdd
from vidtag.data.manifest import ManifestError

START_MS = 1503828163000


def _info(path, lat0, lon0, n=5, start_offset_ms=0, key="locations"):
    fixes = [{"timestamp": START_MS + start_offset_ms + 1000 * k, "latitude": lat0 + 0.001 * k, "longitude": lon0,
              "speed": 5.0, "course": 0.0, "accuracy": 10.0} for k in range(n)]
    if key == "gps":
        fixes = [{**f, "altitude": 3.0, "horizontal accuracy": 5.0, "vertical accuracy": 4.0} for f in fixes]
    info = {"startTime": START_MS, "endTime": START_MS + 40000, "id": path.stem, "rideID": "r", "timelapse": False,
            "filename": "ignored.mov", "locations": [], "gps": [], "accelerometer": [], "gyro": []}
    info[key] = fixes
    path.write_text(json.dumps(info))


@pytest.fixture
def bdd(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "videos/100k" / split).mkdir(parents=True)
        (tmp_path / "info/100k" / split).mkdir(parents=True)
    make_video(tmp_path / "videos/100k/train/0000f77c-6257be58.mov", seconds=4.0)
    _info(tmp_path / "info/100k/train/0000f77c-6257be58.json", 40.6768, -73.8353)
    make_video(tmp_path / "videos/100k/train/0000f77c-cb820c98.mov", seconds=4.0)
    _info(tmp_path / "info/100k/train/0000f77c-cb820c98.json", 40.70, -73.80, n=3, start_offset_ms=1000, key="gps")
    make_video(tmp_path / "videos/100k/val/00a0f008-3c67908e.mov", seconds=2.0)  # no info JSON: no GPS
    return tmp_path


def test_frames_at_1fps_with_interpolated_gps(bdd):
    df, skipped = read_bdd(bdd)
    a = df.filter(pl.col("sequence_id") == "train/0000f77c-6257be58")
    assert a["video_path"][0] == "videos/100k/train/0000f77c-6257be58.mov"
    assert a["timestamp_s"].to_list() == pytest.approx([0, 1, 2, 3])
    assert a["lat"].to_list() == pytest.approx([40.6768, 40.6778, 40.6788, 40.6798])
    assert set(a["split"]) == {"train"}
    # The second video's fixes start 1 s late and come from `gps`; all frames are within tolerance.
    b = df.filter(pl.col("sequence_id") == "train/0000f77c-cb820c98")
    assert b["lat"].to_list() == pytest.approx([40.70, 40.70, 40.701, 40.702])
    # The val video has no GPS: its frames are left out and reported, not silently dropped.
    assert "val/00a0f008-3c67908e" not in df["sequence_id"].to_list()
    assert skipped.filter(pl.col("sequence_id") == "val/00a0f008-3c67908e").height == 2
    assert skipped["reason"][0].startswith("no GPS")


def test_fps_and_tolerance(bdd):
    df, skipped = read_bdd(bdd, fps=2.0, gps_tolerance_s=0.2)
    b = df.filter(pl.col("sequence_id") == "train/0000f77c-cb820c98")
    assert b["timestamp_s"].to_list() == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])  # fixes at 1..3 s
    assert skipped.filter(pl.col("sequence_id") == "train/0000f77c-cb820c98")["row"].to_list() == [0, 1, 7]


def test_gama_lists_choose_videos_and_split(bdd):
    lists = bdd / "list"
    lists.mkdir()
    (lists / "train_day.list").write_text("0000f77c-cb820c98 1200\n")
    (lists / "val_day_vid.list").write_text("0000f77c-6257be58\n")
    df, _ = read_bdd(bdd, lists_dir=lists)
    assert dict(df.unique("sequence_id").select("sequence_id", "split").iter_rows()) == {
        "train/0000f77c-cb820c98": "train", "train/0000f77c-6257be58": "val"}
    (lists / "val_day_vid.list").write_text("0000f77c-6257be58\nffffffff-00000000\n")
    with pytest.raises(ManifestError, match="ffffffff-00000000"):
        read_bdd(bdd, lists_dir=lists)
