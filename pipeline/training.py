"""What the two training stages share: resuming an interrupted run, and discarding a stale one."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vidtag.errors import CheckpointMismatchError
from vidtag.train.checkpoint import STATE


def run_resumable(train: Callable[[Any], dict], checkpoint_dir: Path, live_dir: str | None) -> dict:
    """Run ``train(live)``, resuming from ``checkpoint_dir`` after an interruption.

    The stage's outputs persist between `dvc repro` runs (dvc.yaml ``persist: true``) so that a killed
    run resumes. DVC re-runs a stage only when something it depends on changed, so a *finished*
    checkpoint is stale by definition, and one written with other params too: both are discarded
    and training starts afresh.
    """
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
