"""Exact code dependencies of each DVC stage, from a static import closure (nothing is imported or run).

A stage ``cmd: python -m pipeline.X ...`` runs every repository module that ``pipeline.X`` imports, directly
or not. This walks the AST of each such module and follows every import of a repository package
(``vidtag``, ``pipeline``), including:

- imports inside functions, methods and ``try`` blocks (they run when the function does: counted);
- ``from pkg import name`` where ``name`` is a submodule (``from vidtag import features``);
- relative imports (``from .store import x``, ``from .. import geo``);
- ``importlib.import_module("vidtag.x")`` / ``__import__("vidtag.x")`` with a literal name;
- lazy PEP 562 exports: when a module has a module-level ``__getattr__`` and a ``{"Name": "submodule"}``
  dict literal, ``from pkg import Name`` (or ``pkg.Name`` after ``import pkg``) counts ``pkg/submodule.py``
  only, and ``from pkg import *`` counts them all;
- the ``__init__.py`` of every package on the way: importing ``vidtag.features.store`` runs
  ``vidtag/__init__.py`` and ``vidtag/features/__init__.py`` first.

Imports under ``if TYPE_CHECKING:`` are ignored (never run); their ``else:`` branch is followed.
The closure over-approximates where Python may not import (``from pkg import name`` also counts
``pkg/name.py`` when it exists; a literal import inside a lazy ``__getattr__`` always counts), which is the
safe side for a dependency list. Not seen: imports built from computed strings other than the PEP 562 form
above, and ``exec``.

Usage::

    python -m pipeline.deps            # per stage, the deps block to paste into dvc.yaml
    python -m pipeline.deps --check    # exit 1, listing how dvc.yaml's code deps differ from the closure

Code deps in dvc.yaml are listed as files. A dep is "code" when it lies under a repository package
(``vidtag/``, ``pipeline/``) and is a ``.py`` file or a directory; everything else (``cache/...``, data
files) is left alone by the check.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vidtag", "pipeline")  # top-level repository packages whose files are code deps


# --------------------------------------------------------------------------- import closure


@dataclass
class _Module:
    """What one file imports, and the lazy (PEP 562) names it resolves on first access."""

    imports: set[str]  # absolute names of every module it may import, ours or not
    names: set[tuple[str, str, bool]]  # (module, name, by from-import) it takes from other modules
    lazy: dict[str, str] | None  # with a module-level __getattr__: name -> module, from its str->str dict literals
    defined: set[str]  # module-level names (these never reach __getattr__)


class _Finder:
    """Resolves module names to files under ``root`` and reads what each file imports."""

    def __init__(self, root: Path, packages: Iterable[str]):
        self.root = Path(root)
        self.packages = frozenset(packages)
        self._files: dict[str, tuple[Path, bool] | None] = {}
        self._parsed: dict[str, _Module | None] = {}

    def module_file(self, name: str) -> tuple[Path, bool] | None:
        """``(path, is_package)`` of a repository module, or None (not ours, or no such file)."""
        if name in self._files:
            return self._files[name]
        parts = name.split(".")
        found = None
        if parts[0] in self.packages and all(p.isidentifier() for p in parts):
            base = self.root.joinpath(*parts)
            if (base / "__init__.py").is_file():
                found = (base / "__init__.py", True)
            elif base.with_name(parts[-1] + ".py").is_file():
                found = (base.with_name(parts[-1] + ".py"), False)
        self._files[name] = found
        return found

    def parse(self, name: str) -> _Module | None:
        if name not in self._parsed:
            hit = self.module_file(name)
            self._parsed[name] = None if hit is None else _parse(name, *hit)
        return self._parsed[name]

    def imports(self, name: str) -> set[str]:
        """Every module that importing ``name`` may import: its import statements, submodules taken with
        ``from pkg import sub``, and the submodules a lazy ``__getattr__`` loads for the names it takes."""
        mod = self.parse(name)
        if mod is None:
            return set()
        out = set(mod.imports)
        for src, attr, from_import in mod.names:
            if from_import and attr != "*" and self.module_file(f"{src}.{attr}") is not None:
                out.add(f"{src}.{attr}")  # `from vidtag import features`
                continue
            other = self.parse(src)
            if other is None or other.lazy is None:
                continue
            if attr == "*":
                wanted = list(other.lazy) if from_import else []
            else:
                wanted = [attr] if attr not in other.defined else []
            for w in wanted:
                target = other.lazy.get(w)
                for cand in (f"{src}.{target}", f"{src.rpartition('.')[0]}.{target}", target) if target else ():
                    if self.module_file(cand) is not None:
                        out.add(cand)
                        break
        return out


def _parse(name: str, path: Path, is_package: bool) -> _Module:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    visitor = _ImportVisitor(name if is_package else name.rpartition(".")[0])
    visitor.visit(tree)
    defined: set[str] = set()
    lazy: dict[str, str] = {}
    has_getattr = False
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(stmt.name)
            has_getattr |= stmt.name == "__getattr__"
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in stmt.names if a.name != "*")
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            defined.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
            d = stmt.value
            if isinstance(d, ast.Dict) and all(
                    isinstance(x, ast.Constant) and isinstance(x.value, str) for x in [*d.keys, *d.values]):
                lazy.update({k.value: v.value for k, v in zip(d.keys, d.values)})
    return _Module(visitor.found, visitor.names, lazy if has_getattr else None, defined)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, package: str):
        self.package = package
        self.found: set[str] = set()
        self.names: set[tuple[str, str, bool]] = set()
        self.aliases: dict[str, str] = {}  # local name -> module it may be bound to (scopes merged)
        self.attributes: list[list[str]] = []  # dotted chains `a.b.c` read in the code

    def visit_Module(self, node: ast.Module) -> None:
        self.generic_visit(node)
        for chain in self.attributes:  # `import vidtag.train as t; t.train_phase1`: a lazy name, maybe
            if chain[0] in self.aliases:
                full = self.aliases[chain[0]].split(".") + chain[1:]
                for i in range(len(self.aliases[chain[0]].split(".")), len(full)):
                    self.names.add((".".join(full[:i]), full[i], False))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:  # `if TYPE_CHECKING: ... else: <runs>`
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.add(alias.name)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".") if self.package else []
            if node.level - 1 > len(parts) or not parts:
                return  # beyond the top-level package: an ImportError at run time
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        if not target:
            return
        self.found.add(target)
        for alias in node.names:
            self.names.add((target, alias.name, True))
            if alias.name != "*":
                self.aliases[alias.asname or alias.name] = f"{target}.{alias.name}"  # a module, or not: harmless

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name):
            self.attributes.append([value.id, *chain[::-1]])
        else:
            self.visit(value)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if (fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            self.found.add(node.args[0].value)
        self.generic_visit(node)


def _walk(modules: Iterable[str], root: Path, packages: Iterable[str], run_as_main: bool) -> dict[str, str | None]:
    """Breadth-first: repository file -> the file whose import first reached it (None for the entry modules)."""
    finder = _Finder(root, packages)
    seen: set[str] = set()  # module names already queued
    parent: dict[str, str | None] = {}
    todo: deque[tuple[str, str | None]] = deque()

    def add(name: str, by: str | None) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # every package on the way runs its __init__.py
            sub = ".".join(parts[:i])
            if sub not in seen:
                seen.add(sub)
                todo.append((sub, by))

    for m in modules:
        add(m, None)
        hit = finder.module_file(m)
        if run_as_main and hit is not None and hit[1]:
            add(f"{m}.__main__", None)  # `python -m pkg` runs pkg/__main__.py (skipped below if there is none)
    while todo:
        name, by = todo.popleft()
        hit = finder.module_file(name)
        if hit is None:
            continue  # not ours (stdlib, third party) or a namespace package without __init__.py
        rel = hit[0].relative_to(root).as_posix()
        parent.setdefault(rel, by)
        for imported in sorted(finder.imports(name)):
            if imported.split(".")[0] in finder.packages:
                add(imported, rel)
    return parent


def import_closure(modules: Iterable[str], root: str | Path = REPO, packages: Iterable[str] = PACKAGES,
                   run_as_main: bool = True) -> list[str]:
    """Sorted repository files (posix, relative to ``root``) that running/importing ``modules`` executes.

    ``run_as_main``: a package among ``modules`` is run like ``python -m pkg`` (its ``__main__.py`` counts).
    """
    return sorted(_walk(modules, Path(root), packages, run_as_main))


def import_chains(modules: Iterable[str], root: str | Path = REPO, packages: Iterable[str] = PACKAGES,
                  run_as_main: bool = True) -> dict[str, list[str]]:
    """Each file of the closure -> a shortest chain of files importing it, from an entry module to the file."""
    parent = _walk(modules, Path(root), packages, run_as_main)
    chains = {}
    for f in parent:
        chain = [f]
        while parent[chain[-1]] is not None:
            chain.append(parent[chain[-1]])
        chains[f] = chain[::-1]
    return dict(sorted(chains.items()))


# --------------------------------------------------------------------------- dvc.yaml


def load_stages(dvc_yaml: str | Path = REPO / "dvc.yaml") -> dict[str, dict]:
    """Stage name -> stage dict (``foreach``/``matrix`` stages: their ``do`` body)."""
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    return {name: (s.get("do", s) if isinstance(s, dict) else {}) for name, s in stages.items()}


def stage_modules(stage: dict) -> list[str]:
    """Python modules a stage's ``cmd`` runs: ``python -m pkg.mod`` or ``python pkg/mod.py``."""
    cmds = stage.get("cmd") or []
    out: list[str] = []
    for cmd in [cmds] if isinstance(cmds, str) else cmds:
        for part in str(cmd).replace("&&", ";").split(";"):
            argv = shlex.split(part)
            if not argv or not Path(argv[0]).name.startswith("python"):
                continue
            for i, a in enumerate(argv[1:], 1):
                if a == "-m" and i + 1 < len(argv):
                    out.append(argv[i + 1])
                    break
                if a.startswith("-m") and len(a) > 2:
                    out.append(a[2:])
                    break
                if a.endswith(".py") and not a.startswith("-"):
                    out.append(a[:-3].replace("/", ".").lstrip("."))
                    break
                if a == "-c" or not a.startswith("-"):
                    break
    return out


