"""Training batches: which sequences an epoch visits, and which frames of each a step sees (Appendix A)."""

from __future__ import annotations

import torch

from vidtag.errors import ConfigError
from vidtag.features.sequences import SequenceTable

SAMPLING_MODES = ("subset", "window")


def sample_frames(table: SequenceTable, seq_idx: torch.Tensor, seq_len: int, generator: torch.Generator, mode: str = "subset") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``seq_len`` frames from each chosen sequence -> rows (B, T), pad_mask (B, T) True = pad.

    ``subset`` (default): a uniformly random subset of the sequence's frames, kept in temporal order. We
    chose it over a contiguous window because validation videos are fed whole (Appendix C) and span far
    more ground than 16 consecutive frames, and because neighbouring MSLS frames are metres apart, which
    makes their GPS near-duplicates inside the contrastive batch; a subset spreads the 16 frames along
    the whole drive. ``window``: a random contiguous run. Shorter sequences are taken whole and padded.
    """
    if mode not in SAMPLING_MODES:
        raise ConfigError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}")
    dev = table.rows.device
    lengths = table.lengths[seq_idx]  # (B,)
    b, width = len(seq_idx), table.rows.shape[1]
    t = min(seq_len, width)
    if mode == "subset":
        keys = torch.rand(b, width, generator=generator, device=dev)
        keys = keys.masked_fill(torch.arange(width, device=dev)[None, :] >= lengths[:, None], 2.0)  # pads sort last
        pos = keys.argsort(dim=1)[:, :t].sort(dim=1).values  # (B, T)
    else:
        span = (lengths - t + 1).clamp(min=1)
        start = (torch.rand(b, generator=generator, device=dev) * span).long()
        pos = start[:, None] + torch.arange(t, device=dev)[None, :]  # (B, T)
    pad = pos >= lengths[:, None]
    rows = table.rows[seq_idx].gather(1, pos.clamp(max=width - 1))
    return rows.masked_fill(pad, -1), pad


def epoch_order(n_sequences: int, batch_size: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    """A shuffled pass over all sequences in batches; a last batch of fewer than 2 sequences is dropped."""
    order = torch.randperm(n_sequences, generator=generator, device=device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches
