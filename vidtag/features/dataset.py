"""DataLoader dataset for extraction: one item = one batch of manifest rows, decoded and preprocessed once.

An item is a whole batch (not a frame) so that a worker opens each video once per batch and decodes
its frames in PTS order, and so that batch boundaries are fixed by the work unit (byte-identical
features on resume: the same rows always go through the model together).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vidtag.features.backbones import Preprocessor


# Default per-frame pixel budget: an 8K frame (33 MP) and 50 MP phone photos pass; a 20000 x 20000 JPEG
# (400 MP, 1.2 GB decoded) is refused before it is decoded.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class FrameSource:
    """Where each manifest row's pixels come from: an image file, or a video + timestamp (absolute paths).

    ``refused[i]`` (when set) is why row i is not read at all: its path resolves outside the manifest's root.
    """

    image_path: tuple[str | None, ...]
    video_path: tuple[str | None, ...]
    timestamp_s: tuple[float | None, ...]
    refused: tuple[str | None, ...] = ()

    @classmethod
    def from_manifest(cls, df, root: str | Path, allow_outside_root: bool = False) -> "FrameSource":
        """Paths that resolve outside ``root`` (``../``, absolute, symlinks out) are refused per row unless
        the manifest was written with ``allow_outside_root``: nothing outside the dataset is read."""
        from vidtag.data.report import OUTSIDE_ROOT, outside_root

        root = Path(root)
        n = df.height

        def col(name):
            return df[name].to_list() if name in df.columns else [None] * n

        refused = [None] * n
        if not allow_outside_root:
            for name in ("image_path", "video_path"):
                for i in map(int, outside_root(root, col(name)).nonzero()[0]):
                    refused[i] = f"{name.replace('_path', '')} {col(name)[i]} {OUTSIDE_ROOT} {root} (not read)"
        images = tuple(None if p is None else str(root / p) for p in col("image_path"))
        videos = tuple(None if p is None else str(root / p) for p in col("video_path"))
        return cls(images, videos, tuple(col("timestamp_s")), tuple(refused))

    def __len__(self) -> int:
        return len(self.image_path)


class FrameBatches(Dataset):
    """Item i = batch i of ``batches`` (row ranges): (rows, clip (B, 3, S, S) uint8, dino (B, 3, S, S) uint8, ok (B,), reasons)."""

    def __init__(self, source: FrameSource, batches: list[tuple[int, int]], preprocessor: Preprocessor,
                 max_pixels: int = MAX_PIXELS):
        self.source, self.batches, self.pre, self.max_pixels = source, batches, preprocessor, max_pixels
        self._blank: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        n = sum(b - a for a, b in self.batches)
        return f"FrameBatches({len(self.batches)} batches, {n} frames)"

    def _blank_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._blank is None:
            c, d = self.pre.clip_cfg["crop_px"], self.pre.dino_cfg["crop_px"]
            self._blank = torch.zeros(3, c, c, dtype=torch.uint8), torch.zeros(3, d, d, dtype=torch.uint8)
        return self._blank

    def _crops(self, img, r: int, crops: dict, reasons: dict) -> None:
        """Normalise and preprocess one decoded frame right away, so a batch never holds full-size images."""
        rgb, err = to_rgb(img, self.max_pixels)
        if err:
            reasons[r] = err
            return
        try:
            crops[r] = self.pre(rgb)
        except Exception as e:  # truncated JPEGs fail here, at full decode
            reasons[r] = f"cannot decode image: {type(e).__name__}: {e}"

    def __getitem__(self, i: int):
        start, stop = self.batches[i]
        rows = np.arange(start, stop)
        crops: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        reasons: dict[int, str] = {}
        videos: dict[str, list[int]] = {}
        refused = self.source.refused
        for r in rows:
            r = int(r)
            img_path, vid_path = self.source.image_path[r], self.source.video_path[r]
            if refused and refused[r]:
                reasons[r] = refused[r]
            elif img_path is not None:
                img, err = open_image(img_path, self.max_pixels)
                if err:
                    reasons[r] = err
                else:
                    self._crops(img, r, crops, reasons)
            elif vid_path is not None and self.source.timestamp_s[r] is not None:
                videos.setdefault(vid_path, []).append(r)
            else:
                reasons[r] = "row has neither image_path nor video_path + timestamp_s"
        for vid_path, vrows in videos.items():
            _decode_video_rows(vid_path, vrows, self.source.timestamp_s, lambda img, r: self._crops(img, r, crops, reasons),
                               reasons)

        clips, dinos = [], []
        ok = np.ones(len(rows), dtype=bool)
        for j, r in enumerate(rows):
            pair = crops.get(int(r))
            if pair is None:
                ok[j] = False
                reasons.setdefault(int(r), "frame could not be read")
                pair = self._blank_pair()
            clips.append(pair[0])
            dinos.append(pair[1])
        reason_list = [reasons.get(int(r), "") if not ok[j] else "" for j, r in enumerate(rows)]
        return torch.from_numpy(rows), torch.stack(clips), torch.stack(dinos), torch.from_numpy(ok), reason_list


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img, max_pixels: int = MAX_PIXELS):
    """A decoded frame as 8-bit RGB the way it is meant to be seen, or ``(None, reason)``.

    EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits (PIL's own conversion clips it
    to white); palette, CMYK, grey and alpha modes go through PIL's conversion; floating-point pixels
    and frames above ``max_pixels`` are refused.
    """
    from PIL import ImageOps

    w, h = img.size
    if w * h > max_pixels:
        return None, f"frame is {w} x {h} = {w * h} pixels, above the limit of {max_pixels} (max_pixels)"
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        return None, f"cannot apply the EXIF orientation: {type(e).__name__}: {e}"
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        from PIL import Image

        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            return None, f"{img.mode} pixels outside 0..65535 cannot be shown as 8-bit"
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 0..65535 -> 0..255, rounded
        return Image.fromarray(a8, mode="L").convert("RGB"), None
    if img.mode == "F":
        return None, "floating-point pixels (PIL mode F) are not supported; save the frame as 8-bit"
    try:
        return (img if img.mode == "RGB" else img.convert("RGB")), None
    except Exception as e:  # a mode PIL cannot turn into RGB (e.g. LAB)
        return None, f"cannot convert {img.mode} pixels to RGB: {type(e).__name__}: {e}"


def open_image(path: str, max_pixels: int = MAX_PIXELS):
    """Open an image file, refusing one above ``max_pixels`` before decoding it; ``(PIL image, None)`` or
    ``(None, reason)``. The pixels are decoded (so a broken file fails here, per frame)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                img.close()
                return None, f"image {path} is {w} x {h} = {w * h} pixels, above the limit of {max_pixels} (max_pixels)"
            img.load()
        return img, None
    except FileNotFoundError:
        return None, f"image file not found: {path}"
    except Image.DecompressionBombError as e:
        return None, f"image {path} is above the limit of {max_pixels} pixels (max_pixels): {e}"
    except Exception as e:
        return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def load_rgb(path: str, max_pixels: int = MAX_PIXELS):
    """An image file as 8-bit RGB (EXIF orientation applied, 16-bit scaled), or ``(None, reason)``."""
    img, err = open_image(path, max_pixels)
    return (None, err) if err else to_rgb(img, max_pixels)


def _decode_video_rows(path: str, rows: list[int], times: tuple, take, reasons: dict) -> None:
    """Decode the frames of one video that these rows ask for (one open, PTS order), handing each to
    ``take(image, row)`` as it comes; failures go to ``reasons``."""
    from vidtag.data.video import read_video_frames

    wanted: dict[float, list[int]] = {}
    for r in rows:
        wanted.setdefault(float(times[r]), []).append(r)  # duplicate timestamps decode once
    got: set[float] = set()
    try:
        for t, img in read_video_frames(path, list(wanted)):
            if img is not None:
                got.add(t)
                for r in wanted.get(t, ()):
                    take(img, r)
    except FileNotFoundError:
        for r in rows:
            reasons[r] = f"video file not found: {path}"
        return
    except Exception as e:  # a broken container or stream: rows not yet decoded are bad, the run goes on
        err = f"cannot decode video {path}: {type(e).__name__}: {e}"
    else:
        err = None
    for t, rs in wanted.items():
        if t not in got:
            for r in rs:
                reasons[r] = err or f"no frame at {t:.3f} s in {path}"
