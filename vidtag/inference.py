"""Two-stage inference (paper Fig. 5), written once: evaluation, ``vidtag predict`` and both training phases'
validation all call :class:`Locator`.

Phase I: frame embeddings -> top-1 over the gallery's GPS embeddings. Phase II: those GPS points'
embeddings -> GeoRefiner (with the frame embeddings as memory) -> refined embeddings -> GPS-to-GPS
retrieval against the same (unit-normalised) gallery embeddings -> final coordinates.

Choices the paper leaves open (recorded here and in the README):

* **Re-embedding the Phase I GPS.** The Phase I winners are gallery points, so their location-encoder
  embeddings are rows of the gallery embeddings; they are gathered, not recomputed. The GeoRefiner
  normalises its queries itself, so normalised rows are equivalent to raw ones.
* **One search index per (gallery, model)**, built on the device the work runs on, and reused for every
  batch and for both retrievals of Fig. 5.
* **Confidence** (per frame, in [0, 1]): the model's own probability that the truth lies within
  ``confidence_radius_km`` of the final prediction. The frame's Phase I (frame -> GPS) scores over its
  top-k gallery candidates become probabilities with the learned logit scale,
  ``p = softmax(exp(logit_scale) * cos)``, and the confidence is the mass of those candidates that
  lie within the radius of the final prediction. This is the visual evidence, the distribution that
  Phase I was trained to calibrate. GPS -> GPS scores after the GeoRefiner are not used: neighbouring
  grid points have near-identical embeddings there, so their mass is always ~1.
* **Unreadable frames are dropped** from their sequence, in training and here alike
  (vidtag.features.sequences): the model sees the readable frames in order, and TempGeo numbers them
  without gaps. A dropped frame then takes the prediction of the nearest readable frame in time (the
  earlier one on a tie), with confidence 0 and ``valid = False``. A sequence with no readable frame gets
  null coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidtag.device import resolve_device
from vidtag.errors import InferenceError
from vidtag.features.sequences import SequenceTable, padded_chunks, sequences_from_offsets
from vidtag.features.source import FeatureTensors
from vidtag.geo import haversine_km_torch
from vidtag.progress import progress as progress_bar
from vidtag.retrieval import GalleryIndex, gallery_embeddings, latlon_fingerprint, module_fingerprint

OUTPUT_COLUMNS = ("sequence_id", "frame_index", "lat", "lon", "phase1_lat", "phase1_lon", "confidence", "valid")


@dataclass(frozen=True)
class InferenceConfig:
    k: int = 256  # Phase I candidates per frame for the confidence softmax; paper silent (it only uses top-1)
    confidence_radius_km: float = 1.0  # mass within this of the prediction; 1 km = the paper's headline accuracy (Sec. 4.3)
    batch_frames: int = 8192  # padded frames per forward pass; sequences are grouped by length up to this
    backend: str = "auto"  # retrieval backend, see vidtag.retrieval.search
    gallery_batch: int = 8192  # gallery points per location-encoder forward when embedding the gallery


@dataclass
class Located:
    """Fig. 5's answer for every frame of a :class:`SequenceTable`, in the table's frame order."""

    rows: np.ndarray  # (M,) feature rows
    phase1: np.ndarray  # (M,) gallery index of the Phase I top-1
    final: np.ndarray | None  # (M,) gallery index after the GeoRefiner; None when not refined
    confidence: np.ndarray | None  # (M,) see the module docstring; None when not asked for
    # Phase I's top-K per frame when asked for (locate(top_k=K)): gallery index (M, K) and probability (M, K),
    # softmax(exp(logit_scale) * cos) over the frame's k candidates, best first.
    candidates: tuple[np.ndarray, np.ndarray] | None = None


@contextmanager
def _eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode inside, each module's own mode restored after (validation runs in the middle of training)."""
    live = [m for m in modules if m is not None]
    was = [m.training for m in live]
    for m in live:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(live, was):
            m.train(mode)


