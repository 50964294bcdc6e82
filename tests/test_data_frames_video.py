"""Frame folders (natural order, coordinates CSV) and videos (PTS times, seeking, rotation, GPS tracks), and
videos as real files come: MP4 / MKV / MPEG-TS / WebM (VP9), a ``-c copy`` trim with pre-roll at negative
PTS, a remux whose stream starts at 1.4 s."""

import numpy as np
import polars as pl
import pytest
from media import grey_level, remux, write_h264, write_video, write_vp9
from PIL import Image

from vidtag.data.frames import read_frames
from vidtag.data.manifest import ManifestError, validate_manifest
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


def frame_index_of(img) -> int:
    """Which :func:`media.marker_frame` a decoded image is (k modulo 30)."""
    return round(grey_level(img) / 8) % 30


def assert_every_frame(path, n_frames, fps, first_k=0):
    """All ``n_frames`` frames are on the timeline from 0 at 1/fps steps, and each decodes to its own picture."""
    t, _ = frame_times(path)
    assert t.size == n_frames and t[0] == 0.0 and (t >= 0).all()
    np.testing.assert_allclose(t, np.arange(n_frames) / fps, atol=1e-3)
    got = list(read_video_frames(path, t))
    assert [ts for ts, _ in got] == list(t) and all(im is not None for _, im in got)
    assert [frame_index_of(im) for _, im in got] == [(first_k + k) % 30 for k in range(n_frames)]
    return t


def write_mpeg4(path, n_frames, fps, gop):
    return write_video(path, n_frames, fps, codec="mpeg4", gop=gop, bit_rate=4_000_000)


@pytest.mark.parametrize("name,writer", [("v.mp4", write_h264), ("v.mkv", write_h264), ("v.mov", write_h264),
                                         ("v.ts", write_h264), ("v.webm", write_vp9), ("v.avi", write_mpeg4)])
def test_every_container_gives_every_frame_from_zero(tmp_path, name, writer):
    v = writer(tmp_path / name, 20, 10, gop=7)
    assert_every_frame(v, 20, 10)


def test_copy_trim_never_samples_the_preroll(tmp_path):
    # Like `ffmpeg -ss 0.5 -i in.mp4 -c copy out.mp4`: the copy starts at the keyframe at 0 s, so frames 0-4
    # are pre-roll at negative PTS that the MP4 edit list hides; the video starts with frame 5 at 0 s.
    src = write_h264(tmp_path / "in.mp4", 20, 10, gop=15)
    trimmed = remux(src, tmp_path / "trim.mp4", trim_s=0.5)
    t = assert_every_frame(trimmed, 15, 10, first_k=5)
    assert np.allclose(sample_frame_times(t, 1.0), [0.0, 1.0])
    df, _, _ = read_videos([trimmed], fps=2.0)
    assert df["timestamp_s"].to_list() == pytest.approx([0.0, 0.5, 1.0])
    validate_manifest(df)  # timestamps >= 0: a valid manifest


@pytest.mark.parametrize("gop", [4, 100])
def test_ts_remux_starting_late_and_seeks_without_an_index(tmp_path, gop):
    # An MPEG-TS remux starts at 1.4 s and seeks land on any packet; gop=100 is a single keyframe at the start.
    src = write_h264(tmp_path / "in.mp4", 30, 10, gop=gop)
    ts = remux(src, tmp_path / "r.ts", shift_s=1.4)
    t, start = frame_times(ts)
    assert start == pytest.approx(1.4, abs=0.01)
    assert_every_frame(ts, 30, 10)
    # seek_gap_s=0: a seek for every target, each must back off to a keyframe before it
    got = list(read_video_frames(ts, [0.0, 0.9, 2.3, 2.9], seek_gap_s=0.0))
    assert [frame_index_of(im) for _, im in got] == [0, 9, 23, 29]
    track = tmp_path / "t.csv"
    track.write_text("t_s,lat,lon\n0,10.0,20.0\n2,10.2,20.0\n")
    df, _, _ = read_videos([ts], fps=1.0, track=track)
    assert df["timestamp_s"].to_list() == pytest.approx([0.0, 1.0, 2.0])  # from the stream start, not 1.4 s
    assert df["lat"].to_list() == pytest.approx([10.0, 10.1, 10.2])  # track times are from the stream start too


@pytest.mark.parametrize("name", ["trim.mkv", "trim.webm", "trim.ts"])
def test_trimmed_copies_in_other_containers(tmp_path, name):
    # Matroska has no edit lists: the muxer moves the pre-roll to 0, so every copied frame is shown.
    # MPEG-TS keeps the negative offset as a later start time.
    write = write_vp9 if name.endswith("webm") else write_h264
    src = write(tmp_path / ("in.webm" if name.endswith("webm") else "in.mp4"), 20, 10, gop=15)
    out = remux(src, tmp_path / name, trim_s=0.5, shift_s=1.4 if name.endswith("ts") else 0.0)
    t, _ = frame_times(out)
    assert t[0] == 0.0 and (t >= 0).all() and t.size in (15, 20)
    got = list(read_video_frames(out, t))
    assert all(im is not None for _, im in got)
    first = 20 - t.size
    assert [frame_index_of(im) for _, im in got] == list(range(first, 20))


def test_sampling_is_linear_in_frames_and_refuses_bad_rates():
    t = np.arange(100_000) / 30.0
    assert sample_frame_times(t, 1e9).size == t.size  # faster than the video: every frame, no 1e9-long grid
    for fps in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            sample_frame_times(t, fps)
