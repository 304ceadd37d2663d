"""The package layering: dependencies run one way, ``fedlora`` ← ``strategies`` ← ``clients`` ←
``simulations`` ← ``bench``.

- A module may import only its own package and the packages to its left (every import statement counts,
  also the ones inside functions).
- ``fedlora/`` (the core) never imports flwr, statically or at run time.
- ``bench/`` uses no ``_private`` name of another package.
- No source file is over the size limit.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["fedlora", "strategies", "clients", "simulations", "bench"]
MAX_LINES = 450


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every absolute import in ``tree``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def layering_violations(package: str, files: list[Path] | None = None) -> list[str]:
    """Imports in ``package`` of a project package to its right (or of flwr, for the core)."""
    allowed = set(ORDER[: ORDER.index(package) + 1])
    forbidden = (set(ORDER) - allowed) | ({"flwr"} if package == "fedlora" else set())
    bad = []
    for path in files if files is not None else _sources(package):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in _imported_modules(tree):
            top = name.split(".", 1)[0]
            if top in forbidden:
                bad.append(f"{path.name}:{line} imports {name}")
    return sorted(set(bad))


@pytest.mark.parametrize("package", ORDER)
def test_dependencies_run_one_way(package):
    assert layering_violations(package) == []


def test_probe_finds_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from simulations.server_app import run_server\n    import flwr.app\n")
    assert len(layering_violations("strategies", [bad])) == 1  # the function-level import counts
    assert len(layering_violations("fedlora", [bad])) == 2  # and flwr is forbidden in the core


def private_names_used(files: list[Path]) -> list[str]:
    """``_private`` names of other project packages that ``files`` import or reach as attributes."""
    others = tuple(p for p in ORDER if p != "bench")
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in others:
                parts = node.module.split(".")
                names = [a.name for a in node.names]
                if any(p.startswith("_") and not p.startswith("__") for p in parts + names):
                    bad.append(f"{path.name}:{node.lineno} from {node.module} import {', '.join(names)}")
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in others:
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    bad.append(f"{path.name}:{node.lineno} {base.id}.{node.attr}")
    return bad


def test_bench_uses_no_private_names_of_other_packages():
    assert private_names_used(_sources("bench")) == []


def test_private_name_probe(tmp_path):
    bad = tmp_path / "b.py"
    bad.write_text("from simulations.grid import _mean_std\nimport strategies.base as sb\nsb._num(1)\n"
                   "from bench._common import verdict\n")
    assert len(private_names_used([bad])) == 2  # bench's own private module is fine


CORE_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in _sources("fedlora")
)


def test_core_does_not_import_flwr_at_run_time():
    assert "fedlora.privacy.dp_sgd" in CORE_MODULES and "fedlora" in CORE_MODULES  # every core module
    code = (f"import sys\nfor m in {CORE_MODULES!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_probe_detects_flwr_imports():
    code = "import sys, strategies\nprint(any(m == 'flwr' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"  # the same probe sees flwr when a Flower module is imported


def test_no_source_file_over_the_size_limit():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for pkg in ORDER for p in _sources(pkg)
           if (n := len(p.read_text().splitlines())) > MAX_LINES and not p.name.endswith("_test.py")]
    assert big == []


def test_no_exported_name_is_also_a_submodule():
    """``from pkg import name`` must not return the submodule ``pkg/name.py`` once something imported it (a
    function and a module of one name shadow each other depending on import order)."""
    import importlib
    import pkgutil

    clashes = []
    for module in CORE_MODULES + ["strategies"]:
        pkg = importlib.import_module(module)
        if hasattr(pkg, "__path__"):
            subs = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
            clashes += [f"{module}.{n}" for n in sorted(subs & set(getattr(pkg, "__all__", [])))]
    assert clashes == []
