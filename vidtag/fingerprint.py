"""Content fingerprints: sha256 hex digests that say whether a cached result still belongs to its inputs.

One encoding per kind of value, so the same thing always gets the same hash wherever it is taken:

- a file: its bytes (:func:`sha256_file`);
- a JSON-able object: its canonical JSON, keys sorted, no whitespace, NaN refused (:func:`sha256_json`);
- table columns (:func:`sha256_arrays`, :func:`sha256_frame`): floats as little-endian float64 (null is
  NaN), integers and booleans as little-endian int64 (null is -2**62), strings joined by ``\\x00`` with
  null written as ``\\x01`` (so null and "" differ);
- a module's tensors (:func:`sha256_state`): sorted by name, each as ``name|dtype|shape;`` followed by its
  raw bytes; a module and its state dict give the same hash.

These hashes are stored (feature-store keys, gallery files, bundle configs, gallery-embedding caches), so an
encoding here must not change without a format version bump where it is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

INT_NULL = -(2**62)  # stands for a null integer
_NULL_STR = "\x01"  # stands for a null string; "\x00" separates values
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj``: sorted keys, no whitespace, UTF-8 kept, NaN/inf refused (ValueError)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    """sha256 of :func:`canonical_json` (tuples hash like lists, key order does not matter)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def _strings_bytes(values: Iterable[str | None]) -> bytes:
    return "\x00".join(_NULL_STR if v is None else v for v in values).encode("utf-8")


def column_bytes(values) -> bytes:
    """The bytes one column contributes to a fingerprint (see the module docstring); a polars Series,
    numpy array or list. Other column types (dates, nested) raise TypeError: say how to hash them first."""
    if hasattr(values, "fill_null") and hasattr(values, "dtype"):  # a polars Series
        import polars as pl

        s = values
        if s.dtype == pl.String:
            return _strings_bytes(s.to_list())
        if s.dtype.is_integer() or s.dtype == pl.Boolean:
            return s.cast(pl.Int64).fill_null(INT_NULL).to_numpy().astype("<i8").tobytes()
        if s.dtype.is_float():
            return s.cast(pl.Float64).fill_null(np.nan).to_numpy().astype("<f8").tobytes()
        raise TypeError(f"cannot fingerprint a {s.dtype} column ({s.name!r}); cast it to a string, integer or float")
    a = np.asarray(values)
    if a.dtype.kind == "f":
        return a.astype("<f8").tobytes()
    if a.dtype.kind in "iub":
        return a.astype("<i8").tobytes()
    if a.dtype.kind in "UO" and all(v is None or isinstance(v, str) for v in a.ravel().tolist()):
        return _strings_bytes(a.ravel().tolist())
    raise TypeError(f"cannot fingerprint an array of dtype {a.dtype}; expected floats, integers or strings")


def sha256_arrays(*columns) -> str:
    """sha256 over equal-length columns (the columns of one table), in order, without names or framing.

    E.g. a gallery's ``lat, lon[, label]``. The columns must have the same length, which makes the
    concatenation unambiguous; use :func:`sha256_frame` where names and absent columns should count.
    """
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise ValueError(f"sha256_arrays needs columns of one length, got lengths {sorted(lengths)}")
    h = hashlib.sha256()
    for c in columns:
        h.update(column_bytes(c))
    return h.hexdigest()


def sha256_frame(df, columns: Iterable[str] | None = None) -> str:
    """sha256 over a polars DataFrame's ``columns`` (default: all), row order included.

    Framed as ``rows=<n>;`` then per column ``|<name>:`` and its values, or ``absent`` for a column the
    frame lacks, so asking for an optional column that is missing differs from one that is all null.
    """
    h = hashlib.sha256()
    h.update(f"rows={df.height};".encode())
    for c in df.columns if columns is None else columns:
        h.update(f"|{c}:".encode())
        h.update(column_bytes(df[c]) if c in df.columns else b"absent")
    return h.hexdigest()


def sha256_state(module_or_state) -> str:
    """sha256 of a module's tensors (its ``state_dict()``: parameters and persistent buffers) by name,
    dtype, shape and exact bytes; the module itself or its state dict give the same hash."""
    import torch

    state: Mapping[str, Any] = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        t = t.detach().cpu().contiguous() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
