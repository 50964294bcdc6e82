"""Two-stage inference (paper Fig. 5) over many sequences at once, and ``predict`` on one video.

Phase I: frame embeddings -> top-1 over the gallery's GPS embeddings. Phase II: those GPS points'
embeddings -> GeoRefiner (with the frame embeddings as memory) -> refined embeddings -> GPS-to-GPS
retrieval against the same (unit-normalised) gallery embeddings -> final coordinates.

Choices the paper leaves open (recorded here and in the README):

* **Re-embedding the Phase I GPS.** The Phase I winners are gallery points, so their location-encoder
  embeddings are rows of the cached gallery embeddings; they are gathered, not recomputed. The
  GeoRefiner normalises its queries itself, so normalised rows are equivalent to raw ones.
* **Confidence** (per frame, in [0, 1]): the model's own probability that the truth lies within
  ``confidence_radius_km`` of the final prediction. The frame's Phase I (frame -> GPS) scores over its
  top-k gallery candidates become probabilities with the learned logit scale,
  ``p = softmax(exp(logit_scale) * cos)``, and the confidence is the mass of those candidates that
  lie within the radius of the final prediction. This is the visual evidence, the distribution that
  Phase I was trained to calibrate. GPS -> GPS scores after the GeoRefiner are not used: neighbouring
  grid points have near-identical embeddings there, so their mass is always ~1. A frame whose
  evidence is spread over several places, or whose prediction the GeoRefiner moved away from it,
  reads low.
* **Invalid frames** (unreadable images, masked in the feature store): excluded from TempGeo and the
  GeoRefiner through the padding mask, so they do not pollute their neighbours; they then take the
  prediction of the nearest valid frame in time (the earlier one on a tie), with confidence 0 and
  ``valid = False``. A sequence with no valid frame gets null coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from vidtag.device import resolve_device
from vidtag.geo import haversine_km
from vidtag.retrieval import GalleryIndex, gallery_embeddings, latlon_fingerprint, module_fingerprint

OUTPUT_COLUMNS = ("sequence_id", "frame_index", "lat", "lon", "phase1_lat", "phase1_lon", "confidence", "valid")


class InferenceError(ValueError):
    """Inputs that do not fit the model or each other (shapes, offsets, empty gallery)."""


@dataclass(frozen=True)
class InferenceConfig:
    k: int = 256  # Phase I candidates per frame for the confidence softmax; paper silent (it only uses top-1)
    confidence_radius_km: float = 1.0  # mass within this of the prediction; 1 km = the paper's headline accuracy (Sec. 4.3)
    batch_frames: int = 8192  # padded frames per forward pass; sequences are grouped by length up to this
    backend: str = "auto"  # retrieval backend, see vidtag.retrieval.search
    gallery_batch: int = 8192  # gallery points per location-encoder forward when embedding the gallery


def gallery_latlon(df: pl.DataFrame, path: str | Path = "gallery") -> np.ndarray:
    """(G, 2) float64 lat, lon of a gallery table (DESIGN.md: columns lat, lon)."""
    if df.height == 0:
        raise InferenceError(f"gallery {path} is empty; rebuild it (stage `gallery`)")
    return df.select(pl.col("lat").cast(pl.Float64), pl.col("lon").cast(pl.Float64)).to_numpy()


def read_gallery_latlon(path: str | Path) -> np.ndarray:
    """(G, 2) lat, lon of a gallery file, read through vidtag.gallery (which refuses an altered file)."""
    from vidtag.gallery import read_gallery

    return gallery_latlon(read_gallery(path)[0], path)


def bundle_gallery_embeddings(bundle, latlon: np.ndarray, cache_dir: str | Path | None, batch: int = 8192) -> np.ndarray:
    """The bundle's gallery embeddings (G, 512), unit-norm, cached under ``cache_dir`` per (model, gallery)."""
    key = f"{module_fingerprint(bundle.location_encoder)[:16]}-{latlon_fingerprint(latlon)[:16]}"
    return gallery_embeddings(bundle.location_encoder, latlon, cache_dir, key=key, batch_size=batch)


