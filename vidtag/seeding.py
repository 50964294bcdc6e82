"""Seeded construction without side effects: library code never reseeds the caller's global RNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside, torch's global RNG (CPU and any CUDA device) starts from ``seed``; the caller's state is
    restored on exit, so module initialisation and dropout draws are reproducible and leave no trace."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
