"""dvc.yaml's code deps are exactly what each stage imports (pipeline/deps.py), and the closure itself is right."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.deps import check, import_chains, import_closure, main, render, stage_modules, write

REPO = Path(__file__).resolve().parent.parent
DVC_YAML = REPO / "dvc.yaml"
STAGES = list((yaml.safe_load(DVC_YAML.read_text()).get("stages") or {}))


@pytest.fixture(scope="module")
def diffs():
    return {d.stage: d for d in check(DVC_YAML, REPO)}


# ----------------------------------------------------------------------------- the real dvc.yaml


@pytest.mark.parametrize("stage", STAGES)
def test_every_imported_repository_file_is_a_dep_of_the_stage(diffs, stage):
    d = diffs[stage]
    assert d.closure, f"{stage}: its cmd runs no repository module (expected `python -m pipeline.<x>`)"
    assert not d.missing, (f"{stage} imports files its deps do not cover (edits to them would not re-run it):\n"
                           + "\n".join(d.lines()[: len(d.missing)])
                           + "\n`python -m pipeline.deps` prints the deps to paste into dvc.yaml")


@pytest.mark.parametrize("stage", STAGES)
def test_no_code_dep_covers_a_file_the_stage_does_not_import(diffs, stage):
    # e.g. `vidtag/train` as a dep of train_phase1 re-runs it when only vidtag/train/phase2.py changed
    d = diffs[stage]
    assert not d.extra, (f"{stage} lists code deps it does not import (code deps are listed as exact files):\n"
                         + "\n".join(f"  {dep}: {why}" for dep, why in d.extra.items()))


def test_extract_does_not_import_training_models_or_evaluation():
    (stage,) = [s for s in STAGES if s == "extract"]
    chains = import_chains(stage_modules(yaml.safe_load(DVC_YAML.read_text())["stages"][stage]), REPO)
    forbidden = {"vidtag/retrieval.py", "vidtag/inference.py", "vidtag/metrics.py", "vidtag/evaluation.py"}
    bad = [f for f in chains if f.startswith(("vidtag/train/", "vidtag/models/")) or f in forbidden]
    assert not bad, ("the extract stage imports training / model / evaluation code, so editing it re-extracts "
                     "features:\n" + "\n".join(" -> ".join(chains[f]) for f in bad))


# ----------------------------------------------------------------------------- the closure, on a synthetic repo


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def repo(tmp_path):
    return write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": """
            import os
            import numpy

            def later():
                from pkg.sub import deep  # function-level import
                import pkg.lazy as lz
                return deep, lz
            """,
        "pkg/lazy.py": "",
        "pkg/sub/__init__.py": "from .helper import h  # relative import inside a package __init__\n",
        "pkg/sub/helper.py": "from .. import util  # `from <package> import <submodule>`, relative\nh = 1\n",
        "pkg/sub/deep.py": "from . import leaf\nfrom ..typed import T\n",
        "pkg/sub/leaf.py": "",
        "pkg/util.py": "",
        "pkg/typed.py": """
            from __future__ import annotations
            import typing
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from pkg.heavy import Heavy
            else:
                from pkg import runtime
            if typing.TYPE_CHECKING:
                import pkg.heavy2
            T = 1
            """,
        "pkg/heavy.py": "",
        "pkg/heavy2.py": "",
        "pkg/runtime.py": "",
        "pkg/unused.py": "",
        "pkg/dyn.py": "import importlib\nm = importlib.import_module('pkg.util')\n",
        "app/__init__.py": "",
        "app/__main__.py": "from app import cmd\n",
        "app/cmd.py": "from pkg.sub.leaf import *\n",
        "app/uses_lazy.py": "from lazy import A\nimport lazy as L\n\ndef f():\n    return L.B, L.E\n",
        "app/star.py": "from lazy import *\n",
        "lazy/__init__.py": """
            import importlib

            _EXPORTS = {"A": "a", "B": "b", "C": "c"}
            _ERRORS = ("E",)

            def __getattr__(name):  # PEP 562: a submodule is imported when one of its names is first used
                if name in _ERRORS:
                    return getattr(importlib.import_module("lazy.errors"), name)
                return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
            """,
        "lazy/a.py": "", "lazy/b.py": "", "lazy/c.py": "", "lazy/errors.py": "",
    })


def closure(repo, *modules):
    return import_closure(modules, repo, packages=("pkg", "app", "lazy"))


def test_function_level_imports_and_package_inits_are_followed(repo):
    assert closure(repo, "pkg.a") == [
        "pkg/__init__.py", "pkg/a.py", "pkg/lazy.py", "pkg/runtime.py", "pkg/sub/__init__.py", "pkg/sub/deep.py",
        "pkg/sub/helper.py", "pkg/sub/leaf.py", "pkg/typed.py", "pkg/util.py",
    ]


def test_importing_a_submodule_runs_every_package_init_on_the_way(repo):
    # `from pkg.sub.leaf import *` runs pkg/__init__.py and pkg/sub/__init__.py (which imports helper -> util)
    assert closure(repo, "app.cmd") == [
        "app/__init__.py", "app/cmd.py", "pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/helper.py",
        "pkg/sub/leaf.py", "pkg/util.py",
    ]


def test_relative_imports_and_from_package_import_submodule(repo):
    assert closure(repo, "pkg.sub.helper") == ["pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/helper.py",
                                               "pkg/util.py"]
    assert "pkg/sub/leaf.py" in closure(repo, "pkg.sub.deep")  # `from . import leaf`


def test_type_checking_imports_are_ignored_but_their_else_branch_is_not(repo):
    got = closure(repo, "pkg.typed")
    assert "pkg/heavy.py" not in got and "pkg/heavy2.py" not in got
    assert "pkg/runtime.py" in got


def test_literal_import_module_and_python_m_package_runs_main(repo):
    assert "pkg/util.py" in closure(repo, "pkg.dyn")
    assert "app/__main__.py" in closure(repo, "app") and "app/cmd.py" in closure(repo, "app")
    assert closure(repo, "pkg.unused") == ["pkg/__init__.py", "pkg/unused.py"]
    assert closure(repo, "json", "numpy") == []  # not ours


def test_lazy_pep562_names_pull_in_only_the_submodules_they_load(repo):
    # `from lazy import A` and `L.B` load lazy/a.py and lazy/b.py through __getattr__; lazy/c.py is never loaded
    assert closure(repo, "app.uses_lazy") == [
        "app/__init__.py", "app/uses_lazy.py", "lazy/__init__.py", "lazy/a.py", "lazy/b.py", "lazy/errors.py",
    ]
    assert {"lazy/a.py", "lazy/b.py", "lazy/c.py"} <= set(closure(repo, "app.star"))  # `import *` takes them all


def test_chains_say_how_a_file_is_reached(repo):
    chains = import_chains(["pkg.a"], repo, packages=("pkg",))
    assert chains["pkg/sub/leaf.py"] == ["pkg/a.py", "pkg/sub/deep.py", "pkg/sub/leaf.py"]


@pytest.mark.parametrize("cmd, modules", [
    ("python -m pkg.a --out x", ["pkg.a"]),
    ("python3 -u -m pkg.a", ["pkg.a"]),
    ("python pkg/a.py --flag", ["pkg.a"]),
    (["python -m pkg.a", "python -m app"], ["pkg.a", "app"]),
    ("python -m pkg.a && python -m app", ["pkg.a", "app"]),
    ("dvc exp show", []),
])
def test_stage_modules_reads_the_cmd(cmd, modules):
    assert stage_modules({"cmd": cmd}) == modules


def dvc_yaml(repo, deps):
    path = repo / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": {"s": {"cmd": "python -m pkg.sub.helper --x 1", "deps": deps}}}))
    return path


def test_check_flags_missing_too_broad_directory_and_stale_deps_and_ignores_data(repo):
    exact = ["pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/helper.py", "pkg/util.py", "cache/data.parquet"]
    (repo / "pkg" / "table.csv").write_text("a\n")
    (diff,) = check(dvc_yaml(repo, exact + ["pkg/table.csv"]), repo, packages=("pkg",))
    assert not diff, diff.lines()

    (diff,) = check(dvc_yaml(repo, ["pkg/sub/helper.py", "pkg/unused.py", "pkg/gone.py", "pkg/sub", "cache/x"]),
                    repo, packages=("pkg",))
    assert diff.missing == ["pkg/__init__.py", "pkg/util.py"]  # pkg/sub covers the other two
    assert diff.extra["pkg/unused.py"] == "not imported"
    assert diff.extra["pkg/gone.py"] == "no such file"
    assert diff.extra["pkg/sub"].startswith("too broad") and "pkg/sub/deep.py" in diff.extra["pkg/sub"]
    assert any("pkg/sub/helper.py -> pkg/util.py" in line for line in diff.lines())

    # a directory that covers only imported files is still reported: code deps are listed as files
    (repo / "pkg" / "sub" / "deep.py").unlink()
    (repo / "pkg" / "sub" / "leaf.py").unlink()
    (diff,) = check(dvc_yaml(repo, ["pkg"]), repo, packages=("pkg",))
    assert "too broad" in diff.extra["pkg"]
    (diff,) = check(dvc_yaml(repo, ["pkg/__init__.py", "pkg/util.py", "pkg/sub"]), repo, packages=("pkg",))
    assert diff.extra == {"pkg/sub": "a directory (list its files instead)"} and not diff.missing


def test_render_prints_pasteable_deps_and_check_exit_codes(repo, capsys):
    path = dvc_yaml(repo, ["pkg/sub", {"cache/data.parquet": {}}])
    text = render(path, repo, packages=("pkg",))
    block = yaml.safe_load(text)["s"]["deps"]
    assert block == ["pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/helper.py", "pkg/util.py",
                     {"cache/data.parquet": {}}]

    args = ["--dvc-yaml", str(path), "--root", str(repo), "--package", "pkg"]
    assert main(args) == 0 and capsys.readouterr().out.strip() == text
    assert main(["--check", *args]) == 1
    assert "s: too broad" in capsys.readouterr().out
    dvc_yaml(repo, block)
    assert main(["--check", *args]) == 0


def test_write_makes_the_deps_exact_and_keeps_the_rest_of_the_file(repo):
    path = dvc_yaml(repo, ["pkg/sub", "cache/data.parquet"])
    path.write_text("# a comment kept\n" + path.read_text())
    assert write(path, repo, packages=("pkg",))
    (diff,) = check(path, repo, packages=("pkg",))
    assert not diff, diff.lines()
    assert path.read_text().startswith("# a comment kept\n")
    assert "cache/data.parquet" in yaml.safe_load(path.read_text())["stages"]["s"]["deps"]
    assert not write(path, repo, packages=("pkg",))  # already exact: untouched
