"""Videos: frame times on the presentation timeline, sparse sampling, GPS track interpolation, decoding.

The manifest references video frames as ``video_path`` + ``timestamp_s``: seconds on the stream's
presentation timeline, counted from the stream's start time (so always >= 0, whatever the container's
clock: an MPEG-TS remux starts at 1.4 s, a ``-c copy`` trim at a negative PTS). Packets the container
marks as not presented (edit-list pre-roll, PTS before the start) are never sampled.
:func:`read_video_frames` is the one decoder the extractor and ``predict`` use: it seeks rather than
decoding everything, starts decoding on a keyframe (containers without an index, like MPEG-TS, seek
to any packet), matches frames by PTS, and applies the stream's display-matrix rotation (so rotation
is handled at decode time and not stored in the manifest).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from vidtag.data.manifest import SKIPPED_COLUMNS, SPLITS
from vidtag.data.report import (OUTSIDE_ROOT, Track, finalize, first_line, flag_bad_coords,
                                judge_track, outside_root, parse_numbers, read_csv_strings)
from vidtag.errors import ConfigError, ManifestError
from vidtag.geo import wrap_lon

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
GPS_TOLERANCE_S = 1.5  # BDD logs ~1 Hz fixes: a frame within 1.5 s of the first/last fix takes that fix


def _start_pts(container, stream) -> int:
    """Where the stream's presentation timeline begins, in its time base: the stream's start time, else
    the container's, else 0 (one rule for :func:`frame_times` and :func:`read_video_frames`)."""
    if stream.start_time is not None:
        return int(stream.start_time)
    if container.start_time is not None:  # microseconds (AV_TIME_BASE)
        return int(round(container.start_time / 1_000_000 / float(stream.time_base)))
    return 0


