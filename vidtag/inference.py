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

Beyond the paper (App. L), on request, after each of the two retrievals:

* **Candidates**: each frame keeps its top-K gallery points (``top_k``) with their cosine scores and
  probabilities ``softmax(exp(logit_scale) * cos)`` over the K, the model's own temperature
  (:class:`Candidates`, one per stage in ``Located.candidates``). The confidence keeps its own, larger
  ``k``: it is a mass over many candidates, while decoding costs O(K^2) per frame.
* **Local refinement** (``vidtag.refine``): the best candidates move to the best point of a fine lattice
  in their gallery cell, scored against the same query (the frame embedding for Phase I, the GeoRefiner's
  output for the final retrieval). They keep retrieval's ranking and scores unless ``refine_rerank``.
* **Temporal decoding** (``vidtag.decode``): Viterbi over the candidates of whole sequences picks the
  jointly best path; the transition scale comes from the frames' timestamps where known, else from a step
  scale (``step_km``), never below the gallery's spacing (refinement moves candidates within their cells only,
  so cells still compete at that resolution), with a dead zone of one scale (``vidtag.decode``). The GeoRefiner still reads the Phase I top-1 (Fig. 5), so the Phase I and final
  lattices are decoded independently and the argmax and Viterbi answers come from one pass.
  The confidence is measured around the answer that is reported (decoded or not).

Beyond the paper, on the toy world's evidence (README "Trajectory shape"):

* **Per-frame expert** (``vidtag.models.frame_expert``, ``expert_weight`` > 0 and a bundle that has one): both
  retrievals score a gallery point by the main model's logit plus ``expert_weight`` times the expert's, a
  product of their distributions. The index holds each gallery point's two embeddings side by side, scaled
  by 1/sqrt(2) (the unit vector of the pair, so local refinement embeds lattice points the same way); the
  query is sqrt(2) [q, r q'] with r = expert_weight exp(s') / exp(s), so a candidate's score is
  ``cos(q, g) + r cos(q', g')`` in the main model's cosine units and its temperature still applies.
* **Temporal median smoothing** (``smooth_frames`` > 0, ``vidtag.smoothing``): each retrieval's answer (its
  top-1, or the decoded path) becomes the spherical median of the answers within +-smooth_frames frames.
  The GeoRefiner's queries are the smoothed Phase I top-1, re-embedded by the location encoder.

