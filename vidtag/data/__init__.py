"""Datasets to manifests: the manifest schema, one reader per dataset, and the toy world (Sec. 4.1)."""

from vidtag.data.manifest import (
    MANIFEST_COLUMNS,
    Manifest,
    ManifestError,
    manifest_fingerprint,
    read_manifest,
    validate_manifest,
    write_manifest,
)

__all__ = [
    "MANIFEST_COLUMNS",
    "Manifest",
    "ManifestError",
    "manifest_fingerprint",
    "read_manifest",
    "validate_manifest",
    "write_manifest",
]
