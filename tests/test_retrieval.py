"""vidtag.retrieval: exact top-k equals brute force on both backends; the gallery cache refuses mixing."""

import numpy as np
import pytest
import torch

from vidtag.retrieval import (
    GalleryCacheError,
    GalleryIndex,
    RetrievalError,
    gallery_embeddings,
    search,
)


def brute_force(q, g, k):
    """Reference: full scores, stable sort descending -> ties go to the lowest index."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_search_equals_brute_force(backend, k):
    rng = np.random.default_rng(k)
    g = unit(rng.normal(size=(1000, 64))).astype(np.float32)
    q = unit(rng.normal(size=(53, 64))).astype(np.float32)
    scores, index = search(q, g, k=k, backend=backend)
    ref_s, ref_i = brute_force(q, g, k)
    assert scores.dtype == np.float32 and index.dtype == np.int64
    assert scores.shape == index.shape == (53, k)
    np.testing.assert_array_equal(index, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_ties_go_to_the_lowest_index(backend):
    # Gallery of repeated rows: every query has many exactly-equal best scores.
    rng = np.random.default_rng(0)
    base = rng.integers(-2, 3, size=(4, 8)).astype(np.float32)
    g = np.repeat(base, 25, axis=0)[rng.permutation(100)]
    q = rng.integers(-2, 3, size=(20, 8)).astype(np.float32)
    scores, index = search(q, g, k=7, backend=backend)
    ref_s, ref_i = brute_force(q, g, 7)
    np.testing.assert_array_equal(index, ref_i)
    np.testing.assert_allclose(scores, ref_s)


def test_torch_backend_tiles_gallery_and_queries_and_merges():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(997, 16)).astype(np.float32)
    q = rng.normal(size=(41, 16)).astype(np.float32)
    # 41 queries meet 17 gallery rows at a time (700 // 41): 59 tiles, the last one 11 rows
    idx = GalleryIndex.build(g, "torch", gallery_chunk=100, score_budget=700)
    scores, index = idx.search(q, k=12)
    ref_s, ref_i = brute_force(q, g, 12)
    np.testing.assert_array_equal(index, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)


def test_half_precision_candidates_are_rescored_in_fp32():
    rng = np.random.default_rng(2)
    g = unit(rng.normal(size=(500, 32))).astype(np.float32)
    q = unit(rng.normal(size=(30, 32))).astype(np.float32)
    scores, index = search(q, g, k=3, backend="torch", precision="bf16")
    ref_s, ref_i = brute_force(q, g, 3)
    np.testing.assert_array_equal(index, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_torch_in_torch_out_and_backends_agree():
    torch.manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(300, 24), dim=1)
    q = torch.nn.functional.normalize(torch.randn(10, 24), dim=1)
    s_t, i_t = search(q, g, k=4, backend="torch")
    s_f, i_f = search(q, g, k=4, backend="faiss")
    assert isinstance(i_t, torch.Tensor) and i_t.dtype == torch.int64 and s_t.dtype == torch.float32
    assert torch.equal(i_t, i_f)


def test_ivf_option_finds_exact_neighbours_when_probing_all_lists():
    rng = np.random.default_rng(3)
    g = unit(rng.normal(size=(2000, 16))).astype(np.float32)
    q = unit(rng.normal(size=(15, 16))).astype(np.float32)
    _, index = search(q, g, k=3, backend="faiss", ivf_nlist=8, ivf_nprobe=8)
    np.testing.assert_array_equal(index, brute_force(q, g, 3)[1])


@pytest.mark.parametrize(
    ("q", "g", "k", "backend", "message"),
    [
        (np.ones((2, 4)), np.ones((5, 3)), 1, "torch", "dim 4"),
        (np.ones((2, 4)), np.ones((5, 4)), 6, "faiss", "between 1 and the gallery size 5"),
        (np.array([[1.0, np.nan]]), np.ones((5, 2)), 1, "faiss", "queries row 0"),
        (np.ones((2, 4)), np.ones((5, 4)), 1, "annoy", "must be one of"),
        (np.ones(4), np.ones((5, 4)), 1, "torch", "2-D"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(q, g, k, backend, message):
    with pytest.raises(RetrievalError, match=message):
        search(q, g, k=k, backend=backend)


# -- tiling, ties across tiles and shards, half precision with a certified short list ------------------


def tie_world(seed=0, n_base=6, repeats=40, n_q=23, dim=8):
    """Small-integer rows repeated many times in shuffled order: exact scores with many ties, spread over
    every tile and shard, so the lowest-index rule is tested where tiles and shards meet."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(n_base, dim)).astype(np.float32)
    g = np.repeat(base, repeats, axis=0)[rng.permutation(n_base * repeats)]
    q = rng.integers(-2, 3, size=(n_q, dim)).astype(np.float32)
    return q, g