Any video length in bounded memory (``vidtag.windows``): TempGeo and the GeoRefiner attend over whole
sequences, so a sequence longer than ``window_frames`` runs through both window by window (overlapping,
each frame's output from its most central window), while retrieval, the candidates, refinement and Viterbi
still see the whole sequence (their memory is linear in its length). The GeoRefiner's queries are the
Phase I top-1 of the stitched whole-sequence frame embeddings. Sequences of at most ``window_frames``
frames (every MSLS sequence at the default) run whole, exactly as without windows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidtag.decode import DECODE_METHODS, DecodeConfig, DecodeError, emissions_from_scores, transition_scales_km, viterbi
from vidtag.device import resolve_device
from vidtag.errors import InferenceError
from vidtag.features.sequences import SequenceTable, padded_chunks, sequences_from_offsets
from vidtag.features.source import FeatureTensors
from vidtag.geo import haversine_km_torch
from vidtag.models.frame_expert import ConcatLocationEncoder
from vidtag.progress import progress as progress_bar
from vidtag.refine import LocalRefiner, RefineConfig, gallery_spacing_km
from vidtag.retrieval import GalleryIndex, embed_locations_tensor, gallery_embeddings, latlon_fingerprint, module_fingerprint
from vidtag.smoothing import smooth_tracks
from vidtag.windows import DEFAULT_WINDOW_FRAMES, DEFAULT_WINDOW_OVERLAP, WindowPlan, check_window, plan_windows

OUTPUT_COLUMNS = ("sequence_id", "frame_index", "lat", "lon", "phase1_lat", "phase1_lon", "confidence", "valid")


def check_expert_and_smoothing(expert_weight, smooth_frames) -> None:
    """One clear error for a bad ``expert_weight`` (finite, >= 0) or ``smooth_frames`` (integer >= 0); None passes
    (the bundle's setting, :func:`bundle_settings`)."""
    w = 0 if expert_weight is None else expert_weight
    smooth_frames = 0 if smooth_frames is None else smooth_frames
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
        raise InferenceError(f"expert_weight must be a finite number >= 0; found {expert_weight!r}")
    if isinstance(smooth_frames, bool) or not isinstance(smooth_frames, int) or smooth_frames < 0:
        raise InferenceError(f"smooth_frames must be an integer >= 0; found {smooth_frames!r}")


def bundle_settings(bundle, cfg: InferenceConfig) -> InferenceConfig:
    """``cfg`` with its None settings taken from the bundle: the ``inference`` settings `evaluate` recorded in it
    (so `vidtag predict` answers as the evaluation did), else 0."""
    recorded = (getattr(bundle, "config", None) or {}).get("inference") or {}
    w = cfg.expert_weight if cfg.expert_weight is not None else recorded.get("expert_weight", 0.0)
    n = cfg.smooth_frames if cfg.smooth_frames is not None else recorded.get("smooth_frames", 0)
    if getattr(bundle, "expert", None) is None and cfg.expert_weight is None:
        w = 0.0  # a recorded weight needs the expert; a bundle without one answers as Fig. 5
    check_expert_and_smoothing(w, n)
    return replace(cfg, expert_weight=float(w), smooth_frames=int(n))


@dataclass(frozen=True)
class InferenceConfig:
    k: int = 256  # Phase I candidates per frame for the confidence softmax; paper silent (it only uses top-1)
    confidence_radius_km: float = 1.0  # mass within this of the prediction; 1 km = the paper's headline accuracy (Sec. 4.3)
    batch_frames: int = 8192  # padded frames per forward pass; sequences are grouped by length up to this
    backend: str = "auto"  # retrieval backend, see vidtag.retrieval.search
    gallery_batch: int = 8192  # gallery points per location-encoder forward when embedding the gallery
    # Beyond the paper (see the module docstring); the defaults are Fig. 5 as published.
    decode: str = "argmax"  # argmax: each frame its own top-1 (Fig. 5) | viterbi: jointly best path (vidtag.decode)
    top_k: int = 64  # candidates per frame that decoding and refinement work on
    max_speed_kmh: float = 130.0  # frames with timestamps: a move at this speed costs one nat (vidtag.decode)
    step_km: float | None = None  # frames without timestamps: transition scale per frame step (decode.step_scale_km)
    transition_weight: float = 1.0  # multiplies the log transitions; 0 = argmax
    refine: bool = False  # refine the best candidates on a fine local lattice (vidtag.refine)
    refine_step_km: float = 0.05  # the lattice's spacing
    refine_radius_km: float | None = None  # half-width searched around a candidate; None = half the gallery spacing
    refine_k: int = 8  # candidates refined per frame
    refine_rerank: bool = False  # True: refined candidates re-sorted by their refined scores (vidtag.refine)
    # None = what the bundle records from its evaluation (config.json "inference"), else 0 (Fig. 5)
    expert_weight: float | None = None  # weight of the per-frame expert's logits in both retrievals (needs a bundle with one)
    smooth_frames: int | None = None  # temporal median of each retrieval's answers over +-this many frames (0 = off)
    # Long videos (vidtag.windows): TempGeo and the GeoRefiner run on windows of this many frames; 0 = whole sequences.
    window_frames: int = DEFAULT_WINDOW_FRAMES  # 512 > MSLS's longest sequence (494): short videos run whole, as before
    window_overlap: int = DEFAULT_WINDOW_OVERLAP  # frames shared by consecutive windows (context at the seams)

    def __post_init__(self):
        if self.decode not in DECODE_METHODS:
            raise InferenceError(f"decode must be one of {DECODE_METHODS}; found {self.decode!r}")
        if int(self.top_k) < 1:
            raise InferenceError(f"top_k must be >= 1; found {self.top_k}")
        check_expert_and_smoothing(self.expert_weight, self.smooth_frames)
        check_window(self.window_frames, self.window_overlap)

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(step_km=self.step_km, max_speed_kmh=self.max_speed_kmh, transition_weight=self.transition_weight)

    def refine_config(self) -> RefineConfig | None:
        if not self.refine:
            return None
        return RefineConfig(step_km=self.refine_step_km, radius_km=self.refine_radius_km, top=self.refine_k, rerank=self.refine_rerank)


@dataclass
class Candidates:
    """One retrieval's top-K per frame, best score first: the lattice temporal decoding runs on."""

    latlon: np.ndarray  # (M, K, 2) float64 degrees
    score: np.ndarray  # (M, K) float32 cosine similarity to the frame's query
    prob: np.ndarray  # (M, K) float64 softmax(exp(logit_scale) * score) over the K: the decoder's emissions
    index: np.ndarray  # (M, K) int64 gallery row; -1 for a point local refinement found between gallery points
    path: np.ndarray | None = None  # (M,) int64 column the Viterbi path takes; None when not decoded

    def answer(self, decoded: bool = True) -> np.ndarray:
        """(M, 2) degrees: the decoded path's candidate (when decoded and ``decoded``), else the best one."""
        col = self.path if decoded and self.path is not None else np.zeros(len(self.latlon), np.int64)
        return self.latlon[np.arange(len(self.latlon)), col]


@dataclass
class Located:
    """Fig. 5's answer for every frame of a :class:`SequenceTable`, in the table's frame order."""

    rows: np.ndarray  # (M,) feature rows
    phase1: np.ndarray  # (M,) gallery index of the Phase I top-1
    final: np.ndarray | None  # (M,) gallery index after the GeoRefiner; None when not refined
    confidence: np.ndarray | None  # (M,) see the module docstring; None when not asked for
    # Per stage ("phase1", "final") when asked for (locate(top_k=K)): each frame's candidates, refined and
    # decoded as requested. Empty otherwise.
    candidates: dict[str, Candidates] = field(default_factory=dict)
    n_refined_points: int = 0  # fine-lattice points the location encoder embedded (vidtag.refine)
    # With smoothing (locate(smooth_frames=N)): per stage, the smoothed answers (M, 2) of the best candidate ("best"),
    # of the decoded path ("decoded", when decoded) and of the gallery top-1 before refinement ("gallery", when refined).
    smoothed: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def latlon(self, stage: str, gallery: np.ndarray, decoded: bool = True) -> np.ndarray:
        """(M, 2) degrees: the answer of ``stage`` ("phase1" | "final"): smoothed where smoothing ran; else from
        its candidates where kept (decoded path or best, refined when refinement ran), else Fig. 5's gallery top-1."""
        if stage in self.smoothed:
            per = self.smoothed[stage]
            return per["decoded" if decoded and "decoded" in per else "best"]
        if stage in self.candidates:
            return self.candidates[stage].answer(decoded)
        idx = self.phase1 if stage == "phase1" else self.final
        if idx is None:
            raise InferenceError(f"no {stage!r} answer: this locator stops after Phase I")
        return np.asarray(gallery)[idx]

    def before_refinement(self) -> Located:
        """The same answers as Fig. 5's gallery top-1 would give them, before local refinement (smoothed where
        smoothing ran): what refinement is compared against."""
        smoothed = {stage: {"best": per.get("gallery", per["best"])} for stage, per in self.smoothed.items()}
        return replace(self, candidates={}, smoothed=smoothed)


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


class Locator:
    """Fig. 5 against one gallery: the model's parts and a search index built once over the gallery.

    ``refiner=None`` stops after Phase I (Phase I validation, and the Phase I columns of every output).
    """

    def __init__(self, frame_encoder: nn.Module, location_encoder: nn.Module, logit_scale: torch.Tensor, refiner: nn.Module | None,
                 gallery_latlon: np.ndarray, gallery_emb: torch.Tensor | np.ndarray, *, backend: str = "auto",
                 device: str | torch.device | None = "auto", expert: nn.Module | None = None, expert_weight: float = 0.0):
        """``gallery_emb``: (G, D) unit embeddings of the main location encoder; with an ``expert`` and
        ``expert_weight`` > 0, (G, 2D) the pair's (``ConcatLocationEncoder`` normalised, module docstring)."""
        check_expert_and_smoothing(expert_weight, 0)
        self.device = resolve_device(device)
        self.frame_encoder = frame_encoder.to(self.device)
        self.location_encoder = location_encoder  # the GeoRefiner's: it re-embeds corrected and smoothed GPS
        self.expert = expert.to(self.device) if expert is not None and expert_weight > 0 else None
        # what candidates are scored against: the gallery index and local refinement's lattices
        self.search_encoder = location_encoder if self.expert is None else ConcatLocationEncoder(location_encoder, self.expert.location_encoder)
        self.refiner = None if refiner is None else refiner.to(self.device)
        self.scale = logit_scale.detach().float().exp().to(self.device)  # the learned temperature, a device scalar
        self.logit_scale = logit_scale.detach().double().cpu()  # its log, for the decoder's emissions
        self.gallery_latlon = np.asarray(gallery_latlon, dtype=np.float64)  # (G, 2)
        if len(self.gallery_latlon) == 0:
            raise InferenceError("the gallery is empty; rebuild it (stage `gallery`)")
        gal = torch.as_tensor(gallery_emb).to(self.device, torch.float32)  # (G, D) unit, or (G, 2D) with the expert
        if gal.shape[0] != len(self.gallery_latlon):
            raise InferenceError(f"gallery has {len(self.gallery_latlon)} points but {gal.shape[0]} embeddings")
        self.index = GalleryIndex.build(gal, backend, self.device)
        if self.expert is not None:
            d = gal.shape[1] // 2
            self.expert_ratio = float(expert_weight) * float(self.expert.logit_scale.detach().float().exp()) / float(self.scale)
            gal = F.normalize(gal[:, :d], dim=-1)  # the main model's own embeddings: the GeoRefiner's queries
        self.gallery_emb = gal
        self.gallery_latlon_t = torch.from_numpy(self.gallery_latlon).to(self.device)

    @classmethod
    def for_model(cls, frame_encoder, location_encoder, logit_scale, refiner, gallery_latlon, *, backend="auto", device="auto",
                  gallery_batch: int = 8192) -> Locator:
        """A locator for a model in training: the gallery embedded now, on the device, with the current weights."""
        dev = resolve_device(device)
        latlon = torch.as_tensor(np.asarray(gallery_latlon, dtype=np.float64), device=dev)
        emb = embed_locations_tensor(location_encoder.to(dev), latlon, gallery_batch)  # uncached: the model is training
        return cls(frame_encoder, location_encoder, logit_scale, refiner, gallery_latlon, emb, backend=backend, device=dev)

    @classmethod
    def for_bundle(cls, bundle, gallery: np.ndarray | None = None, *, gallery_emb: np.ndarray | None = None,
                   cache_dir: str | Path | None = None, cfg: InferenceConfig = InferenceConfig(), device="auto") -> Locator:
        """A locator for a trained bundle; gallery embeddings cached under ``cache_dir`` per (model, gallery)."""
        if gallery is None:
            if bundle.gallery_path is None:
                raise InferenceError("this model bundle carries no gallery (a trained model before `evaluate` packs one); "
                                     "pass a gallery file (--gallery FILE, gallery=...)")
            gallery = read_gallery_latlon(bundle.gallery_path)
        gallery = np.asarray(gallery, dtype=np.float64)
        cfg = bundle_settings(bundle, cfg)
        expert = None
        if cfg.expert_weight > 0:
            expert = getattr(bundle, "expert", None)
            if expert is None:
                raise InferenceError(f"expert_weight {cfg.expert_weight} needs a model with a per-frame expert (train with "
                                     "phase1.frame_expert: true); this bundle has none: set the weight to 0")
        if gallery_emb is None:
            gallery_emb = bundle_gallery_embeddings(bundle, gallery, cache_dir, cfg.gallery_batch, with_expert=expert is not None)
        return cls(bundle.frame_encoder, bundle.location_encoder, bundle.logit_scale, bundle.refiner, gallery, gallery_emb,
                   backend=cfg.backend, device=device, expert=expert, expert_weight=cfg.expert_weight)

    def spacing_km(self) -> float:
        """The gallery's resolution (median nearest-neighbour distance), measured once: refinement's default cell."""
        if getattr(self, "_spacing_km", None) is None:
            self._spacing_km = gallery_spacing_km(self.gallery_latlon)
        return self._spacing_km

    def local_refiner(self, cfg: RefineConfig) -> LocalRefiner:
        """A refiner for one run (its cache of fine-lattice embeddings lives as long as it does)."""
        radius_km = cfg.radius_km if cfg.radius_km is not None else 0.5 * self.spacing_km()
        return LocalRefiner(self.search_encoder, cfg, radius_km, device=self.device)

    @torch.no_grad()
    def locate(self, source, table: SequenceTable, *, k: int = 1, batch_frames: int = 8192,
               confidence_radius_km: float | None = None, progress: bool = False, top_k: int = 0,
               decode: DecodeConfig | None = None, refine: RefineConfig | None = None,
               timestamp_s: np.ndarray | None = None, confidence_decoded: bool = True,
               window_frames: int = DEFAULT_WINDOW_FRAMES, window_overlap: int = DEFAULT_WINDOW_OVERLAP,
               smooth_frames: int = 0) -> Located:
        """Fig. 5 for every frame of ``table``, whole sequences at a time, features gathered from ``source``
        (vidtag.features.source). ``k`` Phase I candidates feed the confidence (needs ``confidence_radius_km``).
        TempGeo and the GeoRefiner see sequences longer than ``window_frames`` window by window
        (vidtag.windows; 0 = whole sequences, attention memory ~ T^2); everything else sees whole sequences.

        ``top_k`` > 0 keeps each frame's best ``top_k`` candidates of both retrievals (``Located.candidates``);
        ``refine`` refines them (vidtag.refine), ``decode`` runs Viterbi over them (vidtag.decode) with
        ``timestamp_s`` (N,) per feature row (NaN = unknown) for the transition scale. The confidence is
        measured around the decoded final answer, or around the best candidate with ``confidence_decoded=False``.
        ``smooth_frames`` > 0 smooths every answer over +-that many frames (module docstring; ``Located.smoothed``).
        """
        n_gallery = len(self.gallery_latlon)
        check_window(window_frames, window_overlap)
        check_expert_and_smoothing(0, smooth_frames)
        if (decode is not None or refine is not None) and top_k < 1:
            raise InferenceError("decoding and refinement work on candidates: give top_k >= 1")
        top_k = max(0, min(int(top_k), n_gallery))
        k = max(1, min(int(k), n_gallery))
        k_search = max(k, top_k)  # one search serves the confidence and the candidates
        local = self.local_refiner(refine) if refine is not None else None
        if decode is not None:  # no scale below the gallery's resolution: a one-cell move is within the dead zone
            # Refinement moves candidates within their own cells only, so cells still compete at the gallery's
            # spacing: a dead zone of the lattice's step would make every move to a neighbouring cell cost
            # spacing / step nats and freeze the path (measured: README "Refinement").
            decode = replace(decode, min_scale_km=max(decode.min_scale_km, self.spacing_km()))
        ts = None if timestamp_s is None else np.asarray(timestamp_s, dtype=np.float64)
        stages = ("phase1",) if self.refiner is None else ("phase1", "final")
        rows_out, p1_out, p2_out, conf_out = [], [], [], []
        cand_out: dict[str, list] = {s: [] for s in stages}
        smooth_out: dict[str, dict[str, list]] = {s: {} for s in stages} if smooth_frames else {}
        reported = "decoded" if confidence_decoded and decode is not None else "best"  # the smoothed answer the confidence is measured at
        chunks = padded_chunks(table, batch_frames) if len(table) else []
        with _eval_mode(self.frame_encoder, self.refiner):
            for _, rows, pad in progress_bar(chunks, total=len(chunks), desc="inference", unit="batch", enabled=progress):
                rows, pad = rows.to(self.device), pad.to(self.device)
                keep = ~pad
                plan = plan_windows(keep.sum(dim=1), window_frames, window_overlap) \
                    if window_frames and rows.shape[1] > window_frames else None  # None: every sequence fits one window
                frame_emb = self._frame_embeddings(source, rows, pad, plan, batch_frames)  # (B, T, D) unit
                expert_q = None
                if self.expert is not None:  # each frame alone: no window needed, memory linear in T
                    clip, dino, _ = source.gather(rows)
                    expert_q = self.expert.frame_encoder(clip, dino, pad)[keep].float()  # (M, D) unit
                q1 = self._search_query(frame_emb[keep].float(), expert_q)  # (M, D) or (M, 2D)
                s1, i1 = self.index.search(q1, k=k_search)  # (M, k_search) Phase I candidates, best first

                def smoothed(points: torch.Tensor) -> torch.Tensor:  # (M, 2) -> (M, 2): along each sequence
                    track = torch.zeros(*keep.shape, 2, dtype=torch.float64, device=self.device)
                    track[keep] = points.to(self.device, torch.float64)
                    return smooth_tracks(track, keep, smooth_frames)[keep]
                rows_out.append(rows[keep])
                p1_out.append(i1[:, 0])
                scale_km = self._step_scales(rows, ts, decode) if decode is not None else None  # (B, T)
                answer = {}
                if top_k:
                    lat1 = self._lattice(q1, s1[:, :top_k], i1[:, :top_k], keep, scale_km, local, decode)
                    cand_out["phase1"].append(lat1)
                    answer["phase1"] = self._answer(lat1, confidence_decoded)
                query_gps = self.gallery_latlon_t[i1[:, 0]]  # (M, 2) Fig. 5: the Phase I top-1 feeds the GeoRefiner
                if smooth_frames:
                    self._smooth_answers(smooth_out["phase1"], smoothed, query_gps, lat1 if top_k else None, decode is not None,
                                         local is not None)
                    query_gps = smoothed(query_gps)
                    if "phase1" in answer:
                        answer["phase1"] = smooth_out["phase1"][reported][-1]
                if self.refiner is not None:
                    gps_emb = torch.zeros_like(frame_emb)
                    if smooth_frames:  # smoothed points lie between gallery points: embed them
                        enc_dev = next(self.location_encoder.parameters()).device
                        gps_emb[keep] = embed_locations_tensor(self.location_encoder, query_gps.to(enc_dev, torch.float32),
                                                               batch_frames).to(gps_emb.device, gps_emb.dtype)
                    else:
                        gps_emb[keep] = self.gallery_emb[i1[:, 0]].to(gps_emb.dtype)  # (M, D) -> (B, T, D)
                    refine_fn, inputs = self.refiner, (frame_emb, gps_emb)
                    if self.refiner.needs_gps:  # output "offset": the queries' GPS too
                        gps = torch.zeros(*frame_emb.shape[:2], 2, device=frame_emb.device)
                        gps[keep] = query_gps.float()  # (M, 2) -> (B, T, 2)
                        inputs = (frame_emb, gps_emb, gps)

                        def refine_fn(f, g, ll, p):
                            return self.refiner(f, g, p, gps_latlon=ll, location_encoder=self.location_encoder)
                    if plan is None:
                        refined = refine_fn(*inputs, pad)  # (B, T, D) unit
                    else:  # the same queries (whole-sequence Phase I top-1), window by window
                        refined = plan.apply(refine_fn, *inputs, batch_frames=batch_frames)  # (B, T, D)
                    q2 = self._search_query(F.normalize(refined[keep].float(), dim=-1), expert_q)  # (M, D) or (M, 2D)
                    s2, i2 = self.index.search(q2, k=max(1, top_k))  # (M, K) GPS -> GPS candidates
                    p2_out.append(i2[:, 0])
                    if top_k:
                        lat2 = self._lattice(q2, s2, i2, keep, scale_km, local, decode)
                        cand_out["final"].append(lat2)
                        answer["final"] = self._answer(lat2, confidence_decoded)
                    if smooth_frames:
                        self._smooth_answers(smooth_out["final"], smoothed, self.gallery_latlon_t[i2[:, 0]],
                                             lat2 if top_k else None, decode is not None, local is not None)
                        answer["final"] = smooth_out["final"][reported][-1]
                if confidence_radius_km is not None:
                    stage = stages[-1]  # the answer: final, or Phase I for a Phase-I-only locator
                    at = answer.get(stage)
                    if at is None:
                        at = self.gallery_latlon_t[(p2_out if stage == "final" else p1_out)[-1]]
                    conf_out.append(self._confidence(s1[:, :k], i1[:, :k], at, confidence_radius_km))

        def cat(parts):
            return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.int64)

        candidates = {}
        for stage in stages if top_k else ():
            parts = cand_out[stage]

            def part(j, tail, dtype):
                return torch.cat([p[j] for p in parts]).cpu().numpy().astype(dtype) if parts else np.zeros((0, *tail), dtype)
            candidates[stage] = Candidates(part(0, (top_k, 2), np.float64), part(1, (top_k,), np.float32),
                                           part(2, (top_k,), np.float64), part(3, (top_k,), np.int64),
                                           part(4, (), np.int64) if decode is not None else None)
        smooth = {stage: {d: torch.cat(parts).cpu().numpy() if parts else np.zeros((0, 2)) for d, parts in per.items()}
                  for stage, per in smooth_out.items()}
        return Located(cat(rows_out), cat(p1_out), cat(p2_out) if self.refiner is not None else None,
                       cat(conf_out).astype(np.float64) if conf_out else None, candidates,
                       local.n_embedded if local is not None else 0, smooth)

    def _search_query(self, q: torch.Tensor, expert_q: torch.Tensor | None) -> torch.Tensor:
        """(M, D) unit query -> what the index is searched with: itself, or sqrt(2) [q, r q'] with the expert."""
        if expert_q is None:
            return q
        return torch.cat([q, self.expert_ratio * expert_q], dim=1) * math.sqrt(2.0)

    @staticmethod
    def _smooth_answers(out: dict[str, list], smoothed, top1: torch.Tensor, lattice, decoded: bool, refined: bool) -> None:
        """Append one chunk's smoothed answers (``Located.smoothed``): the best candidate's (or the gallery top-1's),
        the decoded path's, and with refinement the gallery top-1's too."""
        best = Locator._answer(lattice, False) if lattice is not None else top1
        out.setdefault("best", []).append(smoothed(best))
        if decoded and lattice is not None:
            out.setdefault("decoded", []).append(smoothed(Locator._answer(lattice, True)))
        if refined:
            out.setdefault("gallery", []).append(smoothed(top1))

    def _frame_embeddings(self, source, rows: torch.Tensor, pad: torch.Tensor, plan: WindowPlan | None,
                          batch_frames: int) -> torch.Tensor:
        """(B, T, D) unit frame embeddings of a chunk: one forward over its whole sequences, or window by window."""
        if plan is None:
            clip, dino, _ = source.gather(rows)  # (B, T, Dc), (B, T, Dd)
            return self.frame_encoder(clip, dino, pad)

        def encode(win_rows: torch.Tensor, win_pad: torch.Tensor) -> torch.Tensor:
            clip, dino, _ = source.gather(win_rows.masked_fill(win_pad, -1))  # (n, W, Dc), (n, W, Dd)
            return self.frame_encoder(clip, dino, win_pad)  # (n, W, D)

        return plan.apply(encode, rows, batch_frames=batch_frames)

    def _step_scales(self, rows: torch.Tensor, timestamp_s: np.ndarray | None, decode: DecodeConfig) -> torch.Tensor:
        """Transition scale (B, T) km of each step between consecutive readable frames (vidtag.decode)."""
        r = rows.cpu().numpy()  # (B, T) feature rows, -1 = pad (trailing)
        both = (r[:, 1:] >= 0) & (r[:, :-1] >= 0)
        n_steps = np.zeros(r.shape, np.int64)
        n_steps[:, 1:] = np.where(both, r[:, 1:] - r[:, :-1], 0)  # frame steps spanned: > 1 across dropped frames
        dt = np.full(r.shape, np.nan)
        if timestamp_s is not None:
            cur, prev = np.clip(r[:, 1:], 0, None), np.clip(r[:, :-1], 0, None)
            dt[:, 1:] = np.where(both, timestamp_s[cur] - timestamp_s[prev], np.nan)
        try:
            return torch.from_numpy(transition_scales_km(dt, n_steps, decode)).to(self.device)
        except DecodeError as e:
            raise InferenceError(str(e)) from None

    def _lattice(self, query, score, index, keep, scale_km, local: LocalRefiner | None, decode: DecodeConfig | None):
        """(latlon (M, K, 2), score (M, K), prob (M, K), index (M, K), path (M,) | None) of one retrieval's candidates."""
        latlon = self.gallery_latlon_t[index]  # (M, K, 2)
        if local is not None:
            latlon, score, index = (x.to(self.device) for x in local.refine(query, latlon, score, index))
        log_p = emissions_from_scores(score, self.logit_scale)  # (M, K) float64, the model's temperature
        path = None
        if decode is not None:
            b, t = keep.shape
            kk = score.shape[1]
            log_e = log_p.new_zeros(b, t, kk)
            log_e[keep] = log_p  # (M, K) -> (B, T, K)
            cand = latlon.new_zeros(b, t, kk, 2)
            cand[keep] = latlon  # (M, K, 2) -> (B, T, K, 2)
            path = viterbi(log_e, cand, ~keep, scale_km=scale_km, transition_weight=decode.transition_weight,
                           min_scale_km=decode.min_scale_km, free_scales=decode.free_scales).index[keep]  # (M,)
        return latlon, score, log_p.exp(), index, path

    @staticmethod
    def _answer(lattice, decoded: bool) -> torch.Tensor:
        """(M, 2) the lattice's answer: the decoded path's candidate, else the best one."""
        latlon, path = lattice[0], lattice[4]
        col = path if decoded and path is not None else torch.zeros(len(latlon), dtype=torch.long, device=latlon.device)
        return latlon[torch.arange(len(latlon), device=latlon.device), col]

    def _confidence(self, s1: torch.Tensor, i1: torch.Tensor, at: torch.Tensor, radius_km: float) -> torch.Tensor:
        """Phase I softmax mass (M,) of the candidates within ``radius_km`` of each answer ``at`` (M, 2) degrees."""
        prob = torch.softmax(s1.float() * self.scale, dim=1)  # (M, k)
        cand = self.gallery_latlon_t[i1]  # (M, k, 2)
        at = at.to(cand.dtype)[:, None, :]  # (M, 1, 2)
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


