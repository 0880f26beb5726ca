"""The package's import structure: no cycles, and the front end / engine core layering.

Every module under pagedserve/ is parsed with ``ast`` (nothing is imported). An edge
``a -> b`` means module ``a`` imports pagedserve module ``b`` when ``a`` itself is imported:
a statement of the module body, including those under ``if``/``try``/``with`` and in class
bodies, but not inside functions (lazy imports are allowed) nor under ``if TYPE_CHECKING:``.
``import a.b.c`` and ``from a.b import c`` (c a module) are edges to ``a.b.c``;
``from a.b import name`` is an edge to ``a.b``.

Rules:
1. No import cycle among pagedserve modules.
2. Front-end modules (the API server and client processes) do not load model code on
   import: nothing in ``FORBIDDEN_FOR_FRONT_END`` may be reached from them through
   module-level imports (directly or through other modules, parent packages' __init__
   included, since Python runs those too).
3. The engine-core side (``ENGINE_CORE_SIDE``) never imports the engine front end or the
   entrypoints, not even lazily inside a function.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = "pagedserve"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
REPO_ROOT = PACKAGE_DIR.parent

FRONT_END = (
    "pagedserve.entrypoints",
    "pagedserve.transformers_utils",
    "pagedserve.engine.arg_utils",
    "pagedserve.engine.async_llm",
    "pagedserve.engine.llm_engine",
    "pagedserve.engine.llm",
    "pagedserve.engine.input_processor",
    "pagedserve.engine.output_processor",
    "pagedserve.engine.detokenizer",
    "pagedserve.engine.core_client",
    "pagedserve.engine.messages",
)
FORBIDDEN_FOR_FRONT_END = (
    "pagedserve.models",
    "pagedserve.worker",
    "pagedserve.attention",
    "pagedserve.layers",
)
ENGINE_CORE_SIDE = (
    "pagedserve.worker",
    "pagedserve.models",
    "pagedserve.attention",
    "pagedserve.layers",
    "pagedserve.core",
)
FORBIDDEN_FOR_ENGINE_CORE_SIDE = (
    "pagedserve.engine",
    "pagedserve.entrypoints",
)


def in_any(module: str, prefixes: tuple[str, ...]) -> bool:
    """``module`` is one of ``prefixes`` or inside one of those packages."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Import:
    target: str  # a pagedserve module
    path: str  # the importing file, relative to the repository root
    line: int
    module_level: bool  # runs when the importing module is imported

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def all_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "__pycache__" not in path.parts:
            modules[module_name(path)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, with whether it runs on import."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, module_level))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(tree, True)
    return found


def resolve(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The pagedserve modules an import statement names (others are dropped)."""
    modules = all_modules()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            names.append(submodule if submodule in modules else source)
    targets = []
    for name in names:
        # `import pagedserve.a.b` of a name that is no file: the deepest module it names.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name not in targets:
            targets.append(name)
    return targets


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = all_modules()[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = str(path.relative_to(REPO_ROOT))
    result = []
    for node, module_level in import_nodes(tree):
        for target in resolve(node, module, path.name == "__init__.py"):
            if target != module:
                result.append(Import(target, rel, node.lineno, module_level))
    return tuple(result)


def module_level_edges(module: str) -> dict[str, Import]:
    """{imported module: the first statement importing it} for imports that run on import."""
    edges: dict[str, Import] = {}
    for imp in imports_of(module):
        if imp.module_level:
            edges.setdefault(imp.target, imp)
    return edges


def parent_packages(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def format_chain(chain: list[tuple[str, Import | None]]) -> str:
    """`a` then `-> b (file:line)` lines; an edge without an Import is a parent package."""
    lines = [f"      {chain[0][0]}"]
    for module, imp in chain[1:]:
        how = imp.where() if imp is not None else "parent package, runs first"
        lines.append(f"        -> {module}  ({how})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- cycles
def strongly_connected_components(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph has a few hundred nodes)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def shortest_cycle_through(start: str, graph: dict[str, list[str]], within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected component."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in graph[node]:
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")


def test_no_import_cycles() -> None:
    edges = {m: module_level_edges(m) for m in all_modules()}
    graph = {m: sorted(e) for m, e in edges.items()}
    problems = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        cycle = shortest_cycle_through(component[0], graph, set(component))
        chain = [(cycle[0], None)] + [
            (b, edges[a][b]) for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        others = sorted(set(component) - set(cycle))
        note = f"\n      (same cycle group: {', '.join(others)})" if others else ""
        problems.append(format_chain(chain) + note)
    assert not problems, (
        f"{len(problems)} import cycle(s) among pagedserve modules (module-level imports), "
        f"shortest of each:\n"
        + "\n\n".join(problems)
    )


# ------------------------------------------------------------------------- layering
def what_import_loads(module: str) -> dict[str, list[tuple[str, Import | None]]]:
    """Every pagedserve module that ``import module`` runs, with the shortest chain to it."""
    chains: dict[str, list[tuple[str, Import | None]]] = {module: [(module, None)]}
    queue = deque([module])
    while queue:
        current = queue.popleft()
        steps: list[tuple[str, Import | None]] = [(p, None) for p in parent_packages(current)]
        steps += list(module_level_edges(current).items())
        for target, imp in steps:
            if target not in chains:
                chains[target] = [*chains[current], (target, imp)]
                queue.append(target)
    return chains


def test_front_end_does_not_load_model_code() -> None:
    front_end = [m for m in all_modules() if in_any(m, FRONT_END)]
    assert front_end, "no front-end module found"
    # Grouped by the import that first enters model code, as one such import usually
    # drags in many front-end modules.
    by_entry: dict[tuple[str, str, str], list[str]] = {}
    example: dict[tuple[str, str, str], list[tuple[str, Import | None]]] = {}
    for module in sorted(front_end):
        loaded = what_import_loads(module)
        hits = [m for m in loaded if in_any(m, FORBIDDEN_FOR_FRONT_END)]
        if not hits:
            continue
        chain = loaded[min(hits, key=lambda m: (len(loaded[m]), m))]
        (importer, _), (target, imp) = chain[-2], chain[-1]
        entry = (importer, target, imp.where() if imp is not None else "parent package")
        by_entry.setdefault(entry, []).append(module)
        if entry not in example or len(chain) < len(example[entry]):
            example[entry] = chain
    problems = [
        f"  {importer} -> {target}  ({where})\n"
        f"    loaded on import by {len(modules)} front-end module(s): {', '.join(modules)}\n"
        f"    shortest chain:\n{format_chain(example[(importer, target, where)])}"
        for (importer, target, where), modules in sorted(by_entry.items())
    ]
    assert not problems, (
        f"front-end modules load model code ({', '.join(FORBIDDEN_FOR_FRONT_END)}) on "
        f"import, through {len(problems)} import(s):\n" + "\n\n".join(problems)
    )


def test_engine_core_side_never_imports_the_front_end() -> None:
    problems = []
    for module in sorted(m for m in all_modules() if in_any(m, ENGINE_CORE_SIDE)):
        for imp in imports_of(module):
            if in_any(imp.target, FORBIDDEN_FOR_ENGINE_CORE_SIDE):
                kind = "" if imp.module_level else " [inside a function or TYPE_CHECKING]"
                problems.append(f"    {module} -> {imp.target}  ({imp.where()}){kind}")
    assert not problems, (
        f"{len(problems)} import(s) from the engine-core side into "
        f"{' / '.join(FORBIDDEN_FOR_ENGINE_CORE_SIDE)}:\n" + "\n".join(problems)
    )


def test_front_end_imports_really_load_no_model_code() -> None:
    """The same rule, measured: import every front-end module in a fresh interpreter."""
    import subprocess
    import sys

    front_end = sorted(m for m in all_modules() if in_any(m, FRONT_END))
    script = (
        "import importlib, sys\n"
        f"for name in {front_end!r}:\n"
        "    importlib.import_module(name)\n"
        f"prefixes = {FORBIDDEN_FOR_FRONT_END!r}\n"
        "print(' '.join(sorted(m for m in sys.modules\n"
        "                      if any(m == p or m.startswith(p + '.') for p in prefixes))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert not loaded, f"importing the front-end modules loaded: {', '.join(loaded)}"


# ------------------------------------------------------------- the checker itself
def test_the_graph_sees_known_edges() -> None:
    """Guards the parser: a few imports that exist must be found, and lazies skipped."""
    assert "pagedserve.core.block_pool" in module_level_edges("pagedserve.core.kv_cache_manager")
    # pagedserve/__init__.py imports the engine only lazily (in __getattr__ / TYPE_CHECKING).
    top = module_level_edges("pagedserve")
    assert "pagedserve.sampling_params" in top
    assert not any(m.startswith("pagedserve.engine") for m in top)
    lazy = [i for i in imports_of("pagedserve") if not i.module_level]
    assert any(i.target == "pagedserve.engine.llm" for i in lazy)
