"""vidtag.inference: two-stage inference (Fig. 5) over padded batches of sequences, from a real bundle."""

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from vidtag.geo import haversine_km
from vidtag.features.sequences import build_sequences
from vidtag.features.source import FeatureTensors
from vidtag.inference import InferenceConfig, InferenceError, offsets_from_sequence_ids, predict_sequences
from vidtag.models.bundle import Bundle, build_models, load_bundle, save_bundle
from vidtag.models.config import VidTAGConfig
from vidtag.train.batches import sample_frames

DC, DD = 8, 12

TINY_MODEL = {
    "frame": {"clip_dim": DC, "dino_dim": DD, "tempgeo_heads": 2, "tempgeo_ff_dim": 32, "mlp_dims": [16], "out_dim": 16, "max_positions": 4},
    "location": {"rff_dim": 8, "hidden_dim": 16, "n_hidden": 1, "out_dim": 16},
    "refiner": {"width": 16, "heads": 2, "ff_dim": 32},
}


def tiny_bundle(directory, gallery_latlon, backbones=None, seed=0, dims=(DC, DD)):
    """An untrained but complete bundle written with save_bundle and read back with load_bundle."""
    model = {**TINY_MODEL, "frame": {**TINY_MODEL["frame"], "clip_dim": dims[0], "dino_dim": dims[1]}}
    cfg = VidTAGConfig.from_dict(model)
    frame, loc, refiner = build_models(cfg, seed=seed)
    gallery_file = directory.parent / f"{directory.name}-gallery.parquet"
    pl.DataFrame({"lat": gallery_latlon[:, 0], "lon": gallery_latlon[:, 1]}).write_parquet(gallery_file)
    config = {"model": cfg.to_dict(), "backbones": backbones, "feature_dims": {"clip": dims[0], "dino": dims[1]}}
    save_bundle(directory, Bundle(frame, loc, refiner, torch.tensor(2.0), config, gallery_file))
    return load_bundle(directory, "cpu")


def grid(n=12):
    """A world-wide grid, so that even an untrained location encoder tells its points apart."""
    lat, lon = np.meshgrid(np.linspace(-60, 70, n), np.linspace(-180, 165, n), indexing="ij")
    return np.stack([lat.ravel(), lon.ravel()], axis=1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("b") / "model", grid())