def bundle_gallery_embeddings(bundle, latlon: np.ndarray, cache_dir: str | Path | None, batch: int = 8192,
                              with_expert: bool = False) -> np.ndarray:
    """The bundle's gallery embeddings (G, 512), unit-norm, cached under ``cache_dir`` per (model, gallery); with
    the per-frame expert, (G, 1024): both location encoders' (``ConcatLocationEncoder``, normalised)."""
    encoder = ConcatLocationEncoder(bundle.location_encoder, bundle.expert.location_encoder) if with_expert else bundle.location_encoder
    key = f"{module_fingerprint(encoder)[:16]}-{latlon_fingerprint(latlon)[:16]}"
    return gallery_embeddings(encoder, latlon, cache_dir, key=key, batch_size=batch)


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


def check_timestamps(timestamps_s, n: int, offsets: np.ndarray) -> np.ndarray | None:
    """(N,) float64 seconds (NaN = unknown) or None; refuses a wrong length and time running backwards in a sequence."""
    if timestamps_s is None:
        return None
    ts = np.asarray(timestamps_s, dtype=np.float64)
    if ts.shape != (n,):
        raise InferenceError(f"timestamps_s must have one value per frame ({n}); found shape {ts.shape}")
    if np.isinf(ts).any():
        raise InferenceError("timestamps_s must be finite seconds (NaN = unknown)")
    same_seq = np.ones(max(n - 1, 0), bool)
    inner = offsets[1:-1]
    same_seq[inner[(inner > 0) & (inner < n)] - 1] = False
    back = same_seq & (np.diff(ts) < 0)  # NaN compares False: unknown times are never "backwards"
    if back.any():
        row = int(np.flatnonzero(back)[0]) + 1
        raise InferenceError(f"timestamps_s go backwards at frame row {row} ({ts[row - 1]} -> {ts[row]} s); frames must be in time order")
    return ts