@torch.no_grad()
def embed_gallery(location_encoder: nn.Module, latlon_deg: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Unit-norm gallery embeddings (G, D) on the encoder's device, in eval mode, uncached: for a model that
    is still training (validation), where a disk cache would never be hit twice."""
    with _eval_mode(location_encoder):
        return torch.cat([F.normalize(location_encoder(c).float(), dim=-1) for c in latlon_deg.split(batch)])


class Locator:
    """Fig. 5 against one gallery: the model's parts and a search index built once over the gallery.

    ``refiner=None`` stops after Phase I (Phase I validation, and the Phase I columns of every output).
    """

    def __init__(self, frame_encoder: nn.Module, location_encoder: nn.Module, logit_scale: torch.Tensor, refiner: nn.Module | None,
                 gallery_latlon: np.ndarray, gallery_emb: torch.Tensor | np.ndarray, *, backend: str = "auto",
                 device: str | torch.device | None = "auto"):
        self.device = resolve_device(device)
        self.frame_encoder = frame_encoder.to(self.device)
        self.location_encoder = location_encoder
        self.refiner = None if refiner is None else refiner.to(self.device)
        self.scale = logit_scale.detach().float().exp().to(self.device)  # the learned temperature, a device scalar
        self.gallery_latlon = np.asarray(gallery_latlon, dtype=np.float64)  # (G, 2)
        if len(self.gallery_latlon) == 0:
            raise InferenceError("the gallery is empty; rebuild it (stage `gallery`)")
        gal = torch.as_tensor(gallery_emb).to(self.device, torch.float32)  # (G, D) unit
        if gal.shape[0] != len(self.gallery_latlon):
            raise InferenceError(f"gallery has {len(self.gallery_latlon)} points but {gal.shape[0]} embeddings")
        self.gallery_emb = gal
        self.gallery_latlon_t = torch.from_numpy(self.gallery_latlon).to(self.device)
        self.index = GalleryIndex.build(gal, backend, self.device)

    @classmethod
    def for_model(cls, frame_encoder, location_encoder, logit_scale, refiner, gallery_latlon, *, backend="auto", device="auto",
                  gallery_batch: int = 8192) -> Locator:
        """A locator for a model in training: the gallery embedded now, on the device, with the current weights."""
        dev = resolve_device(device)
        latlon = torch.as_tensor(np.asarray(gallery_latlon, dtype=np.float64), device=dev)
        emb = embed_gallery(location_encoder.to(dev), latlon, gallery_batch)
        return cls(frame_encoder, location_encoder, logit_scale, refiner, gallery_latlon, emb, backend=backend, device=dev)

    @classmethod
    def for_bundle(cls, bundle, gallery: np.ndarray | None = None, *, gallery_emb: np.ndarray | None = None,
                   cache_dir: str | Path | None = None, cfg: InferenceConfig = InferenceConfig(), device="auto") -> Locator:
        """A locator for a trained bundle; gallery embeddings cached under ``cache_dir`` per (model, gallery)."""
        if gallery is None:
            gallery = read_gallery_latlon(bundle.gallery_path)
        gallery = np.asarray(gallery, dtype=np.float64)
        if gallery_emb is None:
            gallery_emb = bundle_gallery_embeddings(bundle, gallery, cache_dir, cfg.gallery_batch)
        return cls(bundle.frame_encoder, bundle.location_encoder, bundle.logit_scale, bundle.refiner, gallery, gallery_emb,
                   backend=cfg.backend, device=device)

    @torch.no_grad()
    def locate(self, source, table: SequenceTable, *, k: int = 1, batch_frames: int = 8192,
               confidence_radius_km: float | None = None, progress: bool = False, top_k: int = 0) -> Located:
        """Fig. 5 for every frame of ``table``, whole sequences at a time, features gathered from ``source``
        (vidtag.features.source). ``k`` Phase I candidates feed the confidence (needs ``confidence_radius_km``);
        ``top_k`` > 0 also returns each frame's best ``top_k`` of them (``Located.candidates``)."""
        top_k = max(0, min(int(top_k), len(self.gallery_latlon)))
        k = max(1, top_k, min(int(k), len(self.gallery_latlon)))
        rows_out, p1_out, p2_out, conf_out, cand_out = [], [], [], [], []
        chunks = padded_chunks(table, batch_frames) if len(table) else []
        with _eval_mode(self.frame_encoder, self.refiner):
            for _, rows, pad in progress_bar(chunks, total=len(chunks), desc="inference", unit="batch", enabled=progress):
                rows, pad = rows.to(self.device), pad.to(self.device)
                clip, dino, _ = source.gather(rows)  # (B, T, Dc), (B, T, Dd)
                frame_emb = self.frame_encoder(clip, dino, pad)  # (B, T, D) unit
                keep = ~pad
                s1, i1 = self.index.search(frame_emb[keep].float(), k=k)  # (M, k) Phase I candidates, best first
                rows_out.append(rows[keep])
                p1_out.append(i1[:, 0])
                if top_k:
                    prob = torch.softmax(s1.float() * self.scale, dim=1)  # (M, k), as the confidence's
                    cand_out.append((i1[:, :top_k], prob[:, :top_k]))
                if self.refiner is None:  # Phase I only: its top-1 is the answer
                    if confidence_radius_km is not None:
                        conf_out.append(self._confidence(s1, i1, i1[:, 0], confidence_radius_km))
                    continue
                gps_emb = torch.zeros_like(frame_emb)
                gps_emb[keep] = self.gallery_emb[i1[:, 0]].to(gps_emb.dtype)  # (M, D) -> (B, T, D)
                refined = self.refiner(frame_emb, gps_emb, pad)  # (B, T, D) unit
                _, i2 = self.index.search(F.normalize(refined[keep].float(), dim=-1), k=1)  # (M, 1)
                p2_out.append(i2[:, 0])
                if confidence_radius_km is not None:
                    conf_out.append(self._confidence(s1, i1, i2[:, 0], confidence_radius_km))

        def cat(parts):
            return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.int64)
        cands = None
        if top_k:
            cands = (cat([i for i, _ in cand_out]).reshape(-1, top_k),
                     cat([p for _, p in cand_out]).astype(np.float64).reshape(-1, top_k))
        return Located(cat(rows_out), cat(p1_out), cat(p2_out) if self.refiner is not None else None,
                       cat(conf_out).astype(np.float64) if conf_out else None, cands)

    def _confidence(self, s1: torch.Tensor, i1: torch.Tensor, final: torch.Tensor, radius_km: float) -> torch.Tensor:
        """Phase I softmax mass (M,) of the candidates within ``radius_km`` of each final prediction."""
        prob = torch.softmax(s1.float() * self.scale, dim=1)  # (M, k)
        cand = self.gallery_latlon_t[i1]  # (M, k, 2)
        at = self.gallery_latlon_t[final][:, None, :]  # (M, 1, 2)
        near = haversine_km_torch(at[..., 0], at[..., 1], cand[..., 0], cand[..., 1]) <= radius_km  # (M, k)
        return (prob * near).sum(dim=1).clamp(0.0, 1.0)


