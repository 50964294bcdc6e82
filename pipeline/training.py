"""What the two training stages share: resuming an interrupted run, discarding a stale one, and DVCLive
curves that continue across a resume."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vidtag.errors import CheckpointMismatchError
from vidtag.io import write_json_atomic
from vidtag.lock import writer_lock
from vidtag.train.checkpoint import mark_delivered, read_state


def history_path(checkpoint_dir: Path) -> Path:
    """Every DVCLive step logged so far, kept beside the checkpoint (DVC clears the DVCLive folder before a
    stage runs, so the curves of the epochs before an interruption live here)."""
    return checkpoint_dir.with_name(checkpoint_dir.name + ".live.json")


def _read_history(path: Path) -> list[dict[str, float]]:
    try:
        steps = json.loads(path.read_text()).get("steps", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []


class LiveHistory:
    """A DVCLive ``Live`` whose steps are also written to :func:`history_path`; made with the steps of the
    epochs a resumed checkpoint holds, it logs them again first, so the curves continue where they were
    (the loop logs one step per epoch: step k is epoch k + 1, as in an uninterrupted run)."""

    def __init__(self, live, path: Path, keep_steps: int):
        self._live, self._path = live, path
        self._steps = _read_history(path)[:keep_steps]
        self._current: dict[str, float] = {}
        for step in self._steps:
            for name, value in step.items():
                live.log_metric(name, value)
            live.next_step()
        write_json_atomic(path, {"steps": self._steps})  # drops steps logged after the checkpoint was written

    def log_metric(self, name: str, value, *args, **kwargs) -> None:
        self._current[name] = float(value)
        self._live.log_metric(name, value, *args, **kwargs)

    def next_step(self) -> None:
        self._steps.append(self._current)
        self._current = {}
        write_json_atomic(self._path, {"steps": self._steps})
        self._live.next_step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)


def _discard(checkpoint_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    history_path(checkpoint_dir).unlink(missing_ok=True)


def code_fingerprint(module: str) -> str:
    """sha256 over the repository files ``module`` imports (the stage's code deps in dvc.yaml): part of a training
    run's identity, so an unfinished checkpoint written by older code is started afresh, not resumed."""
    from pipeline.deps import REPO, import_closure
    from vidtag.fingerprint import sha256_file, sha256_json

    return sha256_json({f: sha256_file(REPO / f) for f in import_closure([module])})


def run_resumable(train: Callable[[Any], dict], checkpoint_dir: Path, live_dir: str | None, deliver: bool = True) -> dict:
    """Run ``train(live)``, resuming from ``checkpoint_dir`` after an interruption.

    The stage's outputs persist between `dvc repro` runs (dvc.yaml ``persist: true``) so that a killed
    run resumes. DVC re-runs a stage only when something it depends on changed, so a checkpoint whose
    outputs were written (*delivered*) is stale by definition, and one written with other params too:
    both are discarded and training starts afresh. A finished checkpoint whose outputs were never
    written (the bundle write failed) is resumed: no epoch is trained again, the outputs are written.
    One run per checkpoint at a time (:func:`vidtag.lock.writer_lock`). ``deliver=False`` leaves the finished
    checkpoint undelivered, for a stage that trains a second model after this one and marks both delivered at
    the end (:func:`mark_delivered`): an interruption in the second then does not retrain the first.
    """
    checkpoint_dir = Path(checkpoint_dir)
    with writer_lock(checkpoint_dir, what="training"):
        state = read_state(checkpoint_dir)
        if state is not None and state.get("complete") and state.get("delivered"):
            print(f"{checkpoint_dir} holds a finished run of older inputs: starting afresh", file=sys.stderr)
            _discard(checkpoint_dir)
        elif state is not None and state.get("complete"):
            print(f"{checkpoint_dir} holds a finished run whose outputs were not written: writing them", file=sys.stderr)
        elif state is None:
            history_path(checkpoint_dir).unlink(missing_ok=True)  # steps of a run with no checkpoint to resume

        for attempt in range(2):
            live = None
            if live_dir:
                from dvclive import Live

                saved = read_state(checkpoint_dir)
                live = LiveHistory(Live(live_dir, resume=False, save_dvc_exp=False, dvcyaml=False),
                                   history_path(checkpoint_dir), int(saved.get("epoch", 0)) if saved else 0)
            try:
                metrics = train(live)
            except CheckpointMismatchError as e:
                if attempt:
                    raise
                print(f"{e}: the params changed since, starting afresh", file=sys.stderr)
                _discard(checkpoint_dir)
                continue
            finally:
                if live is not None:
                    live.end()
            if deliver:
                mark_delivered(checkpoint_dir)
            return metrics
    raise AssertionError("unreachable")
