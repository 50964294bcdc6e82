"""The extraction loop: manifest rows -> frozen CLIP + DINOv2 features in the Zarr store, resumable and shardable.

Work is done in units = store shards (``StoreLayout.shard_rows`` rows). Unit u belongs to process
``u % n`` of ``--shard i/n`` (or torchrun's RANK / WORLD_SIZE), so concurrent writers never share a
shard. A unit is written whole, then marked done; a killed run redoes only unmarked units, and since
batch boundaries are fixed inside a unit, the final store is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidtag.device import resolve_device
from vidtag.errors import ConfigError, FeatureStoreError, ManifestError
from vidtag.features.backbones import BackboneConfig, DualBackbone, build_backbones
from vidtag.features.dataset import MAX_PIXELS, FrameBatches, FrameSource
from vidtag.features.store import StoreLayout, open_store, store_key
from vidtag.lock import writer_lock


@dataclass(frozen=True)
class ExtractConfig:
    """How extraction runs; none of these change the features except ``bf16`` (recorded in the store key)."""

    batch_size: int = 256  # frames per forward pass; large batches keep a GPU busy (App. A is silent)
    num_workers: int = 4  # DataLoader processes decoding + preprocessing frames (0 = in the main process)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, which stays fp32 and deterministic)
    compile: bool = False  # torch.compile the encoders on CUDA (worth it for long runs only)
    prefetch_batches: int = 4  # batches each worker decodes ahead, overlapping decode with compute
    max_pixels: int = MAX_PIXELS  # larger frames are refused per frame (masked bad), never decoded
    layout: StoreLayout = field(default_factory=StoreLayout)

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be a whole number >= 1, got {self.max_pixels!r}")


@dataclass
class ExtractResult:
    """What a run did: ``status`` is "up-to-date", "complete" or "partial" (other shards still to finish)."""

    path: Path
    status: str
    n_rows: int
    units_written: int
    frames_written: int
    seconds: float
    n_bad: int | None = None
    bad_rows: list[dict[str, Any]] | None = None
    units_left: int = 0
    units_redone: int = 0  # finished units found damaged (checksum, size, missing shard) and extracted again
    units_verified: int = 0  # finished units whose shards were checked against their checksums

    @property
    def frames_per_s(self) -> float:
        return self.frames_written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the user."""
        if self.status == "up-to-date":
            checked = f"; {self.units_verified} unit(s) match their checksums" if self.units_verified else ""
            return f"{self.path}: already complete for this manifest and these backbones{checked}; nothing to do"
        s = (f"{self.path}: wrote {self.frames_written} frames in {self.units_written} unit(s), "
             f"{self.seconds:.1f} s ({self.frames_per_s:.0f} frames/s)")
        if self.units_redone:
            s += f", {self.units_redone} of them damaged and extracted again"
        if self.status == "partial":
            return s + f"; {self.units_left} unit(s) left for other shards"
        return s + f"; store complete, {self.n_rows} rows, {self.n_bad} bad frame(s) masked"


# params.yaml `backbone:` keys that are run settings rather than backbone identity.
RUN_KEYS = ("batch_size", "num_workers", "device", "bf16", "compile", "prefetch_batches", "max_pixels")
LAYOUT_KEYS = ("shard_rows", "chunk_rows")


def configs_from_params(params: dict[str, Any]) -> tuple[BackboneConfig, ExtractConfig]:
    """Split the ``backbone`` params section into the backbone identity and how extraction runs."""
    run = {k: params[k] for k in RUN_KEYS if k in params}
    layout = StoreLayout(**{k: int(params[k]) for k in LAYOUT_KEYS if k in params})
    rest = {k: v for k, v in params.items() if k not in RUN_KEYS and k not in LAYOUT_KEYS}
    return BackboneConfig.from_dict(rest), ExtractConfig(**run, layout=layout)


