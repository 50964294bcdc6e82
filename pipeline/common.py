"""What every stage script shares: its params section(s), a log line of how it was run, and one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vidtag.cpu_kernels import pin_cpu_kernels
from vidtag.errors import VidtagError
from vidtag.threads import passive_openmp, set_threads

passive_openmp()  # before any stage imports torch
pin_cpu_kernels()  # the same float results on every x86-64 CPU with AVX2 (vidtag.cpu_kernels)

PARAMS_FILE = Path(os.environ.get("VIDTAG_PARAMS", "params.yaml"))


def load_params(*sections: str) -> dict[str, Any]:
    """The named top-level sections of params.yaml (plus ``seed`` and ``runtime``), logged once.

    ``runtime`` holds settings that change how a stage runs but never what it computes (devices, memory
    modes, validation frequency); no stage declares it in dvc.yaml, so changing it re-runs nothing.
    """
    with open(PARAMS_FILE) as f:
        params = yaml.safe_load(f) or {}
    missing = [s for s in sections if s not in params]
    if missing:
        raise SystemExit(f"error: {PARAMS_FILE} has no section(s) {missing}; expected {list(sections)}")
    chosen = {s: params[s] for s in sections}
    chosen["seed"] = params.get("seed", 0)
    chosen["runtime"] = dict(params.get("runtime") or {})
    chosen["runtime"]["threads"] = set_threads(chosen["runtime"].get("threads"))
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}", file=sys.stderr)
    print(f"params: {json.dumps(chosen, sort_keys=True, default=str)}", file=sys.stderr)
    return chosen


def pick(section: dict[str, Any], klass) -> dict[str, Any]:
    """The keys of ``section`` that are fields of the dataclass ``klass``."""
    names = set(klass.__dataclass_fields__)
    return {k: v for k, v in section.items() if k in names}


def run_stage(main: Callable[[], Any]) -> None:
    """Run a stage's ``main``; an error a user can cause (VidtagError) ends it with one line, not a
    traceback. Set VIDTAG_DEBUG=1 to see the traceback instead."""
    try:
        main()
    except VidtagError as e:
        if os.environ.get("VIDTAG_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(f"error: {e}") from None