def _dep_path(dep) -> str:
    p = next(iter(dep)) if isinstance(dep, dict) else str(dep)
    while p.startswith("./"):
        p = p[2:]
    return p.rstrip("/")


def stage_deps(stage: dict) -> list[str]:
    return [_dep_path(d) for d in stage.get("deps") or []]


def is_code_dep(dep: str, root: str | Path = REPO, packages: Iterable[str] = PACKAGES) -> bool:
    """A ``.py`` file or a directory under a repository package; other files there (data) are not code."""
    if dep.split("/")[0] not in set(packages):
        return False
    return dep.endswith(".py") or (Path(root) / dep).is_dir() or "." not in Path(dep).name


def covers(dep: str, file: str) -> bool:
    return dep in (".", "") or file == dep or file.startswith(dep + "/")


@dataclass
class StageDiff:
    """How one stage's code deps differ from its import closure."""

    stage: str
    closure: list[str]
    missing: list[str] = field(default_factory=list)  # imported, covered by no dep
    extra: dict[str, str] = field(default_factory=dict)  # code dep -> why it is wrong
    chains: dict[str, list[str]] = field(default_factory=dict)  # imported file -> how the stage imports it

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra)

    def why(self, file: str) -> str:
        return " -> ".join(self.chains.get(file, [file]))

    def lines(self) -> list[str]:
        out = [f"{self.stage}: missing {f} (covered by no dep; imported via {self.why(f)})" for f in self.missing]
        return out + [f"{self.stage}: {why}: {d}" for d, why in self.extra.items()]


