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
    idx = GalleryIndex.build(g, "torch", gallery_chunk=100, score_budget=700)  # 10 tiles, 7 queries at a time
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
