"""`prepare` stage: params ``data`` -> the manifest (the toy source also writes its images under data.root)."""

from __future__ import annotations

import argparse

from pipeline.common import load_params
from vidtag.data.ingest import ingest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="manifest parquet to write, e.g. cache/manifest.parquet")
    args = ap.parse_args()
    p = load_params("data")
    data = p["data"]
    source = data["source"]
    m = ingest(source, data["root"], args.out, val_fraction=data.get("val_fraction", 0.2), seed=p["seed"],
               skip_bad=data.get("skip_bad", False), options=data.get(source) or {})
    print(m)


if __name__ == "__main__":
    main()
