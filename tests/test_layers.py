"""The dependency direction of the code, read from the import statements of every file:

    scripts (train.py, test.py, predict.py, demo.py, app.py, export.py, benchmarks/)
        -> engine (utils/)
            -> dataset/ -> models/

``models/`` imports nothing from ``dataset/`` or ``utils/``, ``dataset/`` nothing from
``utils/``, no package anything from a script; and no module imports a project module inside a
function (no hidden edges, no cycles dodged by import order)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "dataset", "utils", "benchmarks")
SCRIPTS = ("train", "test", "predict", "demo", "app", "export")
# package -> the project packages it may import (besides itself)
ALLOWED = {"models": set(), "dataset": {"models"}, "utils": {"models", "dataset"},
           "benchmarks": {"models", "dataset", "utils"}}


def _source_files(package: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _module_name(path: str, root: str = ROOT) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, root: str = ROOT) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import in the file; relative
    imports resolved against the file's package."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    module = _module_name(path, root)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                out.append((name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    wrong = []
    for path in _source_files(package):
        for name, line, _ in _imports(path):
            top = _top(name)
            if top in SCRIPTS or (top in PACKAGES and top != package
                                  and top not in ALLOWED[package]):
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", ("models", "dataset", "utils"))
def test_no_project_imports_inside_functions(package):
    hidden = [f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
              for path in _source_files(package)
              for name, line, in_function in _imports(path)
              if in_function and _top(name) in PACKAGES + SCRIPTS]
    assert not hidden, "project imports inside functions:\n" + "\n".join(hidden)


def test_the_checker_sees_a_wrong_edge(tmp_path):
    """The parser finds relative, absolute and nested imports (so the tests above can fail)."""
    (tmp_path / "models").mkdir()
    probe = tmp_path / "models" / "probe.py"
    probe.write_text("from ..utils import misc\nimport dataset.data\n\ndef f():\n"
                     "    from utils.training import train\n")
    found = _imports(str(probe), str(tmp_path))
    assert [(n, f) for n, _, f in found] == [("utils", False), ("dataset.data", False),
                                             ("utils.training", True)]
