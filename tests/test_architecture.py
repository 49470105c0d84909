"""The house's shape is tested too: import floors (import-linter contracts in pyproject.toml), no
import cycle among dataprune modules (imports inside functions included), no module over 400 lines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dataprune"
MAX_LINES = 400


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """import-linter's command, run by this interpreter on the tree at ``cwd`` (first on the path)."""
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(cwd)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_contracts_catch_an_upward_import_hidden_inside_a_function(tmp_path):
    """A copy of the package with one low module importing the CLI inside a function: the contract breaks."""
    shutil.copytree(PKG, tmp_path / "dataprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    tables = tmp_path / "dataprune" / "tables.py"
    tables.write_text(tables.read_text() + "\n\ndef _sneaky():\n    from .cli import app\n    return app\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and "dataprune.tables" in r.stdout and "dataprune.cli" in r.stdout


def test_every_module_sits_on_a_floor():
    """A new top-level module must be given its floor in pyproject.toml, or the contract would not see it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    top = next(c for c in contracts if c["containers"] == ["dataprune"])
    named = {m.strip() for layer in top["layers"] for m in layer.split("|")}
    present = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert present - named == set(), f"modules without a floor in pyproject.toml: {sorted(present - named)}"
    assert named - present == set(), f"floors naming no module: {sorted(named - present)}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph.get(w, ())))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_dataprune_modules():
    import grimp  # installed with import-linter (the test extra)

    g = grimp.build_graph("dataprune", cache_dir=None)
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycles(graph) == []


def test_no_module_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    over = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
    assert len(sizes) > 20  # the walk saw the package

