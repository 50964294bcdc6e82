"""Exact inner-product top-k retrieval (FAISS or torch) and the gallery-embedding cache (Fig. 5).

One function, :func:`search`, answers "which k gallery rows score highest for each query" for
training (in-batch metrics), evaluation and ``vidtag predict``. Both backends are exact and agree
with brute force, ties going to the lowest gallery index, so results are reproducible across
backends and machines. :class:`GalleryIndex` keeps a built index for repeated searches (a 1M x 512
gallery is 2 GB: copy it to the device once, not per call).

Search is a matrix product followed by a selection: every score costs 2 D FLOP (1,024 at D = 512) and is
read once by the selection, so it is compute-bound on a CPU and near the ridge on a GPU. The torch
backend works on tiles of many queries and gallery rows written into one reused score buffer, selects
each tile's top-k where the tile is written and merges candidates as it goes; ties are settled at the
end, and only for the rare rows where a tile's boundary tie can matter. A tile is up to 2^26 scores (256
MB); on a CPU a k = 1 search uses tiles of 2^21 (8 MB: 4,096 queries x 512 rows, or 512 x 4,096), so the
scores are still in the last-level cache when the selection reads them (k > 1 keeps wide tiles: torch's
CPU ``topk`` pays per row, and the running merge per tile). The CPU tile's fp32 product runs through
numpy's BLAS (OpenBLAS in numpy's wheels; the library FAISS uses too) into that buffer, with the
project's thread count: torch's own CPU GEMM (MKL) reached 0.6-0.95 of OpenBLAS's rate on an AMD EPYC
(Zen 4), varying from run to run, where OpenBLAS's barely moves. The selection for k = 1 is numpy's
``argmax`` (vectorised, first maximum = lowest index), ~10x faster than torch's CPU ``max(dim=1)`` with
indices. GPU tiles stay torch.

Half precision (fp16 or bf16 scores, fp32 accumulation; the default on CUDA) keeps a short list per
query, re-scores it in fp32 and checks, with a per-query bound on the rounding error, that the list
must hold fp32's exact top-k; a query the bound cannot certify is searched again in fp32. Several
devices split the gallery into contiguous shards, each answers exactly, and the answers merge.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vidtag.errors import GalleryCacheError, RetrievalError  # re-exported from here as well
from vidtag.fingerprint import sha256_arrays, sha256_file, sha256_state
from vidtag.geo import check_latlon
from vidtag.io import atomic_path, write_json_atomic
from vidtag.threads import passive_openmp

Backend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# FAISS's GPU kernels only select up to this many neighbours per query; above it the
# GPU path hands over to the torch backend, which has no cap.
FAISS_GPU_MAX_K = 2048

# torch backend tiles: up to 4,096 queries x up to 65,536 gallery rows, at most 2^26 scores (256 MB of
# float32) at once (512 queries meet 65,536 rows, 8,192 go 4,096 x 16,384 at a time); 2^21 for an fp32
# k = 1 search on a CPU (8 MB, cache-resident between product and selection: 512 x 4,096, or 4,096 x 512).
# Many rows on both sides keep the product near the machine's matmul rate.
DEFAULT_QUERY_CHUNK = 4096
DEFAULT_GALLERY_CHUNK = 1 << 16
DEFAULT_SCORE_BUDGET = 1 << 26
DEFAULT_CPU_TOP1_SCORE_BUDGET = 1 << 21
DEFAULT_RESCORE = 32  # half precision: short-list length beyond k, re-scored in fp32

_FP32_UNIT_ROUNDOFF = 2.0**-24


def _faiss():
    passive_openmp()  # FAISS loads its own OpenMP runtime, which reads OMP_WAIT_POLICY once, here
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
        return None
    return faiss


def faiss_gpu_count() -> int:
    """GPUs that FAISS can use (0 with faiss-cpu, or with faiss-gpu on a machine without GPUs)."""
    faiss = _faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def _as_float32_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise RetrievalError(f"{name} must be a 2-D array (rows, dim); found shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise RetrievalError(f"{name} row {bad} has NaN or infinite values; embeddings must be finite")
    return x


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2:
        raise RetrievalError(f"{name} must be a 2-D tensor (rows, dim); found shape {tuple(x.shape)}")
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        raise RetrievalError(f"{name} row {bad} has NaN or infinite values; embeddings must be finite")


def _order_candidates(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k of (Q, C) candidates by score descending, ties by lowest index (two stable sorts)."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, by_score)[:, :k], index.gather(1, by_score)[:, :k]


def _topk_lowest_index_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of (Q, G) scores, ties to the lowest column, by one stable sort of every row.

    For the rare rows the tiled search cannot settle cheaply (a tie at the k-th place), and for the
    FAISS backend's tie fix-ups.
    """
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # (Q, k)
    return scores.gather(1, order), order