def stage_closures(dvc_yaml: str | Path = REPO / "dvc.yaml", root: str | Path = REPO,
                   packages: Iterable[str] = PACKAGES) -> dict[str, list[str]]:
    """Stage name -> sorted repository files its command imports (stages not running Python: ``[]``)."""
    return {name: import_closure(stage_modules(s), root, packages) for name, s in load_stages(dvc_yaml).items()}


def check(dvc_yaml: str | Path = REPO / "dvc.yaml", root: str | Path = REPO,
          packages: Iterable[str] = PACKAGES) -> list[StageDiff]:
    """One StageDiff per stage; a false one means its code deps are exactly the files it imports."""
    root = Path(root)
    packages = tuple(packages)
    diffs = []
    for name, stage in load_stages(dvc_yaml).items():
        chains = import_chains(stage_modules(stage), root, packages)
        closure = list(chains)
        deps = stage_deps(stage)
        diff = StageDiff(name, closure, missing=[f for f in closure if not any(covers(d, f) for d in deps)],
                         chains=chains)
        imported = set(closure)
        for d in deps:
            if not is_code_dep(d, root, packages):
                continue
            if d.endswith(".py"):
                if d not in imported:
                    diff.extra[d] = "not imported" if (root / d).is_file() else "no such file"
                continue
            under = sorted(p.relative_to(root).as_posix() for p in (root / d).rglob("*.py")
                           if "__pycache__" not in p.parts) if (root / d).is_dir() else []
            unused = [f for f in under if f not in imported]
            if unused:
                diff.extra[d] = f"too broad (covers {len(unused)} file(s) not imported: {', '.join(unused)})"
            elif not under:
                diff.extra[d] = "no such directory (or no .py files in it)"
            else:
                diff.extra[d] = "a directory (list its files instead)"
        diffs.append(diff)
    return diffs


