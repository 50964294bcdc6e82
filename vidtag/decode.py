"""Temporal decoding of per-frame retrieval candidates: an HMM over the top-K gallery points, solved by Viterbi.

Beyond the paper. App. L names VidTAG's remaining errors: near-miss confusions with look-alike places
and predictions that jump kilometres between consecutive frames. Map-matching met the same problem
with noisy GPS and solved it with a hidden Markov model (Newson & Krumm 2009): each frame keeps K
candidate positions scored by how well they explain the observation (emissions), consecutive
candidates are scored by how plausible the move between them is (transitions), and Viterbi returns
the jointly best path. Here the candidates are a frame's top-K gallery points and the emissions their
retrieval probabilities, so a frame whose top-1 is a look-alike 300 km away can fall back to its
second candidate on the drive.

Transition model: ``log p(j -> i) = -transition_weight * dist_km(j, i) / scale_km`` (an exponential,
or Laplace, distance model as in Newson & Krumm). Why exponential rather than Gaussian: its cost
grows linearly, so a genuinely fast move (a cut in the video, a train, a highway) is penalised but
can still be paid for by strong visual evidence, where a squared cost would forbid it; and a linear
cost is additive along a straight line, so crossing D km in one step or in several costs the same
D / scale and the decoder has no reason to invent detours. The normalising constant of the
distribution is the same for every pair (j, i) at a step and does not change the argmax, so it is
left out. ``scale_km`` is what the camera can cover between the two frames:

* timestamps known: ``scale_km = max_speed_kmh * dt_s / 3600``: a move at the maximum speed costs
  one nat, twice as far two nats;
* no timestamps: ``scale_km = step_km``, a typical distance between consecutive frames measured on
  the training tracks with :func:`step_scale_km`;
* both within one batch (some sequences timed, some not, or a frame whose timestamp is unknown):
  :func:`transition_scales_km` gives each step its own scale, passed to :func:`viterbi` as ``scale_km``.

A dead zone (``free_scales``, 0 by default; inference uses :class:`DecodeConfig`'s 1): a move of up to
``free_scales * scale_km`` costs nothing and only the excess is charged,
``log p = -transition_weight * max(0, dist_km - free_scales * scale_km) / scale_km``. Why: the candidates'
emissions barely tell apart points a few tens of metres apart (their location embeddings are nearly
equal), so a pure distance cost makes the path stand still while the camera drives on (the "collapse"
of Fig. 4). With the dead zone a move at the camera's pace (or within the gallery's resolution, which
inference sets as the floor ``min_scale_km``, local refinement or not) is free and the emissions decide it, while a jump of
kilometres still costs about ``dist / scale`` nats. The cost stays linear, hence additive, beyond the
zone.

Padding (``pad_mask`` True) may sit anywhere, not only at the end: invalid frames inside a video
(masked in the feature store, see ``vidtag.inference``) are skipped. A padded step carries no cost,
the path holds its state across it, and the next valid frame is linked to the last valid one with
the scale of the whole gap (the summed ``dt_s``, or ``step_km`` times the number of steps). Padded
steps get candidate index 0.

Cost: O(T K^2) per sequence, batched over B, with a (B, K, K) distance matrix per time step and
(B, T, K) int32 backpointers. Work is in float64: the K^2 distances per step are cheap next to
retrieval, and float32 degrees alone are only good to about half a metre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vidtag.errors import VidtagError
from vidtag.geo import EARTH_RADIUS_KM, haversine_km


class DecodeError(VidtagError, ValueError):
    """Decoder inputs that do not fit together (shapes, non-finite values, missing scale)."""


@dataclass(frozen=True)
class ViterbiPath:
    """The jointly best candidate path.

    ``index`` (B, T) int64: the chosen candidate in [0, K) per frame, 0 on padded steps.
    ``log_score`` (B,) float64: the path's summed log emissions plus weighted log transitions
    (0 for a sequence that is all padding).
    """

    index: torch.Tensor
    log_score: torch.Tensor


def _half_angle_trig(latlon_deg: torch.Tensor) -> torch.Tensor:
    """(..., 2) degrees -> (5, ...): sin and cos of lat/2, sin and cos of lon/2, cos lat (leading axis: contiguous rows)."""
    half = torch.deg2rad(latlon_deg) / 2
    return torch.stack([half[..., 0].sin(), half[..., 0].cos(), half[..., 1].sin(), half[..., 1].cos(), (2 * half[..., 0]).cos()])


def _pairwise_km(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Haversine distances (B, K, K) [j, i] between (5, B, K) candidates in :func:`_half_angle_trig` form.

    The same formula as ``vidtag.geo.haversine_km_torch``, with sin((b - a) / 2) expanded as
    sin(b/2) cos(a/2) - cos(b/2) sin(a/2): the trigonometry is done once per candidate instead of
    once per pair, which halves the time of the decoder's dominant step. In float64 it agrees with
    the direct form to ~1e-12 km.
    """
    p, c = prev[:, :, :, None], cur[:, :, None, :]  # (5, B, K, 1), (5, B, 1, K)
    sin_dlat = c[0] * p[1] - c[1] * p[0]  # (B, K, K) sin(dlat / 2)
    sin_dlon = c[2] * p[3] - c[3] * p[2]  # (B, K, K) sin(dlon / 2)
    h = sin_dlat.square_().add_(sin_dlon.square_().mul_(p[4] * c[4]))
    return h.clamp_(0.0, 1.0).sqrt_().asin_().mul_(2 * EARTH_RADIUS_KM)


