"""Where batches of cached features come from: the whole cache on the device, or streamed from the store.

:class:`FeatureTensors` holds the whole cache on the device (no loader in the loop); when it does not fit,
:class:`StreamedFeatures` reads the rows of each batch from the Zarr store (or host arrays) instead, with
the same ``gather`` API and bit-identical batches. :func:`feature_source` picks one. Training, validation
and evaluation all gather through these, so the model sees the same float16 features everywhere.
Row ``i`` of the features is row ``i`` of the manifest.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from vidtag.errors import ConfigError, FeatureStoreError
from vidtag.features.store import ChunkReader


@dataclass
class FeatureTensors:
    """Whole feature cache on one device: clip (N, Dc) and dino (N, Dd) float16, latlon (N, 2) float64."""

    clip: torch.Tensor
    dino: torch.Tensor
    latlon: torch.Tensor

    @classmethod
    def from_arrays(cls, clip, dino, manifest: pl.DataFrame, device: torch.device) -> FeatureTensors:
        """``clip`` / ``dino``: numpy arrays, or zarr arrays (``load_features(lazy=True)``) copied block by block."""
        latlon = _manifest_latlon(clip, dino, manifest)
        # float16 halves device memory; batches are cast to float32 after the gather.
        return cls(_resident(clip, device), _resident(dino, device), torch.from_numpy(latlon).to(device))

    @classmethod
    def from_frames(cls, clip, dino, device: torch.device) -> FeatureTensors:
        """Features of frames with no known GPS (a video to predict): latlon is NaN."""
        if clip.shape[0] != dino.shape[0]:
            raise FeatureStoreError(f"clip has {clip.shape[0]} rows but dino has {dino.shape[0]}; they must describe the same frames")
        latlon = torch.full((int(clip.shape[0]), 2), float("nan"), dtype=torch.float64, device=device)
        return cls(_resident(clip, device), _resident(dino, device), latlon)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (B, T) with -1 = pad -> clip (B, T, Dc), dino (B, T, Dd) float32 and latlon (B, T, 2)."""
        r = rows.clamp(min=0)
        return self.clip[r].float(), self.dino[r].float(), self.latlon[r]

    def sample(self, draw):
        """``draw()`` (a step drawing its batch's rows on the device), as is: nothing here waits for the device."""
        return draw()


def _manifest_latlon(clip, dino, manifest: pl.DataFrame) -> np.ndarray:
    """(N, 2) float64 lat/lon (NaN = unknown), after checking the features have one row per manifest row."""
    if clip.shape[0] != len(manifest) or dino.shape[0] != len(manifest):
        raise FeatureStoreError(
            f"feature store has {clip.shape[0]} clip / {dino.shape[0]} dino rows but the manifest has {len(manifest)}; "
            "re-run `dvc repro extract` so the store matches the manifest"
        )
    return manifest.select(pl.col("lat").fill_null(np.nan), pl.col("lon").fill_null(np.nan)).to_numpy().astype(np.float64)


def _resident(arr, device: torch.device) -> torch.Tensor:
    """The whole array as a float16 tensor on ``device``; a zarr array goes one shard at a time, so host
    memory never holds more than a shard of it (the device may be the only place it fits)."""
    if isinstance(arr, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float16)).to(device)
    out = torch.empty(tuple(arr.shape), dtype=torch.float16, device=device)
    block = int((getattr(arr, "shards", None) or arr.chunks)[0])
    for start in range(0, arr.shape[0], block):
        stop = min(start + block, arr.shape[0])
        out[start:stop] = torch.from_numpy(np.ascontiguousarray(arr[start:stop], dtype=np.float16)).to(device)
    return out


# -- streamed features --------------------------------------------------------------------------

CACHE_MB = 512  # decoded-chunk LRU of a streamed source; random training batches rarely hit, evaluation passes do


