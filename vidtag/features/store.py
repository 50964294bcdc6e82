"""The feature store: the frozen CLIP + DINOv2 features of Sec. 3.1 in a Zarr v3 group, row i <-> manifest row i.

Layout, and why:
- ``clip (N, Dc)`` / ``dino (N, Dd)`` float16, ``valid (N,)`` bool. Training reads sequences of 16
  consecutive rows at random positions, so inner chunks are small (``chunk_rows`` = 64 rows: 96 KiB of
  CLIP + 128 KiB of DINOv2 at ViT-L/14 sizes) and a random sequence touches one or two of them. No
  compression: float16 features are near-incompressible and decompression would only slow random reads.
- Chunks are grouped into shards of ``shard_rows`` rows (4096: 6 + 8 MiB files at ViT-L/14 sizes), one
  shard per array per *work unit*: 1M frames make ~750 files, not millions (DVC hashes it in seconds).
  A writer only ever writes whole shards that it owns (zarr-python's partial-shard writes from
  several processes lose data), which is what makes ``--shard i/n`` safe.
- ``done (n_units,)`` bool, one chunk file per unit, written only after that unit's shards; a killed
  run redoes exactly the units without a ``done`` mark, so the result is byte-identical to a clean run.
- Bad frames of a unit go to ``_bad/unit_<u>.json`` (written before ``done``); :meth:`FeatureStore.finalize`
  gathers them into the attributes ``n_bad`` / ``bad_rows`` once every unit is done.
- A cache is verified, not trusted: ``_sums/unit_<u>.json`` records the size and sha256 of each of the
  unit's shard files (written with the shards, before ``done``). A resumed extraction checks every finished
  unit against it and extracts a changed, truncated or deleted one again; :func:`verify_store` checks a
  whole store, and loading checks the sizes (cheap) so a truncated or deleted shard is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vidtag.errors import ConfigError, FeatureStoreError  # FeatureStoreError re-exported: `from vidtag.features.store import ...` works
from vidtag.fingerprint import sha256_file

FORMAT_VERSION = 2  # 2: per-unit shard checksums in _sums/
BAD_DIR = "_bad"
SUMS_DIR = "_sums"
ARRAYS = ("clip", "dino", "valid")  # the arrays a unit writes a shard of
# Attributes that must match for a store to be reused (the rest are informational).
KEY_ATTRS = ("format_version", "backbones", "preprocessing", "manifest_fingerprint", "n_rows", "dims", "shard_rows",
             "chunk_rows")


@dataclass(frozen=True)
class StoreLayout:
    """Row chunking of the store (see the module docstring for why these sizes)."""

    shard_rows: int = 4096  # rows per shard = per work unit; hundreds of files per million frames
    chunk_rows: int = 64  # rows per inner chunk = the unit of a random read

    def __post_init__(self):
        if self.chunk_rows < 1 or self.shard_rows < self.chunk_rows or self.shard_rows % self.chunk_rows:
            raise ConfigError(f"shard_rows ({self.shard_rows}) must be a positive multiple of chunk_rows "
                             f"({self.chunk_rows})")


@dataclass
class Features:
    """Features: ``clip (N, Dc)``, ``dino (N, Dd)`` float16, ``valid (N,)`` bool.

    ``clip`` / ``dino`` are numpy arrays, or read-on-demand zarr arrays from ``load_features(lazy=True)``
    (both have ``shape`` and slicing; training streams the lazy ones when they do not fit in memory).
    """

    clip: Any  # np.ndarray | zarr.Array
    dino: Any
    valid: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Features({len(self.valid)} rows, clip {self.clip.shape[1]}-d, dino {self.dino.shape[1]}-d, "
                f"{int((~self.valid).sum())} invalid)")


def store_key(backbone_fp: dict[str, Any], manifest_fp: str, n_rows: int, layout: StoreLayout) -> dict[str, Any]:
    """The attributes a store is identified by; any difference means the store cannot be reused."""
    return {
        "format_version": FORMAT_VERSION,
        "backbones": {k: v for k, v in backbone_fp.items() if k != "preprocessing"},
        "preprocessing": backbone_fp["preprocessing"],
        "manifest_fingerprint": manifest_fp,
        "n_rows": int(n_rows),
        "dims": {"clip": backbone_fp["clip"]["dim"], "dino": backbone_fp["dino"]["dim"]},
        "shard_rows": layout.shard_rows,
        "chunk_rows": layout.chunk_rows,
    }


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ (for a readable refusal)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _normalise_json(obj: Any) -> Any:
    """What the object reads back as after a JSON round trip (tuples become lists, ...)."""
    return json.loads(json.dumps(obj))


class FeatureStore:
    """An open feature store: which units exist, which are done, and whole-unit writes."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r+")
        except Exception as e:
            raise FeatureStoreError(f"{self.path} is not a vidtag feature store ({type(e).__name__}: {e}); "
                                    "delete it or extract again with --force") from None
        missing = [a for a in ("clip", "dino", "valid", "done") if a not in self.group]
        if missing:
            raise FeatureStoreError(f"{self.path} lacks array(s) {missing}; it is not a complete vidtag feature "
                                    "store; delete it or extract again with --force")
        self.attrs = dict(self.group.attrs)
        try:
            self.n_rows = int(self.attrs["n_rows"])
            self.shard_rows = int(self.attrs["shard_rows"])
        except (KeyError, TypeError, ValueError):
            raise FeatureStoreError(f"{self.path}: attributes n_rows / shard_rows are missing or not numbers; it is "
                                    "not a vidtag feature store; delete it or extract again with --force") from None
        self.n_units = int(self.group["done"].shape[0])

    @classmethod
    def create(cls, path: str | os.PathLike, key: dict[str, Any], *, info: dict[str, Any] | None = None) -> "FeatureStore":
        """Create an empty store atomically: built beside ``path``, then renamed into place.

        If another process (another ``--shard``) created it first, that store is opened instead.
        """
        import zarr

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n, sr, cr = key["n_rows"], key["shard_rows"], key["chunk_rows"]
        n_units = max(1, -(-n // sr))
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for name, dim in (("clip", key["dims"]["clip"]), ("dino", key["dims"]["dino"])):
                g.create_array(name, shape=(n, dim), dtype="float16", chunks=(cr, dim), shards=(sr, dim),
                               compressors=None, fill_value=0.0)
            g.create_array("valid", shape=(n,), dtype="bool", chunks=(cr,), shards=(sr,), fill_value=False)
            g.create_array("done", shape=(n_units,), dtype="bool", chunks=(1,), fill_value=False)
            g.attrs.update({**key, **(info or {}), "n_units": n_units, "complete": False, "n_bad": None,
                            "bad_rows": None})
            (tmp / BAD_DIR).mkdir()
            (tmp / SUMS_DIR).mkdir()
            try:
                os.rename(tmp, path)  # fails if another process got there first (non-empty target)
            except OSError:
                if not path.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path)

    # -- keys -----------------------------------------------------------------------------------

    def key(self) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in KEY_ATTRS}

    def check_key(self, key: dict[str, Any]) -> None:
        """Refuse to mix: raise unless the store was made with exactly this key."""
        want = _normalise_json(key)
        diff = _diff(self.key(), want)
        if diff:
            raise FeatureStoreError(
                f"{self.path} was extracted with different settings ({', '.join(diff)} differ) and cannot be "
                "reused or mixed; extract again with --force (vidtag extract --force, or delete the store) "
                "to rebuild it for the current manifest and backbones")

    # -- units ----------------------------------------------------------------------------------

    def unit_rows(self, u: int) -> tuple[int, int]:
        return u * self.shard_rows, min((u + 1) * self.shard_rows, self.n_rows)

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def clean_unit(self, u: int) -> None:
        """Before unit ``u`` is written again: remove what a killed writer may have left (zarr's ``*.partial``
        temp files, ours) and the unit's old shard files."""
        for name in ("clip", "dino", "valid", "done"):
            d = self.path / name / "c"
            if d.is_dir():
                for p in d.glob(f"{u}.*.partial"):
                    p.unlink(missing_ok=True)
                for p in (d / str(u)).glob("*.partial") if (d / str(u)).is_dir() else ():
                    p.unlink(missing_ok=True)
        (self.path / BAD_DIR / f".unit_{u:06d}.json.tmp").unlink(missing_ok=True)
        (self.path / SUMS_DIR / f".unit_{u:06d}.json.tmp").unlink(missing_ok=True)
        for name in ARRAYS:  # the unit is rewritten whole: zarr must not merge into a damaged old shard
            self.shard_file(name, u).unlink(missing_ok=True)

    # -- checksums ------------------------------------------------------------------------------

    def shard_file(self, name: str, u: int) -> Path:
        """The shard file of array ``name`` for unit ``u`` (Zarr v3 default chunk keys, '/' separated)."""
        return self.path / name / "c" / str(u) / "0" if name != "valid" else self.path / name / "c" / str(u)

    def _sums_path(self, u: int) -> Path:
        return self.path / SUMS_DIR / f"unit_{u:06d}.json"

    def unit_sums(self, u: int) -> dict[str, dict[str, Any] | None]:
        """Size and sha256 of each shard file of unit ``u``; None where zarr wrote no file (all fill value)."""
        out: dict[str, dict[str, Any] | None] = {}
        for name in ARRAYS:
            f = self.shard_file(name, u)
            out[name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)} if f.is_file() else None
        return out

    def unit_problem(self, u: int, *, full: bool = True) -> str | None:
        """Why finished unit ``u`` cannot be trusted, or None. ``full=False`` compares sizes only (no reading)."""
        try:
            recorded = json.loads(self._sums_path(u).read_text())
        except (OSError, ValueError):
            return f"has no readable checksum record ({SUMS_DIR}/{self._sums_path(u).name})"
        if not isinstance(recorded, dict):
            return f"has a damaged checksum record ({SUMS_DIR}/{self._sums_path(u).name})"
        for name in ARRAYS:
            f, want = self.shard_file(name, u), recorded.get(name)
            rel = f.relative_to(self.path).as_posix()
            if want is None:
                if f.exists():
                    return f"shard {rel} exists but none was written"
                continue
            if not f.is_file():
                return f"shard {rel} is missing (deleted)"
            size = f.stat().st_size
            if size != want.get("bytes"):
                return f"shard {rel} has {size} bytes, {want.get('bytes')} were written (truncated or changed)"
            if full and sha256_file(f) != want.get("sha256"):
                return f"shard {rel} does not match its sha256 (changed since it was written)"
        return None

    def redo_unit(self, u: int) -> None:
        """Mark unit ``u`` not done (and the store incomplete), so the next run extracts it again."""
        self.group["done"][u] = False
        if self.attrs.get("complete"):
            self.group.attrs.update({"complete": False, "n_bad": None, "bad_rows": None})
            self.attrs = dict(self.group.attrs)

    def problems(self, units=None, *, full: bool = True) -> dict[int, str]:
        """Unit -> why it cannot be trusted, over ``units`` (default all); not-done units are not extracted."""
        done = self.done_mask()
        out = {}
        for u in range(self.n_units) if units is None else units:
            why = self.unit_problem(u, full=full) if done[u] else "is not extracted"
            if why:
                out[u] = why
        return out

    def write_unit(self, u: int, clip: np.ndarray, dino: np.ndarray, valid: np.ndarray,
                   bad: list[tuple[int, str]]) -> None:
        """Write unit ``u`` whole (its shards, then its bad list), then mark it done."""
        start, stop = self.unit_rows(u)
        if clip.shape[0] != stop - start or dino.shape[0] != stop - start or valid.shape[0] != stop - start:
            raise ValueError(f"unit {u} covers rows {start}:{stop} but got {clip.shape[0]} rows")
        self.group["clip"][start:stop] = clip.astype(np.float16)
        self.group["dino"][start:stop] = dino.astype(np.float16)
        self.group["valid"][start:stop] = valid.astype(bool)
        bad_path = self.path / BAD_DIR / f"unit_{u:06d}.json"
        if bad:
            tmp = bad_path.with_name(f".{bad_path.name}.tmp")
            tmp.write_text(json.dumps([{"row": int(r), "reason": str(m)} for r, m in bad], indent=1) + "\n")
            os.replace(tmp, bad_path)
        else:
            bad_path.unlink(missing_ok=True)
        sums = self._sums_path(u)
        sums.parent.mkdir(exist_ok=True)
        tmp = sums.with_name(f".{sums.name}.tmp")
        tmp.write_text(json.dumps(self.unit_sums(u), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, sums)
        self.group["done"][u] = True

    def finalize(self) -> dict[str, Any] | None:
        """Once every unit is done: gather bad rows into the attributes and mark the store complete."""
        if not self.done_mask().all():
            return None
        bad: list[dict[str, Any]] = []
        for p in sorted((self.path / BAD_DIR).glob("unit_*.json")):
            bad += json.loads(p.read_text())
        bad.sort(key=lambda b: b["row"])
        summary = {"complete": True, "n_bad": len(bad), "bad_rows": bad}
        if any(self.attrs.get(k) != v for k, v in summary.items()):
            self.group.attrs.update(summary)
            self.attrs = dict(self.group.attrs)
        return summary

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))


