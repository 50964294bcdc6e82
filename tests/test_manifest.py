"""Manifest schema: validation names the bad row, writes are atomic and carry the root, fingerprints are stable."""

import math

import polars as pl
import pytest

from vidtag.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    manifest_fingerprint,
    read_manifest,
    skipped_report_path,
    validate_manifest,
    write_manifest,
)
from vidtag.data.report import finalize, flag_bad_coords, flag_duplicates
from vidtag.io import read_parquet_metadata


def _frames(**over):
    base = {
        "sequence_id": ["b", "a", "a"],
        "frame_index": [0, 1, 0],
        "image_path": ["b/0.jpg", "a/1.jpg", "a/0.jpg"],
        "lat": [1.0, None, 2.0],
        "lon": [3.0, None, 4.0],
        "split": ["train", "val", "val"],
    }
    base.update(over)
    return pl.DataFrame(base)


def test_validate_sorts_casts_and_orders_columns():
    df = validate_manifest(_frames())
    assert df.columns == [c for c in MANIFEST_COLUMNS if c in df.columns]
    assert df["sequence_id"].to_list() == ["a", "a", "b"]
    assert df["frame_index"].to_list() == [0, 1, 0]
    assert df.schema["frame_index"] == pl.Int32
    assert df["lat"].null_count() == 1  # unknown coordinates stay null


@pytest.mark.parametrize(
    "over, words",
    [
        ({"lat": [1.0, math.nan, 2.0]}, "NaN"),
        ({"lat": [1.0, 2.0, 95.0], "lon": [3.0, 4.0, 5.0]}, "out of range"),
        ({"lon": [3.0, 4.0, None], "lat": [1.0, 2.0, 3.0]}, "half-missing"),
        ({"frame_index": [0, 0, 0]}, "duplicate"),
        ({"frame_index": [0, 2, 0]}, "contiguous"),
        ({"split": ["train", "val", "dev"]}, "split"),
        ({"split": ["train", "val", "train"]}, "several splits"),
    ],
)
def test_validate_names_the_bad_row(over, words):
    with pytest.raises(ManifestError, match="row") as e:
        validate_manifest(_frames(**over))
    assert words in str(e.value)


def test_write_read_roundtrip_with_relative_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    out = tmp_path / "cache" / "m.parquet"
    write_manifest(_frames(), out, root, source="unit")
    meta = read_parquet_metadata(out)
    assert meta["vidtag.root"] == "../data"
    assert meta["vidtag.source"] == "unit"
    m = read_manifest(out)
    assert m.root == root.resolve()
    assert m.source == "unit"
    assert m.df.equals(validate_manifest(_frames()))
    assert meta["vidtag.manifest_fingerprint"] == manifest_fingerprint(m.df)
    # The tree moves as a whole: the root still resolves.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    assert read_manifest(moved / "cache" / "m.parquet").root == (moved / "data").resolve()


def test_read_refuses_foreign_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    _frames().write_parquet(p)
    with pytest.raises(ManifestError, match="write_manifest"):
        read_manifest(p)
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.parquet")


def test_fingerprint_tracks_feature_columns_only():
    df = validate_manifest(_frames())
    fp = manifest_fingerprint(df)
    assert fp == manifest_fingerprint(df.clone())
    assert fp != manifest_fingerprint(df.with_columns(pl.col("image_path").str.replace("0", "9")))
    assert fp != manifest_fingerprint(df.reverse())
    # Labels and coordinates do not shape features.
    assert fp == manifest_fingerprint(df.with_columns(pl.col("lat") + 1))


def test_finalize_raises_or_skips_and_reports(tmp_path):
    rows = pl.DataFrame({
        "sequence_id": ["s", "s", "s", "s"],
        "image_path": ["s/1.jpg", "s/2.jpg", "s/3.jpg", "s/3.jpg"],
        "lat": [1.0, 200.0, 1.0, 1.0],
        "lon": [1.0, 1.0, 1.0, 1.0],
        "split": ["train"] * 4,
        "_file": ["coords.csv"] * 4,
        "_row": [1, 2, 3, 4],
        "_reason": pl.Series([None] * 4, dtype=pl.String),
        "_order": [1, 2, 3, 4],
    })
    rows = flag_duplicates(flag_bad_coords(rows), "image_path", "image")
    with pytest.raises(ManifestError, match=r"coords.csv row 2: lat/lon out of range.*1 more"):
        finalize(rows, skip_bad=False)
    good, skipped = finalize(rows, skip_bad=True)
    assert good["image_path"].to_list() == ["s/1.jpg", "s/3.jpg"]
    assert good["frame_index"].to_list() == [0, 1]
    assert skipped["row"].to_list() == [2, 4]
    out = tmp_path / "m.parquet"
    write_manifest(good, out, tmp_path, skipped=skipped)
    report = pl.read_csv(skipped_report_path(out))
    assert report["reason"].to_list() == ["lat/lon out of range [-90, 90] x [-180, 180]", "duplicate image"]


def test_manifest_imports_no_reader():
    """The manifest sits below the readers and their skip-report helpers (no import cycle with report)."""
    import subprocess
    import sys

    code = ("import sys, vidtag.data.manifest; "
            "assert not [m for m in sys.modules if m.startswith('vidtag.data.') and m != 'vidtag.data.manifest'], "
            "sorted(sys.modules); from vidtag.data import read_manifest, ManifestError")
    subprocess.run([sys.executable, "-c", code], check=True)
