"""One entry point from a source name and its options to a written manifest (used by `prepare` and the CLI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vidtag.data.manifest import Manifest, write_manifest
from vidtag.errors import ConfigError

SOURCES = ("toy", "msls", "bdd", "cityguessr", "frames", "video")


def ingest(source: str, root: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0,
           skip_bad: bool = False, allow_outside_root: bool = False, options: dict[str, Any] | None = None) -> Manifest:
    """Read ``root`` with the ``source`` reader and write the manifest (and its skip report) to ``out``.

    ``options`` are the reader's own keyword arguments (params.yaml ``data.<source>``). Image, video and
    folder paths that resolve outside ``root`` are refused (bad rows) unless ``allow_outside_root``; the
    manifest records the choice so that extraction honours it too.
    """
    opts = dict(options or {})
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
    return write_manifest(df, out, root, source=source, skipped=skipped, allow_outside_root=allow_outside_root)
