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


@dataclass(frozen=True)
class FrameSource:
    """Where each manifest row's pixels come from: an image file, or a video + timestamp (absolute paths)."""

    image_path: tuple[str | None, ...]
    video_path: tuple[str | None, ...]
    timestamp_s: tuple[float | None, ...]

    @classmethod
    def from_manifest(cls, df, root: str | Path) -> "FrameSource":
        root = Path(root)
        n = df.height

        def col(name):
            return df[name].to_list() if name in df.columns else [None] * n

        images = tuple(None if p is None else str(root / p) for p in col("image_path"))
        videos = tuple(None if p is None else str(root / p) for p in col("video_path"))
        return cls(images, videos, tuple(col("timestamp_s")))

    def __len__(self) -> int:
        return len(self.image_path)


class FrameBatches(Dataset):
    """Item i = batch i of ``batches`` (row ranges): (rows, clip (B, 3, S, S) uint8, dino (B, 3, S, S) uint8, ok (B,), reasons)."""

    def __init__(self, source: FrameSource, batches: list[tuple[int, int]], preprocessor: Preprocessor):
        self.source, self.batches, self.pre = source, batches, preprocessor
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

    def __getitem__(self, i: int):
        start, stop = self.batches[i]
        rows = np.arange(start, stop)
        images: dict[int, object] = {}
        reasons: dict[int, str] = {}
        videos: dict[str, list[int]] = {}
        for r in rows:
            img_path, vid_path = self.source.image_path[r], self.source.video_path[r]
            if img_path is not None:
                images[r], err = _open_image(img_path)
                if err:
                    reasons[r] = err
            elif vid_path is not None and self.source.timestamp_s[r] is not None:
                videos.setdefault(vid_path, []).append(int(r))
            else:
                reasons[r] = "row has neither image_path nor video_path + timestamp_s"
        for vid_path, vrows in videos.items():
            _decode_video_rows(vid_path, vrows, self.source.timestamp_s, images, reasons)

        clips, dinos = [], []
        ok = np.ones(len(rows), dtype=bool)
        for j, r in enumerate(rows):
            pair = None
            if r not in reasons:
                try:
                    pair = self.pre(images[r])
                except Exception as e:  # truncated JPEGs fail here, at full decode
                    reasons[r] = f"cannot decode image: {type(e).__name__}: {e}"
            if pair is None:
                ok[j] = False
                pair = self._blank_pair()
            clips.append(pair[0])
            dinos.append(pair[1])
        reason_list = [reasons.get(int(r), "") for r in rows]
        return torch.from_numpy(rows), torch.stack(clips), torch.stack(dinos), torch.from_numpy(ok), reason_list


def _open_image(path: str):
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
        return img, None
    except FileNotFoundError:
        return None, f"image file not found: {path}"
    except Exception as e:
        return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def _decode_video_rows(path: str, rows: list[int], times: tuple, images: dict, reasons: dict) -> None:
    """Decode the frames of one video that these rows ask for (one open, PTS order); failures go to ``reasons``."""
    from vidtag.data.video import read_video_frames

    wanted: dict[float, list[int]] = {}
    for r in rows:
        wanted.setdefault(float(times[r]), []).append(r)  # duplicate timestamps decode once
    got: dict[float, object] = {}
    try:
        for t, img in read_video_frames(path, list(wanted)):
            if img is not None:
                got[t] = img
    except FileNotFoundError:
        for r in rows:
            reasons[r] = f"video file not found: {path}"
        return
    except Exception as e:  # a broken container or stream: rows not yet decoded are bad, the run goes on
        err = f"cannot decode video {path}: {type(e).__name__}: {e}"
    else:
        err = None
    for t, rs in wanted.items():
        for r in rs:
            if t in got:
                images[r] = got[t]
            else:
                reasons[r] = err or f"no frame at {t:.3f} s in {path}"