@pytest.mark.parametrize("k", [1, 2, 7, 45])
@pytest.mark.parametrize(("query_chunk", "gallery_chunk", "score_budget"), [(5, 13, 10**6), (23, 64, 10**6), (4, 1000, 30), (1, 1, 1)])
def test_ties_across_tiles_go_to_the_lowest_index(k, query_chunk, gallery_chunk, score_budget):
    q, g = tie_world()
    idx = GalleryIndex.build(g, "torch", query_chunk=query_chunk, gallery_chunk=gallery_chunk, score_budget=score_budget)
    scores, index = idx.search(q, k)
    ref_s, ref_i = brute_force(q, g, k)
    np.testing.assert_array_equal(index, ref_i)
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [1, 6, 130])
def test_shards_answer_like_one_gallery(precision, k):
    """The gallery split over three 'devices' (CPU shards of 80 rows), ties straddling the shard boundaries."""
    q, g = tie_world(seed=1)
    sharded = GalleryIndex.build(g, "torch", "cpu", precision=precision, shard_devices=["cpu", "cpu", "cpu"], gallery_chunk=32)
    assert [len(s) for s in sharded._shards] == [80, 80, 80]
    scores, index = sharded.search(torch.from_numpy(q), k)
    ref_s, ref_i = brute_force(q, g, k)
    np.testing.assert_array_equal(index.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s)


def test_tiling_of_a_real_sized_batch_equals_brute_force():
    rng = np.random.default_rng(4)
    g = unit(rng.normal(size=(5000, 48))).astype(np.float32)
    q = unit(rng.normal(size=(300, 48))).astype(np.float32)
    idx = GalleryIndex.build(g, "torch", query_chunk=128, gallery_chunk=1024, score_budget=128 * 700)
    assert idx._tiles(300) == (128, 700)
    for k in (1, 3):
        np.testing.assert_array_equal(idx.search(q, k)[1], brute_force(q, g, k)[1])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_bound_holds_where_rounding_errors_add_up(precision):
    """|fp32 re-score - half score| <= a + b |half score| on adversarial rows: every component rounds the
    same way (query and gallery rows equal up to sign patterns), tiny components near fp16's subnormals."""
    rng = np.random.default_rng(5)
    d = 64
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ulp = torch.finfo(dtype).eps
    base = 1 + 0.49 * ulp * np.arange(1, d + 1) / d  # just below half an ulp above 1: all round down
    rows = [base, -base, base * 1e-5, base * rng.uniform(0.5, 2, d), rng.normal(size=d)]
    g = np.stack(rows + [r * s for r in rows for s in (1.0, 0.3)]).astype(np.float32)
    q = g.copy()
    idx = GalleryIndex.build(g, "torch", precision=precision)
    sh = idx._shards[0]
    qt = torch.from_numpy(q)
    half = (qt.to(dtype) @ sh.half.T).float()  # (Q, G) what the short list is chosen by
    exact = torch.einsum("qd,gd->qg", qt, sh.g32)
    a, b = idx._error_bound(sh, qt)
    err = (exact - half).abs()
    assert (err <= a[:, None] + b * half.abs()).all()
    assert (err.amax(dim=1) > 0.05 * a).any()  # the bound is not absurdly loose on these rows


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_falls_back_to_fp32_where_it_cannot_certify(precision):
    """40 rows within 1e-2 of the query's direction (scores within ~1e-3 of each other, far apart for fp32):
    half precision cannot rank them, the short list (8) cannot hold them all, so the bound sends the query
    to fp32, and the answer is still brute force's."""
    rng = np.random.default_rng(6)
    d = 32
    q = unit(rng.normal(size=(3, d))).astype(np.float32)
    near = unit(q[0] + 1e-2 * rng.normal(size=(40, d))).astype(np.float32)
    far = unit(rng.normal(size=(500, d))).astype(np.float32)
    g = np.concatenate([far[:250], near, far[250:]])
    idx = GalleryIndex.build(g, "torch", precision=precision, rescore=8, gallery_chunk=128)
    scores, index = idx.search(q, 5)
    ref_s, ref_i = brute_force(q, g, 6)
    assert np.diff(-ref_s, axis=1).min() > 1e-6  # fp32 can rank them: any disagreement would be ours
    np.testing.assert_array_equal(index, ref_i[:, :5])
    assert idx.n_fallback >= 1  # the crowded query was searched again in fp32
    clear = GalleryIndex.build(far, "torch", precision=precision, rescore=8)
    clear.search(unit(rng.normal(size=(20, d))).astype(np.float32), 1)
    assert clear.n_fallback == 0  # well-separated rows are certified from the short list


