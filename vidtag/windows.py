"""Overlapping temporal windows: TempGeo and the GeoRefiner over a video of any length in bounded memory.

Both networks attend over the whole sequence (Sec. 3.2, 3.4), so one forward pass over T frames holds
(heads x T x T) attention scores: a 1-hour drive sampled at 1 fps (3,600 frames) needs ~50x the memory of
MSLS's longest sequence (494 frames, Sec. 4.1), and 100K frames do not fit anywhere. A sequence longer than
``window_frames`` is therefore cut into windows of exactly ``window_frames`` frames, consecutive windows
sharing at least ``window_overlap`` frames (the last window ends at the sequence's last frame, so it may
share more). Each window is a sequence of its own to the model: its frames are numbered by rank within the
window and the learned position table is interpolated to the window's length, as for any video longer
than the training length (TempGeo's positions encode order within a clip: training samples sorted frames
spanning a video, App. A). Memory per forward pass is then bounded by the window, not the video.

**Each frame takes its output from the window whose centre is nearest** (ties to the earlier window), not
a linear cross-fade over the overlap, because:

* every stitched output is the model's own output for a real input (one forward pass over one window), a
  unit vector the retrieval and the GeoRefiner's query can read as is; a blend of two windows' unit vectors
  is no embedding either window produced, and would need renormalising;
* the most central window gives a frame the most context on its poorer side: at least about
  ``window_overlap / 2`` frames both ways, except near the sequence's ends where there is no more to give;
* the stitched output equals running each window alone at the frames it owns, which is checked exactly.

A sequence of at most ``window_frames`` frames is a single window holding all of it: the model sees it
whole, as without windows. ``window_frames = 0`` turns windowing off (whole sequences, memory ~ T^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vidtag.errors import InferenceError

DEFAULT_WINDOW_FRAMES = 512  # > MSLS's longest sequence (494 frames, Sec. 4.1): every MSLS and toy sequence is one window
DEFAULT_WINDOW_OVERLAP = 128  # a quarter of the window: >= 64 frames of context on both sides of every owned frame


def check_window(window_frames: int, window_overlap: int) -> None:
    """Refuse a window that cannot advance (overlap >= window) or negative sizes, in one line."""
    if int(window_frames) != window_frames or window_frames < 0:
        raise InferenceError(f"window_frames must be a whole number >= 0 (0 = whole sequences); found {window_frames!r}")
    if int(window_overlap) != window_overlap or window_overlap < 0:
        raise InferenceError(f"window_overlap must be a whole number >= 0; found {window_overlap!r}")
    if window_frames and window_overlap >= window_frames:
        raise InferenceError(f"window_overlap ({window_overlap}) must be smaller than window_frames ({window_frames}) "
                             "so that consecutive windows advance")


@dataclass
class WindowPlan:
    """The windows of a padded batch of sequences (B, T), and which window each frame's output comes from."""

    seq: torch.Tensor  # (NW,) int64 batch row each window reads
    start: torch.Tensor  # (NW,) int64 first column of each window
    n_frames: torch.Tensor  # (NW,) int64 real frames in each window (== width except for sequences shorter than it)
    width: int  # frames per window, padding included
    owner: torch.Tensor  # (B, T) int64 window whose output each column takes; -1 at padding

    def __len__(self) -> int:
        return int(self.seq.numel())

    def columns(self, sl: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(cols (n, W) column each window frame reads, pad (n, W) True beyond the sequence's end) of windows ``sl``."""
        offs = torch.arange(self.width, device=self.start.device)
        pad = offs[None, :] >= self.n_frames[sl, None]  # (n, W)
        cols = (self.start[sl, None] + offs[None, :]).masked_fill(pad, 0)  # (n, W)
        return cols, pad

    def take(self, x: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        """Windows ``sl`` of ``x`` (B, T, ...) -> (n, W, ...); padding columns hold column 0's value (masked downstream)."""
        cols, _ = self.columns(sl)
        return x[self.seq[sl, None], cols]

    def stitch(self, out: torch.Tensor) -> torch.Tensor:
        """Every window's output (NW, W, ...) -> (B, T, ...): each frame from the window that owns it, zeros at padding."""
        if len(self) == 0:
            return out.new_zeros(*self.owner.shape, *out.shape[2:])
        own = self.owner.clamp(min=0)  # (B, T)
        pos = (torch.arange(self.owner.shape[1], device=own.device)[None, :] - self.start[own]).clamp(0, self.width - 1)
        got = out[own, pos]  # (B, T, ...)
        keep = (self.owner >= 0).reshape(*self.owner.shape, *([1] * (out.dim() - 2)))
        return torch.where(keep, got, got.new_zeros(()))

    def groups(self, batch_frames: int) -> list[slice]:
        """Consecutive windows in groups of about ``batch_frames`` frames (at least one window each)."""
        per = max(1, int(batch_frames) // max(self.width, 1))
        return [slice(a, min(a + per, len(self))) for a in range(0, len(self), per)]

    def apply(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor, batch_frames: int = 8192) -> torch.Tensor:
        """``fn(*windows, pad)`` over groups of windows of each ``x`` (B, T, ...), stitched back to (B, T, D).

        ``fn`` sees (n, W, ...) inputs and the (n, W) padding mask (True = pad) and returns (n, W, D); one call
        holds at most max(``batch_frames``, W) frames, so attention memory is bounded by the window."""
        outs = [fn(*(self.take(x, sl) for x in xs), self.columns(sl)[1]) for sl in self.groups(batch_frames)]
        if not outs:
            return self.stitch(torch.zeros(0, self.width, 0, device=self.owner.device))
        return self.stitch(torch.cat(outs))


def plan_windows(lengths: torch.Tensor, window_frames: int, window_overlap: int) -> WindowPlan:
    """Windows of sequences of ``lengths`` (B,) padded to T = max(lengths) (trailing padding, as
    vidtag.features.sequences lays them out); see the module docstring. ``window_frames = 0``: one window
    per sequence, its whole length."""
    check_window(window_frames, window_overlap)
    lengths = torch.as_tensor(lengths).long()
    dev = lengths.device
    n_cols = int(lengths.max()) if lengths.numel() else 0
    width = min(int(window_frames), n_cols) if window_frames else n_cols
    stride = int(window_frames) - int(window_overlap) if window_frames else 1  # >= 1 (check_window); unused when off
    # Windows per sequence: one for a sequence that fits, none for an empty one.
    over = (lengths - width).clamp(min=0)  # (B,)
    n_win = torch.where(over > 0, (over + stride - 1) // stride + 1, (lengths > 0).long())  # (B,)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=dev), n_win)  # (NW,)
    first = torch.cumsum(n_win, 0) - n_win  # (B,) index of each sequence's first window
    i = torch.arange(len(seq), device=dev) - first[seq]  # (NW,) index within its sequence
    start = torch.minimum(i * stride, over[seq])  # (NW,) the last window ends at the sequence's end
    n_frames = lengths[seq].clamp(max=width)  # (NW,)
    # Ownership: frame t goes to the window whose centre is nearest; the boundary after window j sits halfway
    # between its centre and the next one's, i.e. at t = (start_j + start_j+1 + W - 1) / 2 (kept doubled, exact
    # in integers). A frame exactly on a boundary stays with the earlier window.
    max_n = int(n_win.max()) if n_win.numel() else 0
    bounds = torch.full((len(lengths), max(max_n - 1, 1)), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
    inner = i < (n_win[seq] - 1)  # (NW,) windows followed by another of the same sequence
    j = torch.nonzero(inner).flatten()
    bounds[seq[j], i[j]] = start[j] + start[j + 1] + width - 1
    t2 = 2 * torch.arange(n_cols, device=dev).expand(len(lengths), n_cols).contiguous()  # (B, T) doubled column
    local = torch.searchsorted(bounds, t2, side="left")  # (B, T) boundaries strictly before each column
    owner = first[:, None] + local  # (B, T)
    owner = owner.masked_fill(torch.arange(n_cols, device=dev)[None, :] >= lengths[:, None], -1)
    return WindowPlan(seq, start, n_frames, width, owner)