def _tile_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of one (q, g) score tile -> values (q, k'), columns (q, k'), boundary tie value (q,).

    k = 1 is the first (lowest) column among equal maxima: exact. On a CPU numpy's ``argmax`` finds it
    (vectorised; torch's CPU ``max(dim=1)`` with indices runs at ~1 G scores/s, a tenth of it), elsewhere
    torch's ``max``. Otherwise ``topk(k + 1)``: where the (k+1)-th value equals the k-th, which of the
    tied columns were kept is arbitrary, and the tie value is returned (else -inf) so the caller can redo
    the row if that value turns out to be the final k-th score.
    """
    g = scores.shape[1]
    none = torch.full((scores.shape[0],), float("-inf"), dtype=scores.dtype, device=scores.device)
    if k == 1:
        if scores.device.type == "cpu" and scores.dtype == torch.float32:
            i = torch.from_numpy(scores.numpy().argmax(axis=1)[:, None])  # (q, 1) int64, the first maximum
            return scores.gather(1, i), i, none
        v, i = scores.max(dim=1, keepdim=True)
        return v, i, none
    if g <= k:
        v, i = torch.topk(scores, g, dim=1)
        return v, i, none
    v, i = torch.topk(scores, k + 1, dim=1)  # (q, k + 1), sorted descending
    tie = torch.where(v[:, k] == v[:, k - 1], v[:, k - 1], none)
    return v[:, :k], i[:, :k], tie


_BLAS = None  # threadpoolctl's controller of the BLAS libraries loaded with numpy, made once


@contextmanager
def _cpu_blas_threads(cpu: bool):
    """numpy's BLAS (the CPU tiles' product) runs with torch's thread count, the project's
    (``vidtag.threads``), not the count OpenBLAS chose when numpy was loaded; restored afterwards."""
    global _BLAS
    if not cpu:
        yield
        return
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController().select(user_api="blas")
    with _BLAS.limit(limits=torch.get_num_threads()):
        yield


def _product(q: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """fp32 scores q (r, D) @ g (c, D)^T into ``out`` (r, c). On a CPU through numpy's BLAS, writing into the
    same memory (see the module docstring: the faster GEMM on the CPU this was measured on), else torch."""
    if out.device.type == "cpu" and out.dtype == torch.float32:
        np.matmul(q.numpy(), g.numpy().T, out=out.numpy())
        return out
    return torch.mm(q, g.T, out=out)


@contextmanager
def _exact_matmul(cuda: bool):
    """Products as the error analysis assumes them: fp32 in full fp32 (no TF32, whose 10-bit mantissa
    would change the answer) and half-precision products accumulated in fp32. Restored afterwards."""
    if not cuda:
        yield
        return
    mm = torch.backends.cuda.matmul
    saved = (torch.get_float32_matmul_precision(), mm.allow_fp16_reduced_precision_reduction,
             mm.allow_bf16_reduced_precision_reduction)
    torch.set_float32_matmul_precision("highest")
    mm.allow_fp16_reduced_precision_reduction = mm.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        mm.allow_fp16_reduced_precision_reduction, mm.allow_bf16_reduced_precision_reduction = saved[1:]


def _mm_out_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can write a half-precision product as fp32 on ``device`` (``mm(out_dtype=)``,
    CUDA): then scores are not rounded to half precision a second time."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


@dataclass
class _Shard:
    """Contiguous gallery rows [offset, offset + n) on one device."""

    offset: int
    g32: torch.Tensor  # (n, D) float32 on the shard's device: the exact scores
    half: torch.Tensor | None  # (n, D) fp16/bf16 copy for the half-precision pass, else None
    norm_max: float  # largest row L2 norm, for the rounding-error bound
    out_fp32: bool = False  # half products written as fp32 (CUDA mm(out_dtype=))

    @property
    def device(self) -> torch.device:
        return self.g32.device

    def __len__(self) -> int:
        return int(self.g32.shape[0])


def _shard_devices(shard_devices, device: torch.device) -> list[torch.device]:
    if shard_devices is None:
        return [device]
    if shard_devices == "all":
        if not torch.cuda.is_available():
            raise RetrievalError("shard_devices='all' needs CUDA devices; none are available")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devs = [torch.device(d) for d in shard_devices]
    if not devs:
        raise RetrievalError("shard_devices is empty; give at least one device (or None for the index's device)")
    for d in devs:
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise RetrievalError(f"shard device {d} is not available on this machine")
    return devs


@dataclass
class GalleryIndex:
    """A gallery made ready for repeated exact top-k searches on one backend and device.

    Build with :meth:`build`; ``search(queries, k)`` behaves like :func:`search`.
    """

    backend: str  # "faiss" or "torch" (resolved, never "auto")
    device: torch.device  # where torch queries' results go; the first shard's device by default
    size: int
    dim: int
    _gallery_np: np.ndarray | None = None  # float32 (G, D) view for FAISS tie fix-ups (FAISS's own copy when flat)
    _faiss_index: object | None = None
    _faiss_gpu: bool = False
    _exact: bool = True  # False for IVF (approximate)
    _shards: list[_Shard] = field(default_factory=list)  # torch backend
    precision: str = "fp32"
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK
    score_budget: int | None = None  # scores per tile; None: DEFAULT_SCORE_BUDGET, DEFAULT_CPU_TOP1_SCORE_BUDGET for fp32 k = 1 on a CPU
    rescore: int = DEFAULT_RESCORE
    query_chunk: int = DEFAULT_QUERY_CHUNK
    n_fallback: int = 0  # half precision: queries the error bound could not certify, searched again in fp32
    _buffers: dict = field(default_factory=dict)  # (device, dtype) -> flat score buffer, reused across tiles

    @classmethod
    def build(
        cls,
        gallery,
        backend: Backend = "auto",
        device: str | torch.device | None = None,
        *,
        precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
        ivf_nlist: int = 0,
        ivf_nprobe: int = 16,
        gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
        score_budget: int | None = None,
        rescore: int = DEFAULT_RESCORE,
        query_chunk: int = DEFAULT_QUERY_CHUNK,
        shard_devices: Sequence[str | torch.device] | Literal["all"] | None = None,
    ) -> GalleryIndex:
        """Prepare ``gallery`` (G, D) for search.

        backend "auto": FAISS when it can use a GPU, else torch on a CUDA ``device``, else FAISS on CPU.
        precision (torch backend): "auto" is fp16 on CUDA and fp32 on CPU; half precision scores every
        gallery row, keeps k + ``rescore`` candidates per query and returns fp32's exact answer (see the
        module docstring). ``shard_devices`` (torch backend): split the gallery over these devices ("all":
        every CUDA device); results go to ``device``. ``query_chunk`` queries and ``gallery_chunk`` gallery rows
        per tile, at most ``score_budget`` scores (None: 2^26, or 2^21 for fp32 k = 1 on a CPU), set the tiling. ivf_nlist > 0 (FAISS only) builds an approximate IndexIVFFlat
        with that many lists, for galleries too big for exact search; 0 (default) is exact IndexFlatIP.
        """
        if backend not in BACKENDS:
            raise RetrievalError(f"backend must be one of {BACKENDS}; found {backend!r}")
        if precision not in PRECISIONS:
            raise RetrievalError(f"precision must be one of {', '.join(PRECISIONS)}; found {precision!r}")
        if min(gallery_chunk, score_budget or 1, query_chunk) < 1 or rescore < 0:
            raise RetrievalError("gallery_chunk, score_budget and query_chunk must be >= 1, rescore >= 0")
        dev = torch.device(device) if device is not None else (
            gallery.device if isinstance(gallery, torch.Tensor) else torch.device("cpu")
        )
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RetrievalError(f"device {dev} requested but CUDA is not available; use device='cpu'")
        devices = _shard_devices(shard_devices, dev)
        if backend == "auto":
            if faiss_gpu_count() > 0 and dev.type == "cuda":
                backend = "faiss"
            elif dev.type == "cuda" or _faiss() is None or shard_devices is not None:
                backend = "torch"
            else:
                backend = "faiss"
        if ivf_nlist and backend != "faiss":
            raise RetrievalError("ivf_nlist needs backend='faiss' (the torch backend is exact only)")
        if backend == "torch":
            out = cls._build_torch(gallery, dev, devices, precision, gallery_chunk, score_budget, rescore)
            out.query_chunk = int(query_chunk)
            return out
        if shard_devices is not None:
            raise RetrievalError("shard_devices is for backend='torch'; FAISS shards over every GPU it sees by itself")
        return cls._build_faiss(gallery, dev, ivf_nlist, ivf_nprobe)

    @classmethod
    def _build_torch(cls, gallery, dev, devices, precision, gallery_chunk, score_budget, rescore) -> GalleryIndex:
        if isinstance(gallery, torch.Tensor):
            _check_tensor(gallery, "gallery")
            g = gallery.detach()
        else:
            g = torch.from_numpy(_as_float32_2d(gallery, "gallery"))
        if g.shape[0] == 0:
            raise RetrievalError("gallery is empty; build a gallery with at least one point")
        n, d = int(g.shape[0]), int(g.shape[1])
        auto = precision == "auto"
        if auto:
            precision = "fp16" if dev.type == "cuda" else "fp32"
        half = _HALF.get(precision)
        if half == torch.float16:
            # fp16 holds values below 65504: a gallery (or scores) beyond a safe margin of it stays fp32
            big = float(g.abs().max()) > 2.0**14 or float(g.float().norm(dim=1).max()) ** 2 > 2.0**14
            if big and not auto:
                raise RetrievalError("the gallery has values too large for fp16 scores; use precision='fp32' or 'bf16'")
            if big:
                precision, half = "fp32", None
        out = cls("torch", dev, n, d, precision=precision, gallery_chunk=gallery_chunk, score_budget=score_budget,
                  rescore=rescore)
        bounds = np.linspace(0, n, min(len(devices), n) + 1).round().astype(int)
        for sd, a, b in zip(devices, bounds[:-1], bounds[1:]):
            g32 = g[a:b].to(sd, torch.float32).contiguous()  # no copy when already fp32 on the device
            out._shards.append(_Shard(
                int(a), g32, None if half is None else g32.to(half),
                float(g32.norm(dim=1).max()), half is not None and _mm_out_fp32(sd, half),
            ))
        return out

    @classmethod
    def _build_faiss(cls, gallery, dev, ivf_nlist, ivf_nprobe) -> GalleryIndex:
        faiss = _faiss()
        if faiss is None:
            raise RetrievalError("backend='faiss' needs the faiss-cpu (or faiss-gpu) package; use backend='torch'")
        g = _as_float32_2d(gallery, "gallery")
        if g.shape[0] == 0:
            raise RetrievalError("gallery is empty; build a gallery with at least one point")
        n, d = g.shape
        faiss.omp_set_num_threads(torch.get_num_threads())
        if ivf_nlist:
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, int(ivf_nlist), faiss.METRIC_INNER_PRODUCT)
            index.train(g)
            index.nprobe = int(ivf_nprobe)
            index.add(g)
        else:
            index = faiss.IndexFlatIP(d)
            index.add(g)
            # FAISS holds its own copy: tie fix-ups read that one, so the gallery is held once
            g = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
        use_gpu = dev.type == "cuda" and faiss_gpu_count() > 0
        if use_gpu:  # pragma: no cover - needs faiss-gpu and a GPU
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # split the gallery across all GPUs; results are merged by FAISS
            cpu_index, index = index, faiss.index_cpu_to_all_gpus(index, co=co)
            g = np.array(g) if not ivf_nlist else g  # the host copy outlives the CPU index it viewed
            del cpu_index
        out = cls("faiss", dev, n, d)
        out._gallery_np, out._faiss_index, out._faiss_gpu = g, index, use_gpu
        out._exact = not ivf_nlist
        return out

    # ----------------------------------------------------------------------------------------
    def search(self, queries, k: int = 1):
        """Top-k (scores (Q, k) float32, index (Q, k) int64); torch in -> torch out, numpy in -> numpy out."""
        if not 1 <= k <= self.size:
            raise RetrievalError(f"k must be between 1 and the gallery size {self.size}; found k={k}")
        as_torch = isinstance(queries, torch.Tensor)
        out_device = queries.device if as_torch else None
        if self.backend == "torch":
            scores, index = self._search_torch(queries, k)
        else:
            scores, index = self._search_faiss(queries, k)
        if as_torch:
            return torch.as_tensor(scores).to(out_device), torch.as_tensor(index).to(out_device)
        return (
            scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores,
            index.cpu().numpy() if isinstance(index, torch.Tensor) else index,
        )

    def vectors(self, index: torch.Tensor) -> torch.Tensor:
        """Gallery rows (..., D) float32 at ``index`` (any shape, int64), on ``index``'s device, read from the
        copy the index holds: a caller needing gallery rows (Fig. 5's GeoRefiner takes the top-1's GPS
        embedding) need not keep a second copy of a 2 GB gallery."""
        flat = index.reshape(-1)
        if self.backend == "faiss":
            rows = torch.from_numpy(self._gallery_np)[flat.cpu()]
        elif len(self._shards) == 1:
            rows = self._shards[0].g32[flat.to(self._shards[0].device)]
        else:
            rows = torch.empty(len(flat), self.dim, dtype=torch.float32, device=index.device)
            for sh in self._shards:
                mine = (flat >= sh.offset) & (flat < sh.offset + len(sh))
                rows[mine] = sh.g32[(flat[mine] - sh.offset).to(sh.device)].to(index.device)
        return rows.to(index.device).reshape(*index.shape, self.dim)

    # -- torch backend ---------------------------------------------------------------------------
    def _tiles(self, n_queries: int, device: torch.device | None = None, k: int = 2) -> tuple[int, int]:
        """(query rows, gallery rows) per tile of a top-``k`` search on ``device`` (default: the first
        shard's): as many queries as ``query_chunk`` allows (the product runs fastest with many rows on
        both sides), then gallery rows to fill the score budget."""
        device = device or self._shards[0].device
        budget = self.score_budget
        if budget is None:
            top1_cpu = device.type == "cpu" and k == 1 and self.precision == "fp32"
            budget = DEFAULT_CPU_TOP1_SCORE_BUDGET if top1_cpu else DEFAULT_SCORE_BUDGET
        q_tile = max(1, min(n_queries, self.query_chunk))
        largest = max(len(s) for s in self._shards)
        return q_tile, max(1, min(self.gallery_chunk, largest, budget // q_tile))

    def _scores(self, device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) view of a flat buffer kept per (device, dtype): a 256 MB tile is not allocated
        (and page-faulted in) again for every tile."""
        buf = self._buffers.get((device, dtype))
        if buf is None or buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=dtype, device=device)
            self._buffers[(device, dtype)] = buf
        return buf[: rows * cols].view(rows, cols)

    def _search_torch(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(queries, torch.Tensor):
            _check_tensor(queries, "queries")
            q = queries.detach().to(self.device, torch.float32)
        else:
            q = torch.from_numpy(_as_float32_2d(queries, "queries")).to(self.device)
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dim {q.shape[1]} but the gallery has dim {self.dim}")
        q_tile, _ = self._tiles(q.shape[0], k=k)
        out_s = torch.empty(q.shape[0], k, dtype=torch.float32, device=self.device)
        out_i = torch.empty(q.shape[0], k, dtype=torch.int64, device=self.device)
        cuda = any(s.device.type == "cuda" for s in self._shards)
        cpu = any(s.device.type == "cpu" for s in self._shards)
        with torch.no_grad(), _exact_matmul(cuda), _cpu_blas_threads(cpu):
            for q0 in range(0, q.shape[0], q_tile):
                s, i = self._top_k(q[q0 : q0 + q_tile], k)
                out_s[q0 : q0 + q_tile], out_i[q0 : q0 + q_tile] = s, i
        return out_s, out_i

    def _top_k(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of one query tile over every shard. All shards' work is queued before any result
        is checked (the checks are the only host syncs), so shards on several GPUs run side by side."""
        half = self.precision in _HALF
        qs = [q.to(sh.device, non_blocking=True) for sh in self._shards]
        parts = [(self._shard_half if half else self._shard_fp32)(sh, qq, k) for sh, qq in zip(self._shards, qs)]
        # each part: (scores (q, k'), index (q, k'), redo (q,) bool): rows the shard must answer again
        out_s, out_i = [], []
        for sh, qq, (s, i, redo) in zip(self._shards, qs, parts):
            rows = torch.nonzero(redo).flatten()
            if rows.numel():  # rare: a tie at the k-th place, or half-precision rows the bound cannot certify
                if half:
                    self.n_fallback += int(rows.numel())
                    fs, fi = self._fp32_rows(sh, qq[rows], k)
                else:
                    fs, fi = self._shard_exact_rows(sh, qq[rows], k)
                s, i = s.clone(), i.clone()
                s[rows], i[rows] = fs, fi
            out_s.append(s.to(self.device))
            out_i.append(i.to(self.device))
        if len(out_s) == 1:
            return out_s[0], out_i[0]
        return _order_candidates(torch.cat(out_s, dim=1), torch.cat(out_i, dim=1), k)

    def _fp32_rows(self, sh: _Shard, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 top-k of one shard, ties settled: the half-precision path's fallback."""
        s, i, redo = self._shard_fp32(sh, q, k)
        rows = torch.nonzero(redo).flatten()
        if rows.numel():
            s[rows], i[rows] = self._shard_exact_rows(sh, q[rows], k)
        return s, i

    def _shard_fp32(self, sh: _Shard, q: torch.Tensor, k: int):
        """fp32 top-k of one shard, tile by tile with a running merge; ``redo`` marks rows where a tile
        kept an arbitrary one of several columns tied at the final k-th score."""
        kk = min(k, len(sh))
        _, g_tile = self._tiles(q.shape[0], sh.device, kk)
        best_s = best_i = None
        tie = torch.full((q.shape[0],), float("-inf"), device=sh.device)
        for g0 in range(0, len(sh), g_tile):
            g = sh.g32[g0 : g0 + g_tile]  # (g, D)
            s = _product(q, g, self._scores(sh.device, torch.float32, q.shape[0], g.shape[0]))  # (q, g)
            v, i, t = _tile_top(s, kk)
            i = i + (sh.offset + g0)
            tie = torch.maximum(tie, t)
            if best_s is None:
                best_s, best_i = v, i
            elif kk == 1:  # strictly better only: an equal score in a later tile has a higher index
                better = v > best_s
                best_s, best_i = torch.where(better, v, best_s), torch.where(better, i, best_i)
            else:
                best_s, best_i = _order_candidates(torch.cat([best_s, v], 1), torch.cat([best_i, i], 1), kk)
        if kk > 1:
            best_s, best_i = _order_candidates(best_s, best_i, kk)
        return best_s, best_i, tie >= best_s[:, -1]

    def _shard_exact_rows(self, sh: _Shard, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 top-k of one shard for a few rows, every tile by a stable sort: exact whatever the ties."""
        _, g_tile = self._tiles(q.shape[0], sh.device)
        kk = min(k, len(sh))
        best_s = best_i = None
        for g0 in range(0, len(sh), g_tile):
            g = sh.g32[g0 : g0 + g_tile]
            s = _product(q, g, torch.empty(q.shape[0], g.shape[0], device=sh.device))  # (r, g)
            v, i = _topk_lowest_index_ties(s, min(kk, s.shape[1]))
            i = i + (sh.offset + g0)
            best_s = v if best_s is None else torch.cat([best_s, v], 1)
            best_i = i if best_i is None else torch.cat([best_i, i], 1)
            best_s, best_i = _order_candidates(best_s, best_i, kk)
        return best_s, best_i

    def _error_bound(self, sh: _Shard, q: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(a (q,), b): |fp32 re-score - half-precision score h| <= a + b |h| for every row of the shard.

        Inputs rounded to half precision (unit roundoff u) give |h(x)h(y) - xy| <= (2u + u^2)|xy| per
        term; fp32 accumulation adds gamma_D = D 2^-24 / (1 - D 2^-24) of sum |x_i y_i| (Higham, Accuracy
        and Stability of Numerical Algorithms, 2nd ed., Sec. 3.1), and the fp32 re-score its own gamma_D;
        sum |q_i g_i| <= |q| |g| (Cauchy-Schwarz). Rounding the result to the output type (u_out) adds
        u_out / (1 - u_out) of |h|; subnormal inputs and outputs add absolute terms. A 1 % margin
        covers the norms' own rounding.
        """
        dtype = sh.half.dtype
        u = torch.finfo(dtype).eps / 2
        u_out = _FP32_UNIT_ROUNDOFF if sh.out_fp32 else u
        d = self.dim
        gamma = d * _FP32_UNIT_ROUNDOFF / (1 - d * _FP32_UNIT_ROUNDOFF)
        rel = (2 * u + u * u) + gamma * (1 + u) ** 2 + gamma
        tiny = torch.finfo(dtype).tiny * u  # largest rounding error of a subnormal input
        tiny_out = (torch.finfo(torch.float32) if sh.out_fp32 else torch.finfo(dtype)).tiny * u_out
        qn = q.norm(dim=1)  # (q,)
        absolute = tiny * (1 + u) * math.sqrt(d) * (qn + sh.norm_max) + d * tiny * tiny + tiny_out
        return 1.01 * (rel * qn * sh.norm_max + absolute), 1.01 * u_out / (1 - u_out)

    def _shard_half(self, sh: _Shard, q: torch.Tensor, k: int):
        """Half-precision pass over one shard: a short list of k + rescore candidates per query, re-scored
        in fp32 and ordered exactly. ``redo`` marks rows the list may not answer exactly: where the largest
        half score left out, plus its error bound, reaches the k-th fp32 score of the list (fp32's true
        k-th score over the shard is at least that, so a row left out below it cannot be in the top-k)."""
        _, g_tile = self._tiles(q.shape[0], sh.device)
        kk = min(k, len(sh))
        m = min(len(sh), k + self.rescore)
        qh = q.to(sh.half.dtype)
        best_v = best_i = None
        dropped = torch.full((q.shape[0],), float("-inf"), device=sh.device)  # largest half score left out
        for g0 in range(0, len(sh), g_tile):
            g = sh.half[g0 : g0 + g_tile]
            if sh.out_fp32:  # pragma: no cover - CUDA only
                s = torch.mm(qh, g.T, out_dtype=torch.float32)
            else:
                s = torch.mm(qh, g.T, out=self._scores(sh.device, sh.half.dtype, q.shape[0], g.shape[0]))
            v, i = torch.topk(s, min(m + 1, s.shape[1]), dim=1)
            if v.shape[1] > m:
                dropped = torch.maximum(dropped, v[:, m].float())
                v, i = v[:, :m], i[:, :m]
            v, i = v.float(), i + (sh.offset + g0)
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                if v.shape[1] > m:
                    v, pos = torch.topk(v, m + 1, dim=1)
                    dropped = torch.maximum(dropped, v[:, m])
                    v, i = v[:, :m], i.gather(1, pos[:, :m])
            best_v, best_i = v, i
        exact = torch.einsum("qd,qmd->qm", q, sh.g32[best_i - sh.offset])  # (q, m) fp32 re-scores
        s, i = _order_candidates(exact, best_i, kk)
        a, b = self._error_bound(sh, q)
        reach = torch.where(dropped.isneginf(), dropped, dropped + a + b * dropped.abs())  # -inf: nothing left out
        ok = reach < s[:, -1]
        if sh.half.dtype == torch.float16:  # scores beyond fp16's range are not scores
            ok &= (q.norm(dim=1) * sh.norm_max < 2.0**14) & (q.abs().amax(dim=1) < 2.0**14)
        return s, i, ~ok

    # -- FAISS backend ---------------------------------------------------------------------------
    def _search_faiss(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_float32_2d(queries, "queries")
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dim {q.shape[1]} but the gallery has dim {self.dim}")
        if self._faiss_gpu and k + 1 > FAISS_GPU_MAX_K:  # pragma: no cover - GPU only
            torch_index = GalleryIndex.build(self._gallery_np, "torch", self.device)
            s, i = torch_index._search_torch(q, k)
            return s.cpu().numpy(), i.cpu().numpy()
        _faiss().omp_set_num_threads(torch.get_num_threads())  # the project's thread count (vidtag.threads)
        # One extra neighbour shows whether the k-th score is tied with a row FAISS left out.
        kq = min(k + 1, self.size)
        scores, index = self._faiss_index.search(q, kq)  # (Q, kq)
        s_t, i_t = torch.from_numpy(scores), torch.from_numpy(index.astype(np.int64))
        missing = i_t < 0  # IVF can return fewer than k hits; they never win
        s_t = s_t.masked_fill(missing, float("-inf"))
        i_t = i_t.masked_fill(missing, self.size)
        if self._exact and kq > k:
            tied = torch.nonzero(s_t[:, k] == s_t[:, k - 1]).flatten()
            if tied.numel():  # rare: recompute those rows in full and break ties by index
                full = torch.from_numpy(q[tied.numpy()] @ self._gallery_np.T)  # (t, G)
                ts, ti = _topk_lowest_index_ties(full, k)
                s_t, i_t = s_t[:, :k].clone(), i_t[:, :k].clone()
                s_t[tied], i_t[tied] = ts, ti
        s_k, i_k = _order_candidates(s_t, i_t, k)
        i_k = i_k.masked_fill(i_k >= self.size, -1)
        return s_k.numpy().astype(np.float32), i_k.numpy()


def search(queries, gallery, k: int = 1, backend: Backend = "auto", device=None, **build_kwargs):
    """Exact inner-product top-k of ``queries`` (Q, D) over ``gallery`` (G, D).

    Returns (scores (Q, k) float32, index (Q, k) int64), best first, ties to the lowest gallery
    index; torch tensors in give torch tensors out (on the queries' device), else numpy.
    For repeated searches over one gallery, build a :class:`GalleryIndex` once instead.
    """
    return GalleryIndex.build(gallery, backend, device, **build_kwargs).search(queries, k)


# --------------------------------------------------------------------------------------------
# Gallery embeddings: embedded once per (location encoder weights, gallery points), cached on disk.


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, values): :func:`sha256_state`."""
    return sha256_state(module)


def latlon_fingerprint(latlon_deg) -> str:
    """sha256 over the gallery's (G, 2) degrees as float64, in order; equals
    :func:`vidtag.gallery.gallery_fingerprint` of an unlabelled gallery of the same points."""
    a = np.asarray(latlon_deg, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise RetrievalError(f"gallery coordinates must be (G, 2) lat, lon degrees; found shape {a.shape}")
    return sha256_arrays(a[:, 0], a[:, 1])


@torch.no_grad()
def embed_locations_tensor(location_encoder: torch.nn.Module, latlon_deg: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Unit-normalised (G, D) float32 embeddings of (G, 2) degrees on the encoder's device, in eval mode (the
    encoder's own mode restored after), in batches: training validation keeps them on the device."""
    was_training = location_encoder.training
    location_encoder.eval()
    try:
        return torch.cat([torch.nn.functional.normalize(location_encoder(c).float(), dim=-1)  # (b, 2) -> (b, D)
                          for c in latlon_deg.split(batch_size)])
    finally:
        location_encoder.train(was_training)


def embed_locations(location_encoder: torch.nn.Module, latlon_deg, batch_size: int = 8192) -> np.ndarray:
    """Unit-normalised (G, 512) float32 embeddings of (G, 2) degrees, in batches, without gradients (numpy)."""
    latlon = np.asarray(latlon_deg, dtype=np.float32)
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise RetrievalError(f"gallery coordinates must be (G, 2) lat, lon degrees; found shape {latlon.shape}")
    if len(latlon) == 0:
        return np.zeros((0, 512), np.float32)
    param = next(location_encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return embed_locations_tensor(location_encoder, torch.from_numpy(latlon).to(device), batch_size).cpu().numpy()


def _spot_rows(n: int, k: int = 8) -> np.ndarray:
    """Up to ``k`` row indices spread evenly over ``n`` rows (first and last included)."""
    return np.unique(np.linspace(0, max(n - 1, 0), min(k, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def _cached_embeddings(npy: Path, meta_path: Path, expect: dict, key: str, location_encoder, latlon_deg,
                       batch_size: int) -> tuple[np.ndarray | None, str | None]:
    """The cached embeddings if they can be trusted, else ``(None, why not)``.

    Trusted means: the record names this (model, gallery), the file's sha256 equals the recorded one (a
    truncated, replaced or half-written file fails), every row is a unit vector, and a few rows embedded
    afresh agree with the file (a file replaced together with its record fails too).
    """
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None, "its record is missing or not JSON"
    if not isinstance(meta, dict):
        return None, "its record is not a JSON object"
    found = {k: meta.get(k) for k in expect}
    if found != expect:
        diff = [k for k in expect if found[k] != expect[k]]
        raise GalleryCacheError(
            f"{npy} was embedded for a different {' and '.join(diff)} than requested under key {key!r}; "
            "use a key naming both fingerprints (key=None does) or delete the file to re-embed"
        )
    try:
        digest = sha256_file(npy)
    except OSError:
        return None, "the embeddings file is missing"
    if digest != meta.get("sha256"):
        return None, "the file does not match its recorded sha256 (truncated, changed or half-written)"
    try:
        emb = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:
        return None, f"the file cannot be read as .npy ({e})"
    if emb.ndim != 2 or emb.shape[0] != expect["n"] or emb.dtype != np.float32:
        return None, f"it holds {emb.shape} {emb.dtype}, expected ({expect['n']}, D) float32"
    norms = np.linalg.norm(emb, axis=1)
    if not (np.isfinite(norms).all() and np.abs(norms - 1.0).max(initial=0.0) < 1e-3):
        return None, "some rows are not unit vectors (NaN, zeros or other values than the encoder gives)"
    rows = _spot_rows(len(emb))
    fresh = embed_locations(location_encoder, np.asarray(latlon_deg)[rows], batch_size)  # (k, D)
    if fresh.shape[1] != emb.shape[1] or (np.sum(fresh * emb[rows], axis=1) < 0.999).any():
        return None, "rows embedded afresh differ from the file"
    return emb, None


def gallery_embeddings(
    location_encoder: torch.nn.Module,
    latlon_deg,
    cache_dir: str | os.PathLike | None,
    key: str | None = None,
    batch_size: int = 8192,
) -> np.ndarray:
    """Gallery GPS embeddings (G, 512), unit-normalised float32, cached per (model, gallery).

    The file ``<cache_dir>/gallery_emb-<key>.npy`` sits beside a ``.json`` recording the full
    fingerprints of the encoder weights and the gallery points and the file's sha256. A file recorded for
    other fingerprints under the same key is refused (GalleryCacheError); one that fails its checksum or
    a spot check against fresh embeddings is never used: the gallery is embedded again, with a line
    saying so, and the cache rewritten. ``key`` defaults to ``<model fp[:16]>-<gallery fp[:16]>``;
    ``cache_dir=None`` embeds without caching; a cache that cannot be written is skipped with a line.
    """
    latlon = np.asarray(latlon_deg, dtype=np.float64)
    model_fp = module_fingerprint(location_encoder)
    gallery_fp = latlon_fingerprint(latlon)
    check_latlon(latlon[:, 0], latlon[:, 1], source="gallery coordinates", unknown_ok=False, error=RetrievalError)
    if cache_dir is None:
        return embed_locations(location_encoder, latlon, batch_size)
    key = key or f"{model_fp[:16]}-{gallery_fp[:16]}"
    cache_dir = Path(cache_dir)
    npy = cache_dir / f"gallery_emb-{key}.npy"
    meta_path = npy.with_suffix(".json")
    expect = {"model_fingerprint": model_fp, "gallery_fingerprint": gallery_fp, "n": int(len(latlon))}
    if npy.exists() or meta_path.exists():
        emb, why = _cached_embeddings(npy, meta_path, expect, key, location_encoder, latlon, batch_size)
        if emb is not None:
            return emb
        print(f"gallery-embedding cache {npy}: {why}; not used, embedding the gallery again", file=sys.stderr, flush=True)
    emb = embed_locations(location_encoder, latlon, batch_size)
    try:
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb, allow_pickle=False)
            digest = sha256_file(tmp)
        # The record is written last: until it names this file's sha256, the file is not trusted.
        write_json_atomic(meta_path, {**expect, "key": key, "dim": int(emb.shape[1]), "sha256": digest})
    except OSError as e:
        print(f"gallery-embedding cache {npy}: cannot be written ({e.strerror or e}); going on without it",
              file=sys.stderr, flush=True)
    return emb
