"""DVC stage `extract`: manifest -> frozen CLIP + DINOv2 feature store (params: `backbone`).

    python -m pipeline.extract --manifest cache/manifest.parquet --out cache/features.zarr [--shard i/n]
"""

from __future__ import annotations

import argparse

from pipeline.common import load_params, run_stage
from vidtag.data.manifest import read_manifest
from vidtag.features.extract import configs_from_params, extract_features, parse_shard

# runtime: keys that change how extraction runs, not the features (declared by no stage)
RUNTIME_KEYS = {"device": "device", "extract_workers": "num_workers"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard", default=None, help="i/n (default: torchrun's RANK/WORLD_SIZE, else all)")
    ap.add_argument("--force", action="store_true", help="rebuild a store made with other settings")
    args = ap.parse_args(argv)
    params = load_params("backbone")
    runtime = {ours: params["runtime"][key] for key, ours in RUNTIME_KEYS.items() if key in params["runtime"]}
    bcfg, ecfg = configs_from_params({**params["backbone"], **runtime})
    result = extract_features(read_manifest(args.manifest), args.out, bcfg, ecfg, shard=parse_shard(args.shard),
                              overwrite=args.force)
    print(result.summary())


if __name__ == "__main__":
    run_stage(main)