def locate_sequences(
    bundle,
    clip: np.ndarray,
    dino: np.ndarray,
    valid: np.ndarray | None,
    sequence_offsets: np.ndarray,
    gallery: np.ndarray | None = None,
    *,
    sequence_ids=None,
    timestamps_s: np.ndarray | None = None,
    gallery_emb: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    cfg: InferenceConfig = InferenceConfig(),
    device: str | torch.device | None = "auto",
    progress: bool = False,
    top_k: int = 0,
    always_decode: bool = False,
) -> tuple[Located, np.ndarray]:
    """Fig. 5 (with ``cfg``'s decoding and refinement) for every frame: (Located over input rows, gallery (G, 2)).

    Inputs as :func:`predict_sequences`. Candidates are kept when ``cfg`` decodes or refines (``cfg.top_k``)
    or ``top_k`` > 0 asks for them; ``always_decode`` runs Viterbi even when ``cfg.decode`` is argmax, so
    both answers can be compared (the confidence still follows ``cfg.decode``).
    """
    dev = resolve_device(device)
    cfg = bundle_settings(bundle, cfg)
    valid, offsets, ids = check_features(bundle, clip, dino, valid, sequence_offsets, sequence_ids)
    ts = check_timestamps(timestamps_s, len(valid), offsets)
    locator = Locator.for_bundle(bundle, gallery, gallery_emb=gallery_emb, cache_dir=cache_dir, cfg=cfg, device=dev)
    table = sequences_from_offsets(offsets, valid, ids)
    source = FeatureTensors.from_frames(np.asarray(clip), np.asarray(dino), dev)
    decoding = cfg.decode == "viterbi" or always_decode
    lattice_k = max(cfg.top_k if (decoding or cfg.refine) else 0, int(top_k))
    found = locator.locate(source, table, k=cfg.k, batch_frames=cfg.batch_frames, confidence_radius_km=cfg.confidence_radius_km,
                           progress=progress, top_k=lattice_k, decode=cfg.decode_config() if decoding else None,
                           refine=cfg.refine_config(), timestamp_s=ts, confidence_decoded=cfg.decode == "viterbi",
                           window_frames=cfg.window_frames, window_overlap=cfg.window_overlap, smooth_frames=cfg.smooth_frames)
    return found, locator.gallery_latlon


