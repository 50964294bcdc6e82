"""A small, committed copy of this repository for the slow end-to-end tests: the tracked tree without the
demo's results, the toy world shrunk to 2 cities of 5 short drives, and an environment that runs the venv's
`dvc` and `git` with one thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = ("cache/", "metrics/", "plots/", "dvclive/")  # what `dvc repro` writes: the copy starts without it


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    """Run ``cmd``; fail the test with its output tails if it fails; return stdout + stderr."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def small_repo(work: Path, *, epochs: int, eval_every: int, n_maps: int) -> dict:
    """Copy the tracked tree into ``work``, shrink the demo, commit it; returns the environment to run in."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(RESULTS) and rel != "dvc.lock":
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["toy"].update(sequences_per_city=5, cities=["Amsterdam", "Melbourne"], max_frames=30)
    for phase in ("phase1", "phase2"):
        params[phase].update(epochs=epochs, batch_size=4, warmup_steps=2)
    params["runtime"]["eval_every"] = eval_every
    params["eval"]["n_maps"] = n_maps
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        run(["git", *args], work, env)
    return env