def render(dvc_yaml: str | Path = REPO / "dvc.yaml", root: str | Path = REPO,
           packages: Iterable[str] = PACKAGES, stages: Iterable[str] | None = None) -> str:
    """The ``deps:`` block of each stage, ready to paste into dvc.yaml: code files first, then its other deps."""
    wanted = set(stages) if stages else None
    out = ["# python -m pipeline.deps: each stage's deps, code files from the import closure"]
    for name, stage in load_stages(dvc_yaml).items():
        if wanted is not None and name not in wanted:
            continue
        closure = import_closure(stage_modules(stage), root, packages)
        other = [d for d in stage.get("deps") or [] if not is_code_dep(_dep_path(d), root, packages)]
        out += [f"  {name}:", "    deps:"]
        out += [f"      - {f}" for f in closure]
        for d in other:
            dumped = yaml.safe_dump([d], default_flow_style=False, sort_keys=False).rstrip("\n").splitlines()
            out += ["      " + dumped[0]] + ["      " + ln for ln in dumped[1:]]
    return "\n".join(out)


def write(dvc_yaml: str | Path = REPO / "dvc.yaml", root: str | Path = REPO, packages: Iterable[str] = PACKAGES) -> bool:
    """Rewrite each stage's ``deps:`` list in ``dvc_yaml`` in place from the import closure (comments and
    everything else kept, the file's own indentation followed; written atomically). True when it changed."""
    from vidtag.io import atomic_path

    path = Path(dvc_yaml)
    text = path.read_text()
    stages = load_stages(path)
    lines, out, stage, i = text.splitlines(), [], None, 0

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        key = line.strip().split(":")[0]
        if line.rstrip().endswith(":") and key in stages and indent(line) <= 2:
            stage = key
        if stage is None or line.strip() != "deps:":
            continue
        base, items = indent(line), []
        while i < len(lines) and lines[i].strip() and (indent(lines[i]) > base or lines[i].lstrip().startswith("- ")):
            items.append(lines[i])
            i += 1
        pad = " " * (indent(items[0]) if items else base + 2)
        rendered = render(path, root, packages, stages=[stage]).splitlines()
        block = rendered[rendered.index("    deps:") + 1:]
        out.extend(pad + ln[6:] for ln in block)
        stage = None
    new = "\n".join(out) + "\n"
    if new == text:
        return False
    with atomic_path(path) as tmp:
        Path(tmp).write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.deps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps differ from the closure")
    ap.add_argument("--dvc-yaml", default=str(REPO / "dvc.yaml"))
    ap.add_argument("--root", default=str(REPO), help="repository root the packages live in")
    ap.add_argument("--package", action="append", help=f"a repository package (repeatable; default {PACKAGES})")
    ap.add_argument("--stage", action="append", help="only this stage (repeatable; printing only)")
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's deps lists in place from the closure")
    args = ap.parse_args(argv)
    packages = tuple(args.package or PACKAGES)
    if args.write:
        changed = write(args.dvc_yaml, args.root, packages)
        print(f"{args.dvc_yaml}: {'deps rewritten' if changed else 'already exact'}")
        return 0
    if not args.check:
        print(render(args.dvc_yaml, args.root, packages, stages=args.stage))
        return 0
    diffs = [d for d in check(args.dvc_yaml, args.root, packages) if d]
    for d in diffs:
        for line in d.lines():
            print(line)
    if diffs:
        print(f"\n{len(diffs)} stage(s) differ; `python -m pipeline.deps` prints the deps to paste into dvc.yaml",
              file=sys.stderr)
        return 1
    print("dvc.yaml code deps match every stage's import closure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
