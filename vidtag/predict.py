"""`vidtag predict` on one input: decode a video (or read a folder of frames), extract features with the
bundle's own frozen backbones (Sec. 3.1), and locate every frame with Fig. 5 (vidtag.inference).

The steps are separate so that a caller predicting many inputs (``vidtag.api.Model``) builds the backbones
once, counts every input's frames up front for one progress bar, and reuses the gallery embeddings:
:func:`open_frames` (or :func:`frames_from_images`) -> :func:`predict_frames`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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
        # A model that reads no DINOv2 features (dino_dim 0: GeoCLIP) gets the CLIP tower alone.
        bb = build_backbones(cfg, device, dino=bundle.frame_encoder.cfg.dino_dim > 0)
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
    """The image as 8-bit RGB (EXIF orientation, 16-bit, palette and CMYK handled as in extraction), or None
    when it cannot be decoded or exceeds the pixel limit (then reported as an unreadable frame)."""
    from vidtag.features.dataset import load_rgb

    img, _ = load_rgb(str(path))
    return img


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


@dataclass
class Frames:
    """One input's frames, not yet decoded: ``images`` yields a PIL image, or None for an unreadable frame."""

    sequence_id: str  # the input's name (file stem), the predictions' sequence_id
    timestamps_s: np.ndarray | None  # (count,) seconds from the video's start; None for stills
    images: Iterator  # count items, decoded lazily
    count: int
    names: list[str] | None  # file names of a folder of frames
    source: str = ""  # what the frames came from, for messages (the input path)


def open_frames(input_path: str | Path, fps: float = 1.0) -> Frames:
    """A video file (sampled at ``fps`` on its timeline), an image, or a folder of frames in natural order;
    videos are probed here (frame count, timestamps) and decoded only as ``images`` is read."""
    input_path = Path(input_path)
    timestamps, images, n, names = _frames_of(input_path, fps)
    return Frames(input_path.stem, timestamps, images, n, names, str(input_path))


def frames_from_images(images: Iterable, sequence_id: str = "images") -> Frames:
    """In-memory PIL images (None = unreadable) as one sequence, in the given order, without timestamps."""
    images = list(images)
    for i, img in enumerate(images):
        if img is not None and not hasattr(img, "convert"):
            raise PredictError(f"images[{i}] is a {type(img).__name__}; expected a PIL image (or None for a missing frame)")
    return Frames(sequence_id, None, iter(images), len(images), None, f"{len(images)} images")


def frame_features(frames: Frames, bb, *, batch_size: int = 32, bar: Progress | None = None):
    """Backbone features of every frame: clip (n, Dc), dino (n, Dd) float32, valid (n,) bool.

    Rounded through float16 as the feature store holds them, so predict sees exactly what training saw."""
    n = frames.count
    clip_out = np.zeros((n, bb.dims[0]), np.float32)
    dino_out = np.zeros((n, bb.dims[1]), np.float32)
    valid = np.zeros(n, bool)
    batch_rows, batch_c, batch_d = [], [], []

    def flush():
        if batch_rows:
            d_in = torch.stack(batch_d) if bb.has_dino else None
            c, d = bb.encode(torch.stack(batch_c), d_in)  # (b, 3, S, S) -> (b, Dc), (b, Dd)
            clip_out[batch_rows] = c.half().float().cpu().numpy()
            dino_out[batch_rows] = d.half().float().cpu().numpy()
            valid[batch_rows] = True
            batch_rows.clear(), batch_c.clear(), batch_d.clear()

    for i, img in enumerate(frames.images):
        if i >= n:
            break
        if img is not None:
            c, d = bb.preprocess(img)
            batch_rows.append(i), batch_c.append(c), batch_d.append(d)
            if len(batch_rows) == batch_size:
                flush()
        if bar is not None:
            bar.update(1)
    flush()
    return clip_out, dino_out, valid


def predict_frames(
    frames: Frames,
    bundle,
    backbones,
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    cfg: InferenceConfig = InferenceConfig(),
    gallery: np.ndarray | None = None,
    gallery_emb: np.ndarray | None = None,
    top_k: int = 0,
    bar: Progress | None = None,
    progress: bool = False,
) -> pl.DataFrame:
    """Fig. 5 on one input's frames with ready backbones (see :func:`predict_input` for the columns).

    ``gallery`` (G, 2) degrees replaces the bundle's; ``gallery_emb`` its embeddings (else cached per
    (model, gallery) under ``cache_dir``). ``bar`` counts the frames (one bar over many inputs)."""
    dev = resolve_device(device)
    clip, dino, valid = frame_features(frames, backbones, batch_size=batch_size, bar=bar)
    n = frames.count
    if not valid.any():
        raise PredictError(f"{frames.source or frames.sequence_id}: none of its {n} frames could be decoded; "
                           "is the file truncated or not a video/image?")
    out = predict_sequences(bundle, clip, dino, valid, np.array([0, n]), gallery, sequence_ids=[frames.sequence_id],
                            timestamps_s=frames.timestamps_s, gallery_emb=gallery_emb, cache_dir=cache_dir, cfg=cfg,
                            device=dev, progress=progress, top_k=top_k)
    ts = frames.timestamps_s if frames.timestamps_s is not None else [None] * n
    return out.drop("sequence_id").insert_column(1, pl.Series("timestamp_s", ts, dtype=pl.Float64))


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
    backbones=None,
    gallery: np.ndarray | None = None,
    top_k: int = 0,
) -> pl.DataFrame:
    """Decode a video (sampled at ``fps``) or read a folder of frames, extract features with the
    bundle's backbones (``backbones``: already built ones), and run Fig. 5. One row per frame:
    frame_index, timestamp_s (PTS; null for a folder), lat, lon, phase1_lat, phase1_lon, confidence, valid,
    and with ``top_k`` > 0 ``candidates`` (each frame's Phase I top-K, vidtag.inference.candidates_column).
    """
    dev = resolve_device(device)
    frames = open_frames(input_path, fps)
    bb = backbones if backbones is not None else backbones_for_bundle(bundle, dev)
    with Progress(total=frames.count, desc="frames", unit="frame", enabled=progress) as bar:
        return predict_frames(frames, bundle, bb, device=dev, batch_size=batch_size, cache_dir=cache_dir, cfg=cfg,
                              gallery=gallery, top_k=top_k, bar=bar, progress=progress)
