"""Print what `make demo` produced: the headline metrics and where the plots and the model are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

GROUPS = ("frame", "video", "trajectory", "shape", "city")
PHASE1_GROUPS = ("frame", "trajectory", "shape")
# The JSON is written with sorted keys; print accuracies by increasing threshold (acc_0.1km before
# acc_1km, whatever metrics.THRESHOLDS_KM holds), then the rest in this order, each shape metric beside
# its yardstick.
ORDER = ["median_km", "dfd_deg", "mrd_deg", "dfd_km", "mrd_km",
         "path_length_ratio", "n_path_length_ratio", "r2_in_drive", "distinct_points", "distinct_cells", "distinct_true_cells",
         "distinct_ratio",
         "dfd_km_right_city", "mrd_km_right_city", "n_right_city"]


def _cell(key: str, value) -> str:
    if value is None:  # e.g. no sequence placed in the right city: nothing to average
        return f"{key}=n/a"
    return f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"


def _sort_key(key: str) -> tuple:
    if key.startswith("acc_") and key.endswith("km"):
        try:
            return (0, float(key[4:-2]), 0)
        except ValueError:
            pass
    return (1, 0.0, ORDER.index(key) if key in ORDER else len(ORDER))


def _cells(values: dict) -> str:
    keys = sorted(values, key=_sort_key)  # stable: unknown keys keep the JSON's order, at the end
    return "  ".join(_cell(k, values[k]) for k in keys)


def format_metrics(metrics: dict) -> str:
    lines = [f"  {group:<17} {_cells(metrics[group])}" for group in GROUPS if metrics.get(group)]
    for group in PHASE1_GROUPS:
        values = metrics.get("phase1", {}).get(group)
        if values:
            lines.append(f"  {'phase1 ' + group:<17} {_cells(values)}   (Phase I alone, before GeoRefiner)")
    if metrics.get("shape") or metrics.get("phase1", {}).get("shape"):
        lines += [
            "  shape: path_length_ratio = predicted / true path length, median over the n_path_length_ratio moving",
            "         sequences (1 right, 0 one point per video, > 1 jitter); r2_in_drive = share of the true movement",
            "         within a sequence that the prediction reproduces, median (1 the drive's shape, 0 a point, < 0 noise);",
            "         distinct_cells vs distinct_true_cells = gallery cells under the predicted vs the true drive,",
            "         per sequence (mean; distinct_points: distinct predicted coordinates);",
            "         *_right_city = DFD/MRD km over the n_right_city sequences with video-level error <= 25 km",
        ]
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
    print("\n  model bundle : cache/bundle/   (try: .venv/bin/vidtag predict VIDEO --model cache/bundle --out pred.csv --map pred.html)")
    print("  plots        : plots/  (dvc plots show  ->  dvc_plots/index.html)")
    print("  compare runs : dvc exp run -S phase2.alpha=1 && dvc metrics diff")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
