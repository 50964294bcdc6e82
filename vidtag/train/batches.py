"""Training sequences from the feature cache: features held as tensors on the device, batches drawn there.

Frames whose features are masked invalid (unreadable images) or whose GPS is unknown are dropped from
their sequence before sampling, so a sequence is its remaining frames in order; sequences left empty
are dropped. Row ``i`` of the features is row ``i`` of the manifest (DESIGN.md, feature store).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

SAMPLING_MODES = ("subset", "window")


@dataclass
class FeatureTensors:
    """Whole feature cache on one device: clip (N, Dc) and dino (N, Dd) float16, latlon (N, 2) float64."""

    clip: torch.Tensor
    dino: torch.Tensor
    latlon: torch.Tensor

    @classmethod
    def from_arrays(cls, clip: np.ndarray, dino: np.ndarray, manifest: pl.DataFrame, device: torch.device) -> FeatureTensors:
        if len(clip) != len(manifest) or len(dino) != len(manifest):
            raise ValueError(
                f"feature store has {len(clip)} clip / {len(dino)} dino rows but the manifest has {len(manifest)}; "
                "re-run `dvc repro extract` so the store matches the manifest"
            )
        # float16 halves device memory; batches are cast to float32 after the gather.
        latlon = manifest.select(pl.col("lat").fill_null(np.nan), pl.col("lon").fill_null(np.nan)).to_numpy().astype(np.float64)
        return cls(
            torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float16)).to(device),
            torch.from_numpy(np.ascontiguousarray(dino, dtype=np.float16)).to(device),
            torch.from_numpy(latlon).to(device),
        )

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (B, T) with -1 = pad -> clip (B, T, Dc), dino (B, T, Dd) float32 and latlon (B, T, 2)."""
        r = rows.clamp(min=0)
        return self.clip[r].float(), self.dino[r].float(), self.latlon[r]


@dataclass
class SequenceTable:
    """Each sequence's usable feature rows, in frame order, as a padded (S, L) matrix (-1 = pad)."""

    rows: torch.Tensor  # (S, L) int64
    lengths: torch.Tensor  # (S,) int64
    sequence_ids: list[str]
    n_dropped_frames: int

    def __len__(self) -> int:
        return len(self.sequence_ids)

    @property
    def n_frames(self) -> int:
        return int(self.lengths.sum())

    def to(self, device) -> SequenceTable:
        return SequenceTable(self.rows.to(device), self.lengths.to(device), self.sequence_ids, self.n_dropped_frames)

    def __repr__(self) -> str:
        return f"SequenceTable({len(self)} sequences, {self.n_frames} frames, {self.n_dropped_frames} dropped)"


def build_sequences(manifest: pl.DataFrame, valid: np.ndarray, split: str) -> SequenceTable:
    """The sequences of ``split`` with their valid, geotagged frames (manifest order: sequence_id, frame_index)."""
    valid = np.asarray(valid, dtype=bool)
    if len(valid) != len(manifest):
        raise ValueError(f"validity mask has {len(valid)} rows but the manifest has {len(manifest)}")
    df = manifest.select("sequence_id", "frame_index", "lat", "lon", "split").with_row_index("row")
    df = df.filter(pl.col("split") == split)
    usable = valid[df["row"].to_numpy()] & df["lat"].is_not_null().to_numpy() & df["lon"].is_not_null().to_numpy()
    n_dropped = int((~usable).sum())
    df = df.filter(pl.Series(usable)).sort("sequence_id", "frame_index", maintain_order=True)
    groups = df.group_by("sequence_id", maintain_order=True).agg(pl.col("row"))
    seq_rows = [np.asarray(r, dtype=np.int64) for r in groups["row"].to_list()]
    lengths = np.array([len(r) for r in seq_rows], dtype=np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    table = np.full((len(seq_rows), width), -1, dtype=np.int64)
    for i, r in enumerate(seq_rows):
        table[i, : len(r)] = r
    return SequenceTable(torch.from_numpy(table), torch.from_numpy(lengths), groups["sequence_id"].to_list(), n_dropped)


def sample_frames(table: SequenceTable, seq_idx: torch.Tensor, seq_len: int, generator: torch.Generator, mode: str = "subset") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``seq_len`` frames from each chosen sequence -> rows (B, T), pad_mask (B, T) True = pad.

    ``subset`` (default): a uniformly random subset of the sequence's frames, kept in temporal order. We
    chose it over a contiguous window because validation videos are fed whole (Appendix C) and span far
    more ground than 16 consecutive frames, and because neighbouring MSLS frames are metres apart, which
    makes their GPS near-duplicates inside the contrastive batch; a subset spreads the 16 frames along
    the whole drive. ``window``: a random contiguous run. Shorter sequences are taken whole and padded.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}")
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


def padded_chunks(table: SequenceTable, max_frames: int = 8192) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Whole sequences for evaluation, grouped so each chunk holds about ``max_frames`` padded frames.

    Returns (seq_idx (B,), rows (B, L), pad_mask (B, L)) per chunk, sequences sorted by length to limit padding.
    """
    order = torch.argsort(table.lengths.cpu(), stable=True)
    chunks, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * int(table.lengths[order[stop]]) <= max_frames:
            stop += 1
        idx = order[start:stop].to(table.rows.device)
        width = int(table.lengths[idx].max())
        rows = table.rows[idx, :width]
        chunks.append((idx, rows, rows < 0))
        start = stop
    return chunks
