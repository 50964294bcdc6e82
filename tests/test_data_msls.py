"""MSLS reader on a fixture in the real layout (leading unnamed index column, lon before lat)."""

import polars as pl
import pytest

from vidtag.data.manifest import ManifestError
from vidtag.data.msls import read_msls


def _folder(root, city, subset, rows, test=False):
    """rows: (key, seq, frame_number, lat, lon, pano)."""
    d = root / ("test" if test else "train_val") / city / subset
    (d / "images").mkdir(parents=True)
    seq = ",key,sequence_key,frame_number\n" + "".join(f"{i},{k},{s},{f}\n" for i, (k, s, f, *_) in enumerate(rows))
    (d / "seq_info.csv").write_text(seq)
    if not test:
        raw = ",key,lon,lat,ca,captured_at,pano\n" + "".join(
            f"{i},{k},{lo},{la},12.5,2017-06-01 10:00:00,{p}\n" for i, (k, s, f, la, lo, p) in enumerate(rows))
        (d / "raw.csv").write_text(raw)
    for k, *_ in rows:
        (d / "images" / f"{k}.jpg").write_bytes(b"\xff\xd8jpeg")
    return d


@pytest.fixture
def msls(tmp_path):
    # Rows deliberately out of frame order; frame numbers with gaps; one panorama.
    _folder(tmp_path, "zurich", "query", [
        ("-keyC_000000000000000", "seqA", 7, 47.372, 8.542, False),
        ("keyA0000000000000000a", "seqA", 2, 47.370, 8.540, False),
        ("keyB0000000000000000b", "seqA", 5, 47.371, 8.541, False),
        ("keyP0000000000000000p", "seqA", 6, 47.371, 8.541, True),
    ])
    _folder(tmp_path, "zurich", "database", [(f"zdb{i:019d}", f"seq{i // 3}", i % 3, 47.36 + i * 1e-4, 8.53, False) for i in range(12)])
    _folder(tmp_path, "cph", "query", [(f"cph{i:019d}", f"seq{i // 4}", i % 4, 55.67, 12.56 + i * 1e-4, False) for i in range(8)])
    _folder(tmp_path, "miami", "query", [("mia0000000000000000000", "t1", 0, 0, 0, False)], test=True)
    return tmp_path


def test_reads_both_subsets_orders_by_frame_number_and_drops_panoramas(msls):
    df, skipped = read_msls(msls, val_fraction=0.0)
    a = df.filter(pl.col("sequence_id") == "zurich/query/seqA")
    assert a["image_path"].to_list() == [
        "train_val/zurich/query/images/keyA0000000000000000a.jpg",
        "train_val/zurich/query/images/keyB0000000000000000b.jpg",
        "train_val/zurich/query/images/-keyC_000000000000000.jpg",
    ]
    assert a["frame_index"].to_list() == [0, 1, 2]
    assert a["lat"].to_list() == [47.370, 47.371, 47.372] and a["lon"].to_list() == [8.540, 8.541, 8.542]
    assert set(df["city"]) == {"zurich", "cph"} and skipped.height == 0
    assert df["sequence_id"].n_unique() == 1 + 4 + 2  # seq ids are unique across city/subset
    with_pano, _ = read_msls(msls, val_fraction=0.0, include_panoramas=True)
    assert with_pano.height == df.height + 1


def test_random_split_is_per_city_and_deterministic(msls):
    df1, _ = read_msls(msls, val_fraction=0.5, seed=3)
    df2, _ = read_msls(msls, val_fraction=0.5, seed=3)
    assert df1.equals(df2)
    for city, g in df1.group_by("city"):
        assert set(g["split"]) == {"train", "val"}, city


def test_official_split_and_test_cities(msls):
    df, _ = read_msls(msls, split="official", include_test=True)
    assert set(df.filter(pl.col("city") == "cph")["split"]) == {"val"}
    assert set(df.filter(pl.col("city") == "zurich")["split"]) == {"train"}
    test = df.filter(pl.col("split") == "test")
    assert test["city"].to_list() == ["miami"] and test["lat"].is_null().all()


def test_bad_coordinate_names_file_and_row_or_is_skipped(msls):
    raw = msls / "train_val" / "cph" / "query" / "raw.csv"
    lines = raw.read_text().splitlines()
    lines[3] = lines[3].replace("55.67", "nan")  # data row 2 -> file line 4
    raw.write_text("\n".join(lines) + "\n")
    (msls / "train_val" / "zurich" / "database" / "images" / f"zdb{4:019d}.jpg").unlink()
    with pytest.raises(ManifestError, match=r"cph/query/seq_info.csv row 4: lat/lon is NaN"):
        read_msls(msls)
    df, skipped = read_msls(msls, skip_bad=True)
    assert sorted(skipped["reason"].to_list()) == ["image file not found", "lat/lon is NaN or missing"]
    assert df.height == 3 + 12 + 8 - 2


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(ManifestError, match="train_val"):
        read_msls(tmp_path)
