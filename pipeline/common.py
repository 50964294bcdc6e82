"""What every stage script shares: its params section(s), and a log line of how it was run."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
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


def run_resumable(train: Callable[[Any], dict], checkpoint_dir: Path, live_dir: str | None) -> dict:
    """Run ``train(live)``, resuming from ``checkpoint_dir`` after an interruption.

    The stage's outputs persist between `dvc repro` runs (dvc.yaml ``persist: true``) so that a killed
    run resumes. DVC re-runs a stage only when something it depends on changed, so a *finished*
    checkpoint is stale by definition, and one written with other params too: both are discarded
    and training starts afresh.
    """
    from vidtag.train import CheckpointMismatchError
    from vidtag.train.checkpoint import STATE

    state_file = checkpoint_dir / STATE
    if state_file.exists() and json.loads(state_file.read_text()).get("complete"):
        print(f"{checkpoint_dir} holds a finished run of older inputs: starting afresh", file=sys.stderr)
        shutil.rmtree(checkpoint_dir)

    for attempt in range(2):
        live = None
        if live_dir:
            from dvclive import Live

            live = Live(live_dir, resume=checkpoint_dir.exists(), save_dvc_exp=False, dvcyaml=False)
        try:
            return train(live)
        except CheckpointMismatchError as e:
            if attempt:
                raise
            print(f"{e}: the params changed since, starting afresh", file=sys.stderr)
            shutil.rmtree(checkpoint_dir)
        finally:
            if live is not None:
                live.end()
    raise AssertionError("unreachable")


def run_stage(main: Callable[[], Any]) -> None:
    """Run a stage's ``main``; the library's errors end it with one line, not a traceback.

    Set VIDTAG_DEBUG=1 to see the traceback instead.
    """
    from vidtag.features.backbones import BackboneError
    from vidtag.retrieval import GalleryCacheError
    from vidtag.train import TrainingError

    # Every vidtag error class derives from ValueError, except these three (RuntimeError).
    user_errors = (ValueError, FileNotFoundError, BackboneError, GalleryCacheError, TrainingError)
    try:
        main()
    except user_errors as e:
        if os.environ.get("VIDTAG_DEBUG"):
            raise
        raise SystemExit(f"error: {e}") from None
