"""vidtag.windows: TempGeo and the GeoRefiner over long videos window by window, in bounded memory, with
short videos unchanged, each frame's output from its most central window, and masked frames still dropped."""

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from test_inference import DC, DD, features, grid, tiny_bundle
from typer.testing import CliRunner

from vidtag.errors import EvaluationError, InferenceError
from vidtag.inference import InferenceConfig, Locator, predict_sequences
from vidtag.windows import DEFAULT_WINDOW_FRAMES, DEFAULT_WINDOW_OVERLAP, plan_windows


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("w") / "model", grid())


@pytest.fixture
def attention_widths(monkeypatch):
    """(windows, frames) of every transformer layer call in TempGeo and the GeoRefiner, recorded at the layers
    themselves (the fast paths of eval mode go around nn.MultiheadAttention)."""
    seen: list[tuple[int, int]] = []
    for cls in (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer):
        orig = cls.forward

        def wrapped(self, x, *args, _orig=orig, **kwargs):
            seen.append((int(x.shape[0]), int(x.shape[1])))
            return _orig(self, x, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", wrapped)
    return seen


def _cfg(**kw):
    return InferenceConfig(k=16, **kw)


# --- the plan ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, overlap", [(8, 2), (8, 0), (7, 6), (64, 16), (5, 1)])
def test_every_frame_is_owned_by_the_window_whose_centre_is_nearest(window, overlap):
    lengths = torch.tensor([1, window - 1, window, window + 1, 3 * window + 2, 0, 97])
    plan = plan_windows(lengths, window, overlap)
    stride = window - overlap
    for b, length in enumerate(lengths.tolist()):
        wins = torch.nonzero(plan.seq == b).flatten().tolist()
        starts = plan.start[wins].tolist()
        assert len(wins) == (0 if length == 0 else 1 if length <= window else -(-(length - window) // stride) + 1)
        if length > window:  # full windows, stepping by the stride, the last one ending at the sequence's end
            assert plan.n_frames[wins].tolist() == [window] * len(wins)
            assert starts[:-1] == [i * stride for i in range(len(wins) - 1)] and starts[-1] == length - window
        for t in range(lengths.max()):
            own = int(plan.owner[b, t])
            if t >= length:
                assert own == -1
                continue
            dist = [abs(t - (s + (min(window, length) - 1) / 2)) for s in starts]
            assert own == wins[int(np.argmin(dist))]  # nearest centre, ties to the earlier window
            s = int(plan.start[own])
            assert s <= t < s + int(plan.n_frames[own])
            if length > window:  # context on both sides, except where the sequence ends
                assert min(t - s, s + window - 1 - t) >= min(overlap // 2, t, length - 1 - t)


def test_bad_window_settings_are_refused_in_one_line():
    for kw in ({"window_frames": 8, "window_overlap": 8}, {"window_frames": -1}, {"window_overlap": -2}):
        with pytest.raises(InferenceError, match="window"):
            InferenceConfig(**kw)
    with pytest.raises(EvaluationError, match="eval.window_overlap"):
        from vidtag.evaluation import EvalConfig

        EvalConfig(window_frames=4, window_overlap=5)
    assert InferenceConfig(window_frames=0, window_overlap=999).window_frames == 0  # off: the overlap is unused


# --- short videos are unchanged ---------------------------------------------------------------------------

def test_sequences_that_fit_one_window_give_the_whole_sequence_forward_bit_for_bit(bundle):
    """The windowed code path with one window per sequence is the unwindowed forward, exactly (both networks)."""
    clip, dino, offsets = features([5, 1, 9, 30], seed=3)
    lengths = torch.from_numpy(np.diff(offsets))
    rows = torch.full((4, 30), -1, dtype=torch.long)
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        rows[s, : b - a] = torch.arange(a, b)
    pad = rows < 0
    c, d = torch.from_numpy(clip).float()[rows.clamp(min=0)], torch.from_numpy(dino).float()[rows.clamp(min=0)]
    plan = plan_windows(lengths, 64, 16)
    assert len(plan) == 4 and plan.width == 30
    with torch.no_grad():
        whole = bundle.frame_encoder(c, d, pad)
        windowed = plan.apply(lambda cc, dd, p: bundle.frame_encoder(cc, dd, p), c, d)
        assert torch.equal(windowed[~pad], whole[~pad])
        gps = F.normalize(torch.randn(4, 30, 16), dim=-1)
        assert torch.equal(plan.apply(bundle.refiner, whole, gps)[~pad], bundle.refiner(whole, gps, pad)[~pad])


def test_msls_length_videos_predict_as_before_at_the_default_window(bundle, tmp_path, attention_widths):
    clip, dino, offsets = features([494, 3, 130], seed=4)
    assert _cfg().window_frames == DEFAULT_WINDOW_FRAMES >= 494
    run = dict(cache_dir=tmp_path, device="cpu", top_k=3)
    default = predict_sequences(bundle, clip, dino, None, offsets, cfg=_cfg(), **run)
    assert max(t for _, t in attention_widths) == 494  # the longest sequence ran whole
    whole = predict_sequences(bundle, clip, dino, None, offsets, cfg=_cfg(window_frames=0), **run)
    assert default.equals(whole)


# --- long videos ------------------------------------------------------------------------------------------

def test_a_3000_frame_video_runs_with_attention_bounded_by_the_window(bundle, tmp_path, attention_widths):
    clip, dino, offsets = features([3000, 40], seed=5)
    cfg = _cfg(window_frames=64, window_overlap=16, batch_frames=512, decode="viterbi", step_km=1.0)
    out = predict_sequences(bundle, clip, dino, None, offsets, cfg=cfg, cache_dir=tmp_path, device="cpu")
    assert out.height == 3040 and out["valid"].all() and out["lat"].is_not_null().all()
    assert out["confidence"].is_between(0, 1).all()
    assert max(t for _, t in attention_widths) == 64  # frames any attention saw at once: the window
    assert max(n * t for n, t in attention_widths) <= 512  # frames per forward: batch_frames (8 windows)
    assert sum(n for n, _ in attention_widths) > 2 * (3000 // 64)  # both networks went through every window
    attention_widths.clear()
    predict_sequences(bundle, clip[:300], dino[:300], None, np.array([0, 300]), cfg=_cfg(window_frames=0),
                      cache_dir=tmp_path, device="cpu")
    assert max(t for _, t in attention_widths) == 300  # unwindowed, the whole sequence is one attention


def _windows_alone(bundle, plan, c, d, gallery_emb):
    """Fig. 5 written out with windows: each window run alone (batch of one), each frame from its owner."""
    t = c.shape[1]
    frame = torch.zeros(1, t, 16)
    for w in range(len(plan)):
        s, n = int(plan.start[w]), int(plan.n_frames[w])
        emb = bundle.frame_encoder(c[:, s:s + n], d[:, s:s + n])  # (1, n, E)
        owned = torch.nonzero(plan.owner[0] == w).flatten()
        frame[0, owned] = emb[0, owned - s]
    i1 = (frame[0] @ gallery_emb.T).argmax(dim=1)  # Phase I top-1 of the whole sequence's stitched embeddings
    gps = gallery_emb[i1][None]  # (1, T, E)
    refined = torch.zeros(1, t, 16)
    for w in range(len(plan)):
        s, n = int(plan.start[w]), int(plan.n_frames[w])
        out = bundle.refiner(frame[:, s:s + n], gps[:, s:s + n])
        owned = torch.nonzero(plan.owner[0] == w).flatten()
        refined[0, owned] = out[0, owned - s]
    i2 = (F.normalize(refined[0], dim=-1) @ gallery_emb.T).argmax(dim=1)
    return frame[0], i1, i2


def test_the_stitched_output_is_each_window_run_alone_at_the_frames_it_owns(bundle, tmp_path):
    clip, dino, offsets = features([300], seed=7)
    gallery = grid()
    loc = Locator.for_bundle(bundle, gallery, cache_dir=tmp_path, device="cpu")
    c, d = torch.from_numpy(clip).float()[None], torch.from_numpy(dino).float()[None]
    plan = plan_windows(torch.tensor([300]), 64, 16)
    assert len(plan) == 6
    with torch.no_grad():
        frame_ref, i1_ref, i2_ref = _windows_alone(bundle, plan, c, d, loc.gallery_emb)
        rows = torch.arange(300)[None]
        from vidtag.features.source import FeatureTensors

        source = FeatureTensors.from_frames(clip, dino, torch.device("cpu"))
        stitched = loc._frame_embeddings(source, rows, rows < 0, plan, batch_frames=128)  # 2 windows per forward
    torch.testing.assert_close(stitched[0], frame_ref, atol=1e-5, rtol=0)
    out = predict_sequences(bundle, clip, dino, None, offsets, gallery, cfg=_cfg(window_frames=64, window_overlap=16,
                                                                                 batch_frames=128),
                            cache_dir=tmp_path, device="cpu")
    np.testing.assert_array_equal(out.select("phase1_lat", "phase1_lon").to_numpy(), gallery[i1_ref.numpy()])
    np.testing.assert_array_equal(out.select("lat", "lon").to_numpy(), gallery[i2_ref.numpy()])
    whole = predict_sequences(bundle, clip, dino, None, offsets, gallery, cfg=_cfg(window_frames=0),
                              cache_dir=tmp_path, device="cpu")
    assert not whole.select("lat", "lon").equals(out.select("lat", "lon"))  # the windows did change the context


def test_a_masked_frame_in_a_long_video_is_a_dropped_frame(bundle, tmp_path):
    clip, dino, _ = features([400], seed=8)
    valid = np.ones(400, bool)
    valid[[0, 57, 58, 200, 399]] = False  # at the start, a seam's neighbourhood, the middle, the end
    cfg = _cfg(window_frames=48, window_overlap=12)
    run = dict(cfg=cfg, cache_dir=tmp_path, device="cpu")
    masked = predict_sequences(bundle, clip, dino, valid, np.array([0, 400]), **run)
    dropped = predict_sequences(bundle, clip[valid], dino[valid], None, np.array([0, int(valid.sum())]), **run)
    cols = ["lat", "lon", "phase1_lat", "phase1_lon", "confidence"]
    assert masked.filter(pl.col("valid")).select(cols).equals(dropped.select(cols))
    bad = masked.filter(~pl.col("valid"))
    assert bad.height == 5 and (bad["confidence"] == 0).all() and bad["lat"].is_not_null().all()
    rows = masked.select("lat", "lon").rows()
    assert rows[57] == rows[56] and rows[58] == rows[59]  # each takes its nearest readable neighbour's answer


# --- where the setting flows ------------------------------------------------------------------------------

def test_predict_features_and_the_cli_carry_the_window(bundle, tmp_path, attention_widths):
    from vidtag.api import Model
    from vidtag.cli import predict as cli_predict

    clip, dino, _ = features([200], seed=9)
    model = Model(bundle, device="cpu", cache_dir=tmp_path)
    a = model.predict_features(clip.astype(np.float32), dino.astype(np.float32), places=False, window_frames=32,
                               window_overlap=8)
    assert max(t for _, t in attention_widths) == 32 and a.height == 200
    attention_widths.clear()
    model.predict_features(clip.astype(np.float32), dino.astype(np.float32), places=False)
    assert max(t for _, t in attention_widths) == 200  # the model's cfg: 200 frames fit the default window
    with pytest.raises(InferenceError, match="window_overlap"):
        model.predict_features(clip, dino, window_frames=8, window_overlap=8)
    params = {p.name: p.default for p in __import__("inspect").signature(cli_predict).parameters.values()}
    assert (params["window_frames"].default, params["window_overlap"].default) == (DEFAULT_WINDOW_FRAMES, DEFAULT_WINDOW_OVERLAP)


def test_cli_predict_runs_a_frames_folder_window_by_window(tmp_path, attention_widths):
    from PIL import Image

    from vidtag.cli import app
    from vidtag.features.backbones import BackboneConfig, build_backbones

    bb = build_backbones(BackboneConfig(preset="tiny", image_size=32), "cpu")
    fp = bb.fingerprint()
    model_dir = tmp_path / "model"
    tiny_bundle(model_dir, grid(), backbones={k: v for k, v in fp.items() if k != "preprocessing"}, dims=bb.dims)
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    out = tmp_path / "p.csv"
    args = ["predict", str(folder), "--model", str(model_dir), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
            "--no-progress", "--no-places"]
    r = CliRunner().invoke(app, [*args, "--window-frames", "4", "--window-overlap", "1"])
    assert r.exit_code == 0, r.output
    assert pl.read_csv(out).height == 12
    assert max(t for _, t in attention_widths) == 4  # 12 frames, in windows of 4
    bad = CliRunner().invoke(app, [*args, "--window-frames", "4", "--window-overlap", "4"])
    assert bad.exit_code == 1 and "window_overlap (4) must be smaller than window_frames (4)" in bad.output