def candidate_distances_km(prev_latlon: torch.Tensor, cur_latlon: torch.Tensor) -> torch.Tensor:
    """Haversine km (B, K, J) [k, j] from each of (B, K, 2) previous candidates to each of (B, J, 2) current ones
    (degrees): the distances the transitions score, computed as :func:`viterbi` computes them."""
    return _pairwise_km(_half_angle_trig(prev_latlon.double()), _half_angle_trig(cur_latlon.double()))


def log_transitions(dist_km: torch.Tensor, scale_km, weight: float = 1.0, free_scales: float = 0.0) -> torch.Tensor:
    """The decoder's log transition scores of moves of ``dist_km``: ``-weight * max(dist - free_scales * scale, 0)
    / scale`` (module docstring). Works in place on ``dist_km`` (pass a copy to keep it); ``scale_km`` broadcasts."""
    if free_scales > 0:
        dist_km = dist_km.sub_(scale_km * free_scales).clamp_(min=0.0)  # only the excess over the dead zone
    return dist_km.div_(scale_km).mul_(-weight)


def _check_inputs(log_emission, cand_latlon, pad_mask, dt_s):
    if log_emission.ndim != 3:
        raise DecodeError(f"log_emission must be (B, T, K); found shape {tuple(log_emission.shape)}")
    b, t, k = log_emission.shape
    if tuple(cand_latlon.shape) != (b, t, k, 2):
        raise DecodeError(f"cand_latlon must be (B, T, K, 2) = {(b, t, k, 2)}; found {tuple(cand_latlon.shape)}")
    if pad_mask is not None and tuple(pad_mask.shape) != (b, t):
        raise DecodeError(f"pad_mask must be (B, T) = {(b, t)}; found {tuple(pad_mask.shape)}")
    if dt_s is not None and tuple(dt_s.shape) != (b, t):
        raise DecodeError(f"dt_s must be (B, T) = {(b, t)}; found {tuple(dt_s.shape)}")


