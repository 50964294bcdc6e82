"""Exact inner-product top-k retrieval (FAISS or torch) and the gallery-embedding cache (Fig. 5).

One function, :func:`search`, answers "which k gallery rows score highest for each query" for
training (in-batch metrics), evaluation and ``vidtag predict``. Both backends are exact and agree
with brute force, ties going to the lowest gallery index, so results are reproducible across
backends and machines. :class:`GalleryIndex` keeps a built index for repeated searches (a 1M x 512
gallery is 2 GB: copy it to the device once, not per call).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vidtag.errors import GalleryCacheError, RetrievalError  # re-exported from here as well
from vidtag.fingerprint import sha256_arrays, sha256_file, sha256_state
from vidtag.geo import check_latlon
from vidtag.io import atomic_path, write_json_atomic

Backend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")

# FAISS's GPU kernels only select up to this many neighbours per query; above it the
# GPU path hands over to the torch backend, which has no cap.
FAISS_GPU_MAX_K = 2048

# Scores held at once per query tile in the torch backend (float32 elements): ~256 MB.
DEFAULT_SCORE_BUDGET = 64 * 1024 * 1024


def _faiss():
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
    """Exact top-k of (Q, G) scores; ties at the k-th place go to the lowest column.

    ``torch.topk`` picks arbitrarily among equal scores, so rows whose k-th score is shared with a
    column left out are redone with a stable full sort (rare outside synthetic data).
    """
    vals, idx = torch.topk(scores, k, dim=1)  # (Q, k)
    kth = vals[:, -1:]
    n_tied_row = (scores == kth).sum(dim=1)
    n_tied_kept = (vals == kth).sum(dim=1)
    redo = torch.nonzero(n_tied_row > n_tied_kept).flatten()
    if redo.numel():
        order = torch.argsort(scores[redo], dim=1, descending=True, stable=True)[:, :k]
        idx[redo] = order
        vals[redo] = scores[redo].gather(1, order)
    return _order_candidates(vals, idx, k)


@dataclass
class GalleryIndex:
    """A gallery made ready for repeated exact top-k searches on one backend and device.

    Build with :meth:`build`; ``search(queries, k)`` behaves like :func:`search`.
    """

    backend: str  # "faiss" or "torch" (resolved, never "auto")
    device: torch.device
    size: int
    dim: int
    _gallery_np: np.ndarray | None = None  # float32 (G, D); FAISS backend and tie fix-ups
    _gallery_t: torch.Tensor | None = None  # (G, D) on device; torch backend
    _faiss_index: object | None = None
    _faiss_gpu: bool = False
    _exact: bool = True  # False for IVF (approximate)
    _gallery32: torch.Tensor | None = None  # fp32 copy for re-scoring half-precision candidates
    precision: str = "fp32"
    gallery_chunk: int = 1 << 20
    score_budget: int = DEFAULT_SCORE_BUDGET
    rescore: int = 32

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
        gallery_chunk: int = 1 << 20,
        score_budget: int = DEFAULT_SCORE_BUDGET,
        rescore: int = 32,
    ) -> GalleryIndex:
        """Prepare ``gallery`` (G, D) for search.

        backend "auto": FAISS when it can use a GPU, else torch on a CUDA ``device``, else FAISS on CPU.
        precision (torch backend): "auto" is fp16 on CUDA and fp32 on CPU; half-precision candidates
        (k + ``rescore`` per query) are re-scored in fp32 so the answer matches fp32 brute force.
        ivf_nlist > 0 (FAISS only) builds an approximate IndexIVFFlat with that many lists, for
        galleries too big for exact search; 0 (default) is exact IndexFlatIP.
        """
        if backend not in BACKENDS:
            raise RetrievalError(f"backend must be one of {BACKENDS}; found {backend!r}")
        dev = torch.device(device) if device is not None else (
            gallery.device if isinstance(gallery, torch.Tensor) else torch.device("cpu")
        )
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RetrievalError(f"device {dev} requested but CUDA is not available; use device='cpu'")
        if backend == "auto":
            if faiss_gpu_count() > 0 and dev.type == "cuda":
                backend = "faiss"
            elif dev.type == "cuda" or _faiss() is None:
                backend = "torch"
            else:
                backend = "faiss"
        if ivf_nlist and backend != "faiss":
            raise RetrievalError("ivf_nlist needs backend='faiss' (the torch backend is exact only)")

        if backend == "torch":
            if isinstance(gallery, torch.Tensor):
                _check_tensor(gallery, "gallery")
                g = gallery.detach()
            else:
                g = torch.from_numpy(_as_float32_2d(gallery, "gallery"))
            if g.shape[0] == 0:
                raise RetrievalError("gallery is empty; build a gallery with at least one point")
            if precision == "auto":
                precision = "fp16" if dev.type == "cuda" else "fp32"
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
            if dtype is None:
                raise RetrievalError(f"precision must be one of auto, fp32, fp16, bf16; found {precision!r}")
            g32 = g.to(dev, torch.float32).contiguous()
            out = cls(
                "torch", dev, int(g.shape[0]), int(g.shape[1]), precision=precision,
                gallery_chunk=gallery_chunk, score_budget=score_budget, rescore=rescore,
            )
            out._gallery_t = g32 if dtype == torch.float32 else g32.to(dtype)
            out._gallery32 = g32 if dtype != torch.float32 else None  # fp32 copy for re-scoring
            return out

        faiss = _faiss()
        if faiss is None:
            raise RetrievalError("backend='faiss' needs the faiss-cpu (or faiss-gpu) package; use backend='torch'")
        g = _as_float32_2d(gallery, "gallery")
        if g.shape[0] == 0:
            raise RetrievalError("gallery is empty; build a gallery with at least one point")
        n, d = g.shape
        if ivf_nlist:
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, int(ivf_nlist), faiss.METRIC_INNER_PRODUCT)
            index.train(g)
            index.nprobe = int(ivf_nprobe)
            index.add(g)
        else:
            index = faiss.IndexFlatIP(d)
            index.add(g)
        use_gpu = dev.type == "cuda" and faiss_gpu_count() > 0
        if use_gpu:  # pragma: no cover - needs faiss-gpu and a GPU
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # split the gallery across all GPUs; results are merged by FAISS
            index = faiss.index_cpu_to_all_gpus(index, co=co)
        out = cls("faiss", dev, n, d, gallery_chunk=gallery_chunk, score_budget=score_budget)
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

    def _search_torch(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(queries, torch.Tensor):
            _check_tensor(queries, "queries")
            q = queries.detach().to(self.device, torch.float32)
        else:
            q = torch.from_numpy(_as_float32_2d(queries, "queries")).to(self.device)
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dim {q.shape[1]} but the gallery has dim {self.dim}")
        g = self._gallery_t
        half = g.dtype != torch.float32
        kk = min(self.size, k + self.rescore) if half else k  # candidates kept per gallery tile
        g_chunk = max(1, min(self.gallery_chunk, self.size))
        q_chunk = max(1, self.score_budget // g_chunk)
        out_s = torch.empty(q.shape[0], k, dtype=torch.float32, device=self.device)
        out_i = torch.empty(q.shape[0], k, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            for q0 in range(0, q.shape[0], q_chunk):
                qc = q[q0 : q0 + q_chunk]  # (q, D)
                qh = qc.to(g.dtype)
                cand_s, cand_i = [], []
                for g0 in range(0, self.size, g_chunk):
                    s = qh @ g[g0 : g0 + g_chunk].T  # (q, D) @ (D, g) -> (q, g)
                    s_k, i_k = _topk_lowest_index_ties(s.float(), min(kk, s.shape[1]))
                    cand_s.append(s_k)
                    cand_i.append(i_k + g0)
                s_all, i_all = torch.cat(cand_s, 1), torch.cat(cand_i, 1)  # (q, tiles * kk)
                if half:  # exact fp32 scores for the half-precision candidates
                    s_all = torch.einsum("qd,qcd->qc", qc, self._gallery32[i_all])
                s_k, i_k = _order_candidates(s_all, i_all, k)
                out_s[q0 : q0 + q_chunk], out_i[q0 : q0 + q_chunk] = s_k, i_k
        return out_s, out_i

    def _search_faiss(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_float32_2d(queries, "queries")
        if q.shape[1] != self.dim:
            raise RetrievalError(f"queries have dim {q.shape[1]} but the gallery has dim {self.dim}")
        if self._faiss_gpu and k + 1 > FAISS_GPU_MAX_K:  # pragma: no cover - GPU only
            torch_index = GalleryIndex.build(self._gallery_np, "torch", self.device)
            s, i = torch_index._search_torch(q, k)
            return s.cpu().numpy(), i.cpu().numpy()
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


def embed_locations(location_encoder: torch.nn.Module, latlon_deg, batch_size: int = 8192) -> np.ndarray:
    """Unit-normalised (G, 512) float32 embeddings of (G, 2) degrees, in batches, without gradients."""
    latlon = np.asarray(latlon_deg, dtype=np.float32)
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise RetrievalError(f"gallery coordinates must be (G, 2) lat, lon degrees; found shape {latlon.shape}")
    param = next(location_encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = location_encoder.training
    location_encoder.eval()
    chunks = []
    try:
        with torch.no_grad():
            for i in range(0, len(latlon), batch_size):
                x = torch.from_numpy(latlon[i : i + batch_size]).to(device)
                e = location_encoder(x).float()  # (b, 2) -> (b, 512)
                chunks.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
    finally:
        location_encoder.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, 512), np.float32)


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
