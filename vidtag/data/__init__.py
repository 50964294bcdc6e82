"""Datasets to manifests: the manifest schema, one reader per dataset, and the toy world (Sec. 4.1).

Submodules are imported on first use of a name (PEP 562), not with the package, so that importing one
reader (or a DVC stage's static import closure) does not pull in all of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule defining it
_LAZY = {
    "MANIFEST_COLUMNS": "manifest",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "manifest_fingerprint": "manifest",
    "read_manifest": "manifest",
    "validate_manifest": "manifest",
    "write_manifest": "manifest",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from vidtag.data.manifest import (
        MANIFEST_COLUMNS,
        Manifest,
        ManifestError,
        manifest_fingerprint,
        read_manifest,
        validate_manifest,
        write_manifest,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