def features(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return rng.normal(size=(n, DC)).astype(np.float16), rng.normal(size=(n, DD)).astype(np.float16), offsets


def reference_one_sequence(bundle, clip, dino, gallery):
    """Fig. 5 written out for a single sequence, no batching or padding, brute-force argmax."""
    with torch.no_grad():
        c = torch.tensor(clip, dtype=torch.float32)[None]
        d = torch.tensor(dino, dtype=torch.float32)[None]
        frame_emb = bundle.frame_encoder(c, d)  # (1, T, E)
        gal_raw = bundle.location_encoder(torch.tensor(gallery, dtype=torch.float32))  # (G, E)
        gal = F.normalize(gal_raw, dim=-1)
        i1 = (frame_emb[0] @ gal.T).argmax(dim=1)
        gps_emb = bundle.location_encoder(torch.tensor(gallery[i1.numpy()], dtype=torch.float32))[None]  # re-embedded
        refined = bundle.refiner(frame_emb, gps_emb)
        i2 = (refined[0] @ gal.T).argmax(dim=1)
    return gallery[i1.numpy()], gallery[i2.numpy()]


def test_matches_fig5_written_out_for_each_sequence(bundle, tmp_path):
    gallery = grid()
    clip, dino, offsets = features([5, 1, 9, 3])
    out = predict_sequences(bundle, clip, dino, None, offsets, sequence_ids=["a", "b", "c", "d"], cache_dir=tmp_path, device="cpu")
    assert out.columns == ["sequence_id", "frame_index", "lat", "lon", "phase1_lat", "phase1_lon", "confidence", "valid"]
    assert out["sequence_id"].to_list() == ["a"] * 5 + ["b"] + ["c"] * 9 + ["d"] * 3
    assert out["frame_index"].to_list() == [*range(5), 0, *range(9), *range(3)]
    for s in range(4):
        sl = slice(offsets[s], offsets[s + 1])
        p1, p2 = reference_one_sequence(bundle, clip[sl], dino[sl], gallery)
        rows = out[sl]
        np.testing.assert_allclose(rows.select("phase1_lat", "phase1_lon").to_numpy(), p1)
        np.testing.assert_allclose(rows.select("lat", "lon").to_numpy(), p2)
    assert out.select(pl.struct("lat", "lon").n_unique()).item() > 5  # not a collapsed model
    assert len(list(tmp_path.glob("gallery_emb-*.npy"))) == 1  # embedded once, cached


def test_batching_and_padding_do_not_change_predictions(bundle):
    clip, dino, offsets = features([7, 2, 11, 1, 4, 6], seed=1)
    one_batch = predict_sequences(bundle, clip, dino, None, offsets, cfg=InferenceConfig(batch_frames=10_000), device="cpu")
    many = predict_sequences(bundle, clip, dino, None, offsets, cfg=InferenceConfig(batch_frames=11), device="cpu")
    assert one_batch.select("lat", "lon", "phase1_lat", "phase1_lon").equals(many.select("lat", "lon", "phase1_lat", "phase1_lon"))
    np.testing.assert_allclose(one_batch["confidence"], many["confidence"], atol=1e-5)


def test_confidence_is_the_phase1_mass_near_the_final_prediction(bundle):
    clip, dino, offsets = features([6, 3], seed=2)
    out = predict_sequences(bundle, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(k=50, confidence_radius_km=1.0))
    c = out["confidence"].to_numpy()
    assert ((c >= 0) & (c <= 1)).all()
    wide = predict_sequences(bundle, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(k=50, confidence_radius_km=20_100.0))
    np.testing.assert_allclose(wide["confidence"], 1.0, rtol=1e-5)  # every candidate lies within half the circumference
    # One candidate: all the mass sits on the Phase I top-1, so confidence says whether it lies
    # within the radius of the final (refined) prediction.
    single = predict_sequences(bundle, clip, dino, None, offsets, device="cpu", cfg=InferenceConfig(k=1))
    p1_near = haversine_km(single["phase1_lat"], single["phase1_lon"], single["lat"], single["lon"]) <= 1.0
    np.testing.assert_allclose(single["confidence"], p1_near.astype(float))


def test_invalid_frames_are_ignored_and_filled_from_the_nearest_valid_frame(bundle):
    clip, dino, offsets = features([6, 3, 2], seed=3)
    valid = np.ones(11, bool)
    valid[[2, 3]] = False  # two bad frames inside sequence 0
    valid[9:11] = False  # sequence 2 has no readable frame at all
    out = predict_sequences(bundle, clip, dino, valid, offsets, device="cpu")
    clip2, dino2 = clip.copy(), dino.copy()
    clip2[~valid], dino2[~valid] = np.nan, np.nan  # what an invalid frame holds must not matter
    out2 = predict_sequences(bundle, clip2, dino2, valid, offsets, device="cpu")
    assert out.equals(out2)
    seq0 = out[:6]
    assert seq0["valid"].to_list() == [True, True, False, False, True, True]
    assert seq0["lat"][2] == seq0["lat"][1] and seq0["lat"][3] == seq0["lat"][4]  # nearest in time (tie -> earlier)
    assert seq0["lon"][2] == seq0["lon"][1] and seq0["lon"][3] == seq0["lon"][4]
    assert seq0["confidence"][2] == 0.0
    assert out[9:]["lat"].is_null().all() and out[9:]["confidence"].to_list() == [0.0, 0.0]


def test_an_unreadable_middle_frame_is_handled_alike_in_training_and_inference(bundle):
    """One rule for unreadable frames: training drops frame 2 of a 6-frame sequence before sampling, inference
    masks it where it stands; the valid frames get identical embeddings and identical predictions."""
    clip, dino, offsets = features([6], seed=3)
    valid = np.ones(6, bool)
    valid[2] = False
    keep = np.flatnonzero(valid)
    # training path: the manifest's sequence, the unreadable frame dropped, all frames sampled in order
    manifest = pl.DataFrame({"sequence_id": ["a"] * 6, "frame_index": pl.Series(range(6), dtype=pl.Int32),
                             "lat": [0.0] * 6, "lon": [0.0] * 6, "split": ["val"] * 6})
    table = build_sequences(manifest, valid, "val")
    rows, pad = sample_frames(table, torch.tensor([0]), 16, torch.Generator().manual_seed(0))
    data = FeatureTensors.from_arrays(clip, dino, manifest, torch.device("cpu"))
    c, d, _ = data.gather(rows)
    with torch.no_grad():
        train_emb = bundle.frame_encoder(c, d, pad)[~pad]  # (5, E)
        # inference path: the frame masked in place
        c_all = torch.tensor(clip, dtype=torch.float32)[None]
        d_all = torch.tensor(dino, dtype=torch.float32)[None]
        infer_emb = bundle.frame_encoder(c_all, d_all, torch.tensor(~valid)[None])[0, keep]
    torch.testing.assert_close(train_emb, infer_emb, atol=1e-6, rtol=0)
    masked = predict_sequences(bundle, clip, dino, valid, offsets, device="cpu")
    dropped = predict_sequences(bundle, clip[keep], dino[keep], None, np.array([0, 5]), device="cpu")
    cols = ["lat", "lon", "phase1_lat", "phase1_lon", "confidence"]
    assert masked[keep.tolist()].select(cols).equals(dropped.select(cols))
    ref1, ref2 = reference_one_sequence(bundle, clip[keep], dino[keep], grid())
    np.testing.assert_array_equal(dropped.select("phase1_lat", "phase1_lon").to_numpy(), ref1)
    np.testing.assert_array_equal(dropped.select("lat", "lon").to_numpy(), ref2)


def test_features_that_do_not_fit_the_model_are_refused(bundle):
    clip, dino, offsets = features([3])
    with pytest.raises(InferenceError, match="backbones named in the bundle"):
        predict_sequences(bundle, clip[:, :4], dino, None, offsets, device="cpu")
    with pytest.raises(InferenceError, match="sequence_offsets"):
        predict_sequences(bundle, clip, dino, None, np.array([0, 2]), device="cpu")


def test_offsets_from_sorted_sequence_ids():
    offsets, ids = offsets_from_sequence_ids(["x", "x", "y", "z", "z", "z"])
    assert offsets.tolist() == [0, 2, 3, 6] and ids == ["x", "y", "z"]


def test_candidates_of_both_retrievals_and_flat_decoding_is_fig5(bundle):
    from vidtag.decode import DecodeConfig
    from vidtag.features.sequences import sequences_from_offsets
    from vidtag.inference import Locator

    clip, dino, offsets = features([7, 2, 11], seed=4)
    valid = np.ones(20, bool)
    valid[[3, 12]] = False
    base = predict_sequences(bundle, clip, dino, valid, offsets, device="cpu")
    flat = predict_sequences(bundle, clip, dino, valid, offsets, device="cpu",
                             cfg=InferenceConfig(decode="viterbi", step_km=1.0, transition_weight=0.0))
    assert flat.equals(base)  # no transition cost: each frame its own top-1, through the whole path
    locator = Locator.for_bundle(bundle, grid(), device="cpu")
    table = sequences_from_offsets(offsets, valid, ["a", "b", "c"])
    source = FeatureTensors.from_frames(clip, dino, torch.device("cpu"))
    found = locator.locate(source, table, top_k=5, decode=DecodeConfig(step_km=1.0))
    plain = locator.locate(source, table)
    assert np.array_equal(found.phase1, plain.phase1) and np.array_equal(found.final, plain.final)  # Fig. 5 untouched
    assert set(found.candidates) == {"phase1", "final"}
    for stage, top1 in (("phase1", found.phase1), ("final", found.final)):
        c = found.candidates[stage]
        assert c.latlon.shape == (18, 5, 2) and c.score.shape == c.prob.shape == c.index.shape == (18, 5)
        assert np.array_equal(c.index[:, 0], top1) and np.array_equal(c.latlon, grid()[c.index])
        assert (np.diff(c.score, axis=1) <= 0).all() and (c.prob.sum(axis=1) == pytest.approx(1.0))
        assert c.path.shape == (18,) and ((c.path >= 0) & (c.path < 5)).all()
        np.testing.assert_array_equal(found.latlon(stage, grid(), decoded=False), grid()[top1])


# --- evaluation run (vidtag.evaluation) on top of the same inference ---------------------------


def test_evaluation_run_writes_metrics_table_and_plots(bundle, tmp_path):
    from types import SimpleNamespace

    from vidtag.evaluation import EvalConfig, EvalRuntime, run_evaluation, summary, write_reports

    lengths = [4, 3, 5, 2]
    clip, dino, _ = features(lengths, seed=5)
    valid = np.ones(len(clip), bool)
    valid[12:14] = False  # the last sequence is unreadable: filled, counted, not dropped
    gallery = grid()
    rng = np.random.default_rng(0)
    gt = gallery[rng.integers(0, len(gallery), len(clip))]
    manifest = pl.DataFrame({
        "sequence_id": [s for s, n in zip("abcd", lengths) for _ in range(n)],
        "frame_index": np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        "lat": gt[:, 0], "lon": gt[:, 1],
        "split": ["train"] * 4 + ["val"] * 10,
    })
    feats = SimpleNamespace(clip=clip, dino=dino, valid=valid)
    res = run_evaluation(bundle, feats, manifest, EvalConfig(), runtime=EvalRuntime(device="cpu"), cache_dir=tmp_path / "emb")
    p = res.predictions
    assert p["sequence_id"].unique(maintain_order=True).to_list() == ["b", "c", "d"]  # only the val split
    assert p.columns[:10] == ["sequence_id", "frame_index", "lat", "lon", "gt_lat", "gt_lon", "phase1_lat", "phase1_lon", "confidence", "valid"]
    assert p["lat"].is_not_null().all()
    assert res.metrics["n_frames"] == 10 and res.metrics["n_frames_unpredicted"] == 2 == res.metrics["n_frames_invalid"]
    assert set(res.metrics["phase1"]) == {"frame", "video", "trajectory", "shape"}
    # Beyond the paper: argmax and Viterbi side by side (the step scale from the train split's track "a").
    assert set(res.metrics["compare"]) == {"argmax", "viterbi"} and res.metrics["decode"]["step_km"] > 0
    assert res.metrics["compare"]["argmax"]["final"]["frame_acc_1km"] == res.metrics["frame"]["acc_1km"]
    assert res.sequences["sequence_id"].to_list() == ["b", "c", "d"]
    written = write_reports(res, predictions=tmp_path / "pred.parquet", metrics=tmp_path / "m" / "eval.json",
                            per_sequence_csv=tmp_path / "m" / "seq.csv", plots_dir=tmp_path / "plots", n_maps=2)
    assert [w.name for w in written] == ["b.png", "d.png"]
    assert pl.read_csv(tmp_path / "plots" / "accuracy.csv").columns[:3] == ["threshold_km", "final", "phase1"]
    assert pl.read_parquet(tmp_path / "pred.parquet").equals(p)
    text = summary(res.metrics)
    assert "phase I" in text and "acc_1km" in text


# --- the position tables inference reads are the training length (Table 10) -------------------------------


def test_position_tables_follow_seq_len_or_a_contradiction_is_refused(tmp_path):
    """Training on 4-frame sequences under a 16-row table would leave rows 4..15 at their random init, and
    inference reads them (a video of 5..16 frames directly, a longer one by interpolation)."""
    from test_train import RT1, RT2, TINY_MODEL, make_world

    from vidtag.errors import ConfigError
    from vidtag.models.config import GeoRefinerConfig
    from vidtag.train.phase1 import Phase1Config, load_phase1, tied_positions, train_phase1
    from vidtag.train.phase2 import Phase2Config, train_phase2

    assert tied_positions(16, 16, 16, "k", "s") == 16 and tied_positions(16, 4, 16, "k", "s") == 4  # default follows
    assert tied_positions(8, 8, 16, "k", "s") == 8
    world = make_world(n_seq=8)
    frame = {k: v for k, v in TINY_MODEL.to_dict()["frame"].items() if k != "max_positions"}  # left at its default
    model = VidTAGConfig.from_dict({**TINY_MODEL.to_dict(), "frame": frame})
    p1 = Phase1Config(seq_len=4, batch_size=4, epochs=1, warmup_steps=1, location_init="random")
    train_phase1(world, world.manifest, world.gallery, tmp_path / "p1", p1, model, runtime=RT1)
    phase1, config = load_phase1(tmp_path / "p1")
    assert phase1.frame_encoder.tempgeo.pos.shape[0] == 4 and config["model"]["frame"]["max_positions"] == 4
    with pytest.raises(ConfigError, match=r"phase1.model.frame.max_positions=8 but phase1.seq_len=4.*Table 10"):
        train_phase1(world, world.manifest, world.gallery, tmp_path / "bad", p1, TINY_MODEL, runtime=RT1)  # explicitly 8

    gallery_file = tmp_path / "gallery.parquet"
    pl.DataFrame({"lat": world.gallery[:, 0], "lon": world.gallery[:, 1]}).write_parquet(gallery_file)
    p2 = Phase2Config(seq_len=4, batch_size=4, epochs=1, warmup_steps=1)
    refiner = GeoRefinerConfig(**{**TINY_MODEL.refiner.__dict__, "max_positions": 16})
    train_phase2(world, world.manifest, gallery_file, world.gallery, tmp_path / "p1", tmp_path / "model", tmp_path / "ck", p2,
                 refiner, runtime=RT2)
    bundle = load_bundle(tmp_path / "model", "cpu")
    assert bundle.refiner.pos.shape[0] == 4 and bundle.frame_encoder.tempgeo.pos.shape[0] == 4
    with pytest.raises(ConfigError, match=r"phase2.refiner.max_positions=8 but phase2.seq_len=4"):
        train_phase2(world, world.manifest, gallery_file, world.gallery, tmp_path / "p1", tmp_path / "m2", tmp_path / "ck2", p2,
                     GeoRefinerConfig(**{**TINY_MODEL.refiner.__dict__, "max_positions": 8}), runtime=RT2)


# --- CityGuessr68k: city / state / country / continent accuracy from the manifest's hierarchy (Table 3) -----

HIERARCHY = {  # city -> (state, country, continent): c0 and c1 share a state, c2 another state of the same country
    "c0": ("s0", "k0", "EU"), "c1": ("s0", "k0", "EU"), "c2": ("s1", "k0", "EU"), "c3": ("s2", "k1", "AS"),
    "c4": ("s3", "k2", "AS"), "c5": ("s4", "k3", "AM"),
}
CENTRES = {"c0": (48.85, 2.35), "c1": (45.76, 4.84), "c2": (43.30, 5.37), "c3": (35.68, 139.69), "c4": (37.57, 126.98),
           "c5": (40.71, -74.00)}


def _labelled(cities, n_frames, split="val"):
    rows = []
    for i, c in enumerate(cities):
        for t in range(n_frames):
            rows.append({"sequence_id": f"v{i:02d}", "frame_index": t, "lat": CENTRES[c][0], "lon": CENTRES[c][1], "split": split,
                         "city": c, "state": HIERARCHY[c][0], "country": HIERARCHY[c][1], "continent": HIERARCHY[c][2]})
    return pl.DataFrame(rows, schema_overrides={"frame_index": pl.Int32})


def test_label_predictor_reads_the_gallery_label_and_the_manifests_hierarchy():
    from vidtag.evaluation import LabelPredictor
    from vidtag.geo import offset_km

    gallery = pl.DataFrame({"lat": [CENTRES[c][0] for c in CENTRES] + [CENTRES["c3"][0]],
                            "lon": [CENTRES[c][1] for c in CENTRES] + [CENTRES["c3"][1]], "label": [*CENTRES, "c9"]})
    manifest = _labelled(list(CENTRES), 2)
    noisy = manifest.head(1).with_columns(pl.lit("s9").alias("state"), pl.lit("zz").alias("sequence_id"))  # a minority label
    lp = LabelPredictor.build(gallery, {"region_column": "city"}, pl.concat([manifest, noisy]))
    near_c0 = offset_km(np.array([CENTRES["c0"][0]]), np.array([CENTRES["c0"][1]]), 3.0, -2.0)  # off the gallery (refined)
    lat = np.array([CENTRES["c1"][0], CENTRES["c2"][0], CENTRES["c3"][0], float(near_c0[0][0]), CENTRES["c5"][0]])
    lon = np.array([CENTRES["c1"][1], CENTRES["c2"][1], CENTRES["c3"][1], float(near_c0[1][0]), CENTRES["c5"][1]])
    cols = {s.name: s.to_list() for s in lp.columns(lat, lon)}
    assert cols["pred_city"] == ["c1", "c2", "c3", "c0", "c5"]  # c3's twin "c9" listed later loses the tie
    assert cols["pred_state"] == ["s0", "s1", "s2", "s0", "s4"]  # c0's state is its most common one, not the noise
    assert cols["pred_country"] == ["k0", "k0", "k1", "k0", "k3"] and cols["pred_continent"] == ["EU", "EU", "AS", "EU", "AM"]
    assert LabelPredictor.build(gallery.drop("label"), {}, manifest) is None
    assert LabelPredictor.build(gallery, {}, manifest.drop("city")) is None
    country_level = LabelPredictor.build(gallery.with_columns(pl.Series("label", ["k0", "k0", "k0", "k1", "k2", "k3", "k1"])),
                                         {"region_column": "country"}, manifest)
    assert [s.name for s in country_level.columns(lat, lon)] == ["pred_country", "pred_continent"]


def test_evaluation_fills_city_state_country_continent_accuracy(tmp_path):
    from vidtag.evaluation import EvalConfig, EvalRuntime, run_evaluation, summary
    from vidtag.gallery import build_gallery, write_gallery
    from vidtag.metrics import evaluate

    train = _labelled(list(CENTRES), 3, "train")
    val = _labelled(["c0", "c1", "c2", "c3", "c4", "c5", "c1", "c3"], 4).with_columns(pl.format("val{}", "sequence_id").alias("sequence_id"))
    manifest = pl.concat([train, val])
    gal_df, meta = build_gallery(manifest, "city_centres")
    write_gallery(gal_df, meta, tmp_path / "cities.parquet")
    cfg = VidTAGConfig.from_dict(TINY_MODEL)
    frame, loc, refiner = build_models(cfg, seed=3)
    save_bundle(tmp_path / "model", Bundle(frame, loc, refiner, torch.tensor(2.0), {"model": cfg.to_dict(), "backbones": None,
                                           "feature_dims": {"clip": DC, "dino": DD}}, tmp_path / "cities.parquet"))
    bundle = load_bundle(tmp_path / "model", "cpu")
    clip, dino, _ = features([manifest.height], seed=11)
    from types import SimpleNamespace

    feats = SimpleNamespace(clip=clip, dino=dino, valid=np.ones(manifest.height, bool))
    res = run_evaluation(bundle, feats, manifest, EvalConfig(), runtime=EvalRuntime(device="cpu"), cache_dir=tmp_path / "emb")
    p = res.predictions
    # Independently: the predicted point is a city centre; its city's place in HIERARCHY gives the coarser labels.
    by_point = {v: k for k, v in CENTRES.items()}
    for prefix, lat_col, lon_col, got in (("", "lat", "lon", res.metrics["city_frame"]),
                                          ("phase1 ", "phase1_lat", "phase1_lon", res.metrics["phase1"]["city_frame"])):
        city = [by_point[(a, b)] for a, b in zip(p[lat_col], p[lon_col])]
        truth = list(zip(p["city"], p["state"], p["country"], p["continent"]))
        for k, level in enumerate(("city", "state", "country", "continent")):
            want = 100.0 * np.mean([(c if k == 0 else HIERARCHY[c][k - 1]) == t[k] for c, t in zip(city, truth)])
            assert got[level] == pytest.approx(want), (prefix, level)
    assert p["pred_city"].to_list() == [by_point[(a, b)] for a, b in zip(p["lat"], p["lon"])]
    video = res.metrics["city"]  # per video (metrics.evaluate's default for labels)
    assert set(video) == {"city", "state", "country", "continent"}
    assert video["city"] <= video["state"] <= video["country"] <= video["continent"]
    assert video == evaluate(p.select("sequence_id", "frame_index", "lat", "lon", "gt_lat", "gt_lon", "city", "state", "country",
                                      "continent", "pred_city", "pred_state", "pred_country", "pred_continent"))["city"]
    assert set(res.metrics["phase1"]["city"]) == set(video)
    assert "labels" in summary(res.metrics) and "per frame" in summary(res.metrics)


def test_a_bundle_without_a_gallery_round_trips_and_asks_for_one(bundle, tmp_path):
    """A trained model is written without a gallery (evaluation packs one): it loads, refuses to predict alone
    with one clear line, and predicts against any gallery it is given."""
    import dataclasses

    bare = save_bundle(tmp_path / "bare", dataclasses.replace(bundle, gallery_path=None))
    loaded = load_bundle(bare)
    assert loaded.gallery_path is None and not (bare / "gallery.parquet").exists()
    clip, dino, offsets = features([4])
    with pytest.raises(InferenceError, match="carries no gallery"):
        predict_sequences(loaded, clip, dino, None, offsets, device="cpu")
    out = predict_sequences(loaded, clip, dino, None, offsets, gallery=grid(), device="cpu")
    ref = predict_sequences(bundle, clip, dino, None, offsets, device="cpu")
    assert out.select("lat", "lon").equals(ref.select("lat", "lon"))
