"""Learned temporal positions by rank, interpolated beyond the table: one rule for TempGeo and GeoRefiner."""

from __future__ import annotations

import torch


def interpolated_positions(table: torch.Tensor, pad_mask: torch.Tensor | None, t: int) -> torch.Tensor:
    """Position embeddings (B, T, D) from a learned ``table`` (P, D) for frames padded to ``t``.

    ``pad_mask`` (B, T) is True at padding; None means one unpadded sequence and gives (1, T, D).
    A frame's position is its rank among its sequence's unpadded frames, so where padding sits never
    changes the real frames' positions (a masked frame is the same as a dropped one). A sequence of
    L <= P frames uses rows 0..L-1; a longer one (the table is the training length, 16 in Appendix A;
    validation videos are far longer, Appendix C) uses the table linearly interpolated to L rows, so
    the first and last frames keep the first and last positions and order is preserved.
    Padding slots get some row of the table; they are masked downstream.
    """
    p = table.shape[0]
    if pad_mask is None:
        pad_mask = torch.zeros(1, t, dtype=torch.bool, device=table.device)
    keep = ~pad_mask
    rank = (keep.cumsum(dim=1) - 1).clamp(min=0).to(table.dtype)  # (B, T) 0..L-1 over kept frames
    lengths = keep.sum(dim=1, keepdim=True)  # (B, 1)
    scale = (p - 1) / (lengths.to(table.dtype) - 1).clamp(min=1)  # (B, 1)
    frac = torch.where(lengths > p, rank * scale, rank).clamp(max=p - 1)  # (B, T) table coordinate
    lo = frac.floor().long()
    hi = (lo + 1).clamp(max=p - 1)
    w = (frac - lo.to(frac.dtype))[..., None]  # (B, T, 1)
    return table[lo] * (1 - w) + table[hi] * w  # (B, T, D)
