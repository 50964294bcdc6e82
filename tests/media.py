"""Real encoded media for tests: one H.264 writer (PyAV) that every video test shares."""

from __future__ import annotations

from collections.abc import Callable

import av
import numpy as np


def marker_frame(k: int, size: tuple[int, int]) -> np.ndarray:
    """Frame k: grey level 8*(k % 30) in the left half and a white top-left marker (tells frames and rotation apart)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = 8 * (k % 30)
    a[:8, :8] = 255
    return a


def write_h264(path, n_frames: int, fps: float = 10, size: tuple[int, int] = (64, 48), *,
               draw: Callable[[int, tuple[int, int]], np.ndarray] = marker_frame, rotation: int | None = None,
               gop: int = 15):
    """Encode ``n_frames`` frames drawn by ``draw(k, (w, h))`` with PTS k; ``rotation`` sets the display matrix."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.codec_context.gop_size = gop
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
