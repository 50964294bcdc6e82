"""MSLS reader on a fixture in the real layout (leading unnamed index column, lon before lat), and the paper's
data rules (Sec. 4.1): sequences of at least 16 frames, one split per drive."""

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vidtag.data.ingest import ingest
from vidtag.data.manifest import ManifestError, read_manifest, skipped_report_path
from vidtag.data.msls import read_msls
from vidtag.data.split import split_sequences
from vidtag.errors import ConfigError


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
    df, skipped = read_msls(msls, val_fraction=0.0, min_frames=0)
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
    with_pano, _ = read_msls(msls, val_fraction=0.0, include_panoramas=True, min_frames=0)
    assert with_pano.height == df.height + 1


def test_random_split_is_per_city_and_deterministic(msls):
    df1, _ = read_msls(msls, val_fraction=0.5, seed=3, min_frames=0)
    df2, _ = read_msls(msls, val_fraction=0.5, seed=3, min_frames=0)
    assert df1.equals(df2)
    for city, g in df1.group_by("city"):
        assert set(g["split"]) == {"train", "val"}, city


def test_official_split_and_test_cities(msls):
    df, _ = read_msls(msls, split="official", include_test=True, min_frames=0)
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
        read_msls(msls, min_frames=0)
    df, skipped = read_msls(msls, skip_bad=True, min_frames=0)
    assert sorted(skipped["reason"].to_list()) == ["image file not found", "lat/lon is NaN or missing"]
    assert df.height == 3 + 12 + 8 - 2


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(ManifestError, match="train_val"):
        read_msls(tmp_path)


# --- Sec. 4.1: sequence length and one split per drive ----------------------------------------------------


def _drive(city, seq, n, lat0, prefix):
    """n frames of one drive, 20 m apart."""
    return [(f"{prefix}{seq}{i:016d}", seq, i, lat0 + i * 2e-4, 8.5, False) for i in range(n)]


@pytest.fixture
def drives(tmp_path):
    """Zurich: drives d0..d9 each seen in both query (18 frames) and database (20 frames); a short query-only
    sequence (5 frames) and a drive whose database part is short (3 frames) while its query part is long."""
    query = [r for k in range(10) for r in _drive("zurich", f"d{k}", 18, 47.30 + k * 0.01, "q")]
    query += _drive("zurich", "tiny", 5, 47.50, "q") + _drive("zurich", "half", 17, 47.60, "q")
    database = [r for k in range(10) for r in _drive("zurich", f"d{k}", 20, 47.30 + k * 0.01 + 1e-5, "b")]
    database += _drive("zurich", "half", 3, 47.60, "b")
    _folder(tmp_path, "zurich", "query", query)
    _folder(tmp_path, "zurich", "database", database)
    return tmp_path


def _splits_by_drive(df):
    """drive -> the set of splits its frames are in (query and database together)."""
    drive = pl.col("sequence_id").str.split("/").list.get(0) + "/" + pl.col("sequence_id").str.split("/").list.get(2)
    return {d: set(s) for d, s in df.group_by(drive.alias("drive")).agg(pl.col("split").unique()).iter_rows()}


def test_short_sequences_are_left_out_whole_and_named(drives):
    df, skipped = read_msls(drives, val_fraction=0.3)
    assert "zurich/query/tiny" not in set(df["sequence_id"]) and "zurich/database/half" not in set(df["sequence_id"])
    assert "zurich/query/half" in set(df["sequence_id"])  # the long part of that drive stays
    assert df.group_by("sequence_id").len()["len"].min() >= 16
    short = skipped.sort("sequence_id")
    assert short["sequence_id"].to_list() == ["zurich/database/half", "zurich/query/tiny"]
    assert short["reason"][0].startswith("sequence of 3 frame(s) is shorter than min_frames 16")
    assert short["reason"][1].startswith("sequence of 5 frame(s) is shorter than min_frames 16")
    assert short["file"][1].endswith("zurich/query/seq_info.csv") and short["row"][1] == 2 + 10 * 18  # its first CSV line
    kept_all, none = read_msls(drives, val_fraction=0.3, min_frames=0)
    assert none.height == 0 and kept_all.height == df.height + 5 + 3
    with pytest.raises(ConfigError, match="min_frames"):
        read_msls(drives, min_frames=-1)
    with pytest.raises(ManifestError, match="every sequence .* shorter than min_frames 100 .*longest has 20"):
        read_msls(drives, min_frames=100)


