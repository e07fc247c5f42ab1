"""The floor plan, checked: the import contracts in .importlinter hold (nothing imports
upward, values import nothing above them, queue and transport never import each other,
no config loader below it, nothing below imports the applications), and no module of
the package is part of an import cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint_imports() -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (the test extra has it)"
    return subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_import_contract_is_kept():
    r = lint_imports()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "5 kept" in r.stdout, r.stdout[-2000:]


def test_a_forbidden_arrow_breaks_a_contract(tmp_path):
    """The check can fail: a copy of the package where the queue imports a transport."""
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "imsrelay", copy / "imsrelay", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / ".importlinter", copy / ".importlinter")
    manager = copy / "imsrelay" / "queue" / "manager.py"
    manager.write_text(manager.read_text() + "\nfrom imsrelay.transport import maildir  # noqa\n")
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    r = subprocess.run([exe, "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "imsrelay.queue.manager -> imsrelay.transport.maildir" in r.stdout


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("imsrelay")
    assert len(graph.modules) > 100  # the probe sees the package
    assert cycles(graph) == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"a"}}, []),
])
def test_the_cycle_finder_finds_a_cycle(edges, expected):
    graph = grimp.ImportGraph()
    for m in edges:
        graph.add_module(m)
    for m, targets in edges.items():
        for t in targets:
            graph.add_import(importer=m, imported=t)
    assert cycles(graph) == expected
