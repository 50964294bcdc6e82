"""Frozen CLIP + DINOv2 features (Sec. 3.1), cached once in a Zarr v3 store for training and evaluation.

Submodules are imported on first use of a name (PEP 562), not with the package: importing
``vidtag.features.store`` must not load torch and open_clip through ``backbones``, and a DVC stage's code
dependencies (its static import closure) must not grow to every submodule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule defining it
_LAZY = {
    "BackboneConfig": "backbones",
    "BackboneError": "backbones",
    "DualBackbone": "backbones",
    "build_backbones": "backbones",
    "Features": "store",
    "FeatureStoreError": "store",
    "load_features": "store",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from vidtag.features.backbones import BackboneConfig, BackboneError, DualBackbone, build_backbones
    from vidtag.features.store import Features, FeatureStoreError, load_features


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
