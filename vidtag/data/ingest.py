"""One entry point from a source name and its options to a written manifest (used by `prepare` and the CLI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from vidtag.data.manifest import Manifest, write_manifest
from vidtag.data.split import check_min_frames, short_sequences
from vidtag.errors import ConfigError, ManifestError

SOURCES = ("toy", "msls", "bdd", "cityguessr", "frames", "video")


def ingest(source: str, root: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0,
           skip_bad: bool = False, allow_outside_root: bool = False, options: dict[str, Any] | None = None,
           min_frames: int | None = None) -> Manifest:
    """Read ``root`` with the ``source`` reader and write the manifest (and its skip report) to ``out``.

    ``options`` are the reader's own keyword arguments (params.yaml ``data.<source>``). Image, video and
    folder paths that resolve outside ``root`` are refused (bad rows) unless ``allow_outside_root``; the
    manifest records the choice so that extraction honours it too.

    ``min_frames`` (params ``data.min_frames``): sequences with fewer frames are left out whole and named
    in the skip report (Sec. 4.1). None keeps the reader's own rule: MSLS's is the paper's 16 frames, the
    other readers keep every sequence. MSLS applies it before drawing its split; other sources after.
    """
    df, skipped, root = read_source(source, root, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
                                    allow_outside_root=allow_outside_root, options=options, min_frames=min_frames)
    return write_manifest(df, out, root, source=source, skipped=skipped, allow_outside_root=allow_outside_root)


def read_source(source: str, root: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0, skip_bad: bool = False,
                allow_outside_root: bool = False, options: dict[str, Any] | None = None,
                min_frames: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame, Path]:
    """What :func:`ingest` writes, unwritten: ``(rows, skip report, root)`` of one source (the root can change:
    the video reader's common folder). Several sources in one manifest (App. H) read each one with it."""
    opts = dict(options or {})
    if min_frames is not None:
        check_min_frames(min_frames)
        if source == "msls":
            opts["min_frames"] = min_frames
    if source != "toy":
        opts["allow_outside_root"] = allow_outside_root
    root = Path(root)
    if source == "toy":
        from vidtag.data.frames import read_frames
        from vidtag.data.toy import ToyConfig, generate_toy

        cfg_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
        csv = generate_toy(root, ToyConfig(seed=seed, **cfg_kw))
        df, skipped = read_frames(root, csv, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad)
    elif source == "frames":
        from vidtag.data.frames import read_frames

        df, skipped = read_frames(root, opts.pop("coords_csv", None), val_fraction=val_fraction, seed=seed,
                                  skip_bad=skip_bad, **opts)
    elif source == "msls":
        from vidtag.data.msls import read_msls

        for k in ("val_cities", "cities"):
            if opts.get(k) is not None:
                opts[k] = tuple(opts[k])
        df, skipped = read_msls(root, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad, **opts)
    elif source == "bdd":
        from vidtag.data.bdd import read_bdd

        df, skipped = read_bdd(root, skip_bad=skip_bad, **opts)
    elif source == "cityguessr":
        from vidtag.data.cityguessr import read_cityguessr

        df, skipped = read_cityguessr(root, skip_bad=skip_bad, **opts)
    elif source == "video":
        from vidtag.data.video import read_videos

        paths = opts.pop("paths", None) or [root]
        df, skipped, root = read_videos(paths, root if root.is_dir() else None, skip_bad=skip_bad, **opts)
    else:
        raise ConfigError(f"data source must be one of {SOURCES}, got {source!r}")
    if min_frames is not None and source != "msls":
        df, skipped = _drop_short(df, skipped, min_frames, root)
    return df, skipped, root


def _drop_short(df: pl.DataFrame, skipped: pl.DataFrame, min_frames: int, root) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Whole sequences of fewer than ``min_frames`` frames out of a reader's manifest, each named in the
    skip report by its first frame's file."""
    path_col = "image_path" if "image_path" in df.columns else "video_path"
    short = short_sequences(df, min_frames, (path_col,))
    if short.height == 0:
        return df, skipped
    kept = df.filter(~pl.col("sequence_id").is_in(short["sequence_id"].implode()))
    if kept.height == 0:
        raise ManifestError(f"every sequence under {root} is shorter than min_frames {min_frames} (the longest has "
                            f"{int(short['n_frames'].max())} frames); lower min_frames (data.min_frames) to keep them")
    report = short.select(pl.col(path_col).alias("file"), pl.lit(None, dtype=pl.Int64).alias("row"), "sequence_id", "reason")
    return kept, pl.concat([skipped.select(report.columns), report], how="vertical_relaxed")
