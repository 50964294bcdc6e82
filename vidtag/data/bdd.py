"""BDD100K videos with their info JSON, optionally restricted and split by GAMa's day lists.

Layout: ``ROOT/videos/100k/{train,val}/<name>.mov`` and ``ROOT/info/100k/{train,val}/<name>.json``
(override with ``videos_dir`` / ``info_dir``). Frames are sampled at ``fps`` (default 1) by PTS; GPS
comes from the JSON's ``locations`` (fallback ``gps``), ms timestamps aligned so that video time 0 is
``startTime``, interpolated linearly (see :func:`vidtag.data.video.interpolate_track`). Frames more
than ``gps_tolerance_s`` outside the fixes get no position: they are left out and listed in the skip
report ("no GPS fix"), as are videos with no GPS at all — unlocated, not malformed, so this happens
without ``skip_bad``. With GAMa lists (``lists_dir`` holding ``train_day.list`` and
``val_day_vid.list``), only the listed videos are read and the lists give the split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from vidtag.data.manifest import SKIPPED_COLUMNS
from vidtag.data.report import ALLOW_OUTSIDE_HINT, OUTSIDE_ROOT, Track, as_number, finalize, flag_bad_coords, judge_track, outside_root
from vidtag.data.video import GPS_TOLERANCE_S, VIDEO_EXTENSIONS, video_rows
from vidtag.errors import ManifestError

GAMA_LISTS = {"train": "train_day.list", "val": "val_day_vid.list"}


def read_gama_lists(lists_dir: str | os.PathLike) -> dict[str, str]:
    """Video id -> split from GAMa's lists (first whitespace-separated token of each line)."""
    out: dict[str, str] = {}
    for split, name in GAMA_LISTS.items():
        p = Path(lists_dir) / name
        if not p.is_file():
            raise ManifestError(f"GAMa list {p} not found; expected {list(GAMA_LISTS.values())} in {lists_dir}")
        for line in p.read_text().splitlines():
            if line.strip():
                vid = line.split()[0]
                out[Path(vid).stem] = split  # tolerate "name.mov" entries
    return out


def info_track(info: dict, path: Path, skip_bad: bool = False) -> Track | None:
    """GPS track (t_s from startTime, lat, lon) from a BDD info JSON; None when it has no fixes.

    The first of ``locations`` / ``gps`` with entries is used. A fix whose time or coordinates are not
    numbers, NaN or out of range raises naming the file and the fix, or with ``skip_bad`` is dropped
    (listed in ``Track.dropped`` as ``(index, reason)``).
    """
    if not isinstance(info, dict) or "startTime" not in info:
        raise ManifestError(f"{path}: no 'startTime'; expected a BDD100K info JSON (startTime, locations, gps)")
    start_ms = as_number(info["startTime"])
    if not np.isfinite(start_ms):
        raise ManifestError(f"{path}: startTime {info['startTime']!r} is not a number (ms since the epoch)")
    for key in ("locations", "gps"):
        fixes = info.get(key) or []
        if not isinstance(fixes, list):
            raise ManifestError(f"{path}: '{key}' is a {type(fixes).__name__}, expected a list of fixes")
        if not fixes:
            continue
        vals = {k: [] for k in ("timestamp", "latitude", "longitude")}
        not_numbers = []
        for p in fixes:
            p = p if isinstance(p, dict) else {}
            why = None
            for k in vals:
                v = p.get(k)
                vals[k].append(as_number(v))
                if why is None and not np.isfinite(vals[k][-1]) and not (isinstance(v, float) and np.isnan(v)):
                    why = f"{k} is missing" if v is None else f"{k} {v!r} is not a number"
            not_numbers.append(why)
        t = (np.array(vals["timestamp"]) - start_ms) / 1000.0
        return judge_track(t, vals["latitude"], vals["longitude"], source=str(path), rows=range(len(fixes)),
                           label=f"{key}[{{}}]", skip_bad=skip_bad, not_numbers=not_numbers)
    return None