def open_store(path: str | os.PathLike, key: dict[str, Any], *, overwrite: bool = False,
               info: dict[str, Any] | None = None) -> tuple[FeatureStore, str]:
    """Open the store at ``path`` for ``key``, creating it if absent; returns (store, "created"|"resumed"|"complete").

    A store with another key (or not a store at all) is refused unless ``overwrite``, which deletes and
    recreates it; a store with the same key is reused even then, so ``--force`` never throws work away.
    """
    path = Path(path)
    if path.exists():
        try:
            store = FeatureStore(path)
            store.check_key(key)
            return store, "complete" if store.complete else "resumed"
        except FeatureStoreError:
            if not overwrite:
                raise
        shutil.rmtree(path)
    return FeatureStore.create(path, key, info=info), "created"


_EMPTY = np.uint64(2**64 - 1)  # shard-index entry of an inner chunk that was never written (all fill value)


class ChunkReader:
    """Inner chunks of a 2-D float16 store array, read straight from its shard files.

    zarr costs ~0.3 ms of Python per chunk read, and a random training batch touches hundreds of chunks.
    For the layout this module writes (inner chunks uncompressed little-endian; the shard index of
    (offset, nbytes) uint64 pairs plus a crc32c at the end of the shard file: the Zarr v3 sharding spec)
    we read each chunk's byte range with one ``os.pread``. Any other layout or store -> ``for_array`` gives
    None and callers read through zarr.
    """

    def __init__(self, directory: Path, shape: tuple[int, int], chunk_rows: int, shard_rows: int):
        self.directory, self.shape, self.chunk_rows = Path(directory), shape, chunk_rows
        self.per_shard = shard_rows // chunk_rows
        self.chunk_bytes = chunk_rows * shape[1] * 2
        self._index: dict[int, np.ndarray | None] = {}  # shard -> (per_shard, 2) offsets/nbytes; None = no file

    @classmethod
    def for_array(cls, arr) -> "ChunkReader | None":
        try:
            root, meta = Path(arr.store.root), json.loads(json.dumps(arr.metadata.to_dict(), default=str))
        except AttributeError:  # not a local store, or not zarr v3
            return None
        codecs = meta.get("codecs") or [{}]
        conf = codecs[0].get("configuration", {})
        little = [{"name": "bytes", "configuration": {"endian": "little"}}]
        shard_shape = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        inner = conf.get("chunk_shape")
        ours = (len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed" and conf.get("codecs") == little
                and conf.get("index_codecs") == little + [{"name": "crc32c"}] and conf.get("index_location") == "end"
                and meta.get("data_type") == "float16" and meta.get("fill_value") == 0.0 and len(arr.shape) == 2
                and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
                and inner is not None and shard_shape is not None and inner[1] == shard_shape[1] == arr.shape[1])
        if not ours:
            return None
        return cls(root / arr.path, tuple(arr.shape), int(inner[0]), int(shard_shape[0]))

    def _shard_index(self, shard: int, f) -> np.ndarray | None:
        if shard not in self._index:
            if f is None:
                self._index[shard] = None
            else:
                size = self.per_shard * 16 + 4
                raw = os.pread(f.fileno(), size, os.fstat(f.fileno()).st_size - size)
                import google_crc32c  # zarr's own dependency for this codec

                if len(raw) != size or np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
                    raise FeatureStoreError(f"{f.name}: the shard index is damaged (bad checksum or truncated file); "
                                            "extract the features again with --force")
                self._index[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)
        return self._index[shard]

    def read(self, chunks) -> dict[int, np.ndarray]:
        """Row-chunk numbers -> their rows ``(<= chunk_rows, D)`` float16; never-written chunks are zeros."""
        n, dim, cr = self.shape[0], self.shape[1], self.chunk_rows
        out: dict[int, np.ndarray] = {}
        chunks = sorted(set(int(c) for c in chunks))
        for shard in sorted({c // self.per_shard for c in chunks}):
            path = self.directory / "c" / str(shard) / "0"
            f = open(path, "rb") if path.exists() else None
            try:
                index = self._shard_index(shard, f)
                for c in (c for c in chunks if c // self.per_shard == shard):
                    rows = min(cr, n - c * cr)
                    offset, nbytes = (_EMPTY, 0) if index is None else index[c % self.per_shard]
                    if offset == _EMPTY:
                        out[c] = np.zeros((rows, dim), dtype=np.float16)
                        continue
                    raw = os.pread(f.fileno(), self.chunk_bytes, int(offset))
                    if int(nbytes) != self.chunk_bytes or len(raw) != self.chunk_bytes:
                        raise FeatureStoreError(f"{path}: chunk {c} has {len(raw)} of {self.chunk_bytes} bytes; "
                                                "the store is damaged; extract the features again with --force")
                    out[c] = np.frombuffer(raw, dtype="<f2").reshape(cr, dim)[:rows]
            finally:
                if f is not None:
                    f.close()
        return out


def load_features(path: str | os.PathLike, expect_fingerprint: str | None = None, *, lazy: bool = False) -> Features:
    """Read a complete store into memory; ``expect_fingerprint`` (a manifest fingerprint) guards against mix-ups.

    ``lazy=True`` leaves ``clip`` / ``dino`` as zarr arrays read on demand (``valid`` is still loaded), for
    stores bigger than memory; vidtag.train.batches.feature_source decides whether to load or stream them.
    """
    path = Path(path)
    if not path.exists():
        raise FeatureStoreError(f"feature store {path} does not exist; run `vidtag extract` (or `dvc repro extract`)")
    store = FeatureStore(path)
    if store.attrs.get("format_version") != FORMAT_VERSION:
        raise FeatureStoreError(f"feature store {path} has format {store.attrs.get('format_version')}, this vidtag "
                                f"reads format {FORMAT_VERSION}; extract again with --force")
    if not store.complete:
        left = int((~store.done_mask()).sum())
        raise FeatureStoreError(f"feature store {path} is incomplete ({left} of {store.n_units} units not extracted); "
                                "run the extraction again to finish it")
    if expect_fingerprint is not None and store.attrs.get("manifest_fingerprint") != expect_fingerprint:
        raise FeatureStoreError(f"feature store {path} was extracted from another manifest (fingerprint "
                                f"{str(store.attrs.get('manifest_fingerprint'))[:12]}..., expected "
                                f"{expect_fingerprint[:12]}...); extract again with --force")
    damaged = store.problems(full=False)  # sizes only: a truncated or deleted shard is never read
    if damaged:
        u, why = next(iter(damaged.items()))
        more = f" ({len(damaged) - 1} more damaged unit(s))" if len(damaged) > 1 else ""
        raise FeatureStoreError(f"feature store {path}: unit {u} (rows {store.unit_rows(u)[0]}:{store.unit_rows(u)[1]}) "
                                f"{why}{more}; run the extraction again (vidtag extract) to recompute it")
    g = store.group
    valid = np.asarray(g["valid"][:], dtype=bool)
    if lazy:
        return Features(g["clip"], g["dino"], valid, dict(store.attrs))
    return Features(np.asarray(g["clip"][:]), np.asarray(g["dino"][:]), valid, dict(store.attrs))


def verify_store(path: str | os.PathLike, *, full: bool = True) -> dict[int, str]:
    """Check every unit of the store at ``path`` against its recorded checksums (``full=False``: sizes only).

    Returns unit -> problem (empty when the whole store is intact); changes nothing. ``vidtag extract
    --verify`` (``extract_features(..., verify=True)``) also extracts the damaged units again.
    """
    path = Path(path)
    if not path.exists():
        raise FeatureStoreError(f"feature store {path} does not exist; run `vidtag extract` (or `dvc repro extract`)")
    return FeatureStore(path).problems(full=full)
