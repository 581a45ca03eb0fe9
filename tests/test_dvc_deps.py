"""Every DVC stage lists, in its ``deps``, each project module it imports (transitively).

A stage ``python -m ardetect.stages.<name>`` runs every module of ``src/ardetect`` it
imports, directly or through other project modules; a change to any of them can
change the stage's outputs, so DVC must see it. The import closure is computed
statically (``ast``): every ``import`` / ``from ... import`` anywhere in a file
(inside functions and ``try`` blocks too), relative imports resolved. Importing
``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``; those count when they
hold code beyond a docstring.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ardetect"
STAGE_CMD = re.compile(r"^python -m (ardetect\.stages\.\w+)\s*$")


def module_file(src: Path, module: str) -> Path | None:
    """The file a dotted module name runs (``pkg/__init__.py`` for a package), if it is in ``src``."""
    base = src.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _package_of(src: Path, path: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]  # a package's __init__ is its own package
    else:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(src: Path, path: Path) -> set[str]:
    """Dotted names of the modules ``path`` imports (anywhere in the file), relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(src, path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    raise ValueError(f"{path}: relative import beyond the top package")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            for alias in node.names:  # `from pkg import mod` imports the submodule pkg.mod when there is one
                if alias.name != "*":
                    found.add(f"{base}.{alias.name}")
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _has_code(path: Path) -> bool:
    """True when a file holds more than an optional docstring (and ``from __future__`` lines)."""
    body = ast.parse(path.read_text()).body
    for stmt in body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            continue
        return True
    return False


def import_closure(src: Path, module: str) -> set[Path]:
    """Files of ``src`` that running ``module`` executes: its own file, every project module it
    imports, transitively, and the ``__init__.py`` of their packages when they hold code."""
    seen_modules: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen_modules:
            continue
        seen_modules.add(name)
        path = module_file(src, name)
        if path is None:  # a name imported from a module (`from x import func`), not a module
            continue
        parts = name.split(".")
        for i in range(1, len(parts)):  # parent packages run first
            todo.append(".".join(parts[:i]))
        if path.name == "__init__.py" and not _has_code(path):
            continue
        files.add(path)
        todo.extend(imported_modules(src, path))
    return files


def _dep_path(dep) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else str(dep)


def _covered(rel: str, deps: list[str]) -> bool:
    rel_path = Path(rel)
    for dep in deps:
        dep_path = Path(dep.rstrip("/"))
        if rel_path == dep_path or dep_path in rel_path.parents:
            return True
    return False


def missing_deps(spec: dict, root: Path) -> dict[str, list[str]]:
    """For each stage of a parsed ``dvc.yaml`` run as ``python -m ardetect.stages.<name>``, the
    modules of its import closure that no dep (a file, or a folder holding it) covers.

    Paths are relative to the repository root (``root``), where the stages run.
    """
    src = root / "src"
    out: dict[str, list[str]] = {}
    for name, stage in (spec.get("stages") or {}).items():
        match = STAGE_CMD.match(str(stage.get("cmd", "")).strip())
        if not match:
            continue
        wdir = Path(stage.get("wdir", "."))
        deps = [(wdir / _dep_path(d)).as_posix() for d in stage.get("deps") or []]
        closure = import_closure(src, match.group(1))
        rels = sorted(p.relative_to(root).as_posix() for p in closure)
        missing = [r for r in rels if not _covered(r, deps)]
        if missing:
            out[name] = missing
    return out


def _spec() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _python_stages(spec: dict) -> list[str]:
    return [n for n, s in spec["stages"].items() if STAGE_CMD.match(str(s.get("cmd", "")).strip())]


def test_dvc_yaml_has_python_stages():
    names = _python_stages(_spec())
    assert names and "tuples" in names and "evaluate" in names


@pytest.mark.parametrize("stage", _python_stages(_spec()))
def test_stage_deps_cover_its_imports(stage):
    missing = missing_deps(_spec(), REPO).get(stage, [])
    assert not missing, f"stage {stage!r} imports modules not in its dvc.yaml deps: {', '.join(missing)}"


def test_planted_missing_dep_is_reported_exactly():
    spec = _spec()
    planted = copy.deepcopy(spec)
    deps = planted["stages"]["tuples"]["deps"]
    deps.remove("src/ardetect/data/figures.py")
    before = missing_deps(spec, REPO).get("tuples", [])
    after = missing_deps(planted, REPO).get("tuples", [])
    assert sorted(set(after) - set(before)) == ["src/ardetect/data/figures.py"]
    assert set(before) <= set(after)


def test_planted_missing_dep_on_an_exact_closure():
    """Deps set to exactly the closure pass; removing any one module reports that module alone."""
    closure = sorted(p.relative_to(REPO).as_posix() for p in import_closure(REPO / "src", "ardetect.stages.world2"))
    spec = {"stages": {"w": {"cmd": "python -m ardetect.stages.world2", "deps": ["data/x", *closure]}}}
    assert missing_deps(spec, REPO) == {}
    for victim in closure:
        planted = copy.deepcopy(spec)
        planted["stages"]["w"]["deps"].remove(victim)
        assert missing_deps(planted, REPO) == {"w": [victim]}, victim


def test_folder_dep_covers_its_modules():
    spec = {"stages": {"t": {"cmd": "python -m ardetect.stages.tuples", "deps": ["src/ardetect"]}}}
    assert missing_deps(spec, REPO) == {}
    spec["stages"]["t"]["deps"] = ["src/ardetect/data"]
    missing = missing_deps(spec, REPO)["t"]
    assert "src/ardetect/stages/tuples.py" in missing and "src/ardetect/config.py" in missing
    assert not any(m.startswith("src/ardetect/data/") for m in missing)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_closure_follows_relative_function_level_and_package_imports(tmp_path):
    src = tmp_path / "src"
    _write(src / "ardetect/__init__.py", '"""Only a docstring."""\n')
    _write(src / "ardetect/stages/__init__.py", '"""Docs."""\nSTAGES = ("a",)\n')  # code: counts
    _write(src / "ardetect/stages/a.py", "from ardetect.lib import thing\n\ndef main():\n    from ..util import helper\n")
    _write(src / "ardetect/lib/__init__.py", '"""Package with code."""\nfrom .impl import thing\n')
    _write(src / "ardetect/lib/impl.py", "import os\ntry:\n    import ardetect.optional\nexcept ImportError:\n    pass\n")
    _write(src / "ardetect/optional.py", "X = 1\n")
    _write(src / "ardetect/util.py", "from . import leaf\n")
    _write(src / "ardetect/leaf.py", "Y = 2\n")
    _write(src / "ardetect/unused.py", "Z = 3\n")
    got = {p.relative_to(src).as_posix() for p in import_closure(src, "ardetect.stages.a")}
    assert got == {
        "ardetect/stages/__init__.py",
        "ardetect/stages/a.py",
        "ardetect/lib/__init__.py",
        "ardetect/lib/impl.py",
        "ardetect/optional.py",
        "ardetect/util.py",
        "ardetect/leaf.py",
    }
    spec = {"stages": {"a": {"cmd": "python -m ardetect.stages.a", "deps": ["src/ardetect/stages", "src/ardetect/lib"]}}}
    assert missing_deps(spec, tmp_path) == {"a": ["src/ardetect/leaf.py", "src/ardetect/optional.py", "src/ardetect/util.py"]}