def gallery_latlon(df: pl.DataFrame, path: str | Path = "gallery") -> np.ndarray:
    """(G, 2) float64 lat, lon of a gallery table (columns lat, lon)."""
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


def fill_from_nearest_valid(valid: np.ndarray, offsets: np.ndarray) -> np.ndarray:
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


def check_features(bundle, clip, dino, valid, offsets: np.ndarray, sequence_ids) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated (valid (N,), offsets (S + 1,), sequence ids) for features of N frames in S sequences."""
    n = int(clip.shape[0])
    offsets = np.asarray(offsets, dtype=np.int64)
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
    ids = [str(i) for i in range(n_seq)] if sequence_ids is None else [str(s) for s in sequence_ids]
    if len(ids) != n_seq:
        raise InferenceError(f"{len(ids)} sequence_ids for {n_seq} sequences")
    return valid, offsets, ids


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
    top_k: int = 0,
) -> pl.DataFrame:
    """Two-stage predictions for every frame of many sequences.

    clip (N, Dc), dino (N, Dd): features of N frames, sequences stored contiguously in time order; they are
    held as float16 on the device, as in the feature store, so the model sees what training saw.
    ``sequence_offsets`` (S + 1,): sequence s is rows ``offsets[s]:offsets[s+1]``; ``valid`` (N,) bool
    (None = all valid). ``gallery`` (G, 2) degrees defaults to the bundle's; ``gallery_emb`` its
    unit-norm embeddings (else embedded and cached under ``cache_dir``). Returns one row per frame,
    in input order: sequence_id, frame_index, lat, lon, phase1_lat, phase1_lon, confidence, valid; with
    ``top_k`` > 0 also ``candidates``, each frame's Phase I top-K (see :func:`candidates_column`).
    """
    dev = resolve_device(device)
    valid, offsets, ids = check_features(bundle, clip, dino, valid, sequence_offsets, sequence_ids)
    locator = Locator.for_bundle(bundle, gallery, gallery_emb=gallery_emb, cache_dir=cache_dir, cfg=cfg, device=dev)
    table = sequences_from_offsets(offsets, valid, ids)
    source = FeatureTensors.from_frames(np.asarray(clip), np.asarray(dino), dev)
    found = locator.locate(source, table, k=cfg.k, batch_frames=cfg.batch_frames,
                           confidence_radius_km=cfg.confidence_radius_km, progress=progress, top_k=top_k)
    out = frame_table(found, locator.gallery_latlon, valid, offsets, ids)
    return out.with_columns(candidates_column(found, locator.gallery_latlon, len(valid))) if top_k else out


def candidates_column(found: Located, gallery: np.ndarray, n: int) -> pl.Series:
    """``candidates`` (n,): per frame a list of ``{rank, lat, lon, score}``, rank 1 = the Phase I top-1, score its
    probability (:attr:`Located.candidates`); empty for a frame the model did not see (unreadable)."""
    idx, prob = found.candidates  # (M, K), (M, K)
    k = idx.shape[1]
    per_frame: list[list[dict]] = [[] for _ in range(n)]
    lat, lon = gallery[idx, 0], gallery[idx, 1]  # (M, K) each
    for row, la, lo, p in zip(found.rows.tolist(), lat.tolist(), lon.tolist(), prob.tolist()):
        per_frame[row] = [{"rank": r + 1, "lat": la[r], "lon": lo[r], "score": p[r]} for r in range(k)]
    dtype = pl.List(pl.Struct({"rank": pl.Int32, "lat": pl.Float64, "lon": pl.Float64, "score": pl.Float64}))
    return pl.Series("candidates", per_frame, dtype=dtype)


def frame_table(found: Located, gallery: np.ndarray, valid: np.ndarray, offsets: np.ndarray, sequence_ids: list[str]) -> pl.DataFrame:
    """One row per frame (``OUTPUT_COLUMNS``) from Fig. 5's answer; dropped frames take their nearest readable neighbour's."""
    n = len(valid)
    p1_idx = np.full(n, -1, np.int64)
    p2_idx = np.full(n, -1, np.int64)
    conf = np.zeros(n, np.float64)
    p1_idx[found.rows] = found.phase1
    p2_idx[found.rows] = found.final if found.final is not None else found.phase1
    if found.confidence is not None:
        conf[found.rows] = found.confidence
    src = fill_from_nearest_valid(p2_idx >= 0, offsets)
    has = src >= 0
    lat, lon, p1_lat, p1_lon = (np.full(n, np.nan) for _ in range(4))
    lat[has], lon[has] = gallery[p2_idx[src[has]]].T
    p1_lat[has], p1_lon[has] = gallery[p1_idx[src[has]]].T
    conf = np.where(valid & has, np.clip(conf, 0.0, 1.0), 0.0)
    lengths = np.diff(offsets)
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
