"""The unified model (App. H): MSLS, CityGuessr68k and GAMa in one manifest, with App. H's sampling of the
training split, through the real `prepare` path; and evaluation of each dataset against its own gallery."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from tests.test_data_bdd import _info
from tests.test_data_cityguessr import _line
from tests.test_data_frames_video import make_video
from tests.test_data_msls import _folder
from tests.test_decode_eval import KeepFrame, QueryIsFeature, embed
from tests.test_refine import SmoothEncoder
from vidtag.data.manifest import read_manifest, skipped_report_path
from vidtag.data.unified import PAPER_MAX_PER_CITY, ingest_sources, parse_sources
from vidtag.errors import ConfigError

HELSINKI, ZURICH, TOKYO, LAGOS = (60.1699, 24.9384), (47.3769, 8.5417), (35.6762, 139.6503), (6.5244, 3.3792)
BDD_TRAIN_VIDEOS = 10


def _msls(root):
    """Helsinki and Zurich, four 16-frame drives each; drives 0 and 1 of each city also in ``database``."""
    for city, (lat, lon) in (("helsinki", HELSINKI), ("zurich", ZURICH)):
        for subset, drives in (("query", range(4)), ("database", range(2))):
            rows = [(f"{city[0]}{subset[0]}{d}{f:017d}", f"d{d}", f, lat + 1e-4 * f + 0.01 * d, lon, False)
                    for d in drives for f in range(16)]
            _folder(root, city, subset, rows)
    return root


def _cityguessr(root, n_tokyo):
    """Helsinki (also in MSLS: dropped from training), Tokyo with ``n_tokyo`` training videos, Lagos with 3;
    one val video per city. Two frames per video (the reader keeps every 5th: the first)."""
    lines = {"train": [], "val": []}
    for city_id, n in ((0, 3), (1, n_tokyo), (2, 3)):
        for split, count in (("train", n), ("val", 1)):
            for v in range(count):
                d = root / "videos" / f"{split}_{city_id}_{v}"
                d.mkdir(parents=True)
                for k in range(2):
                    (d / f"frame_{k + 1}.jpg").write_bytes(b"\xff\xd8jpeg")
                lines[split].append(_line(f"videos/{split}_{city_id}_{v}", city_id, city_id, city_id, city_id))
    for split, ls in lines.items():
        (root / f"{split}.txt").write_text("".join(ls))
    (root / "cities.csv").write_text("city_id,name,lat,lon\n" + "".join(
        f"{i},{n},{la},{lo}\n" for i, (n, (la, lo)) in enumerate((("Helsinki", HELSINKI), ("Tokyo", TOKYO), ("Lagos", LAGOS)))))
    return {"source": "cityguessr", "root": str(root),
            "labels": {"train": str(root / "train.txt"), "val": str(root / "val.txt")}, "city_table": str(root / "cities.csv")}


def _bdd(root):
    """GAMa layout: ``BDD_TRAIN_VIDEOS`` training videos and 2 val videos (hard links of one 2 s video), 1 fps."""
    root.mkdir(parents=True)
    video = root / "one.mov"
    make_video(video, seconds=2.0, fps=10)
    for split, n in (("train", BDD_TRAIN_VIDEOS), ("val", 2)):
        (root / "videos/100k" / split).mkdir(parents=True)
        (root / "info/100k" / split).mkdir(parents=True)
        for v in range(n):
            name = f"{split}{v:04d}-00000000"
            os.link(video, root / "videos/100k" / split / f"{name}.mov")
            _info(root / "info/100k" / split / f"{name}.json", 40.70 + 0.01 * v, -73.80, n=3)
    video.unlink()
    return {"source": "bdd", "root": str(root)}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified")
    msls = {"source": "msls", "root": str(_msls(root / "msls"))}
    cg = {**_cityguessr(root / "cg", n_tokyo=5), "max_per_city": 2}
    return SimpleNamespace(root=root, entries=[msls, cg, _bdd(root / "bdd")])


def _train_seqs(df, dataset):
    return df.filter((pl.col("dataset") == dataset) & (pl.col("split") == "train"))["sequence_id"].unique()


def test_app_h_sampling_of_three_datasets(three, tmp_path):
    m, report = ingest_sources(three.entries, tmp_path / "m.parquet", val_fraction=0.25, seed=3)
    df = read_manifest(tmp_path / "m.parquet").df
    assert set(df["dataset"]) == {"msls", "cityguessr", "gama"} and df["dataset"].null_count() == 0
    assert all(s.startswith(f"{d}/") for s, d in df.select("sequence_id", "dataset").iter_rows())
    # Every path resolves under the common root, to a file of its own dataset.
    for p, d in df.select(pl.coalesce("image_path", "video_path"), "dataset").iter_rows():
        assert (m.root / p).is_file() and p.startswith({"msls": "msls/", "cityguessr": "cg/", "gama": "bdd/"}[d])
    # 1. MSLS whole: 8 drives, 12 sequences (query + database), none left out; no drive in both splits.
    msls = df.filter(pl.col("dataset") == "msls")
    assert msls["sequence_id"].n_unique() == 12
    drive = msls.select(pl.col("sequence_id").str.replace(r"/(query|database)/", "/").alias("drive"), "split").unique()
    assert drive["drive"].n_unique() == drive.height == 8
    # 2(a) Helsinki's CityGuessr training videos are gone (MSLS has Helsinki); its val video stays (Tables 12-13).
    cg = df.filter(pl.col("dataset") == "cityguessr").unique("sequence_id")
    assert cg.filter((pl.col("city") == "0") & (pl.col("split") == "train")).height == 0
    assert cg.filter((pl.col("city") == "0") & (pl.col("split") == "val")).height == 1
    assert report.dropped_cities == {"0": "helsinki"}
    # 2(c) at most max_per_city training videos per city; every val video kept.
    per_city = dict(cg.filter(pl.col("split") == "train").group_by("city").len().iter_rows())
    assert per_city == {"1": 2, "2": 2} and cg.filter(pl.col("split") == "val").height == 3
    # 3. GAMa sampled to the mean training size of the other two (MSLS's and CityGuessr's after sampling).
    n_msls, n_cg = len(_train_seqs(df, "msls")), len(_train_seqs(df, "cityguessr"))
    assert len(_train_seqs(df, "gama")) == round((n_msls + n_cg) / 2) < BDD_TRAIN_VIDEOS
    assert report.sampled["gama"] == (round((n_msls + n_cg) / 2), BDD_TRAIN_VIDEOS)
    assert df.filter((pl.col("dataset") == "gama") & (pl.col("split") == "val"))["sequence_id"].n_unique() == 2
    # What was left out is in the skip report, one row per sequence, with App. H's reason.
    skipped = pl.read_csv(skipped_report_path(tmp_path / "m.parquet"))
    left = skipped.filter(pl.col("reason").str.starts_with("App. H"))
    assert left["sequence_id"].n_unique() == left.height == 3 + (5 - 2) + (3 - 2) + (BDD_TRAIN_VIDEOS - len(_train_seqs(df, "gama")))
    assert set(left["sequence_id"]) & set(df["sequence_id"]) == set()
    # Deterministic for the seed; another seed draws other GAMa videos.
    again, _ = ingest_sources(three.entries, tmp_path / "m2.parquet", val_fraction=0.25, seed=3)
    assert again.df.equals(m.df)
    other, _ = ingest_sources(three.entries, tmp_path / "m3.parquet", val_fraction=0.25, seed=4)
    assert set(_train_seqs(other.df, "gama")) != set(_train_seqs(df, "gama"))


def test_paper_cap_of_80_videos_per_city(tmp_path):
    cg = _cityguessr(tmp_path / "cg", n_tokyo=PAPER_MAX_PER_CITY + 5)
    msls = {"source": "msls", "root": str(_msls(tmp_path / "msls"))}
    m, report = ingest_sources([msls, cg], tmp_path / "m.parquet", seed=0)
    train = m.df.filter((pl.col("dataset") == "cityguessr") & (pl.col("split") == "train")).unique("sequence_id")
    assert dict(train.group_by("city").len().iter_rows()) == {"1": PAPER_MAX_PER_CITY, "2": 3}
    assert report.capped_cities == {"1": PAPER_MAX_PER_CITY + 5}


def test_same_source_twice_needs_names_and_bad_entries_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unique"):
        parse_sources([{"source": "msls", "root": "a"}, {"source": "msls", "root": "b"}])
    with pytest.raises(ConfigError, match="source"):
        parse_sources([{"root": "a"}])
    with pytest.raises(ConfigError, match="max_per_city"):
        parse_sources([{"source": "cityguessr", "root": "a", "max_per_city": 0}])
    specs = parse_sources([{"source": "msls", "root": "a"}, {"source": "msls", "root": "b", "name": "msls2"}])
    assert [s.name for s in specs] == ["msls", "msls2"]


def test_prepare_stage_reads_data_sources(three, tmp_path):
    params = {"seed": 3, "data": {"sources": three.entries, "val_fraction": 0.25}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "manifest.parquet"
    r = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--out", str(out), "--generated", str(tmp_path / "gen")],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "App. H training split" in r.stdout and "gama" in r.stdout
    direct, _ = ingest_sources(three.entries, tmp_path / "direct.parquet", val_fraction=0.25, seed=3)
    assert read_manifest(out).df.equals(direct.df)
    # The gallery stage: each dataset's own gallery in one file, as params/unified.yaml asks for it.
    unified = yaml.safe_load(open(os.path.join(os.getcwd(), "params", "unified.yaml")))
    params["gallery"] = {**unified["gallery"], "datasets": {**unified["gallery"]["datasets"], "msls": {"kind": "grid", "resolution_km": 0.5},
                                                            "gama": {"kind": "grid", "resolution_km": 1.0}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "pipeline.gallery", "--manifest", str(out), "--out", str(tmp_path / "g.parquet")],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    from vidtag.dataset_gallery import dataset_gallery, gallery_datasets
    from vidtag.gallery import read_gallery

    gal, meta = read_gallery(tmp_path / "g.parquet")
    assert gallery_datasets(meta) == ["msls", "gama", "cityguessr"]  # params order
    centres, cmeta = dataset_gallery(gal, meta, "cityguessr")
    assert cmeta["kind"] == "city_centres" and sorted(centres["label"]) == ["0", "1", "2"]  # Helsinki too (its val video)
    for name in ("msls", "gama"):
        part, pmeta = dataset_gallery(gal, meta, name)
        assert pmeta["kind"] == "grid" and "label" not in part.columns and part.height > 0


# --- evaluation: each dataset against its own gallery (Tables 12-13) ---------------------------------------------

PARIS, LONDON = (48.8566, 2.3522), (51.5074, -0.1278)


def _eval_world(tmp_path):
    """A manifest of two datasets: ``msls`` (drives in Paris, 100 m steps) and ``cityguessr`` (videos labelled
    with the Paris or London city centre, Sec. 5.3); a bundle whose frame embedding is the truth's location
    embedding; and the gallery stage's file of both datasets' galleries (a 0.1 km grid, the city centres)."""
    from vidtag.geo import offset_km

    rows = []
    for d, split in ((0, "train"), (1, "train"), (2, "val"), (3, "val")):
        lat, lon = offset_km(*PARIS, 0.3 * d - 0.5, 0.1 * np.arange(8) - 0.4)
        rows += [dict(sequence_id=f"msls/d{d}", frame_index=i, lat=float(lat), lon=float(b), split=split, dataset="msls",
                      city="paris") for i, b in enumerate(np.atleast_1d(lon))]
    for v, (city, (lat, lon), split) in enumerate((("0", PARIS, "train"), ("1", LONDON, "train"),
                                                   ("0", PARIS, "val"), ("1", LONDON, "val"))):
        rows += [dict(sequence_id=f"cityguessr/v{v}", frame_index=i, lat=lat, lon=lon, split=split, dataset="cityguessr",
                      city=city, state=f"s{city}", country=f"c{city}", continent="europe") for i in range(4)]
    manifest = pl.DataFrame(rows).with_columns(pl.col("frame_index").cast(pl.Int32))
    enc = SmoothEncoder(wavelength_km=(0.5, 2.0))
    clip = embed(enc, manifest.select("lat", "lon").to_numpy()).numpy().astype(np.float16)
    features = SimpleNamespace(clip=clip, dino=np.zeros((len(clip), 1), np.float16), valid=np.ones(len(clip), bool))
    bundle = SimpleNamespace(frame_encoder=QueryIsFeature(clip.shape[1]), location_encoder=enc, refiner=KeepFrame(),
                             logit_scale=torch.tensor(math.log(100.0)), gallery_path=None)
    from vidtag.dataset_gallery import build_dataset_galleries
    from vidtag.gallery import write_gallery

    gal, meta = build_dataset_galleries(manifest, {"msls": {"kind": "grid", "resolution_km": 0.1},
                                                   "cityguessr": {"kind": "city_centres"}}, {"padding_km": 0.5})
    write_gallery(gal, meta, tmp_path / "gallery.parquet")
    return manifest, features, bundle, tmp_path / "gallery.parquet"


def test_each_dataset_is_scored_against_its_own_gallery(tmp_path):
    from vidtag.dataset_gallery import dataset_gallery, gallery_datasets
    from vidtag.evaluation import EvalConfig, EvalRuntime, run_dataset_evaluations, run_evaluation
    from vidtag.gallery import read_gallery, write_gallery

    manifest, features, bundle, gpath = _eval_world(tmp_path)
    gal, meta = read_gallery(gpath)
    assert gallery_datasets(meta) == ["msls", "cityguessr"]
    grid, grid_meta = dataset_gallery(gal, meta, "msls")
    centres, centres_meta = dataset_gallery(gal, meta, "cityguessr")
    assert grid_meta["kind"] == "grid" and "label" not in grid.columns and grid.height > 100
    assert centres_meta["kind"] == "city_centres" and sorted(centres["label"]) == ["0", "1"]

    run = dict(runtime=EvalRuntime(device="cpu"), cache_dir=tmp_path / "emb", gallery_path=gpath)
    per = run_dataset_evaluations(bundle, features, manifest, EvalConfig(), **run)
    assert list(per) == ["msls", "cityguessr"]
    ms, cg = per["msls"].metrics, per["cityguessr"].metrics
    assert ms["cost"]["gallery_points"] == grid.height and cg["cost"]["gallery_points"] == 2
    assert ms["n_frames"] == 16 and cg["n_frames"] == 8
    assert ms["frame"]["acc_0.5km"] == 100.0 and ms["frame"]["median_km"] < 0.1  # a 0.1 km grid answers within 71 m
    assert {"dfd_km", "mrd_km"} <= set(ms["trajectory"]) and "city_frame" not in ms
    # CityGuessr68k: retrieved among city centres only, so city / state / country / continent accuracy (Table 13).
    assert cg["city_frame"] == {"city": 100.0, "state": 100.0, "country": 100.0, "continent": 100.0}
    assert set(per["cityguessr"].predictions.select("lat", "lon").unique().rows()) == {PARIS, LONDON}
    # The same numbers as evaluating that dataset alone with its part as the gallery file.
    for name, (part, part_meta) in (("msls", (grid, grid_meta)), ("cityguessr", (centres, centres_meta))):
        write_gallery(part, part_meta, tmp_path / f"{name}.parquet")
        alone = manifest.filter(pl.col("dataset") == name).drop("dataset")
        keep = (manifest["dataset"] == name).to_numpy()
        feats = SimpleNamespace(clip=features.clip[keep], dino=features.dino[keep], valid=features.valid[keep])
        single = run_evaluation(bundle, feats, alone, EvalConfig(), **{**run, "gallery_path": tmp_path / f"{name}.parquet"})
        assert single.metrics == per[name].metrics
        assert single.predictions.drop([c for c in single.predictions.columns if c.startswith("pred_")]).equals(
            per[name].predictions.drop([c for c in per[name].predictions.columns if c.startswith("pred_")]))
    # The pooled run (the top level of metrics/eval.json) answers from the whole file and scores no labels.
    pooled = run_evaluation(bundle, features, manifest, EvalConfig(), **run).metrics
    assert pooled["n_frames"] == 24 and pooled["cost"]["gallery_points"] == gal.height and "city_frame" not in pooled
    # A manifest of one dataset has no per-dataset results.
    assert run_dataset_evaluations(bundle, features, manifest.drop("dataset"), EvalConfig(), **run) == {}