def predict_sequences(
    bundle,
    clip: np.ndarray,
    dino: np.ndarray,
    valid: np.ndarray | None,
    sequence_offsets: np.ndarray,
    gallery: np.ndarray | None = None,
    *,
    sequence_ids=None,
    timestamps_s: np.ndarray | None = None,
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
    (None = all valid); ``timestamps_s`` (N,) seconds (NaN = unknown; None = none known) set the temporal
    decoder's transitions (``cfg.decode = "viterbi"``; without them it needs ``cfg.step_km``).
    ``gallery`` (G, 2) degrees defaults to the bundle's; ``gallery_emb`` its unit-norm embeddings (else
    embedded and cached under ``cache_dir``). Returns one row per frame, in input order: sequence_id,
    frame_index, lat, lon, phase1_lat, phase1_lon, confidence, valid; with ``top_k`` > 0 also
    ``candidates``, each frame's Phase I top-K (see :func:`candidates_column`).
    """
    found, gallery = locate_sequences(bundle, clip, dino, valid, sequence_offsets, gallery, sequence_ids=sequence_ids,
                                      timestamps_s=timestamps_s, gallery_emb=gallery_emb, cache_dir=cache_dir, cfg=cfg,
                                      device=device, progress=progress, top_k=top_k)
    valid, offsets, ids = check_features(bundle, clip, dino, valid, sequence_offsets, sequence_ids)
    out = frame_table(found, gallery, valid, offsets, ids, decoded=cfg.decode == "viterbi")
    return out.with_columns(candidates_column(found, len(valid), k=top_k)) if top_k else out


def candidates_column(found: Located, n: int, *, stage: str = "phase1", k: int | None = None) -> pl.Series:
    """``candidates`` (n,): per frame a list of ``{rank, lat, lon, score}`` from ``stage``'s candidates
    (:attr:`Located.candidates`; refined where refinement ran), rank 1 = the best, score its probability
    over the frame's K candidates; the first ``k`` (None = all); empty for a frame the model did not see."""
    cands = found.candidates.get(stage)
    if cands is None:
        raise InferenceError(f"no {stage!r} candidates were kept; locate with top_k >= 1")
    kk = cands.prob.shape[1] if k is None else min(int(k), cands.prob.shape[1])
    per_frame: list[list[dict]] = [[] for _ in range(n)]
    lat, lon = cands.latlon[:, :kk, 0], cands.latlon[:, :kk, 1]  # (M, k) each
    for row, la, lo, p in zip(found.rows.tolist(), lat.tolist(), lon.tolist(), cands.prob[:, :kk].tolist()):
        per_frame[row] = [{"rank": r + 1, "lat": la[r], "lon": lo[r], "score": p[r]} for r in range(kk)]
    dtype = pl.List(pl.Struct({"rank": pl.Int32, "lat": pl.Float64, "lon": pl.Float64, "score": pl.Float64}))
    return pl.Series("candidates", per_frame, dtype=dtype)


def frame_table(found: Located, gallery: np.ndarray, valid: np.ndarray, offsets: np.ndarray, sequence_ids: list[str],
                *, decoded: bool = True) -> pl.DataFrame:
    """One row per frame (``OUTPUT_COLUMNS``) from the located answers (:meth:`Located.latlon`: decoded where
    decoding ran and ``decoded``, else the best candidate); dropped frames take their nearest readable neighbour's."""
    n = len(valid)
    p1 = np.full((n, 2), np.nan)
    p2 = np.full((n, 2), np.nan)
    seen = np.zeros(n, bool)
    conf = np.zeros(n, np.float64)
    seen[found.rows] = True
    p1[found.rows] = found.latlon("phase1", gallery, decoded)
    p2[found.rows] = found.latlon("final" if found.final is not None else "phase1", gallery, decoded)
    if found.confidence is not None:
        conf[found.rows] = found.confidence
    src = fill_from_nearest_valid(seen, offsets)
    has = src >= 0
    lat, lon, p1_lat, p1_lon = (np.full(n, np.nan) for _ in range(4))
    lat[has], lon[has] = p2[src[has]].T
    p1_lat[has], p1_lon[has] = p1[src[has]].T
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
