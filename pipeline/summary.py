"""Print what `make demo` produced: the headline metrics and where the plots and the model are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

GROUPS = ("frame", "video", "trajectory", "city")


def format_metrics(metrics: dict) -> str:
    lines = []
    for group in GROUPS:
        values = metrics.get(group)
        if not values:
            continue
        cells = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        lines.append(f"  {group:<10} {cells}")
    phase1 = metrics.get("phase1", {}).get("frame")
    if phase1:
        cells = "  ".join(f"{k}={v:.3f}" for k, v in phase1.items())
        lines.append(f"  {'phase1':<10} {cells}   (Phase I alone, before GeoRefiner)")
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