def frame_times(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Presentation times of every frame shown, in seconds from the stream's start (sorted, >= 0), and the
    start itself in the container's clock; demuxes, never decodes.

    Packets flagged for discard (an MP4 edit list's pre-roll, e.g. after ``ffmpeg -ss 0.5 -c copy``) and
    packets before the stream's start time are not presented, so they are not frames of the video.
    """
    import av

    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            tb = float(s.time_base)
            pts = [p.pts for p in c.demux(s)
                   if p.pts is not None and p.size > 0 and not getattr(p, "is_discard", False)]
            start = _start_pts(c, s)
    except (av.error.FFmpegError, IndexError) as e:
        raise ManifestError(f"{path}: cannot read as a video ({e}); expected a container PyAV/FFmpeg decodes") from e
    pts = np.sort(np.asarray([p for p in pts if p >= start], dtype=np.int64))
    if not pts.size:
        raise ManifestError(f"{path}: the video stream has no frames")
    return (pts - start).astype(np.float64) * tb, float(start) * tb


def sample_frame_times(times_s: np.ndarray, fps: float, start_s: float = 0.0) -> np.ndarray:
    """The frames sampled at ``start + k / fps`` (k = 0, 1, ...): the first frame at or after each time.

    Works frame by frame (O(frames), whatever ``fps``): frame i is taken when some sampling time falls
    in (t[i-1], t[i]], i.e. when the count of sampling times up to t[i] grows.
    """
    if not (math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a finite number > 0, got {fps}")
    times_s = np.asarray(times_s, dtype=np.float64)
    if times_s.size == 0:
        return times_s
    e = 1e-6 * fps  # 1 us of tolerance, in sampling periods
    grid = (times_s - start_s) * fps  # each frame's position in sampling periods
    last = math.floor(grid[-1] + e)  # index of the last sampling time
    if last < 0:
        return times_s[:0]
    count = np.clip(np.floor(grid + e) + 1, 0, last + 1)  # sampling times at or before each frame
    taken = count > np.concatenate([[0.0], count[:-1]])
    return times_s[taken]


def interpolate_track(track_t: np.ndarray, track_lat: np.ndarray, track_lon: np.ndarray, query_t: np.ndarray,
                      tolerance_s: float = GPS_TOLERANCE_S) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of a GPS track at ``query_t`` (NaN where unknown).

    Longitudes are unwrapped first, so a track crossing ±180° interpolates across it, not around the
    world. Before the first fix / after the last one we do not extrapolate: within ``tolerance_s``
    the nearest fix is used (clamped), beyond it the position is NaN (unknown).
    """
    order = np.argsort(track_t, kind="stable")
    t, la, lo = (np.asarray(a, dtype=np.float64)[order] for a in (track_t, track_lat, track_lon))
    q = np.asarray(query_t, dtype=np.float64)
    if t.size == 0:
        return np.full(q.shape, np.nan), np.full(q.shape, np.nan)
    lo = np.degrees(np.unwrap(np.radians(lo)))
    lat = np.interp(q, t, la)
    lon = wrap_lon(np.interp(q, t, lo))
    outside = (q < t[0] - tolerance_s) | (q > t[-1] + tolerance_s)
    lat[outside] = np.nan
    lon[outside] = np.nan
    return lat, lon


def read_track(path: str | os.PathLike, *, skip_bad: bool = False) -> Track:
    """A GPS track (iterates as ``t_s, lat, lon``). CSV: ``t_s`` (seconds from the video's start), ``lat``,
    ``lon``. GPX: ``<trkpt lat lon><time>``; times become seconds after the first timed point.

    A fix whose time or coordinates are missing, not numbers, NaN or out of range raises naming the file
    and the fix (CSV line, trkpt index), or with ``skip_bad`` is dropped and listed in ``Track.dropped``.
    """
    path = Path(path)
    if path.suffix.lower() == ".gpx":
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:
            raise ManifestError(f"{path}: cannot read as GPX ({first_line(e)}); expected <trk><trkseg><trkpt lat lon><time>") from None
        pts = [e for e in root.iter() if e.tag.endswith("trkpt")]
        if not pts:
            raise ManifestError(f"{path}: no <trkpt> points found; expected <trk><trkseg><trkpt lat lon><time>")
        times, why_t = [], []
        for p in pts:
            tm = next((c.text for c in p if c.tag.endswith("time")), None)
            try:
                times.append(datetime.fromisoformat(tm.strip().replace("Z", "+00:00")).timestamp())
                why_t.append(None)
            except (AttributeError, TypeError, ValueError):
                times.append(math.nan)
                why_t.append("<time> is missing" if not tm else f"<time> {tm.strip()!r} is not an ISO 8601 time")
        lat, why_lat = parse_numbers([p.get("lat") for p in pts], "lat")
        lon, why_lon = parse_numbers([p.get("lon") for p in pts], "lon")
        t = np.array(times)
        t0 = t[np.isfinite(t)][0] if np.isfinite(t).any() else 0.0
        return judge_track(t - t0, lat, lon, source=str(path), rows=range(len(pts)), label="trkpt {}",
                           skip_bad=skip_bad, not_numbers=[a or b or c for a, b, c in zip(why_t, why_lat, why_lon)])
    df = read_csv_strings(path, "t_s (seconds from the video start), lat, lon")
    missing = [c for c in ("t_s", "lat", "lon") if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; a track CSV needs t_s (seconds from the video start), lat, lon")
    if df.height == 0:
        raise ManifestError(f"{path}: the track has no rows; a track CSV needs t_s, lat, lon per fix")
    (t, why_t), (lat, why_lat), (lon, why_lon) = (parse_numbers(df[c].to_list(), c) for c in ("t_s", "lat", "lon"))
    return judge_track(t, lat, lon, source=str(path), rows=range(2, df.height + 2), skip_bad=skip_bad,
                       not_numbers=[a or b or c for a, b, c in zip(why_t, why_lat, why_lon)])


def video_rows(video: Path, root: Path, sequence_id: str, fps: float, split: str,
               track: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               tolerance_s: float = GPS_TOLERANCE_S) -> pl.DataFrame:
    """Candidate manifest rows for one video (with bookkeeping columns, see :mod:`vidtag.data.report`).

    ``timestamp_s`` and ``track`` times are both seconds from the stream's start time.
    """
    times, _ = frame_times(video)
    ts = sample_frame_times(times, fps)
    if track is not None:
        lat, lon = interpolate_track(*track, ts, tolerance_s=tolerance_s)
    else:
        lat = lon = np.full(ts.shape, np.nan)
    rel = video.resolve().relative_to(root.resolve()).as_posix() if video.resolve().is_relative_to(root.resolve()) else str(video.resolve())
    return pl.DataFrame({
        "sequence_id": [sequence_id] * ts.size,
        "video_path": [rel] * ts.size,
        "timestamp_s": ts,
        "lat": pl.Series(lat, dtype=pl.Float64).fill_nan(None),  # NaN from interpolation = unknown
        "lon": pl.Series(lon, dtype=pl.Float64).fill_nan(None),
        "split": [split] * ts.size,
        "_file": [str(video)] * ts.size,
        "_row": pl.Series(np.arange(ts.size), dtype=pl.Int64),
        "_reason": pl.Series([None] * ts.size, dtype=pl.String),
        "_order": pl.Series(np.arange(ts.size), dtype=pl.Int64),
    })


def read_videos(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None, *, fps: float = 1.0,
                track: str | os.PathLike | None = None, split: str = "test",
                skip_bad: bool = False, allow_outside_root: bool = False) -> tuple[pl.DataFrame, pl.DataFrame, Path]:
    """Manifest rows for video files (one sequence each, id = file stem); returns ``(df, skipped, root)``.

    ``paths`` may include folders (their video files are taken). An optional GPS track (CSV/GPX, one
    video only) is interpolated at the frames' times; frames outside it get null coordinates. A video
    resolving outside ``root`` (a symlink in a listed folder pointing elsewhere) is not opened: a bad
    row, unless ``allow_outside_root``. Bad track fixes raise, or with ``skip_bad`` are dropped and listed.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise ManifestError(f"{p}: no such video file or folder")
    if not files:
        raise ManifestError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in {list(map(str, paths))}")
    if track is not None and len(files) != 1:
        raise ManifestError(f"a GPS track ({track}) belongs to one video, but {len(files)} videos were given")
    root = Path(root) if root is not None else Path(os.path.commonpath([f.resolve().parent for f in files]))
    trk = read_track(track, skip_bad=skip_bad) if track is not None else None
    stems = [f.stem for f in files]
    ids = stems if len(set(stems)) == len(stems) else [f.as_posix() for f in files]
    outside = np.zeros(len(files), bool) if allow_outside_root else outside_root(root, [str(f) for f in files])
    frames = [video_rows(f, root, sid, fps, split, trk) for f, sid, o in zip(files, ids, outside) if not o]
    frames += [pl.DataFrame({"sequence_id": [sid], "video_path": [str(f)], "timestamp_s": [0.0], "split": [split],
                             "_file": [str(f)], "_reason": [f"video {OUTSIDE_ROOT}"], "_order": [0]})
               for f, sid, o in zip(files, ids, outside) if o]  # never opened: one bad row each
    df = pl.concat(frames, how="diagonal_relaxed")
    df = flag_bad_coords(df, allow_null=True)
    good, skipped = finalize(df, skip_bad)
    if trk is not None and trk.dropped:
        fixes = pl.DataFrame([(str(track), row, ids[0], why) for row, why in trk.dropped], schema=SKIPPED_COLUMNS,
                             orient="row")
        skipped = pl.concat([skipped, fixes], how="vertical_relaxed")
    return good, skipped, root


class _Decoder:
    """One video stream that can restart decoding at a keyframe before any time of its timeline."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.container = path, None
        self._open()
        s = self.stream
        self.tb = float(s.time_base)
        self.start_pts = _start_pts(self.container, s)
        self.half_s = 0.5 / float(s.average_rate or s.guessed_rate or 30)  # half a frame: PTS match tolerance

    def _open(self) -> None:
        """(Re)open the file: a fresh demuxer is at the very start, which no seek guarantees in every format."""
        import av

        if self.container is not None:
            self.container.close()
        self.container = av.open(str(self.path))
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.fresh = True

    def close(self) -> None:
        self.container.close()

    def frames_from(self, target_s: float) -> Iterator[tuple[float, "av.VideoFrame"]]:
        """Frames ``(t_s, frame)`` (t_s from the stream start) decoded from a keyframe at or before ``target_s``.

        Seeks to the target; when the demuxer lands past the last keyframe before it (MPEG-TS and other
        containers without an index seek to any packet), backs off 1, 2, 4, ... s, and at worst decodes
        from the start of the file. Frames before the stream's start (pre-roll) are never yielded.
        """
        import av

        tb, start, half = self.tb, self.start_pts, self.half_s
        back_s = 0.0
        while True:
            seek_s = target_s - back_s
            from_start = seek_s <= 0
            if from_start and not self.fresh:
                self._open()
            elif not from_start:
                try:
                    self.container.seek(start + int(math.floor(seek_s / tb)), stream=self.stream, backward=True)
                except av.error.FFmpegError:  # some demuxers refuse some positions (AVI before its index)
                    back_s = target_s
                    continue
            self.fresh = False
            s = self.stream
            started = overshot = False
            for pkt in self.container.demux(s):
                if not started:
                    if pkt.pts is None and pkt.size == 0:
                        break  # end of stream before any keyframe
                    late = not from_start and pkt.pts is not None and (pkt.pts - start) * tb > target_s + half
                    if late:
                        overshot = True  # the packets up to the target are behind us: seek further back
                        break
                    if not pkt.is_keyframe:
                        continue  # decoding cannot start on a non-keyframe
                    started = True
                for f in s.codec_context.decode(pkt):  # the empty packet at the end drains the decoder
                    if f.pts is not None and f.pts >= start:
                        yield (f.pts - start) * tb, f
            if started or (from_start and not overshot):
                return
            back_s = max(1.0, 2 * back_s)


def read_video_frames(path: str | os.PathLike, timestamps_s: Sequence[float], *, seek_gap_s: float = 2.0,
                      apply_rotation: bool = True) -> Iterator[tuple[float, "Image.Image | None"]]:
    """Yield ``(timestamp_s, PIL image or None)`` for each requested time, in ascending order.

    Times are seconds from the stream's start (as :func:`frame_times` gives them). Seeks when a target
    lies more than ``seek_gap_s`` past the last decoded frame, else decodes forward; a frame is matched
    by PTS (within half a frame). The display matrix's rotation (``VideoFrame.rotation``,
    counter-clockwise degrees) is applied, so portrait phone videos come out upright. ``None`` marks a
    timestamp with no frame (the caller records it as bad).
    """
    targets = sorted(float(t) for t in timestamps_s)
    if not targets:
        return
    dec = _Decoder(path)
    try:
        frames = None
        last_t = -math.inf
        pending = None
        for target in targets:
            if frames is None or target - last_t > seek_gap_s:
                if frames is not None:
                    frames.close()
                frames = dec.frames_from(target)
                pending = None
            found = None
            while True:
                item = pending if pending is not None else next(frames, None)
                pending = None
                if item is None:
                    break
                ft, f = item
                last_t = ft
                if ft < target - dec.half_s:
                    continue
                if abs(ft - target) <= dec.half_s:
                    found = f
                else:
                    pending = item  # past the target: keep it for the next one
                break
            if found is None:
                yield target, None
                continue
            img = found.to_image()
            rot = int(round(found.rotation or 0)) % 360 if apply_rotation else 0
            if rot:
                img = img.rotate(rot, expand=True)  # PIL rotates counter-clockwise, like the display matrix
            yield target, img
        if frames is not None:
            frames.close()
    finally:
        dec.close()