@pytest.mark.parametrize(("backend", "shards"), [("faiss", None), ("torch", None), ("torch", ["cpu", "cpu", "cpu"])])
def test_vectors_reads_gallery_rows_from_the_index(backend, shards):
    g = unit(np.random.default_rng(8).normal(size=(50, 6))).astype(np.float32)
    kwargs = {"shard_devices": shards} if shards else {}
    idx = GalleryIndex.build(g, backend, **kwargs)
    at = torch.tensor([[49, 0], [17, 33]])
    assert torch.equal(idx.vectors(at), torch.from_numpy(g)[at])


def test_fp16_refuses_a_gallery_beyond_its_range():
    g = np.full((4, 3), 1e5, np.float32)
    with pytest.raises(RetrievalError, match="too large for fp16"):
        GalleryIndex.build(g, "torch", precision="fp16")
    assert GalleryIndex.build(g, "torch", "cpu", precision="auto").precision == "fp32"


def test_faiss_holds_the_gallery_once():
    g = unit(np.random.default_rng(7).normal(size=(100, 8))).astype(np.float32)
    idx = GalleryIndex.build(g, "faiss")
    assert not idx._gallery_np.flags.owndata and not np.shares_memory(idx._gallery_np, g)  # FAISS's own copy
    np.testing.assert_array_equal(idx._gallery_np, g)


def test_faiss_is_told_not_to_spin_and_the_user_choice_wins(tmp_path):
    import os
    import subprocess
    import sys

    code = "import os, vidtag.retrieval as r; r._faiss(); print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_cpu_top1_tiles_fit_the_cache_and_blas_runs_with_the_project_threads(monkeypatch):
    """An fp32 k = 1 search on a CPU writes tiles of 2^21 scores (8 MB, still cached when argmax reads them);
    k > 1 keeps wide tiles. numpy's BLAS, which computes the CPU tiles, runs with torch's thread count
    during the search, whatever it had before, and gets its own count back afterwards."""
    from threadpoolctl import threadpool_info

    import vidtag.retrieval as retrieval

    rng = np.random.default_rng(9)
    g = unit(rng.normal(size=(9000, 8))).astype(np.float32)
    q = unit(rng.normal(size=(600, 8))).astype(np.float32)
    idx = GalleryIndex.build(g, "torch")
    assert idx._tiles(512, k=1) == (512, 4096) and idx._tiles(8192, k=1) == (4096, 512)
    assert idx._tiles(512, k=5) == (512, 9000)

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    outside = blas_threads()
    assert outside
    seen, real = [], retrieval._product
    monkeypatch.setattr(retrieval, "_product", lambda *a: seen.append(blas_threads()) or real(*a))
    before, want = torch.get_num_threads(), max(outside) + 1
    torch.set_num_threads(want)
    try:
        _, index = idx.search(q, 1)
    finally:
        torch.set_num_threads(before)
    assert seen and all(n == want for counts in seen for n in counts)
    assert blas_threads() == outside
    np.testing.assert_array_equal(index, brute_force(q, g, 1)[1])


