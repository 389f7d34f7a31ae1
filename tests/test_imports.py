"""The dependency direction of DESIGN.md, checked on the source: every import of a vllm_lab module, also the
ones inside functions (a circle hidden in a function is still a circle), except under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LIB = Path(__file__).resolve().parents[1] / "lib" / "vllm_lab"
# what uses the engines: an engine module never imports these (nor spec, which asks the engines)
ABOVE_ENGINES = {"spec", "launcher", "probe", "search", "load", "steps", "batch", "cli", "report", "ray_exec"}


def _name(path: Path) -> str:
    parts = path.relative_to(LIB).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(LIB.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _resolve(dotted: str) -> str | None:
    """vllm_lab.a.b -> "a.b" when that is a module here, else its package ("a"); None outside vllm_lab."""
    if dotted != "vllm_lab" and not dotted.startswith("vllm_lab."):
        return None
    name = dotted.removeprefix("vllm_lab").lstrip(".")
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path) -> set[str]:
    """Every vllm_lab module this file imports, at the top or inside a function."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(r for a in node.names if (r := _resolve(a.name)) is not None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = _resolve(node.module)
            if base is not None:
                for a in node.names:  # `from vllm_lab.engines import vllm_log`: the submodule
                    sub = _resolve(f"{node.module}.{a.name}")
                    out.add(sub if sub and sub != base and sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out - {"", _name(path)}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_sees_function_level_imports():
    assert "engines" in GRAPH["spec"]  # at the top
    assert {"engines.vllm", "logscan"} <= GRAPH["engines"]
    assert "engines.vllm_log" in GRAPH["engines.vllm"]
    assert "spec" not in GRAPH["engines.base"]  # only under TYPE_CHECKING there


def test_engines_never_import_what_uses_them():
    bad = {
        (m, dep)
        for m, deps in GRAPH.items()
        if _top(m) == "engines"
        for dep in deps
        if _top(dep) in ABOVE_ENGINES
    }
    assert not bad, f"an engine module imports a module above the engines: {sorted(bad)}"


def test_spec_imports_nothing_above_it():
    # the trial's own needs: its errors, command analysis, and the engines that validate it
    assert GRAPH["spec"] <= {"errors", "commands", "engines", "load_spec"}, GRAPH["spec"]


def test_commands_and_errors_sit_at_the_bottom():
    assert GRAPH["errors"] == set()
    assert GRAPH["commands"] <= {"errors"}
    assert GRAPH["logscan"] == set()  # the scanning machinery knows no engine and no trial
    assert GRAPH["load_spec"] <= {"errors"}  # a load's parameters: spec checks them with the trial


def test_load_never_calls_back_into_probe():
    assert "probe" not in GRAPH["load"] and "launcher" not in GRAPH["load"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_circles_among_lib_modules():
    # a package's __init__ importing its own submodules is how a registry is built, not a circle
    graph = {m: {d for d in deps if not (m and d.startswith(m + "."))} for m, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh set of modules: an import-order circle fails here."""
    names = [f"vllm_lab.{m}" if m else "vllm_lab" for m in MODULES if not m.startswith("testing")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'vllm_lab' or m.startswith('vllm_lab.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
