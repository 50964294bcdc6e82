"""`gallery` stage: params ``gallery`` + the manifest's training split -> the GPS gallery parquet
(``kind: world`` needs no manifest rows: a land-only grid over the Earth). ``gallery.datasets`` (name -> settings over
the others) builds each dataset's own gallery of a manifest of several (App. H) into one file (vidtag.dataset_gallery)."""

from __future__ import annotations

import argparse

from pipeline.common import load_params, run_stage
from vidtag.data.manifest import manifest_fingerprint, read_manifest
from vidtag.gallery import build_gallery, write_gallery


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", required=True, help="manifest parquet, e.g. cache/manifest.parquet")
    ap.add_argument("--out", required=True, help="gallery parquet to write, e.g. cache/gallery.parquet")
    args = ap.parse_args()
    g = dict(load_params("gallery")["gallery"])
    m = read_manifest(args.manifest)
    if g.get("datasets") is not None:  # a manifest of several datasets (App. H): each dataset's own gallery, one file
        from vidtag.dataset_gallery import build_dataset_galleries

        per = g.pop("datasets")
        df, meta = build_dataset_galleries(m.df, per, g, manifest_fingerprint(m.df))
        write_gallery(df, meta, args.out)
        print(f"gallery: {df.height} points, " + ", ".join(f"{k}: {v['kind']} {v['n_points']}" for k, v in meta["datasets"].items()))
        return
    g.pop("datasets", None)
    kind = g.pop("kind", "grid")
    if "splits" in g:
        g["splits"] = tuple(g["splits"])
    df, meta = build_gallery(m.df, kind, manifest_fingerprint=manifest_fingerprint(m.df), **g)
    write_gallery(df, meta, args.out)
    where = "land worldwide" if kind == "world" else f"regions={len(meta['regions'])}"
    print(f"gallery: {df.height} points, kind={kind}, {where}")


if __name__ == "__main__":
    run_stage(main)
