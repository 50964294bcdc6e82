"""`prepare` stage: params ``data`` -> the manifest (the toy source also writes its images under data.root).

``data.sources`` (a list of ``{source, root, <options>}``) instead of ``data.source`` joins several datasets into
one manifest with App. H's sampling of the training split (the unified model; ``vidtag.data.unified``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.common import load_params, run_stage
from vidtag.data.ingest import ingest
from vidtag.errors import ConfigError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="manifest parquet to write, e.g. cache/manifest.parquet")
    ap.add_argument("--generated", required=True,
                    help="where data.source=toy generates its world (the stage's output; left empty otherwise)")
    args = ap.parse_args()
    p = load_params("data")
    data = p["data"]
    source = data.get("source")
    # The toy world is an output of this stage, so it lives at --generated whatever data.root says;
    # for real datasets the folder is created empty so the stage's declared outputs always exist.
    Path(args.generated).mkdir(parents=True, exist_ok=True)
    if data.get("sources") is not None:
        from vidtag.data.unified import ingest_sources

        if source is not None:
            raise ConfigError("params data has both 'source' and 'sources'; set data.source: null to use data.sources")
        m, report = ingest_sources(data["sources"], args.out, val_fraction=data.get("val_fraction", 0.2), seed=p["seed"],
                                   skip_bad=data.get("skip_bad", False), min_frames=data.get("min_frames"),
                                   allow_outside_root=data.get("allow_outside_root", False))
        print(report)
        print(m)
        return
    root = args.generated if source == "toy" else data["root"]
    m = ingest(source, root, args.out, val_fraction=data.get("val_fraction", 0.2), seed=p["seed"],
               skip_bad=data.get("skip_bad", False), min_frames=data.get("min_frames"),
               allow_outside_root=data.get("allow_outside_root", False), options=data.get(source) or {})
    print(m)


if __name__ == "__main__":
    run_stage(main)