class _Staging:
    """A reusable host buffer for one array's gathered rows: pinned on CUDA so the copy is asynchronous,
    and guarded by an event so it is not overwritten while a copy from it may still be in flight."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float16):
        self.dim, self.device, self.dtype = dim, device, dtype
        self.pin = device.type == "cuda"
        self.buf = torch.empty(0, dim, dtype=dtype)
        self.event = torch.cuda.Event() if self.pin else None
        self.pending = False

    def host(self, n: int) -> np.ndarray:
        if self.pending:
            self.event.synchronize()
            self.pending = False
        if self.buf.shape[0] < n:
            self.buf = torch.empty(max(n, 2 * self.buf.shape[0]), self.dim, dtype=self.dtype, pin_memory=self.pin)
        return self.buf[:n].numpy()

    def to_device(self, n: int) -> torch.Tensor:
        out = self.buf[:n].to(self.device, non_blocking=self.pin)
        if self.pin:
            self.event.record()
            self.pending = True
        return out


class StreamedFeatures:
    """Features read per batch from the store: same ``gather`` as :class:`FeatureTensors`, same values.

    A gather takes the batch's unique rows (sorted), groups them by the store's inner chunk (64 rows), takes
    the chunks it has from a small LRU of decoded chunks and reads the others once each, copies just the
    unique rows to the device (pinned, non-blocking on CUDA) and expands them there to the (B, T) layout. ``clip`` / ``dino`` may
    also be numpy arrays (features already in host memory but too big for the device): rows are then
    taken directly. lat/lon (16 bytes a row) stay resident.
    """

    def __init__(self, clip, dino, manifest: pl.DataFrame, device: torch.device, cache_mb: float = CACHE_MB):
        self.latlon = torch.from_numpy(_manifest_latlon(clip, dino, manifest)).to(device)
        self.arrays = (clip, dino)
        self.device = torch.device(device)
        self.n_rows = int(clip.shape[0])
        self.in_host = isinstance(clip, np.ndarray) and isinstance(dino, np.ndarray)
        self.chunk_rows = self.n_rows if self.in_host else int(clip.chunks[0])
        if not self.in_host and int(dino.chunks[0]) != self.chunk_rows:
            raise FeatureStoreError(f"clip and dino are chunked differently ({self.chunk_rows} vs {dino.chunks[0]} rows)")
        row_bytes = 2 * (int(clip.shape[1]) + int(dino.shape[1]))
        self.max_chunks = max(1, int(cache_mb * 2**20) // (row_bytes * self.chunk_rows))
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        readers = [] if self.in_host else [ChunkReader.for_array(a) for a in self.arrays]
        self.readers = readers if readers and all(r is not None for r in readers) else None  # else through zarr
        self.staging = [_Staging(int(a.shape[1]), self.device) for a in self.arrays]
        self.inverse = _Staging(1, self.device, torch.int64)  # (B*T, 1): where each batch position's row is
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._drawn: tuple[torch.Tensor, np.ndarray] | None = None  # rows drawn by sample() and their host copy
        self.chunks_read = 0  # decoded chunks read from the store (statistics, and for tests)
        self.chunks_hit = 0

    def __repr__(self) -> str:
        where = "host arrays" if self.in_host else f"the store in {self.chunk_rows}-row chunks"
        return f"StreamedFeatures({self.n_rows} rows from {where}, {self.chunks_read} chunks read, {self.chunks_hit} hits)"

    def sample(self, draw):
        """``draw()`` -> (rows (B, T), ...) run on a side CUDA stream, the rows copied to the host there: the copy
        then waits for the draw alone, not for the previous step's work still queued, so the host reads this
        batch from the store while the device finishes the last one. The draws and their order are the same
        (a CUDA generator advances when a kernel is launched, whatever its stream): results are identical."""
        if self._side is None:
            return draw()
        main = torch.cuda.current_stream(self.device)  # pragma: no cover - CUDA only, from here
        with torch.cuda.stream(self._side):
            out = draw()
            host = out[0].clamp(min=0).cpu().numpy()
        for t in out:
            if isinstance(t, torch.Tensor):
                t.record_stream(main)  # the allocator must not hand their memory to the side stream too early
        main.wait_stream(self._side)
        self._drawn = (out[0], host)
        return out

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (B, T) with -1 = pad -> clip (B, T, Dc), dino (B, T, Dd) float32 and latlon (B, T, 2)."""
        r = rows.clamp(min=0)
        drawn, self._drawn = self._drawn, None
        host_rows = drawn[1] if drawn is not None and drawn[0] is rows else r.cpu().numpy()  # the one host sync
        uniq, inverse = np.unique(host_rows.ravel(), return_inverse=True)  # (U,), (B*T,)
        hosts = [st.host(len(uniq)) for st in self.staging]  # (U, Dc), (U, Dd)
        if self.in_host:
            for arr, host in zip(self.arrays, hosts):
                if arr.dtype == np.float16:
                    np.take(arr, uniq, axis=0, out=host)
                else:
                    host[:] = arr[uniq]  # cast to float16 as FeatureTensors does
        else:
            self._fill_from_chunks(uniq, hosts)
        self.inverse.host(len(inverse))[:, 0] = inverse.reshape(-1)
        inv = self.inverse.to_device(len(inverse))[:, 0]  # (B*T,) pinned, asynchronous on CUDA
        clip, dino = (st.to_device(len(uniq))[inv].view(*r.shape, -1).float() for st in self.staging)
        return clip, dino, self.latlon[r]

    def _fill_from_chunks(self, uniq: np.ndarray, hosts: list[np.ndarray]) -> None:
        cr = self.chunk_rows
        chunk_of = uniq // cr
        needed, starts = np.unique(chunk_of, return_index=True)  # rows of chunk needed[i]: uniq[starts[i]:starts[i+1]]
        missing = [int(c) for c in needed if int(c) not in self.cache]
        fresh = self._read_chunks(missing)
        self.chunks_read += len(missing)
        self.chunks_hit += len(needed) - len(missing)
        bounds = np.append(starts, len(uniq))
        for i, c in enumerate(needed.tolist()):
            pair = fresh.get(c)
            if pair is None:
                pair = self.cache[c]
                self.cache.move_to_end(c)
            lo, hi = bounds[i], bounds[i + 1]
            offsets = uniq[lo:hi] - c * cr
            for host, chunk in zip(hosts, pair):
                host[lo:hi] = chunk[offsets]
        for c, pair in fresh.items():  # cached after the assembly, so a batch bigger than the cache still works
            self.cache[c] = pair
        while len(self.cache) > self.max_chunks:
            self.cache.popitem(last=False)

    def _read_chunks(self, chunks: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Decode the given chunks of both arrays, each once: straight from the shard files when the store has
        our layout (vidtag.features.store.ChunkReader), else through zarr, adjacent chunks as one slice and
        all runs concurrently."""
        if not chunks:
            return {}
        if self.readers is not None:
            clip, dino = (reader.read(chunks) for reader in self.readers)
            return {c: (clip[c], dino[c]) for c in chunks}
        cr = self.chunk_rows
        runs, first = [], chunks[0]
        for prev, c in zip(chunks, chunks[1:] + [None]):
            if c != prev + 1:
                runs.append((first * cr, min((prev + 1) * cr, self.n_rows)))
                first = c
        blocks = _read_slices(self.arrays, runs)  # [array][run] -> (rows, D)
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k, (start, stop) in enumerate(runs):
            for c in range(start // cr, -(-stop // cr)):
                lo, hi = c * cr - start, min((c + 1) * cr, stop) - start
                out[c] = (blocks[0][k][lo:hi], blocks[1][k][lo:hi])  # views: a run stays alive while cached
        return out


def _read_slices(arrays, runs: list[tuple[int, int]]) -> list[list[np.ndarray]]:
    """``arrays[i][start:stop]`` for every run, as numpy; zarr arrays are read concurrently through zarr's
    async API (one event-loop round trip instead of one per slice), with a plain loop as the fallback."""
    try:
        from zarr.core.sync import sync

        async_arrays = [a._async_array for a in arrays]
    except (ImportError, AttributeError):
        return [[np.asarray(a[s:e]) for s, e in runs] for a in arrays]

    async def read_all():
        return await asyncio.gather(*[aa.getitem((slice(s, e),)) for aa in async_arrays for s, e in runs])

    flat = [np.asarray(x) for x in sync(read_all())]
    return [flat[i * len(runs):(i + 1) * len(runs)] for i in range(len(arrays))]


# -- choosing a source --------------------------------------------------------------------------

CUDA_FREE_FRACTION = 0.7  # of free device memory the resident features may take; the rest is for the
# model, activations, the gallery embeddings of validation and the allocator's slack (our choice)
HOST_AVAILABLE_FRACTION = 0.5  # of available host memory, for lazily loaded features trained on the CPU
IN_MEMORY_CHOICES = ("auto", True, False)


def feature_bytes(features) -> int:
    """Bytes of clip + dino as float16 (what :class:`FeatureTensors` would hold)."""
    return 2 * int(features.clip.shape[0]) * (int(features.clip.shape[1]) + int(features.dino.shape[1]))


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget_bytes(device: torch.device, memory_gb: float | None = None) -> int | None:
    """What resident features may use: ``memory_gb`` when given, else a fraction of the free CUDA memory
    (``torch.cuda.mem_get_info``) or of the available host memory; None = unknown (no limit)."""
    if memory_gb is not None:
        return int(float(memory_gb) * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_FREE_FRACTION * free)
    host = _available_host_bytes()
    return None if host is None else int(HOST_AVAILABLE_FRACTION * host)


def choose_resident(features, device: torch.device, in_memory="auto", memory_gb: float | None = None) -> tuple[bool, str]:
    """Resident or streamed, and why (one line for the log). ``in_memory``: "auto" | True | False."""
    if in_memory not in IN_MEMORY_CHOICES or not isinstance(in_memory, (str, bool)):
        raise ConfigError(f"features_in_memory must be one of \"auto\", true or false; got {in_memory!r}")
    need = feature_bytes(features)
    size = f"{need / 2**30:.2f} GiB of clip+dino"
    if in_memory is not True and in_memory is not False:  # auto
        in_host = isinstance(features.clip, np.ndarray) and isinstance(features.dino, np.ndarray)
        if device.type == "cpu" and in_host and memory_gb is None:
            return True, f"{size} already in host memory: resident"
        budget = memory_budget_bytes(device, memory_gb)
        if budget is None:
            return True, f"{size}, memory budget unknown: resident"
        fits = need <= budget
        return fits, f"{size} {'fit' if fits else 'do not fit'} in the {budget / 2**30:.2f} GiB budget on {device}: " + (
            "resident" if fits else "streamed")
    return in_memory, f"{size}: {'resident' if in_memory else 'streamed'} (features_in_memory={str(in_memory).lower()})"


def feature_source(features, manifest: pl.DataFrame, device, in_memory="auto", memory_gb: float | None = None,
                   cache_mb: float = CACHE_MB) -> tuple[FeatureTensors | StreamedFeatures, str]:
    """The batch source for ``features`` (``Features``, eager or ``lazy=True``) and the reason for the choice."""
    device = torch.device(device)
    resident, why = choose_resident(features, device, in_memory, memory_gb)
    if resident:
        return FeatureTensors.from_arrays(features.clip, features.dino, manifest, device), why
    return StreamedFeatures(features.clip, features.dino, manifest, device, cache_mb), why
