"""`vidtag predict` on one input: decode a video (or read a folder of frames), extract features with the
bundle's own frozen backbones (Sec. 3.1), and locate every frame with Fig. 5 (vidtag.inference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from vidtag.device import resolve_device
from vidtag.errors import BackboneError, ManifestError, PredictError
from vidtag.inference import InferenceConfig, predict_sequences
from vidtag.progress import Progress


def backbones_for_bundle(bundle, device: torch.device):
    """Rebuild the frozen backbones named in the bundle and check they are the ones it was trained on."""
    from vidtag.features.backbones import BackboneConfig, build_backbones

    recorded = bundle.config.get("backbones")
    if not recorded:
        raise PredictError("the model bundle names no backbones (config.json 'backbones' is empty); re-export it from a pipeline run")
    try:
        cfg = BackboneConfig.from_dict(recorded.get("config", recorded))
        bb = build_backbones(cfg, device)
    except (BackboneError, ValueError, TypeError) as e:
        raise PredictError(f"cannot build the backbones named in the bundle: {e}") from None
    want = (bundle.frame_encoder.cfg.clip_dim, bundle.frame_encoder.cfg.dino_dim)
    if tuple(bb.dims) != want:
        raise PredictError(
            f"the bundle's backbones give ({bb.dims[0]}, {bb.dims[1]})-d features but its model expects {want}; "
            "the bundle does not match its backbones (re-export it, or fix config.json 'backbones')"
        )
    sha = bb.weights_sha256()
    for name in ("clip", "dino"):
        expect = (recorded.get(name) or {}).get("weights_sha256")
        if expect and expect != sha[name]:
            raise PredictError(
                f"the {name} backbone built from the bundle's config has weights {sha[name][:12]}..., but the model was "
                f"trained on features from {expect[:12]}...; the bundle does not match its backbones (provide the same weights)"
            )
    return bb


def _is_single_image(path: Path) -> bool:
    """A still image file (one frame): by extension, else by PIL recognising it as a one-frame image."""
    from PIL import Image, UnidentifiedImageError

    from vidtag.data.frames import IMAGE_EXTENSIONS
    from vidtag.data.video import VIDEO_EXTENSIONS

    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return True
    if suffix in VIDEO_EXTENSIONS:
        return False
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) == 1  # an animated GIF/PNG/WebP is a video
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _read_image(path: Path):
    """The image as RGB, or None when it cannot be decoded (then reported as an unreadable frame)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


def _frames_of(input_path: Path, fps: float):
    """(timestamps_s or None, iterator of PIL | None, count, names or None) for a video file, a single image
    (one frame, no timestamp) or a folder of frames. Video timestamps are seconds from the stream's start."""
    if input_path.is_dir():
        from vidtag.data.frames import IMAGE_EXTENSIONS, list_frames

        names = list_frames(input_path)
        if not names:
            raise PredictError(f"{input_path} holds no frames; expected image files ({', '.join(IMAGE_EXTENSIONS)})")
        return None, (_read_image(input_path / name) for name in names), len(names), names
    if not input_path.exists():
        raise PredictError(f"{input_path} does not exist; expected a video file, an image or a folder of frames")
    if _is_single_image(input_path):
        return None, iter([_read_image(input_path)]), 1, [input_path.name]
    from vidtag.data.video import frame_times, read_video_frames, sample_frame_times

    try:
        times, _ = frame_times(input_path)
    except ManifestError as e:
        raise PredictError(str(e)) from None
    targets = sample_frame_times(times, fps)

    def decoded():
        import av

        got = 0
        try:
            for _, img in read_video_frames(input_path, targets):
                got += 1
                yield img
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # a truncated tail: the frames not decoded are marked invalid below
        for _ in range(len(targets) - got):
            yield None

    return targets, decoded(), len(targets), None


def predict_input(
    input_path: str | Path,
    bundle,
    *,
    fps: float = 1.0,
    device: str | torch.device | None = "auto",
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    cfg: InferenceConfig = InferenceConfig(),
    progress: bool = False,
) -> pl.DataFrame:
    """Decode a video (sampled at ``fps``) or read a folder of frames, extract features with the
    bundle's backbones, and run two-stage inference. One row per frame:
    frame_index, timestamp_s (PTS; null for a folder), lat, lon, phase1_lat, phase1_lon, confidence, valid.
    """
    input_path = Path(input_path)
    dev = resolve_device(device)
    timestamps, images, n, _ = _frames_of(input_path, fps)
    bb = backbones_for_bundle(bundle, dev)
    clip_out = np.zeros((n, bb.dims[0]), np.float32)
    dino_out = np.zeros((n, bb.dims[1]), np.float32)
    valid = np.zeros(n, bool)
    batch_rows, batch_c, batch_d = [], [], []

    def flush():
        if batch_rows:
            c, d = bb.encode(torch.stack(batch_c), torch.stack(batch_d))  # (b, 3, S, S) -> (b, Dc), (b, Dd)
            # Round through float16 as the feature store does, so predict sees exactly what training saw.
            clip_out[batch_rows] = c.half().float().cpu().numpy()
            dino_out[batch_rows] = d.half().float().cpu().numpy()
            valid[batch_rows] = True
            batch_rows.clear(), batch_c.clear(), batch_d.clear()

    with Progress(total=n, desc="frames", unit="frame", enabled=progress) as bar:
        for i, img in enumerate(images):
            if img is not None:
                c, d = bb.preprocess(img)
                batch_rows.append(i), batch_c.append(c), batch_d.append(d)
                if len(batch_rows) == batch_size:
                    flush()
            bar.update(1)
        flush()
    if not valid.any():
        raise PredictError(f"{input_path}: none of its {n} frames could be decoded; is the file truncated or not a video/image?")
    out = predict_sequences(bundle, clip_out, dino_out, valid, np.array([0, n]), sequence_ids=[input_path.stem],
                            cache_dir=cache_dir, cfg=cfg, device=dev, progress=progress)
    ts = pl.Series("timestamp_s", timestamps if timestamps is not None else [None] * n, dtype=pl.Float64)
    return out.drop("sequence_id").insert_column(1, ts)