def test_shard_devices_are_checked():
    g = np.ones((4, 3), np.float32)
    with pytest.raises(RetrievalError, match="shard_devices is for backend='torch'"):
        GalleryIndex.build(g, "faiss", shard_devices=["cpu"])
    with pytest.raises(RetrievalError, match="empty"):
        GalleryIndex.build(g, "torch", shard_devices=[])
    if not torch.cuda.is_available():
        with pytest.raises(RetrievalError, match="not available"):
            GalleryIndex.build(g, "torch", shard_devices=["cpu", "cuda:0"])


class TinyLocationEncoder(torch.nn.Module):
    """Any module mapping (N, 2) degrees to (N, D) works for the cache; this one is 2 -> 8 linear."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(2, 8)

    def forward(self, latlon):
        return self.lin(latlon)


def test_gallery_embeddings_are_cached_per_model_and_gallery(tmp_path):
    latlon = np.array([[47.37, 8.54], [40.71, -74.0], [-33.87, 151.21]])
    enc = TinyLocationEncoder(0)
    emb = gallery_embeddings(enc, latlon, tmp_path, batch_size=2)
    assert emb.shape == (3, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("gallery_emb-") and files[0].endswith(".json")
    # A file changed on disk is not trusted: embedded again (and rewritten), never returned.
    npy = tmp_path / files[1]
    np.save(npy, emb * 0 + 0.5)
    np.testing.assert_allclose(gallery_embeddings(enc, latlon, tmp_path), emb, rtol=1e-6)
    assert np.array_equal(np.load(npy), emb)
    # Another model (or another gallery) gets its own file under the default key ...
    emb2 = gallery_embeddings(TinyLocationEncoder(1), latlon, tmp_path)
    assert not np.allclose(emb2, emb) and len(list(tmp_path.iterdir())) == 4
    # ... and a forced key that names someone else's file is refused.
    key = files[1][len("gallery_emb-") : -len(".npy")]
    with pytest.raises(GalleryCacheError, match="different model_fingerprint"):
        gallery_embeddings(TinyLocationEncoder(1), latlon, tmp_path, key=key)
    with pytest.raises(GalleryCacheError, match="gallery_fingerprint"):
        gallery_embeddings(enc, latlon[:2] + 1, tmp_path, key=key)


def test_a_trusted_cache_is_read_not_recomputed(tmp_path, monkeypatch):
    """The second call embeds only the few spot-check rows, and returns the file's bytes."""
    import vidtag.retrieval as retrieval

    latlon = np.stack([np.linspace(-60, 60, 200), np.linspace(-170, 170, 200)], axis=1)
    enc = TinyLocationEncoder(0)
    first = gallery_embeddings(enc, latlon, tmp_path)
    embedded = []
    real = retrieval.embed_locations
    monkeypatch.setattr(retrieval, "embed_locations", lambda e, ll, bs=8192: embedded.append(len(ll)) or real(e, ll, bs))
    again = gallery_embeddings(enc, latlon, tmp_path)
    assert np.array_equal(again, first) and embedded == [8]


def test_gallery_embeddings_without_cache_match_a_direct_forward():
    latlon = np.array([[1.0, 2.0], [3.0, 4.0]])
    enc = TinyLocationEncoder(0)
    emb = gallery_embeddings(enc, latlon, None)
    direct = torch.nn.functional.normalize(enc(torch.tensor(latlon, dtype=torch.float32)), dim=1)
    np.testing.assert_allclose(emb, direct.detach().numpy(), rtol=1e-6)