def _length_groups(lengths: np.ndarray, batch_frames: int) -> list[np.ndarray]:
    """Sequence indices grouped by similar length so each group's B * T_max stays near ``batch_frames``."""
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * lengths[order[stop]] <= batch_frames:
            stop += 1
        groups.append(order[start:stop])
        start = stop
    return groups


def _fill_from_nearest_valid(valid: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each row, the row (same sequence) of the nearest valid frame in time; -1 where none."""
    n = len(valid)
    src = np.full(n, -1, dtype=np.int64)
    idx = np.arange(n)
    seq = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    # previous / next valid row, searched within the sequence
    prev = np.where(valid, idx, -1)
    prev = np.maximum.accumulate(prev) if n else prev
    nxt = np.where(valid, idx, n)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1] if n else nxt
    prev_ok = (prev >= 0) & (seq[np.clip(prev, 0, n - 1)] == seq)
    next_ok = (nxt < n) & (seq[np.clip(nxt, 0, n - 1)] == seq)
    d_prev = np.where(prev_ok, idx - prev, np.iinfo(np.int64).max)
    d_next = np.where(next_ok, nxt - idx, np.iinfo(np.int64).max)
    take_prev = prev_ok & (d_prev <= d_next)
    src[take_prev] = prev[take_prev]
    take_next = ~take_prev & next_ok
    src[take_next] = nxt[take_next]
    return src


@torch.no_grad()
def predict_sequences(
    bundle,
    clip: np.ndarray,
    dino: np.ndarray,
    valid: np.ndarray | None,
    sequence_offsets: np.ndarray,
    gallery: np.ndarray | None = None,
    *,
    sequence_ids=None,
    gallery_emb: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    cfg: InferenceConfig = InferenceConfig(),
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> pl.DataFrame:
    """Two-stage predictions for every frame of many sequences.

    clip (N, Dc), dino (N, Dd): features of N frames, sequences stored contiguously in time order;
    ``sequence_offsets`` (S + 1,): sequence s is rows ``offsets[s]:offsets[s+1]``; ``valid`` (N,) bool
    (None = all valid). ``gallery`` (G, 2) degrees defaults to the bundle's; ``gallery_emb`` its
    unit-norm embeddings (else embedded and cached under ``cache_dir``). Returns one row per frame,
    in input order: sequence_id, frame_index, lat, lon, phase1_lat, phase1_lon, confidence, valid.
    """
    dev = resolve_device(device)
    clip = np.asarray(clip)
    dino = np.asarray(dino)
    n = clip.shape[0]
    offsets = np.asarray(sequence_offsets, dtype=np.int64)
    if dino.shape[0] != n:
        raise InferenceError(f"clip has {n} rows but dino has {dino.shape[0]}; they must describe the same frames")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise InferenceError(f"sequence_offsets must rise from 0 to the number of frames ({n}); found {offsets[:5]}...{offsets[-2:]}")
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != (n,):
        raise InferenceError(f"valid must have one flag per frame ({n}); found shape {valid.shape}")
    dims = (bundle.frame_encoder.cfg.clip_dim, bundle.frame_encoder.cfg.dino_dim)
    if (clip.shape[1], dino.shape[1]) != dims:
        raise InferenceError(
            f"features are ({clip.shape[1]}, {dino.shape[1]})-d but the model expects {dims} (clip, dino); "
            "extract features with the backbones named in the bundle's config.json"
        )
    n_seq = len(offsets) - 1
    lengths = np.diff(offsets)
    if sequence_ids is None:
        sequence_ids = [str(i) for i in range(n_seq)]
    if len(sequence_ids) != n_seq:
        raise InferenceError(f"{len(sequence_ids)} sequence_ids for {n_seq} sequences")
    if gallery is None:
        gallery = read_gallery_latlon(bundle.gallery_path)
    gallery = np.asarray(gallery, dtype=np.float64)
    if gallery_emb is None:
        gallery_emb = bundle_gallery_embeddings(bundle, gallery, cache_dir, cfg.gallery_batch)
    if gallery_emb.shape[0] != gallery.shape[0]:
        raise InferenceError(f"gallery has {gallery.shape[0]} points but {gallery_emb.shape[0]} embeddings")
    k = max(1, min(cfg.k, gallery.shape[0]))
    index = GalleryIndex.build(gallery_emb, cfg.backend, dev)
    gal_t = torch.from_numpy(np.ascontiguousarray(gallery_emb, np.float32)).to(dev)  # (G, 512) unit
    scale = float(bundle.logit_scale.detach().float().exp())

    for m in (bundle.frame_encoder, bundle.location_encoder, bundle.refiner):
        m.to(dev).eval()

    p1_idx = np.full(n, -1, np.int64)
    p2_idx = np.full(n, -1, np.int64)
    conf = np.zeros(n, np.float64)
    n_valid = np.concatenate([[0], np.cumsum(valid)])
    has_valid = (n_valid[offsets[1:]] - n_valid[offsets[:-1]]) > 0  # (S,)
    groups = _length_groups(lengths[has_valid], cfg.batch_frames)
    seq_of_group = np.flatnonzero(has_valid)
    iterator = groups
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(groups, desc="inference", unit="batch", leave=False, dynamic_ncols=True)
    for group in iterator:
        seqs = seq_of_group[group]
        width = int(lengths[seqs].max())
        pos = np.arange(width)
        rows = offsets[seqs][:, None] + pos[None, :]  # (B, T) feature rows
        inside = pos[None, :] < lengths[seqs][:, None]  # (B, T)
        rows = np.where(inside, rows, 0)
        use = inside & valid[rows]  # (B, T) frames the model sees
        c = torch.from_numpy(np.where(use[..., None], clip[rows], 0).astype(np.float32)).to(dev)  # (B, T, Dc)
        d = torch.from_numpy(np.where(use[..., None], dino[rows], 0).astype(np.float32)).to(dev)  # (B, T, Dd)
        pad = torch.from_numpy(~use).to(dev)  # (B, T) True = ignore
        frame_emb = bundle.frame_encoder(c, d, pad)  # (B, T, 512) unit
        use_t = ~pad
        q1 = frame_emb[use_t]  # (M, 512)
        s1, i1 = index.search(q1, k=k)  # (M, k): Phase I candidates, top-1 first
        gps_emb = torch.zeros_like(frame_emb)
        gps_emb[use_t] = gal_t[i1[:, 0].to(dev)]  # (M, 512) -> scattered to (B, T, 512)
        refined = bundle.refiner(frame_emb, gps_emb, pad)  # (B, T, 512) unit
        _, i2 = index.search(F.normalize(refined[use_t].float(), dim=-1), k=1)  # (M, 1)
        out_rows = rows[use]
        i1_np = i1.cpu().numpy()
        p1_idx[out_rows] = i1_np[:, 0]
        final = i2.cpu().numpy()[:, 0]
        p2_idx[out_rows] = final
        prob = torch.softmax(s1.float() * scale, dim=1).cpu().numpy()  # (M, k) Phase I evidence
        cand = gallery[i1_np]  # (M, k, 2)
        near = haversine_km(gallery[final, None, 0], gallery[final, None, 1], cand[..., 0], cand[..., 1]) <= cfg.confidence_radius_km
        conf[out_rows] = (prob * near).sum(axis=1)

    src = _fill_from_nearest_valid(p2_idx >= 0, offsets)
    has = src >= 0
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    p1_lat = np.full(n, np.nan)
    p1_lon = np.full(n, np.nan)
    lat[has], lon[has] = gallery[p2_idx[src[has]]].T
    p1_lat[has], p1_lon[has] = gallery[p1_idx[src[has]]].T
    conf = np.where(valid & has, np.clip(conf, 0.0, 1.0), 0.0)
    seq_col = np.repeat(np.asarray(sequence_ids, dtype=object), lengths)
    frame_index = (np.arange(n) - np.repeat(offsets[:-1], lengths)).astype(np.int32)

    def col(x):
        return pl.Series(x, dtype=pl.Float64).fill_nan(None)

    return pl.DataFrame(
        {
            "sequence_id": pl.Series(seq_col.tolist(), dtype=pl.String),
            "frame_index": frame_index,
            "lat": col(lat),
            "lon": col(lon),
            "phase1_lat": col(p1_lat),
            "phase1_lon": col(p1_lon),
            "confidence": conf,
            "valid": valid & has,
        }
    )


def offsets_from_sequence_ids(sequence_ids) -> tuple[np.ndarray, list[str]]:
    """Offsets (S + 1,) and the ids of runs of equal consecutive ids (a manifest sorted by sequence)."""
    ids = np.asarray(sequence_ids, dtype=object)
    if len(ids) == 0:
        return np.zeros(1, np.int64), []
    change = np.ones(len(ids), bool)
    change[1:] = ids[1:] != ids[:-1]
    starts = np.flatnonzero(change)
    return np.append(starts, len(ids)).astype(np.int64), [str(s) for s in ids[starts]]



# --------------------------------------------------------------------------------------------
# predict: one video file or one folder of frames -> per-frame coordinates


class PredictError(RuntimeError):
    """A video or folder that cannot be predicted, or a bundle whose backbones cannot be rebuilt."""


def backbones_for_bundle(bundle, device: torch.device):
    """Rebuild the frozen backbones named in the bundle and check they are the ones it was trained on."""
    from vidtag.features.backbones import BackboneConfig, BackboneError, build_backbones

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


def _frames_of(input_path: Path, fps: float):
    """(timestamps_s or None, iterator of PIL | None, count) for a video file or a folder of frames."""
    from PIL import Image

    if input_path.is_dir():
        from vidtag.data.frames import IMAGE_EXTENSIONS, list_frames

        names = list_frames(input_path)
        if not names:
            raise PredictError(f"{input_path} holds no frames; expected image files ({', '.join(IMAGE_EXTENSIONS)})")

        def images():
            for name in names:
                try:
                    with Image.open(input_path / name) as im:
                        yield im.convert("RGB")
                except (OSError, ValueError):
                    yield None

        return None, images(), len(names), names
    if not input_path.exists():
        raise PredictError(f"{input_path} does not exist; expected a video file or a folder of frames")
    from vidtag.data.manifest import ManifestError
    from vidtag.data.video import frame_times, read_video_frames, sample_frame_times

    try:
        times, start = frame_times(input_path)
    except ManifestError as e:
        raise PredictError(str(e)) from None
    targets = sample_frame_times(times, fps, start_s=float(times[0]))

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
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="frames", unit="frame", leave=False, dynamic_ncols=True)
    batch_rows, batch_c, batch_d = [], [], []

    def flush():
        if batch_rows:
            c, d = bb.encode(torch.stack(batch_c), torch.stack(batch_d))  # (b, 3, S, S) -> (b, Dc), (b, Dd)
            # Round through float16 as the feature store does, so predict sees exactly what training saw.
            clip_out[batch_rows] = c.half().float().cpu().numpy()
            dino_out[batch_rows] = d.half().float().cpu().numpy()
            valid[batch_rows] = True
            batch_rows.clear(), batch_c.clear(), batch_d.clear()

    for i, img in enumerate(images):
        if img is not None:
            c, d = bb.preprocess(img)
            batch_rows.append(i), batch_c.append(c), batch_d.append(d)
            if len(batch_rows) == batch_size:
                flush()
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    if not valid.any():
        raise PredictError(f"{input_path}: none of its {n} frames could be decoded; is the file truncated or not a video/image?")
    out = predict_sequences(bundle, clip_out, dino_out, valid, np.array([0, n]), sequence_ids=[input_path.stem],
                            cache_dir=cache_dir, cfg=cfg, device=dev, progress=progress)
    ts = pl.Series("timestamp_s", timestamps if timestamps is not None else [None] * n, dtype=pl.Float64)
    return out.drop("sequence_id").insert_column(1, ts)
