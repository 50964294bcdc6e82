"""Each dataset's own gallery in one gallery file, for a manifest of several datasets (App. H).

Tables 12-13 score the unified model on each dataset as its own model is scored: MSLS and GAMa on their
GPS grids (App. D; 0.1 km and 0.5 km, Sec. 5.5), CityGuessr68k on its city centres (Sec. 5.3). The
``gallery`` stage builds each part from that dataset's training frames with that dataset's settings and
writes them as one file (one DVC output): the parts' rows one after another, ``label`` null where a part
has none, and the metadata ``kind: datasets`` with each part's own metadata and row range. Evaluation
retrieves each dataset's frames from its part (:func:`dataset_gallery`); the whole file is the gallery a
universal model's bundle answers from (`vidtag predict`).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from vidtag.errors import GalleryError
from vidtag.gallery import build_gallery, gallery_fingerprint

KIND = "datasets"


def build_dataset_galleries(manifest_df: pl.DataFrame, datasets: dict[str, dict[str, Any]],
                            defaults: dict[str, Any] | None = None,
                            manifest_fingerprint: str | None = None) -> tuple[pl.DataFrame, dict]:
    """One gallery per dataset (``datasets``: name -> :func:`vidtag.gallery.build_gallery` settings over
    ``defaults``), each from the manifest rows whose ``dataset`` is that name; joined as described above."""
    if "dataset" not in manifest_df.columns:
        raise GalleryError("gallery.datasets needs a manifest of several datasets (a 'dataset' column: params "
                           "data.sources); this manifest has one dataset, use the plain gallery settings")
    have = set(manifest_df["dataset"].drop_nulls().unique().to_list())
    missing = sorted(set(datasets) - have)
    if missing or not datasets:
        raise GalleryError(f"gallery.datasets names {missing or 'no dataset'}; the manifest's datasets are {sorted(have)}")
    parts, metas, start = [], {}, 0
    for name, settings in datasets.items():
        opts = {**(defaults or {}), **(settings or {})}
        kind = opts.pop("kind", "grid")
        if "splits" in opts:
            opts["splits"] = tuple(opts["splits"])
        df, meta = build_gallery(manifest_df.filter(pl.col("dataset") == name), kind,
                                 manifest_fingerprint=manifest_fingerprint, **opts)
        parts.append(df)
        metas[name] = {**meta, "rows": [start, start + df.height]}
        start += df.height
    df = pl.concat(parts, how="diagonal_relaxed")
    meta = {"kind": KIND, "datasets": metas, "regions": [], "region_column": None, "splits": ["train"],
            "manifest_fingerprint": manifest_fingerprint, "n_points": df.height, "fingerprint": gallery_fingerprint(df)}
    return df, meta


def gallery_datasets(meta: dict) -> list[str]:
    """The datasets a gallery file has parts for, in file order ([] for a single gallery)."""
    parts = (meta.get("datasets") or {}) if meta.get("kind") == KIND else {}
    return sorted(parts, key=lambda name: parts[name]["rows"][0])  # the metadata's JSON sorts its keys


def dataset_gallery(df: pl.DataFrame, meta: dict, name: str) -> tuple[pl.DataFrame, dict]:
    """Dataset ``name``'s part of a gallery file; a single gallery is every dataset's gallery."""
    if meta.get("kind") != KIND:
        return df, meta
    parts = meta.get("datasets") or {}
    if name not in parts:
        raise GalleryError(f"the gallery has parts for datasets {list(parts)}, not {name!r}; add it to gallery.datasets")
    sub_meta = dict(parts[name])
    start, stop = sub_meta.pop("rows")
    if not 0 <= start <= stop <= df.height:
        raise GalleryError(f"the gallery's part for {name!r} (rows {start}-{stop}) lies outside its {df.height} rows; rebuild it")
    sub = df.slice(start, stop - start)
    if "label" in sub.columns and sub["label"].null_count() == sub.height:
        sub = sub.drop("label")
    return sub, sub_meta
