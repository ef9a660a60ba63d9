"""The package's shape: no import circles, stages that meet only through tables, config as a leaf.

Every import of ``clustermix`` inside ``lib/clustermix`` is read from the source (module level and
inside functions alike; imports under ``if TYPE_CHECKING:`` are for the type checker only and are
left out), so a new circle or a stage reaching into another stage fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

from clustermix import registry

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = LIB / "clustermix"
# the runner and the entry points: they may import stages; nothing below them may import them
RUNNER = {"clustermix.pipeline", "clustermix.refresh", "clustermix.cli"}
REGISTRY = "clustermix.registry"  # read by the runner, the CLI and the report; never by a stage


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules a module imports at run time (``from clustermix import x`` counts as ``x``
    when ``x`` is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clustermix"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clustermix"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at run time."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _runtime_imports(ast.parse(path.read_text(), str(path)), modules)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _stage_modules() -> dict[str, str]:
    """Module -> the stage declared there (a stage's ``run`` names its module)."""
    return {s.run.partition(":")[0]: s.name for s in registry.STAGES}


def test_the_graph_sees_what_the_package_imports():
    graph = import_graph()
    # lazy imports inside functions count: the runner reaches every stage only through the registry
    assert "clustermix.kmeans_dist" in graph["clustermix.assign"]
    assert "clustermix.registry" in graph["clustermix.pipeline"]
    assert set(_stage_modules()) <= set(graph)


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]


def test_a_stage_imports_no_other_stage_and_not_the_runner():
    graph = import_graph()
    stages = _stage_modules()
    wrong = {m: sorted(d for d in graph[m] if d in stages or d in RUNNER or d == REGISTRY) for m in stages}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_nothing_below_the_runner_imports_it():
    graph = import_graph()
    wrong = {m: sorted(d & RUNNER) for m, d in graph.items() if m not in RUNNER and d & RUNNER}
    assert wrong == {}


def test_config_is_a_leaf():
    assert import_graph()["clustermix.config"] == set()
    tree = ast.parse((PACKAGE / "config.py").read_text())
    # also under TYPE_CHECKING: the config knows nothing of the project
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("clustermix")]


def _process_state(source: str) -> list[str]:
    """What in a module's source could hold settings for the whole process: module-level names bound
    to anything but an immutable constant (a str, number, tuple or frozenset of them), ``global``
    statements, and writes to ``os.environ``. Empty for a module of pure functions and values."""

    def immutable(v: ast.AST) -> bool:
        if isinstance(v, ast.Constant):
            return True
        if isinstance(v, ast.Tuple):
            return all(immutable(e) for e in v.elts)
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "frozenset":
            return all(isinstance(a, ast.Set | ast.Tuple | ast.List) and all(immutable(e) for e in a.elts)
                       for a in v.args)
        return False

    def environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    def writes_environ(node: ast.AST) -> bool:
        if isinstance(node, ast.Subscript):
            return isinstance(node.ctx, ast.Store | ast.Del) and environ(node.value)
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and environ(node.func.value)
                and node.func.attr in {"update", "setdefault", "pop", "clear", "__setitem__"})

    tree = ast.parse(source)
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None and not immutable(node.value):
            found.append(f"line {node.lineno}: module-level {ast.unparse(node).splitlines()[0]}")
        elif isinstance(node, ast.AnnAssign) and node.value is None:
            found.append(f"line {node.lineno}: module-level {ast.unparse(node)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
        elif writes_environ(node):
            found.append(f"line {node.lineno}: writes os.environ")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "putenv":
            found.append(f"line {node.lineno}: os.putenv")
    return found


def test_storage_settings_are_passed_never_process_state():
    """Object-store settings are a value (``S3Settings``, carried by a ``Lake``, passed as ``s3=``):
    :mod:`clustermix.storage` keeps nothing for the process and exports nothing into the environment,
    and nothing in the package sets them globally or writes AWS variables into ``os.environ``."""
    from clustermix import storage

    assert _process_state((PACKAGE / "storage.py").read_text()) == []
    for gone in ("configure", "apply_env", "settings_for", "_state", "_lock"):
        assert not hasattr(storage, gone), gone
    aws_writes = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.slice, ast.Constant) and str(node.slice.value).startswith("AWS_")
                    and "environ" in ast.unparse(node.value)):
                aws_writes.append(f"{path.name}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"configure", "apply_env"}
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "storage"):
                aws_writes.append(f"{path.name}:{node.lineno}: storage.{node.func.attr}")
    assert aws_writes == []


def test_the_state_finder_finds_planted_globals():
    planted = """
import os, threading
SCHEMES = ("s3://", "s3a://")
CODES = frozenset({"412", "409"})
_lock = threading.Lock()
_state: dict[str, object] = {}
_cfg: object
def configure(cfg):
    global _cfg
    _cfg = cfg
    os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint
    os.environ.update({"AWS_REGION": cfg.region})
"""
    found = _process_state(planted)
    assert [f.split(":")[0] for f in found] == ["line 5", "line 6", "line 7", "line 9", "line 11", "line 12"], found


def test_every_table_has_one_producer_and_every_read_is_written_earlier():
    seen: set[str] = set()
    for stage in registry.STAGES:
        assert set(stage.reads) <= seen or not stage.reads, (stage.name, set(stage.reads) - seen)
        seen |= set(stage.writes)
    for table in registry.tables():
        assert registry.producer(table).name in registry.ORDER
