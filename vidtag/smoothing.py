"""Temporal median smoothing of a sequence's answers (beyond the paper, App. L's "locality-aware post-processing").

Each frame's answer becomes the spherical median of the answers of the frames within ``half`` frames of it in
its sequence: the component-wise median of their unit vectors, normalised back onto the sphere. A median, not
a mean, so that a minority of frames placed in another city (Fig. 4's bursts) is outvoted instead of dragging
the track between cities; unit vectors, not degrees, so that it holds across the antimeridian and near the
poles. Windows are cut at a sequence's ends (no padding by repeated frames) and never cross into another
sequence. The answers are points, not gallery rows: a smoothed track moves between the gallery's cells.

Why it helps (README, "Trajectory shape"): on the toy world a frame alone places itself along its drive only to
about a kilometre, so per-frame answers jitter around the drive (path-length ratio far above 1); over +-45
frames the errors average out and the drive's shape remains.
"""

from __future__ import annotations

import math

import torch

from vidtag.errors import InferenceError
from vidtag.geo import latlon_from_vectors_torch, unit_vectors_torch


def smooth_tracks(latlon: torch.Tensor, valid: torch.Tensor, half: int) -> torch.Tensor:
    """Spherical median over +-``half`` frames of each padded sequence (module docstring).

    latlon (B, T, 2) degrees; valid (B, T) bool, True = a frame of the sequence (padding may sit anywhere and
    is skipped: a window holds the valid frames within ``half`` positions). Returns (B, T, 2) float64 degrees;
    padded positions keep their input. ``half`` = 0 returns the input unchanged (as float64).
    """
    if latlon.ndim != 3 or latlon.shape[-1] != 2 or tuple(valid.shape) != tuple(latlon.shape[:2]):
        raise InferenceError(f"smooth_tracks needs latlon (B, T, 2) and valid (B, T); found {tuple(latlon.shape)} "
                             f"and {tuple(valid.shape)}")
    if not isinstance(half, int) or isinstance(half, bool) or half < 0:
        raise InferenceError(f"smooth_frames must be an integer >= 0; found {half!r}")
    out = latlon.double().clone()
    if half == 0 or latlon.shape[1] == 0:
        return out
    v = unit_vectors_torch(latlon).masked_fill(~valid[..., None], math.nan)  # (B, T, 3) NaN = not a frame
    padded = torch.nn.functional.pad(v.permute(0, 2, 1), (half, half), value=math.nan)  # (B, 3, T + 2 half)
    windows = padded.unfold(2, 2 * half + 1, 1)  # (B, 3, T, 2 half + 1)
    med = windows.nanmedian(dim=-1).values.permute(0, 2, 1)  # (B, T, 3) component-wise median of the window's frames
    # A median of unit vectors is never the zero vector unless the window's frames are spread over the whole
    # sphere; keep the frame's own answer there rather than dividing by ~0.
    ok = valid & (torch.linalg.vector_norm(med, dim=-1) > 1e-9)
    out[ok] = latlon_from_vectors_torch(med[ok])
    return out


def smooth_sequences(latlon, offsets, half: int) -> torch.Tensor:
    """(M, 2) degrees of S sequences stored one after another (sequence s is rows ``offsets[s]:offsets[s+1]``)
    -> (M, 2) float64 degrees, each sequence smoothed on its own (:func:`smooth_tracks`)."""
    x = torch.as_tensor(latlon, dtype=torch.float64)
    bounds = [int(o) for o in offsets]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if not lengths or bounds[0] != 0 or bounds[-1] != x.shape[0] or min(lengths) < 0:
        raise InferenceError(f"offsets must rise from 0 to the number of rows ({x.shape[0]}); found {bounds[:3]}...{bounds[-2:]}")
    t = max(lengths)
    valid = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (S, T)
    padded = torch.zeros(len(lengths), t, 2, dtype=torch.float64)
    padded[valid] = x
    return smooth_tracks(padded, valid, half)[valid]
