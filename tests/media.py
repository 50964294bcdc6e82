"""Real encoded media for tests, made with PyAV as real files come: H.264 in MP4 / MKV / MPEG-TS, VP9 in
WebM, and stream-copied edits (a ``-c copy`` trim with pre-roll at negative PTS, a remux whose stream
starts late, as MPEG-TS muxers start at 1.4 s)."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np


def marker_frame(k: int, size: tuple[int, int]) -> np.ndarray:
    """Frame k: grey level 8*(k % 30) in the left half and a white top-left marker (tells frames and rotation apart)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = 8 * (k % 30)
    a[:8, :8] = 255
    return a


def grey_level(img) -> float:
    """The left half's grey level of a decoded :func:`marker_frame` (its index k is round(level / 8) % 30)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    return float(a[a.shape[0] // 2, : a.shape[1] // 4].mean())


def write_video(path, n_frames: int, fps: float = 10, size: tuple[int, int] = (64, 48), *, codec: str = "libx264",
                draw: Callable[[int, tuple[int, int]], np.ndarray] = marker_frame, rotation: int | None = None,
                gop: int = 15, container_format: str | None = None, bit_rate: int | None = None):
    """Encode ``n_frames`` frames drawn by ``draw(k, (w, h))`` with PTS k; the container follows the extension
    (.mp4, .mkv, .ts, .webm, ...) unless ``container_format`` names it; ``rotation`` sets the display matrix;
    ``bit_rate`` (bits/s) for codecs whose default rate blurs the test pattern (MPEG-4 Part 2)."""
    with av.open(str(path), "w", format=container_format) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.codec_context.gop_size = gop
        if bit_rate:
            s.bit_rate = bit_rate
        if rotation:
            s.set_display_rotation(rotation)
        for k in range(n_frames):
            f = av.VideoFrame.from_ndarray(draw(k, size), format="rgb24")
            f.pts = k
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_h264(path, n_frames: int, fps: float = 10, size: tuple[int, int] = (64, 48), *,
               draw: Callable[[int, tuple[int, int]], np.ndarray] = marker_frame, rotation: int | None = None,
               gop: int = 15):
    """H.264 (libx264, with B-frames) in the container the extension names."""
    return write_video(path, n_frames, fps, size, draw=draw, rotation=rotation, gop=gop)


def write_vp9(path, n_frames: int, fps: float = 10, size: tuple[int, int] = (64, 48), *,
              draw: Callable[[int, tuple[int, int]], np.ndarray] = marker_frame, gop: int = 15):
    """VP9 (libvpx-vp9) in WebM, as browsers and YouTube downloads give it."""
    return write_video(path, n_frames, fps, size, codec="libvpx-vp9", draw=draw, gop=gop)


def remux(src, dst, *, trim_s: float = 0.0, shift_s: float = 0.0, container_format: str | None = None):
    """Stream-copy ``src`` into ``dst`` without re-encoding, like ``ffmpeg [-ss trim_s] -i src -c copy dst``.

    ``trim_s``: copying starts at the last keyframe at or before ``trim_s`` and every timestamp moves by
    ``-trim_s``, so the packets before the cut are pre-roll at negative PTS (MP4 writes an edit list that
    hides them). ``shift_s`` moves every timestamp later: the stream starts at ``shift_s`` (an MPEG-TS
    remux starts at 1.4 s, FFmpeg's default mux delay).
    """
    with av.open(str(src)) as i:
        si = i.streams.video[0]
        tb = si.time_base
        cut = int(math.floor(trim_s / tb + 1e-9))
        packets = [p for p in i.demux(si) if p.dts is not None and p.size > 0]
        keys = [p.pts for p in packets if p.is_keyframe and p.pts <= cut]
        first_key = max(keys) if keys else min(p.pts for p in packets)
        # Packets in decode order from the keyframe on: the ones before it cannot be decoded without it.
        k0 = next(j for j, p in enumerate(packets) if p.is_keyframe and p.pts == first_key)
        move = int(round(shift_s / tb)) - cut
        with av.open(str(dst), "w", format=container_format) as o:
            so = o.add_stream_from_template(si)
            for p in packets[k0:]:
                p.pts += move
                p.dts += move
                p.stream = so
                o.mux(p)
    return dst
