"""VidTAG's trainable parts (Sec. 3.1-3.4): LocationEncoder, FrameEncoder (TempGeo + MLP), GeoRefiner, bundle I/O.

Names load lazily (PEP 562), so importing one submodule never imports the others: a pipeline stage depends
only on the files it really uses.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Bundle": "bundle", "BundleError": "bundle", "assemble_bundle": "bundle", "build_models": "bundle",
    "load_bundle": "bundle", "save_bundle": "bundle",
    "FrameEncoderConfig": "config", "GeoRefinerConfig": "config", "LocationEncoderConfig": "config", "VidTAGConfig": "config",
    "FrameEncoder": "frame_encoder", "TempGeo": "frame_encoder",
    "GeoRefiner": "georefiner",
    "GeoCLIPHead": "geoclip_head",
    "LocationEncoder": "location_encoder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
