"""Print what `make demo` produced: the headline metrics and where the plots and the model are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

GROUPS = ("frame", "video", "trajectory", "city")
# The JSON is written with sorted keys; print thresholds in increasing order instead.
ORDER = ["acc_0.5km", "acc_1km", "acc_5km", "acc_25km", "median_km", "dfd_deg", "mrd_deg", "dfd_km", "mrd_km"]


def _cells(values: dict) -> str:
    keys = sorted(values, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
    return "  ".join(f"{k}={values[k]:.3f}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in keys)


def format_metrics(metrics: dict) -> str:
    lines = [f"  {group:<10} {_cells(metrics[group])}" for group in GROUPS if metrics.get(group)]
    for group in ("frame", "trajectory"):
        values = metrics.get("phase1", {}).get(group)
        if values:
            lines.append(f"  {'phase1 ' + group:<10} {_cells(values)}   (Phase I alone, before GeoRefiner)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    metrics_path = Path(argv[0] if argv else "metrics/eval.json")
    if not metrics_path.exists():
        print(f"error: {metrics_path} not found; run `dvc repro` first", file=sys.stderr)
        return 1
    metrics = json.loads(metrics_path.read_text())
    print(f"\nvidtag demo — validation metrics ({metrics_path}; accuracies in %, distances in km, DFD/MRD deg and km):")
    print(format_metrics(metrics))
    print("\n  model bundle : cache/model/   (try: .venv/bin/vidtag predict VIDEO --model cache/model --out pred.csv --map pred.html)")
    print("  plots        : plots/  (dvc plots show  ->  dvc_plots/index.html)")
    print("  compare runs : dvc exp run -S phase2.alpha=1 && dvc metrics diff")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