def viterbi(
    log_emission: torch.Tensor,
    cand_latlon: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    dt_s: torch.Tensor | None = None,
    *,
    step_km: float | None = None,
    max_speed_kmh: float | None = None,
    scale_km: torch.Tensor | None = None,
    transition_weight: float = 1.0,
    min_scale_km: float = 1e-3,
    free_scales: float = 0.0,
) -> ViterbiPath:
    """Jointly best path through each sequence's top-K candidates (exact Viterbi).

    log_emission (B, T, K): log p(frame | candidate), e.g. a log-softmax over the K retrieval scores;
    ``-inf`` marks a missing candidate, but every valid frame needs one finite entry.
    cand_latlon (B, T, K, 2): the candidates' (lat, lon) in degrees.
    pad_mask (B, T): True = padding, anywhere in the sequence (see the module docstring).
    dt_s (B, T): seconds between frame t-1 and frame t (column 0 is unused); None = unknown, then
    ``step_km`` sets the transition scale, else ``max_speed_kmh`` does.
    scale_km (B, T): instead of ``dt_s`` / ``step_km``, each step's own scale in km (what the camera can
    cover between frame t-1 and frame t; column 0 unused), e.g. from :func:`transition_scales_km`.
    transition_weight: multiplies the log transitions; 0 makes the result exactly the per-frame
    argmax of ``log_emission`` (ties to the lowest index, like ``argmax``).
    min_scale_km: floor on the transition scale, so duplicate timestamps (dt = 0) do not divide by 0.
    free_scales: the dead zone, in scales: moves up to ``free_scales * scale`` cost nothing (module docstring).
    """
    _check_inputs(log_emission, cand_latlon, pad_mask, dt_s)
    if scale_km is not None:
        if dt_s is not None:
            raise DecodeError("give dt_s or scale_km, not both")
        if tuple(scale_km.shape) != tuple(log_emission.shape[:2]):
            raise DecodeError(f"scale_km must be (B, T) = {tuple(log_emission.shape[:2])}; found {tuple(scale_km.shape)}")
    b, t_len, k = log_emission.shape
    dev = log_emission.device
    f64 = torch.float64
    pad = torch.zeros(b, t_len, dtype=torch.bool, device=dev) if pad_mask is None else pad_mask.to(dev, torch.bool)
    valid = ~pad  # (B, T)
    weight = float(transition_weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise DecodeError(f"transition_weight must be finite and >= 0; found {transition_weight}")
    if not (math.isfinite(min_scale_km) and min_scale_km > 0):
        raise DecodeError(f"min_scale_km must be finite and > 0; found {min_scale_km}")
    free = float(free_scales)
    if not (math.isfinite(free) and free >= 0):
        raise DecodeError(f"free_scales must be finite and >= 0; found {free_scales}")
    if weight > 0 and scale_km is None:
        if dt_s is not None and (max_speed_kmh is None or not (math.isfinite(max_speed_kmh) and max_speed_kmh > 0)):
            raise DecodeError(f"with dt_s, max_speed_kmh must be a positive number; found {max_speed_kmh}")
        if dt_s is None and (step_km is None or not (math.isfinite(step_km) and step_km > 0)):
            raise DecodeError(f"without dt_s, step_km must be a positive number (see step_scale_km); found {step_km}")

    if b == 0 or t_len == 0:
        return ViterbiPath(torch.zeros(b, t_len, dtype=torch.long, device=dev), torch.zeros(b, dtype=f64, device=dev))
    if k == 0:
        if bool(valid.any()):
            raise DecodeError("K = 0 candidates, but some frames are not padding")
        return ViterbiPath(torch.zeros(b, t_len, dtype=torch.long, device=dev), torch.zeros(b, dtype=f64, device=dev))

    emis = torch.where(valid[..., None], log_emission.to(dev, f64), 0.0)  # (B, T, K) padded steps cost nothing
    if bool(torch.isnan(emis).any()) or bool((emis == math.inf).any()):
        raise DecodeError("log_emission has NaN or +inf at a valid frame")
    if bool((valid & (emis == -math.inf).all(dim=-1)).any()):
        raise DecodeError("a valid frame has no finite log_emission: every candidate is -inf")
    # Coordinates are read only where they can be chosen: missing candidates (-inf) may hold NaN.
    real = valid[..., None] & (emis > -math.inf)  # (B, T, K)
    latlon = torch.where(real[..., None], cand_latlon.to(dev, f64), 0.0)  # (B, T, K, 2)
    if not bool(torch.isfinite(latlon).all()) or bool((latlon[..., 0].abs() > 90).any()):
        raise DecodeError("cand_latlon must hold finite degrees with |lat| <= 90 for the candidates of valid frames")

    # Steps that lie between two valid frames (a valid frame before t, one at or after t): their dt or
    # step count makes up the gap a transition spans. Leading and trailing padding is never read.
    n_before = torch.cumsum(valid.long(), dim=1) - valid.long()  # (B, T) valid frames before t
    inside = (n_before > 0) & (n_before < valid.sum(dim=1, keepdim=True))  # (B, T)
    if scale_km is not None:
        sc = scale_km.to(dev, f64)
        if bool((inside & ~(torch.isfinite(sc) & (sc >= 0))).any()):
            raise DecodeError("scale_km must be finite and >= 0 between valid frames")
        step = torch.where(inside, sc, 0.0)  # (B, T) km the camera can cover
    elif dt_s is None:
        step = inside.to(f64) * (1.0 if step_km is None else float(step_km))  # (B, T) km per step
    else:
        dt = dt_s.to(dev, f64)
        if bool((inside & ~(torch.isfinite(dt) & (dt >= 0))).any()):
            raise DecodeError("dt_s must be finite and >= 0 between valid frames")
        speed = 1.0 if max_speed_kmh is None else float(max_speed_kmh)
        step = torch.where(inside, dt, 0.0) * (speed / 3600.0)  # (B, T) km the camera can cover

    arange_k = torch.arange(k, device=dev)
    keep = arange_k.expand(b, k)  # (B, K) identity backpointers for skipped steps
    delta = torch.zeros(b, k, dtype=f64, device=dev)  # best score ending in each candidate, max kept at 0
    total = torch.zeros(b, dtype=f64, device=dev)  # what was subtracted to keep that max at 0
    trig = _half_angle_trig(latlon)  # (5, B, T, K)
    prev_trig = torch.zeros(5, b, k, dtype=f64, device=dev)  # last valid frame's candidates
    gap_km = torch.zeros(b, dtype=f64, device=dev)  # scale accumulated since the last valid frame
    seen = torch.zeros(b, dtype=torch.bool, device=dev)  # a valid frame came before
    back = torch.empty(b, t_len, k, dtype=torch.int32, device=dev)  # (B, T, K)

    for t in range(t_len):
        v = valid[:, t]  # (B,)
        gap_km = gap_km + step[:, t]
        cur = trig[:, :, t]  # (5, B, K)
        if weight > 0:
            dist_km = _pairwise_km(prev_trig, cur)  # (B, K, K): [previous j, current i]
            scale_km = gap_km.clamp_min(min_scale_km)[:, None, None]  # (B, 1, 1)
            trans = log_transitions(dist_km, scale_km, weight, free).add_(delta[:, :, None])  # (B, K, K), in place
        else:
            trans = delta[:, :, None].expand(b, k, k)  # (B, K, K): no transition cost at all
        best, arg = trans.max(dim=1)  # (B, K) over j; ties go to the lowest j
        best = torch.where(seen[:, None], best, 0.0)
        arg = torch.where(seen[:, None], arg, keep)
        raw = best + emis[:, t]  # (B, K)
        top = raw.max(dim=1).values  # (B,) finite: some emission is finite and best is finite
        # Subtracting the max keeps scores near 0 over long videos; x - top == 0 exactly iff x == top,
        # so with weight 0 the backpointers are exactly the per-frame argmax.
        delta = torch.where(v[:, None], raw - top[:, None], delta)
        total = torch.where(v, total + top, total)
        back[:, t] = torch.where(v[:, None], arg, keep).to(torch.int32)
        prev_trig = torch.where(v[:, None], cur, prev_trig)
        gap_km = torch.where(v, 0.0, gap_km)
        seen = seen | v

    state = delta.argmax(dim=1)  # (B,) best last state; padded-only sequences: 0
    path = torch.empty(b, t_len, dtype=torch.long, device=dev)
    for t in range(t_len - 1, -1, -1):
        path[:, t] = state
        state = back[:, t].gather(1, state[:, None]).squeeze(1).long()
    return ViterbiPath(torch.where(valid, path, 0), total)


def emissions_from_scores(scores: torch.Tensor, logit_scale, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax over the K candidates of ``exp(logit_scale) * scores`` (B, T, K) -> (B, T, K).

    The same temperature the model was trained with (contrastive loss) and that inference uses for
    its confidence, so the emissions are the model's own calibrated probabilities. Padded steps
    (which may hold NaN) become 0.
    """
    temp = torch.as_tensor(logit_scale, dtype=torch.float64).exp().to(scores.device)
    s = scores.to(torch.float64)
    if pad_mask is not None:
        s = torch.where(pad_mask.to(scores.device, torch.bool)[..., None], 0.0, s)
    return torch.log_softmax(temp * s, dim=-1)


def decode_candidates(
    scores: torch.Tensor,
    logit_scale,
    cand_latlon: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    dt_s: torch.Tensor | None = None,
    **viterbi_kwargs,
) -> torch.Tensor:
    """Chosen candidate (B, T) int64 from raw cosine similarities (B, T, K) of each frame's top-K.

    ``logit_scale`` is the model's learned log temperature (``bundle.logit_scale``); the emissions are
    :func:`emissions_from_scores`. Keyword arguments (``step_km``, ``max_speed_kmh``,
    ``transition_weight``, ...) go to :func:`viterbi`.
    """
    if scores.ndim != 3:
        raise DecodeError(f"scores must be (B, T, K); found shape {tuple(scores.shape)}")
    log_emission = emissions_from_scores(scores, logit_scale, pad_mask)
    return viterbi(log_emission, cand_latlon, pad_mask, dt_s, **viterbi_kwargs).index


def step_scale_km(latlon_deg, offsets=None, *, lengths=None, trim: float = 0.01) -> float:
    """Typical distance in km between consecutive frames of training tracks: the ``step_km`` of :func:`viterbi`.

    latlon_deg (N, 2): frames of all tracks, stored contiguously in time order; the tracks are given
    by ``offsets`` (S + 1,) (track s is rows ``offsets[s]:offsets[s+1]``, as in
    ``vidtag.inference``) or by ``lengths`` (S,). Steps across track boundaries are not counted.

    Statistic: the mean step after dropping the largest ``trim`` fraction (a trimmed mean). The mean
    is the maximum-likelihood scale of the exponential transition model; trimming drops GPS glitches
    and splices. The median is not used: it collapses to 0 when GPS fixes repeat over several frames
    (a 1 Hz receiver under a 30 fps video, or a car waiting at lights), which would forbid any move.
    """
    latlon = np.asarray(latlon_deg, dtype=np.float64)
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise DecodeError(f"latlon_deg must be (N, 2); found shape {latlon.shape}")
    n = latlon.shape[0]
    if (offsets is None) == (lengths is None):
        raise DecodeError("give exactly one of offsets (S + 1,) or lengths (S,)")
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or (lengths < 0).any():
            raise DecodeError("lengths must be a 1-D array of non-negative track lengths")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise DecodeError(f"track offsets must rise from 0 to the number of frames ({n})")
    if not (0.0 <= trim < 1.0):
        raise DecodeError(f"trim must be in [0, 1); found {trim}")
    if not np.isfinite(latlon).all():
        raise DecodeError("latlon_deg has NaN or infinite values")
    same_track = np.ones(max(n - 1, 0), bool)
    inner = offsets[1:-1]
    same_track[inner[(inner > 0) & (inner < n)] - 1] = False  # step ending at a track's first frame
    step_km = haversine_km(latlon[:-1, 0], latlon[:-1, 1], latlon[1:, 0], latlon[1:, 1])[same_track]  # (steps,)
    if step_km.size == 0:
        raise DecodeError("no track has two frames: no step to measure")
    step_km = np.sort(step_km)
    keep = max(1, int(math.ceil(step_km.size * (1.0 - trim))))
    return float(step_km[:keep].mean())


DECODE_METHODS = ("argmax", "viterbi")  # argmax: each frame its own top-1 (the paper, Fig. 5); viterbi: this module


@dataclass(frozen=True)
class DecodeConfig:
    """The transition model as inference runs it (``vidtag.inference``); see the module docstring."""

    step_km: float | None = None  # scale per frame step where time is unknown: step_scale_km of the training tracks
    max_speed_kmh: float = 130.0  # timestamps known: a move at this speed costs one nat (a motorway limit; our choice)
    transition_weight: float = 1.0  # multiplies the log transitions; 0 = the per-frame argmax
    min_scale_km: float = 1e-3  # floor on a step's scale, so repeated timestamps (dt = 0) do not divide by 0
    free_scales: float = 1.0  # dead zone: a move within one scale (the camera's pace) is free (see the module docstring)

    def __post_init__(self):
        if self.step_km is not None and not (math.isfinite(self.step_km) and self.step_km > 0):
            raise DecodeError(f"step_km must be a positive number or None; found {self.step_km}")
        if not (math.isfinite(self.max_speed_kmh) and self.max_speed_kmh > 0):
            raise DecodeError(f"max_speed_kmh must be a positive number; found {self.max_speed_kmh}")
        if not (math.isfinite(self.transition_weight) and self.transition_weight >= 0):
            raise DecodeError(f"transition_weight must be finite and >= 0; found {self.transition_weight}")
        if not (math.isfinite(self.min_scale_km) and self.min_scale_km > 0):
            raise DecodeError(f"min_scale_km must be a positive number; found {self.min_scale_km}")
        if not (math.isfinite(self.free_scales) and self.free_scales >= 0):
            raise DecodeError(f"free_scales must be finite and >= 0; found {self.free_scales}")


def transition_scales_km(dt_s: np.ndarray, n_steps: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """Each step's transition scale in km (B, T), for :func:`viterbi`'s ``scale_km``.

    dt_s (B, T): seconds between the frame before and frame t, NaN where either timestamp is unknown;
    n_steps (B, T): how many frame steps that gap spans (more than one across dropped frames), 0 where
    there is no step (a sequence's first frame, padding). Known time gives ``max_speed_kmh * dt``;
    unknown time ``step_km * n_steps``, the same rule :func:`viterbi` applies to padded steps.
    """
    dt = np.asarray(dt_s, dtype=np.float64)
    steps = np.asarray(n_steps, dtype=np.float64)
    if dt.shape != steps.shape:
        raise DecodeError(f"dt_s {dt.shape} and n_steps {steps.shape} must have the same shape")
    known = np.isfinite(dt) & (steps > 0)
    if (known & (dt < 0)).any():
        raise DecodeError("timestamps go backwards within a sequence; frames must be in time order")
    need_step = (steps > 0) & ~known
    if need_step.any() and cfg.step_km is None:
        raise DecodeError("some frames have no timestamp and no step scale is set (step_km: measure it on training "
                          "tracks with vidtag.decode.step_scale_km, or give timestamps)")
    by_time = np.where(known, dt, 0.0) * (cfg.max_speed_kmh / 3600.0)
    by_step = steps * (cfg.step_km or 0.0)
    return np.where(known, by_time, np.where(need_step, by_step, 0.0))
