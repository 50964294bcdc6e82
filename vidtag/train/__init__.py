"""VidTAG training from the feature cache: Phase I (contrastive) and Phase II (GeoRefiner), Sec. 3.5 / Appendix A.

Names load lazily (PEP 562): importing ``vidtag.train.phase1`` never imports Phase II.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NoiseConfig": "noise", "corrupt_gps": "noise",
    "Phase1Config": "phase1", "load_phase1": "phase1", "train_phase1": "phase1",
    "Phase2Config": "phase2", "train_phase2": "phase2",
    "RuntimeConfig": "loop",
}
_ERRORS = ("CheckpointMismatchError", "TrainingError")
__all__ = sorted([*_EXPORTS, *_ERRORS])


def __getattr__(name: str):
    if name in _ERRORS:
        return getattr(importlib.import_module("vidtag.errors"), name)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
