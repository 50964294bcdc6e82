"""Frame folders (natural order, coordinates CSV) and videos (PTS times, seeking, rotation, GPS tracks)."""

import numpy as np
import polars as pl
import pytest
from media import write_h264
from PIL import Image

from vidtag.data.frames import read_frames
from vidtag.data.manifest import ManifestError
from vidtag.data.video import frame_times, interpolate_track, read_video_frames, read_videos, sample_frame_times


def make_video(path, seconds=3.0, fps=30, size=(64, 48), rotation=None, gop=15):
    """H.264 whose frame k has grey level 8*(k % 30) in its left half and a white top-left marker."""
    return write_h264(path, int(seconds * fps), fps, size, rotation=rotation, gop=gop)


def test_frames_natural_order_and_coords_by_name_or_index(tmp_path):
    for seq in ("drive_10", "drive_2"):
        (tmp_path / seq).mkdir()
        for n in ("img_10.jpg", "img_2.jpg", "img_1.jpg", ".hidden.jpg", "notes.txt"):
            Image.new("RGB", (4, 4)).save(tmp_path / seq / n, format="JPEG") if n.endswith("jpg") else (tmp_path / seq / n).write_text("x")
    csv = tmp_path / "c.csv"
    csv.write_text("sequence_id,frame,lat,lon\n" + "".join(
        f"{s},{f},{la},{lo}\n" for s in ("drive_2", "drive_10") for f, la, lo in (("img_1.jpg", 1, 2), ("1", 1.1, 2), ("img_10.jpg", 1.2, 2))))
    df, skipped = read_frames(tmp_path, csv)
    assert df["sequence_id"].unique(maintain_order=True).to_list() == ["drive_10", "drive_2"]
    assert df.filter(pl.col("sequence_id") == "drive_2")["image_path"].to_list() == ["drive_2/img_1.jpg", "drive_2/img_2.jpg", "drive_2/img_10.jpg"]
    assert df.filter(pl.col("sequence_id") == "drive_2")["lat"].to_list() == [1.0, 1.1, 1.2]
    assert set(df["split"]) == {"train"} and skipped.height == 0
    no_coords, _ = read_frames(tmp_path)
    assert no_coords["lat"].is_null().all() and set(no_coords["split"]) == {"test"}


def test_frames_bad_rows(tmp_path):
    (tmp_path / "s").mkdir()
    for n in ("0.jpg", "1.jpg", "2.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / "s" / n)
    csv = tmp_path / "c.csv"
    csv.write_text("sequence_id,frame,lat,lon\ns,0.jpg,1,2\ns,1.jpg,91,2\ns,2.jpg,1,2\ns,2.jpg,1,3\ns,9.jpg,1,2\n")
    with pytest.raises(ManifestError, match=r"c.csv row 3: lat/lon out of range"):
        read_frames(tmp_path, csv)
    df, skipped = read_frames(tmp_path, csv, skip_bad=True)
    assert df["image_path"].to_list() == ["s/0.jpg", "s/2.jpg"] and df["frame_index"].to_list() == [0, 1]
    assert skipped["row"].to_list() == [3, 5, 6]
    assert skipped["reason"].to_list()[1:] == ["duplicate row for the same frame", "image file not found"]


def test_frame_times_from_pts_and_sparse_sampling(tmp_path):
    v = make_video(tmp_path / "v.mp4", seconds=3.0)
    t, start = frame_times(v)
    assert t.size == 90 and start == 0.0
    assert np.allclose(np.diff(t), 1 / 30)
    assert np.allclose(sample_frame_times(t, 1.0, start), [0, 1, 2])
    assert np.allclose(sample_frame_times(t, 2.0, start), [0, 0.5, 1, 1.5, 2, 2.5])


def test_read_video_frames_seeks_and_matches_pts(tmp_path):
    v = make_video(tmp_path / "v.mp4", seconds=4.0)
    want = [0.0, 1.0 + 7 / 30, 3.5, 99.0]
    got = list(read_video_frames(v, want, seek_gap_s=0.5))
    assert [t for t, _ in got] == want
    levels = [np.asarray(im)[24, 10].mean() for _, im in got[:3]]
    assert np.allclose(levels, [0, 8 * 7, 8 * 15], atol=6)  # the frame at each PTS, not a neighbour
    assert got[3][1] is None


def test_rotation_from_display_matrix_is_applied(tmp_path):
    v = make_video(tmp_path / "r.mp4", seconds=1.0, size=(64, 32), rotation=90)
    (_, im), = read_video_frames(v, [0.0])
    assert im.size == (32, 64)  # portrait after a 90° counter-clockwise turn
    a = np.asarray(im)
    assert a[-4, 4].mean() > 200  # the top-left marker ends up bottom-left
    (_, raw), = read_video_frames(v, [0.0], apply_rotation=False)
    assert raw.size == (64, 32)


def test_interpolation_across_antimeridian_and_no_extrapolation():
    lat, lon = interpolate_track(np.array([0.0, 2.0]), np.array([-17.0, -17.2]), np.array([179.9, -179.9]),
                                 np.array([-1.0, -3.0, 1.0, 2.5, 9.0]), tolerance_s=1.5)
    assert lat[2] == pytest.approx(-17.1) and abs(lon[2]) == pytest.approx(180.0)
    assert lat[0] == -17.0 and lon[3] == pytest.approx(-179.9)  # clamped within tolerance
    assert np.isnan(lat[1]) and np.isnan(lon[4])  # beyond it: unknown


def test_read_videos_with_csv_track(tmp_path):
    v = make_video(tmp_path / "clip.mp4", seconds=3.0)
    track = tmp_path / "t.csv"
    track.write_text("t_s,lat,lon\n0,10.0,20.0\n2,10.2,20.0\n")
    df, skipped, root = read_videos([v], fps=1.0, track=track)
    assert df["video_path"].to_list() == ["clip.mp4"] * 3 and root == tmp_path.resolve()
    assert df["timestamp_s"].to_list() == pytest.approx([0.0, 1.0, 2.0])
    assert df["lat"].to_list() == pytest.approx([10.0, 10.1, 10.2])
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ManifestError, match="bad.mp4"):
        read_videos([tmp_path / "bad.mp4"])
