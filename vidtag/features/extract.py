"""The extraction loop: manifest rows -> frozen CLIP + DINOv2 features in the Zarr store, resumable and shardable.

Work is done in units = store shards (``StoreLayout.shard_rows`` rows). Unit u belongs to process
``u % n`` of ``--shard i/n`` (or torchrun's RANK / WORLD_SIZE), so concurrent writers never share a
shard. A unit is written whole, then marked done; a killed run redoes only unmarked units, and since
batch boundaries are fixed inside a unit, the final store is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidtag.device import resolve_device
from vidtag.errors import ConfigError, ManifestError
from vidtag.features.backbones import BackboneConfig, DualBackbone, build_backbones
from vidtag.features.dataset import FrameBatches, FrameSource
from vidtag.features.store import StoreLayout, open_store, store_key


@dataclass(frozen=True)
class ExtractConfig:
    """How extraction runs; none of these change the features except ``bf16`` (recorded in the store key)."""

    batch_size: int = 256  # frames per forward pass; large batches keep a GPU busy (App. A is silent)
    num_workers: int = 4  # DataLoader processes decoding + preprocessing frames (0 = in the main process)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, which stays fp32 and deterministic)
    compile: bool = False  # torch.compile the encoders on CUDA (worth it for long runs only)
    prefetch_batches: int = 4  # batches each worker decodes ahead, overlapping decode with compute
    layout: StoreLayout = field(default_factory=StoreLayout)

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}")


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

    @property
    def frames_per_s(self) -> float:
        return self.frames_written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the user."""
        if self.status == "up-to-date":
            return f"{self.path}: already complete for this manifest and these backbones; nothing to do"
        s = (f"{self.path}: wrote {self.frames_written} frames in {self.units_written} unit(s), "
             f"{self.seconds:.1f} s ({self.frames_per_s:.0f} frames/s)")
        if self.status == "partial":
            return s + f"; {self.units_left} unit(s) left for other shards"
        return s + f"; store complete, {self.n_rows} rows, {self.n_bad} bad frame(s) masked"


# params.yaml `backbone:` keys that are run settings rather than backbone identity.
RUN_KEYS = ("batch_size", "num_workers", "device", "bf16", "compile", "prefetch_batches")
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
) -> ExtractResult:
    """Fill the store at ``out`` with features for ``manifest`` (a ``vidtag.data.manifest.Manifest``).

    ``max_units`` stops after that many units (tests and benchmarks); the store stays resumable.
    """
    from vidtag.data.manifest import manifest_fingerprint
    from vidtag.progress import Progress

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
    store, state = open_store(out, key, overwrite=overwrite, info={"software": _software()})
    if state == "complete":
        return ExtractResult(store.path, "up-to-date", n, 0, 0, time.perf_counter() - t0,
                             store.attrs.get("n_bad"), store.attrs.get("bad_rows"))

    done = store.done_mask()
    units = [u for u in range(store.n_units) if u % shard_n == shard_i and not done[u]]
    if max_units is not None:
        units = units[:max_units]
    batches: list[tuple[int, int]] = []
    for u in units:
        store.clean_unit(u)
        a, b = store.unit_rows(u)
        batches += [(s, min(s + cfg.batch_size, b)) for s in range(a, b, cfg.batch_size)]

    source = FrameSource.from_manifest(df, manifest.root)
    loader = torch.utils.data.DataLoader(
        FrameBatches(source, batches, bb.preprocessor), batch_size=None, shuffle=False,
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
        return ExtractResult(store.path, "partial", n, len(units), written, seconds, units_left=left)
    return ExtractResult(store.path, "complete", n, len(units), written, seconds, summary["n_bad"], summary["bad_rows"])
