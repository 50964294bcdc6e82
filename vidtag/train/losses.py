"""Training losses (Sec. 3.5): Phase I contrastive CE (Eq. 1), Phase II weighted hinge (Eqs. 2-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidtag.geo import KM_PER_DEG_LAT, haversine_km_torch


def positive_targets(latlon_deg: torch.Tensor, positive_radius_km: float) -> torch.Tensor:
    """(N, 2) degrees -> (N, N) row-stochastic targets: uniform over columns within the radius of the row.

    Eq. 1 uses the identity. Neighbouring frames of one drive can be metres apart, and the identity then
    asks the model to tell apart GPS points it cannot; the paper is silent on this, so we spread each row's
    target over every column whose GPS lies within ``positive_radius_km`` (the diagonal always counts).
    ``positive_radius_km = 0`` is Eq. 1's identity except for exactly repeated coordinates.
    """
    lat, lon = latlon_deg[:, 0].double(), latlon_deg[:, 1].double()
    dist_km = haversine_km_torch(lat[:, None], lon[:, None], lat[None, :], lon[None, :])  # (N, N)
    pos = (dist_km <= positive_radius_km) | torch.eye(len(lat), dtype=torch.bool, device=latlon_deg.device)
    return pos.float() / pos.sum(dim=1, keepdim=True)


def contrastive_loss(
    frame_emb: torch.Tensor,
    gps_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """Eq. 1: CE(V G^T * exp(logit_scale), I) over all N frames of a batch; both sides L2-normalised.

    ``frame_emb`` (N, D) and ``gps_emb`` (N, D); ``targets`` (N, N) soft targets (default identity).
    GeoCLIP normalises both sides; we do too, so the logit scale alone sets the temperature. The scale
    is clamped at 100 as in CLIP. ``symmetric`` adds the GPS->frame direction (Eq. 1 has only frame->GPS).
    """
    v = F.normalize(frame_emb, dim=-1)
    g = F.normalize(gps_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * v @ g.T  # (N, N)
    if targets is None:
        targets = torch.eye(len(v), device=v.device)
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, targets.T / targets.T.sum(dim=1, keepdim=True)))
    return loss


def _weighted_hinge_term(refined: torch.Tensor, truth: torch.Tensor, alpha: float, beta: float,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * (mean upper + mean lower) + beta * mean diag of (G' G^T - I)^2 (Eqs. 2-4) over the rows of
    weight 1 (``weight`` (n,) of 0 / 1, default all 1).

    Rows and columns of weight 0 (padding) weigh 0 in every sum and each mean divides by its count kept
    as a tensor, so the matrix keeps its padded size and nothing waits for the device: selecting the valid
    rows with a boolean mask sizes its result on the host (a sync per step on a GPU). Equal to the mean
    over the (N, N) matrix of the valid rows alone, up to the order of the float sums.
    """
    n = len(refined)
    w = torch.ones(n, dtype=refined.dtype, device=refined.device) if weight is None else weight.to(refined.dtype)
    m = (F.normalize(refined, dim=-1) @ F.normalize(truth, dim=-1).T - torch.eye(n, device=refined.device)) ** 2  # (n, n)
    count = w.sum()  # N, the valid rows (a tensor)
    pairs = (count * (count - 1) / 2).clamp(min=1)  # N (N - 1) / 2 off-diagonal pairs per triangle; N < 2: none
    diag = (m.diagonal() * w).sum() / count.clamp(min=1)
    ww = w[:, None] * w[None, :]  # (n, n): 1 where both row and column are valid
    upper = (torch.triu(m, diagonal=1) * ww).sum() / pairs
    lower = (torch.tril(m, diagonal=-1) * ww).sum() / pairs
    return alpha * (upper + lower) + beta * diag


def weighted_hinge_loss(
    refined: torch.Tensor,
    truth: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    alpha: float = 10.0,
    beta: float = 1.0,
    video_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5: L_f + L_v for (B, T, D) refined and ground-truth GPS embeddings; returns (loss, parts).

    Frame-wise (L_f): one (N, N) matrix over all valid frames of the batch (Eq. 2's G stacks every frame,
    as in Phase I). Video-wise (L_v): a (B, B) matrix over video embeddings, each the L2-normalised mean
    of its sequence's unit-normalised frame embeddings over valid frames (our choice: the paper only says
    "organized at the video level"). ``video_weight`` scales L_v (1 in Eq. 5).
    """
    b, t, d = refined.shape
    valid = torch.ones(b, t, dtype=torch.bool, device=refined.device) if pad_mask is None else ~pad_mask
    r = F.normalize(refined, dim=-1)
    g = F.normalize(truth, dim=-1)
    frame = _weighted_hinge_term(r.flatten(0, 1), g.flatten(0, 1), alpha, beta, valid.flatten())  # (B T, D), pads weigh 0
    w = valid[..., None].to(r.dtype)
    r_seq = (r * w).sum(1) / w.sum(1).clamp(min=1)  # (B, D)
    g_seq = (g * w).sum(1) / w.sum(1).clamp(min=1)
    video = _weighted_hinge_term(r_seq, g_seq, alpha, beta)
    loss = frame + video_weight * video
    return loss, {"frame": frame.detach(), "video": video.detach()}


def gps_km_loss(moved_deg: torch.Tensor, truth_deg: torch.Tensor, pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean distance in km between (B, T, 2) corrected and true GPS over valid frames (beyond the paper).

    For a GeoRefiner with ``output: offset``: its outputs are location embeddings of points, and Eqs. 2-4
    ask every off-diagonal similarity to be 0, which location embeddings of one region cannot be; the loss
    is then lowest with every output pushed off the region (measured: 5 km, every frame). Scoring the
    corrected GPS itself has no such optimum. Equirectangular km, exact enough for corrections of a few km.
    """
    b, t, _ = moved_deg.shape
    w = torch.ones(b, t, device=moved_deg.device) if pad_mask is None else (~pad_mask).to(moved_deg.dtype)
    k = float(KM_PER_DEG_LAT)
    d_north = (moved_deg[..., 0] - truth_deg[..., 0]) * k
    d_lon = torch.remainder(moved_deg[..., 1] - truth_deg[..., 1] + 180.0, 360.0) - 180.0
    d_east = d_lon * k * torch.cos(torch.deg2rad(truth_deg[..., 0]))
    dist = torch.sqrt(d_north**2 + d_east**2 + 1e-8)  # (B, T) km
    loss = (dist * w).sum() / w.sum().clamp(min=1)
    return loss, {"frame": loss.detach(), "video": torch.zeros((), device=loss.device)}
