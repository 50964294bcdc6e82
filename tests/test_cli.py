"""The command line by the conventions: help that renders for every command, choices, --version, options
refused before any work (exit code 2, the option named), and `vidtag evaluate` on an annotated video."""

import json
import os

import numpy as np
import polars as pl
import pytest
import typer
from media import write_h264
from test_inference import grid
from test_predict_cli import gradient, model_dir  # noqa: F401  (the tiny bundle fixture)
from typer.testing import CliRunner

from vidtag.cli import GalleryKind, Preset, SecondKind, app

runner = CliRunner()


def all_commands():
    """(name, click command) for every leaf command of the app."""
    root = typer.main.get_command(app)

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group (Typer vendors its own Click)
                yield from walk(cmd, prefix + [name])
            else:
                yield " ".join(prefix + [name]), cmd

    return list(walk(root, []))


def test_every_command_and_argument_has_help_that_renders():
    commands = all_commands()
    names = {n for n, _ in commands}
    assert {"predict", "evaluate", "extract", "gallery build", "ingest video", "version"} <= names
    for name, cmd in commands:
        r = runner.invoke(app, [*name.split(), "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert cmd.help, name
        for p in cmd.params:
            assert getattr(p, "help", None), f"{name}: {p.name} has no help"
            if p.param_type_name == "option" and not p.is_flag and not p.required and p.default is not None:
                assert "[default:" in r.output, (name, p.name)
        assert "[default: [" not in r.output
    # texts in brackets print as written (no markup eats them)
    r = runner.invoke(app, ["extract", "--help"], terminal_width=200)
    assert "torchrun's RANK/WORLD_SIZE, else all" in r.output


def test_choices_are_the_library_ones_and_version():
    from vidtag.features.backbones import PRESETS, SECOND_KINDS
    from vidtag.gallery import KINDS

    assert tuple(p.value for p in Preset) == PRESETS and tuple(k.value for k in GalleryKind) == KINDS
    assert tuple(k.value for k in SecondKind) == SECOND_KINDS
    r = runner.invoke(app, ["gallery", "build", "m.parquet", "-o", "g.parquet", "--kind", "hexagons"])
    assert r.exit_code == 2 and "--kind" in r.output and "city_centres" in r.output
    r = runner.invoke(app, ["--version"])
    from vidtag import __version__

    assert r.exit_code == 0 and r.output.strip() == f"vidtag {__version__}"




@pytest.fixture()
def clip_mp4(tmp_path):
    return write_h264(tmp_path / "clip.mp4", 20, 10, draw=gradient)


def predict(*args):
    return runner.invoke(app, ["predict", *map(str, args), "--no-progress"])


def refused(r, option, *words):
    """Exit code 2 (a usage error, before any work), naming the option and explaining."""
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{option}'" in r.output, r.output
    for w in words:
        assert w in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("fps", ["nan", "inf", "0", "-1", "1e9"])
def test_fps_must_be_positive_finite_and_plausible(tmp_path, clip_mp4, model_dir, fps):
    r = predict(clip_mp4, "--model", model_dir, "--out", tmp_path / "p.csv", "--fps", fps)
    refused(r, "--fps", "frames per second")
    r = runner.invoke(app, ["ingest", "video", str(clip_mp4), "-o", str(tmp_path / "m.parquet"), "--fps", fps])
    refused(r, "--fps")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("n", ["0", "-1"])
def test_batch_size_must_be_positive(tmp_path, clip_mp4, model_dir, n):
    refused(predict(clip_mp4, "--model", model_dir, "--out", tmp_path / "p.csv", "--batch-size", n), "--batch-size")
    refused(runner.invoke(app, ["extract", "m.parquet", "-o", str(tmp_path / "f.zarr"), "--batch-size", n]), "--batch-size")
    refused(runner.invoke(app, ["evaluate", "m.parquet", "-m", str(model_dir), "--batch-size", n]), "--batch-size")


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:7", "gpu"])
def test_unknown_or_absent_devices_are_refused_listing_what_is_there(tmp_path, clip_mp4, model_dir, device):
    from vidtag.cli import available_devices

    have = available_devices()
    assert have[:2] == ["auto", "cpu"]
    if device in have:
        pytest.skip(f"this machine has {device}")
    r = predict(clip_mp4, "--model", model_dir, "--out", tmp_path / "p.csv", "--device", device)
    refused(r, "--device", "available: " + ", ".join(have))
    r = runner.invoke(app, ["extract", "m.parquet", "-o", str(tmp_path / "f.zarr"), "--device", device])
    refused(r, "--device", "available:")


def test_output_paths_are_files_in_writable_folders_created_as_needed(tmp_path, clip_mp4, model_dir):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    refused(predict(clip_mp4, "--model", model_dir, "--out", folder), "--out", "is a folder")
    refused(runner.invoke(app, ["ingest", "video", str(clip_mp4), "-o", str(folder)]), "--out", "is a folder")
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    refused(predict(clip_mp4, "--model", model_dir, "--out", a_file / "p.csv"), "--out", "is a file, not a folder")
    refused(runner.invoke(app, ["evaluate", "m.parquet", "-m", str(model_dir), "--out", str(a_file)]), "--out", "is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere; a kernel folder is unwritable even for root
            locked = next((p for p in ("/proc/1", "/sys/kernel") if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
        if locked is None:
            pytest.skip("no unwritable folder on this machine")
        refused(predict(clip_mp4, "--model", model_dir, "--out", f"{locked}/sub/p.csv"), "--out", "permission denied")
    finally:
        (tmp_path / "locked").chmod(0o700)
    # Folders that do not exist yet are made, and the command runs.
    out = tmp_path / "new" / "deeper" / "clip.csv"
    r = runner.invoke(app, ["ingest", "video", str(clip_mp4), "-o", str(tmp_path / "made" / "m.parquet")])
    assert r.exit_code == 0, r.output
    r = predict(clip_mp4, "--model", model_dir, "--out", out, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert pl.read_csv(out).height == 2


def test_map_extension_and_map_distinct_from_out(tmp_path, clip_mp4, model_dir):
    out = tmp_path / "p.csv"
    r = predict(clip_mp4, "--model", model_dir, "--out", out, "--map", tmp_path / "x.xyz")
    refused(r, "--map", "x.xyz", ".html")
    same = tmp_path / "same.html"
    for args in (["--out", same, "--map", same], ["--map", same, "--out", same]):  # either order
        r = predict(clip_mp4, "--model", model_dir, *args)
        assert r.exit_code == 2 and "give two different files" in r.output, r.output
    assert not out.exists() and not same.exists()


def test_other_numbers_and_shards_are_checked(tmp_path, model_dir):
    m = str(tmp_path / "m.parquet")
    refused(runner.invoke(app, ["ingest", "toy", str(tmp_path / "toy"), "-o", m, "--val-fraction", "1.5"]), "--val-fraction")
    refused(runner.invoke(app, ["ingest", "toy", str(tmp_path / "toy"), "-o", m, "--sequences-per-city", "0"]),
            "--sequences-per-city")
    refused(runner.invoke(app, ["extract", m, "-o", str(tmp_path / "f.zarr"), "--shard", "3/2"]), "--shard", "0 <= i < n")
    refused(runner.invoke(app, ["gallery", "build", m, "-o", str(tmp_path / "g.parquet"), "--resolution-km", "nan"]),
            "--resolution-km")
    refused(runner.invoke(app, ["evaluate", m, "-m", str(model_dir), "--split", "holdout"]), "--split")


def annotated_drive(tmp_path):
    """A 3 s H.264 drive with a GPS track (the track starts at a gallery point), ingested with `ingest video --track`."""
    video = write_h264(tmp_path / "drive.mp4", 30, 10, draw=gradient)
    lat0, lon0 = grid()[40]
    track = tmp_path / "drive.csv"
    track.write_text("t_s,lat,lon\n" + "".join(f"{t},{lat0 + 0.01 * t},{lon0}\n" for t in range(4)))
    manifest = tmp_path / "m.parquet"
    r = runner.invoke(app, ["ingest", "video", str(video), "--track", str(track), "-o", str(manifest), "--fps", "2"])
    assert r.exit_code == 0, r.output
    return manifest


def test_evaluate_scores_an_annotated_video_end_to_end(tmp_path, model_dir):
    manifest = annotated_drive(tmp_path)
    out, cache = tmp_path / "report", tmp_path / "cache"
    args = ["evaluate", str(manifest), "--model", str(model_dir), "--out", str(out), "--cache-dir", str(cache),
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--maps", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_frames"] == 6 and metrics["n_sequences"] == 1 and metrics["split"] == "all"
    assert metrics["n_frames_invalid"] == 0
    assert set(metrics["frame"]) >= {"acc_1km", "acc_25km", "median_km"} and "phase1" in metrics
    seq = pl.read_csv(out / "per_sequence.csv")
    assert seq["sequence_id"].to_list() == ["drive"]
    pred = pl.read_parquet(out / "predictions.parquet")
    assert pred.height == 6 and pred["gt_lat"].is_not_null().all()
    # the metrics are the predictions' errors, not numbers of their own
    from vidtag.geo import haversine_km

    err = haversine_km(pred["lat"].to_numpy(), pred["lon"].to_numpy(), pred["gt_lat"].to_numpy(), pred["gt_lon"].to_numpy())
    assert metrics["frame"]["median_km"] == pytest.approx(float(np.median(err)), rel=1e-6)
    assert (out / "plots" / "error_cdf.csv").exists() and len(list((out / "plots" / "maps").glob("*.png"))) == 1
    stores = list((cache / "features").glob("*.zarr"))
    assert len(stores) == 1 and "features:" in r.output
    # a rerun reuses the extracted features
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    assert json.loads((out / "metrics.json").read_text())["frame"] == metrics["frame"]


def test_evaluate_refuses_a_manifest_without_ground_truth_or_split(tmp_path, model_dir):
    video = write_h264(tmp_path / "drive.mp4", 10, 10, draw=gradient)
    manifest = tmp_path / "m.parquet"
    assert runner.invoke(app, ["ingest", "video", str(video), "-o", str(manifest)]).exit_code == 0
    base = ["evaluate", str(manifest), "-m", str(model_dir), "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
            "--device", "cpu", "--num-workers", "0", "--no-progress"]
    r = runner.invoke(app, base)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "no ground truth" in r.output, r.output
    r = runner.invoke(app, base + ["--split", "val"])
    assert r.exit_code == 1 and "no rows in split 'val'" in r.output, r.output


def test_ingest_refuses_a_symlink_leaving_the_root_unless_allowed(tmp_path):
    from PIL import Image

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "seq").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(root / "seq" / "000.jpg")
    Image.new("RGB", (8, 8)).save(outside / "x.jpg")
    (root / "seq" / "001.jpg").symlink_to(outside / "x.jpg")
    out = tmp_path / "m.parquet"
    refused = CliRunner().invoke(app, ["ingest", "frames", str(root), "--out", str(out)])
    assert refused.exit_code == 1 and "outside the dataset root" in refused.output and not out.exists()
    allowed = CliRunner().invoke(app, ["ingest", "frames", str(root), "--out", str(out), "--allow-outside-root"])
    assert allowed.exit_code == 0, allowed.output
    assert "2 frames" in allowed.output