def test_a_short_sequence_with_a_bad_row_is_still_an_error_without_skip_bad(drives):
    (drives / "train_val" / "zurich" / "query" / "images" / f"qtiny{2:016d}.jpg").unlink()
    with pytest.raises(ManifestError, match="image file not found"):
        read_msls(drives)
    _, skipped = read_msls(drives, skip_bad=True)
    tiny = skipped.filter(pl.col("sequence_id") == "zurich/query/tiny")
    assert sorted(tiny["reason"].str.slice(0, 20).to_list()) == ["image file not found", "sequence of 4 frame("]


def test_a_drive_in_query_and_database_is_in_one_split(drives):
    straddled = 0
    for seed in range(6):
        df, _ = read_msls(drives, val_fraction=0.5, seed=seed)
        by_drive = _splits_by_drive(df)
        assert all(len(s) == 1 for s in by_drive.values()), (seed, by_drive)
        assert {s for v in by_drive.values() for s in v} == {"train", "val"}
        n_val = sum(v == {"val"} for v in by_drive.values())
        assert n_val == round(len(by_drive) * 0.5)  # the val share counts drives, not folders
        # Splitting per folder (the manifest's sequence ids) would have put some drive in both splits.
        ids = df["sequence_id"].unique().sort().to_list()
        per_folder = split_sequences(ids, 0.5, seed, ["zurich"] * len(ids))
        straddled += any(per_folder[f"zurich/query/d{k}"] != per_folder[f"zurich/database/d{k}"] for k in range(10))
    assert straddled > 0


def test_groups_default_to_the_sequence_itself():
    ids = [f"s{i}" for i in range(40)]
    strata = ["a" if i % 3 else "b" for i in range(40)]
    assert split_sequences(ids, 0.25, 7, strata) == split_sequences(ids, 0.25, 7, strata, groups=ids)
    paired = split_sequences(ids, 0.25, 7, strata, groups=[f"g{i // 2}" for i in range(40)])
    assert all(paired[f"s{i}"] == paired[f"s{i + 1}"] for i in range(0, 40, 2))


def test_vidtag_ingest_msls_keeps_a_drive_in_one_split_and_reports_short_sequences(drives, tmp_path):
    """Through the installed `vidtag` command, as a user runs it."""
    out = tmp_path / "m.parquet"
    vidtag = Path(sys.executable).with_name("vidtag")
    r = subprocess.run([str(vidtag), "ingest", "msls", str(drives), "--out", str(out), "--val-fraction", "0.5", "--seed", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "left out 2 sequence(s) shorter than min_frames" in r.stdout and "m.parquet.skipped.csv" in r.stdout
    df = read_manifest(out).df
    by_drive = _splits_by_drive(df)
    assert all(len(s) == 1 for s in by_drive.values()) and {s for v in by_drive.values() for s in v} == {"train", "val"}
    report = pl.read_csv(skipped_report_path(out))
    assert sorted(report["sequence_id"].to_list()) == ["zurich/database/half", "zurich/query/tiny"]
    assert report["reason"].str.contains("shorter than min_frames 16").all()
    r = subprocess.run([str(vidtag), "ingest", "msls", str(drives), "--out", str(out), "--min-frames", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(read_manifest(out).df["sequence_id"]) >= {"zurich/query/tiny"}
    assert pl.read_csv(skipped_report_path(out))["sequence_id"].to_list() == ["zurich/database/half"]


def test_min_frames_for_other_sources_drops_whole_sequences_after_reading(tmp_path):
    from PIL import Image

    for name, n in (("long", 4), ("short", 2)):
        (tmp_path / "f" / name).mkdir(parents=True)
        for t in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / "f" / name / f"{t}.jpg")
    m = ingest("frames", tmp_path / "f", tmp_path / "m.parquet", min_frames=3)
    assert set(m.df["sequence_id"]) == {"long"}
    report = pl.read_csv(skipped_report_path(tmp_path / "m.parquet"))
    assert report["sequence_id"].to_list() == ["short"] and report["file"].to_list() == ["short/0.jpg"]
    assert set(ingest("frames", tmp_path / "f", tmp_path / "all.parquet").df["sequence_id"]) == {"long", "short"}