def read_bdd(root: str | os.PathLike, *, fps: float = 1.0, lists_dir: str | os.PathLike | None = None,
             videos_dir: str | os.PathLike | None = None, info_dir: str | os.PathLike | None = None,
             gps_tolerance_s: float = GPS_TOLERANCE_S, max_videos: int | None = None,
             skip_bad: bool = False, allow_outside_root: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Manifest rows (``video_path`` + ``timestamp_s``) for BDD100K / GAMa; returns ``(df, skipped)``.

    A video resolving outside ``root`` (``videos_dir`` elsewhere, a symlink out) is not opened: a bad
    row unless ``allow_outside_root``. Bad GPS fixes raise, or with ``skip_bad`` are dropped and listed.
    """
    root = Path(root)
    videos_dir = Path(videos_dir) if videos_dir else root / "videos" / "100k"
    info_dir = Path(info_dir) if info_dir else root / "info" / "100k"
    if not videos_dir.is_dir():
        raise ManifestError(f"{videos_dir} is not a folder; expected ROOT/videos/100k/{{train,val}}/<name>.mov")
    wanted = read_gama_lists(lists_dir) if lists_dir else None
    parts, unlocated = [], []
    dropped: list[tuple] = []  # (file, row, sequence_id, reason) of GPS fixes left out by skip_bad
    outside: list[tuple] = []  # the same for videos outside the root
    for folder in ("train", "val", "test"):
        vdir = videos_dir / folder
        if not vdir.is_dir():
            continue
        vids = sorted(f for f in vdir.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS)
        for v in vids:
            if wanted is not None and v.stem not in wanted:
                continue
            split = wanted[v.stem] if wanted is not None else folder
            ipath = info_dir / folder / f"{v.stem}.json"
            sequence_id = f"{folder}/{v.stem}"
            track = None
            if ipath.is_file():
                try:
                    track = info_track(json.loads(ipath.read_text()), ipath, skip_bad)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ManifestError(f"{ipath}: not valid JSON ({e})") from None
                if track is not None:
                    dropped += [(str(ipath), row, sequence_id, why) for row, why in track.dropped]
                    track = track if track.t_s.size else None
            if not allow_outside_root and outside_root(root, [str(v)])[0]:
                outside.append((str(v), None, sequence_id, f"video {OUTSIDE_ROOT}"))
                continue  # never opened
            rows = video_rows(v, root, sequence_id, fps, split, track, gps_tolerance_s)
            if folder != "test":
                no_fix = rows["lat"].is_null()
                if no_fix.any():
                    why = "no GPS fix within %.1f s" % gps_tolerance_s if track is not None else f"no GPS ({ipath.name} missing, or without valid locations/gps)"
                    unlocated.append(rows.filter(no_fix).with_columns(pl.lit(why).alias("_reason")))
                    rows = rows.filter(~no_fix)
            parts.append(rows)
            if max_videos is not None and len(parts) >= max_videos:
                break
    if wanted is not None:
        found = {p["sequence_id"][0].split("/", 1)[1] for p in parts if p.height}
        missing = sorted(set(wanted) - found - {u["sequence_id"][0].split("/", 1)[1] for u in unlocated}
                         - {sid.split("/", 1)[1] for _, _, sid, _ in outside})
        if missing and max_videos is None:
            raise ManifestError(f"{len(missing)} video(s) in the GAMa lists are not under {videos_dir} "
                                f"(first: {missing[0]}); download them or drop them from the lists")
    if outside and not skip_bad:
        f, _, _, why = outside[0]
        more = f" ({len(outside) - 1} more after it)" if len(outside) > 1 else ""
        raise ManifestError(f"{f}: {why}{more}; {ALLOW_OUTSIDE_HINT}, or pass --skip-bad (skip_bad=True) to "
                            "leave such videos out and list them in <manifest>.skipped.csv")
    if not parts:
        raise ManifestError(f"no videos found under {videos_dir}/{{train,val,test}}")
    df = flag_bad_coords(pl.concat(parts, how="vertical_relaxed"), allow_null=True)
    good, skipped = finalize(df, skip_bad)
    extra = [skipped]
    if unlocated:
        u = pl.concat(unlocated, how="vertical_relaxed")
        extra.append(u.select(pl.col("_file").alias("file"), pl.col("_row").alias("row"), "sequence_id",
                              pl.col("_reason").alias("reason")))
    if dropped or outside:
        extra.append(pl.DataFrame(dropped + outside, schema=SKIPPED_COLUMNS, orient="row"))
    skipped = pl.concat(extra, how="vertical_relaxed").sort("file", "row", nulls_last=True)
    return good, skipped
