"""Which torch device a run uses: one rule for extraction, training, inference and the CLI."""

from __future__ import annotations

import os

import torch

from vidtag.errors import DeviceError

__all__ = ["DeviceError", "resolve_device"]


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else goes to ``torch.device``.

    Under torchrun (LOCAL_RANK set), ``auto`` picks the rank's own GPU, so shards extracted by
    several processes on one node do not all land on GPU 0. An explicit CUDA device on a machine
    without one is an error rather than a silent fall-back to the CPU.
    """
    if name is None or str(name) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return torch.device("cuda", local_rank)
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {str(name)!r} not understood; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} requested but CUDA is not available here; use cpu or auto")
    return dev
