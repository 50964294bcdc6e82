"""The toy world: deterministic, real city coordinates, MSLS-like spacing, read back through `frames`."""

import hashlib

import numpy as np
import polars as pl

from vidtag.data.cityguessr import lookup_city
from vidtag.data.ingest import ingest
from vidtag.data.manifest import read_manifest
from vidtag.data.toy import COORDS_FILE, ToyConfig, generate_toy
from vidtag.geo import haversine_km

SMALL = ToyConfig(cities=("Amsterdam", "Tokyo"), sequences_per_city=5, min_frames=16, max_frames=24, image_size=32)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate_toy(tmp_path / "a", SMALL)
    generate_toy(tmp_path / "b", SMALL)
    generate_toy(tmp_path / "c", ToyConfig(**{**SMALL.__dict__, "seed": 1}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_drives_are_in_their_cities_with_msls_spacing(tmp_path):
    coords = pl.read_csv(generate_toy(tmp_path / "toy", SMALL))
    assert coords.height >= 5 * 2 * 16
    for city in ("Amsterdam", "Tokyo"):
        c = lookup_city(city)
        sub = coords.filter(pl.col("city") == city)
        d = haversine_km(c["lat"], c["lon"], sub["lat"].to_numpy(), sub["lon"].to_numpy())
        assert d.max() < SMALL.city_size_km  # within the grid around the gazetteer centre
    for _, seq in coords.group_by("sequence_id"):
        la, lo = seq["lat"].to_numpy(), seq["lon"].to_numpy()
        step_m = 1000 * haversine_km(la[:-1], lo[:-1], la[1:], lo[1:])
        assert 16 <= seq.height <= 24
        assert 5.0 < np.median(step_m) < 30.0
    assert 0.05 < coords["ambiguous"].mean() < 0.3


def test_appearance_depends_on_city(tmp_path):
    from PIL import Image

    generate_toy(tmp_path / "toy", SMALL)
    coords = pl.read_csv(tmp_path / "toy" / COORDS_FILE).filter(pl.col("ambiguous") == 0)
    means = {}
    for city in ("Amsterdam", "Tokyo"):
        rows = coords.filter(pl.col("city") == city).head(40)
        ims = [np.asarray(Image.open(tmp_path / "toy" / s / f), dtype=float) for s, f in rows.select("sequence_id", "frame").iter_rows()]
        means[city] = np.mean([im[:8].mean((0, 1)) for im in ims], 0)  # sky colour
    assert np.abs(means["Amsterdam"] - means["Tokyo"]).max() > 10


def test_ingest_toy_splits_by_drive_within_cities(tmp_path):
    opts = {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.__dict__.items() if k != "seed"}
    m = ingest("toy", tmp_path / "toy", tmp_path / "m.parquet", val_fraction=0.4, seed=0, options=opts)
    again = read_manifest(tmp_path / "m.parquet")
    assert again.root == (tmp_path / "toy").resolve() and again.source == "toy"
    df = m.df
    per_city = df.group_by("city").agg(pl.col("split").filter(pl.col("split") == "val").len().alias("val"),
                                       pl.col("split").filter(pl.col("split") == "train").len().alias("train"))
    assert (per_city["val"] > 0).all() and (per_city["train"] > 0).all()
    assert df.group_by("sequence_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert all((tmp_path / "toy" / p).is_file() for p in df["image_path"].head(10))


def test_bad_config_is_a_config_error():
    import pytest

    from vidtag.errors import ConfigError

    with pytest.raises(ConfigError, match="min_frames"):
        ToyConfig(min_frames=30, max_frames=20)


def test_cli_reports_an_unknown_city_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from vidtag.cli import app

    r = CliRunner().invoke(app, ["ingest", "toy", str(tmp_path / "toy"), "--out", str(tmp_path / "m.parquet"),
                                 "--cities", "Nowhereville"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
    assert r.output.startswith("error: no city named 'Nowhereville'") and len(r.output.strip().splitlines()) == 1
