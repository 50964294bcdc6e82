"""Sequences as padded tables of feature rows, the one layout training, validation and inference share.

**Unreadable frames are dropped** (the one rule for training and inference): a frame whose features are
masked invalid is not part of its sequence, so a sequence is its readable frames in time order and
TempGeo numbers their positions 0..L-1 without gaps. Inference then gives a dropped frame the prediction
of its nearest readable neighbour (vidtag.inference). Training also drops frames with unknown GPS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from vidtag.errors import FeatureStoreError


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


def build_sequences(manifest: pl.DataFrame, valid: np.ndarray, split: str, require_gps: bool = True) -> SequenceTable:
    """The sequences of ``split`` with their readable (and, with ``require_gps``, geotagged) frames, in
    manifest order (sequence_id, frame_index)."""
    valid = np.asarray(valid, dtype=bool)
    if len(valid) != len(manifest):
        raise FeatureStoreError(f"validity mask has {len(valid)} rows but the manifest has {len(manifest)}")
    df = manifest.select("sequence_id", "frame_index", "lat", "lon", "split").with_row_index("row")
    df = df.filter(pl.col("split") == split)
    usable = valid[df["row"].to_numpy()]
    if require_gps:
        usable &= df["lat"].is_not_null().to_numpy() & df["lon"].is_not_null().to_numpy()
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


def sequences_from_offsets(offsets: np.ndarray, valid: np.ndarray, sequence_ids: list[str]) -> SequenceTable:
    """The table of contiguous sequences (sequence s is rows ``offsets[s]:offsets[s+1]``), readable rows only."""
    valid = np.asarray(valid, dtype=bool)
    seq_rows = [np.flatnonzero(valid[a:b]) + a for a, b in zip(offsets[:-1], offsets[1:])]
    lengths = np.array([len(r) for r in seq_rows], dtype=np.int64)
    table = np.full((len(seq_rows), int(lengths.max()) if len(lengths) else 0), -1, dtype=np.int64)
    for i, r in enumerate(seq_rows):
        table[i, : len(r)] = r
    return SequenceTable(torch.from_numpy(table), torch.from_numpy(lengths), list(sequence_ids), int((~valid).sum()))


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
