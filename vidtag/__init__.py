"""vidtag: frame-wise video geolocalization (VidTAG) over a cached-feature pipeline.

``from vidtag import load_model`` is the Python API (vidtag.api); it loads lazily (PEP 562), so
``import vidtag`` stays light: no torch, no model code until a name is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"load_model": "api", "Model": "api"}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