def parse_shard(spec: str | None = None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); without a spec, torchrun's RANK / WORLD_SIZE; else (0, 1)."""
    env = os.environ if env is None else env
    if spec is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            spec = f"{env['RANK']}/{env['WORLD_SIZE']}"
        else:
            return 0, 1
    try:
        i_s, n_s = str(spec).split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise ConfigError(f"shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"shard {spec!r} is out of range: need 0 <= i < n")
    return i, n


def _software() -> dict[str, str]:
    import open_clip
    import transformers
    import zarr

    return {"torch": torch.__version__.split("+")[0], "open_clip": open_clip.__version__,
            "transformers": transformers.__version__, "zarr": zarr.__version__}


def extract_features(
    manifest,
    out: str | os.PathLike,
    backbone: DualBackbone | BackboneConfig,
    cfg: ExtractConfig = ExtractConfig(),
    *,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
    max_units: int | None = None,
    verify: bool = False,
) -> ExtractResult:
    """Fill the store at ``out`` with features for ``manifest`` (a ``vidtag.data.manifest.Manifest``).

    The store is not trusted: a resumed run checks every finished unit of its shard against the recorded
    sha256 of its shard files, a complete store their sizes (``verify=True``: their sha256 too), and a
    damaged unit is extracted again, with a line saying so. One writer per shard at a time
    (:func:`vidtag.lock.writer_lock`): a second one is refused naming the first. ``max_units`` stops after
    that many units (tests and benchmarks); the store stays resumable.
    """
    from vidtag.data.manifest import manifest_fingerprint

    t0 = time.perf_counter()
    df = manifest.df
    n = df.height
    if n == 0:
        raise ManifestError("the manifest has no rows; nothing to extract")
    shard_i, shard_n = shard
    if overwrite and shard_n > 1:
        raise ConfigError("--force with --shard would let one shard delete the others' work; "
                          "rebuild once without --shard (or delete the store), then start the shards")
    device = resolve_device(cfg.device)
    bb = backbone if isinstance(backbone, DualBackbone) else build_backbones(backbone, device)
    bb = bb.to(device)
    bb.set_precision(cfg.bf16)
    if cfg.compile and device.type == "cuda":
        bb.compile_encoders()

    key = store_key(bb.fingerprint(), manifest_fingerprint(df), n, cfg.layout)
    # Shards i/n and j/n (i != j) write disjoint units; any other pair (a --force rebuild, another n) conflicts.
    try:
        with writer_lock(out, slot=f"shard-{shard_i}-of-{shard_n}", what=f"vidtag extract, shard {shard_i}/{shard_n}",
                         compatible=_shards_compatible):
            return _extract(manifest, out, bb, cfg, key, device, t0, shard=shard, overwrite=overwrite,
                            progress=progress, max_units=max_units, verify=verify)
    except OSError as e:  # a full disk, a read-only folder: finished units stay done, a rerun resumes
        raise FeatureStoreError(f"cannot write feature store {out} ({e.strerror or e}); the units finished so far are "
                                "kept: free space or fix the folder, then run again to resume") from None


def _shards_compatible(a: str, b: str) -> bool:
    """Two ``shard-<i>-of-<n>`` lock slots may write at once when they split the store the same way."""
    try:
        (ia, na), (ib, nb) = ((int(x) for x in s.removeprefix("shard-").split("-of-")) for s in (a, b))
    except ValueError:
        return False
    return na == nb and ia != ib


def _check_finished_units(store, units: list[int], *, full: bool) -> int:
    """Mark the finished units among ``units`` whose shards fail their checksums not done; returns how many."""
    done = store.done_mask()
    redone = 0
    for u in units:
        if not done[u]:
            continue
        why = store.unit_problem(u, full=full)
        if why:
            a, b = store.unit_rows(u)
            print(f"{store.path}: unit {u} (rows {a}:{b}) {why}; extracting it again", file=sys.stderr, flush=True)
            store.redo_unit(u)
            redone += 1
    return redone


def _extract(manifest, out, bb: DualBackbone, cfg: ExtractConfig, key: dict[str, Any], device, t0: float, *,
             shard: tuple[int, int], overwrite: bool, progress: bool, max_units: int | None,
             verify: bool) -> ExtractResult:
    """The body of :func:`extract_features`, run while holding the store's lock."""
    from vidtag.progress import Progress

    df = manifest.df
    n = df.height
    shard_i, shard_n = shard
    store, state = open_store(out, key, overwrite=overwrite, info={"software": _software(), "max_pixels": cfg.max_pixels})
    own = [u for u in range(store.n_units) if u % shard_n == shard_i]
    redone = verified = 0
    if state != "created":
        full = verify or state == "resumed"  # a complete store: sizes always, sha256 when asked to verify
        verified = int(store.done_mask()[own].sum()) if full else 0
        redone = _check_finished_units(store, own, full=full)
        if state == "complete" and redone == 0:
            return ExtractResult(store.path, "up-to-date", n, 0, 0, time.perf_counter() - t0,
                                 store.attrs.get("n_bad"), store.attrs.get("bad_rows"), units_verified=verified)

    done = store.done_mask()
    units = [u for u in own if not done[u]]
    if max_units is not None:
        units = units[:max_units]
    batches: list[tuple[int, int]] = []
    for u in units:
        store.clean_unit(u)
        a, b = store.unit_rows(u)
        batches += [(s, min(s + cfg.batch_size, b)) for s in range(a, b, cfg.batch_size)]

    source = FrameSource.from_manifest(df, manifest.root, getattr(manifest, "allow_outside_root", False))
    loader = torch.utils.data.DataLoader(
        FrameBatches(source, batches, bb.preprocessor, cfg.max_pixels), batch_size=None, shuffle=False,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=cfg.prefetch_batches if cfg.num_workers else None,
    )
    dc, dd = bb.dims
    n_todo = sum(b - a for a, b in batches)
    written = 0
    unit_iter = iter(units)
    cur = None  # (unit, start, stop, clip, dino, valid, bad, filled)
    with Progress(total=n_todo, desc="extract", unit="frame", enabled=progress) as bar:
        for rows, x_clip, x_dino, ok, reasons in loader:
            if cur is None:
                u = next(unit_iter)
                a, b = store.unit_rows(u)
                cur = [u, a, b, np.zeros((b - a, dc), np.float16), np.zeros((b - a, dd), np.float16),
                       np.zeros(b - a, bool), [], 0]
            f_clip, f_dino = bb.encode(x_clip, x_dino)  # (B, Dc), (B, Dd) float32 on the device
            f_clip = f_clip.to("cpu", torch.float16).numpy()
            f_dino = f_dino.to("cpu", torch.float16).numpy()
            ok = ok.numpy()
            rows = rows.numpy()
            finite = np.isfinite(f_clip).all(1) & np.isfinite(f_dino).all(1)  # fp16 overflow or a NaN from the model
            reasons = [m or ("" if fin or not good else "non-finite features (float16 overflow or NaN)")
                       for m, fin, good in zip(reasons, finite, ok)]
            ok = ok & finite
            lo, hi = rows[0] - cur[1], rows[-1] - cur[1] + 1
            cur[3][lo:hi] = np.where(ok[:, None], f_clip, 0)  # bad frames: zeros, masked by valid=False
            cur[4][lo:hi] = np.where(ok[:, None], f_dino, 0)
            cur[5][lo:hi] = ok
            cur[6] += [(int(r), m) for r, m, good in zip(rows, reasons, ok) if not good]
            cur[7] += len(rows)
            bar.update(len(rows))
            if cur[7] == cur[2] - cur[1]:
                u, a, b, c, d, v, bad, _ = cur
                store.write_unit(u, c, d, v, bad)
                for r, m in bad:
                    bar.write(f"bad frame: manifest row {r}: {m}")
                written += b - a
                cur = None
    seconds = time.perf_counter() - t0
    summary = store.finalize()
    if summary is None:
        left = int((~store.done_mask()).sum())
        return ExtractResult(store.path, "partial", n, len(units), written, seconds, units_left=left,
                             units_redone=redone, units_verified=verified)
    return ExtractResult(store.path, "complete", n, len(units), written, seconds, summary["n_bad"], summary["bad_rows"],
                         units_redone=redone, units_verified=verified)
