"""The committed results are the committed pipeline's: `dvc metrics diff` right after `make demo` on a fresh
clone shows no change only if dvc.lock records exactly the code and params in the tree."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _lock():
    return yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(_lock()))
def test_dvc_lock_records_the_code_and_params_in_the_tree(stage):
    """A change to a stage's code or params without re-running `make demo` and committing dvc.lock and
    metrics/ would leave committed numbers that the code no longer produces: caught here."""
    entry = _lock()[stage]
    stale = []
    for dep in entry.get("deps", []):
        path = REPO / dep["path"]
        if dep["path"].startswith(("vidtag/", "pipeline/")) and path.is_file() and _md5(path) != dep.get("md5"):
            stale.append(dep["path"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in (entry.get("params", {}).get("params.yaml") or {}).items():
        here = params
        for part in key.split("."):
            here = here.get(part) if isinstance(here, dict) else None
        if here != value:
            stale.append(f"params.yaml:{key}")
    assert not stale, (f"dvc.lock's {stage} was produced with other versions of {stale}; run `make demo` and commit "
                       "dvc.lock, metrics/, plots/ and dvclive/")


def test_dvc_lock_names_every_stage_and_its_code():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    lock = _lock()
    assert set(lock) == set(dvc)
    for name, stage in dvc.items():
        declared = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
        recorded = {d["path"] for d in lock[name].get("deps", [])}
        assert declared == recorded, (name, declared ^ recorded)
