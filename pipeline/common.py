"""What every stage script shares: its params section(s), and a log line of how it was run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path(os.environ.get("VIDTAG_PARAMS", "params.yaml"))


def load_params(*sections: str) -> dict[str, Any]:
    """The named top-level sections of params.yaml (plus ``seed``), resolved and logged once."""
    with open(PARAMS_FILE) as f:
        params = yaml.safe_load(f) or {}
    missing = [s for s in sections if s not in params]
    if missing:
        raise SystemExit(f"error: {PARAMS_FILE} has no section(s) {missing}; expected {list(sections)}")
    chosen = {s: params[s] for s in sections}
    chosen["seed"] = params.get("seed", 0)
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}", file=sys.stderr)
    print(f"params: {json.dumps(chosen, sort_keys=True, default=str)}", file=sys.stderr)
    return chosen
