"""Measure the package's import structure: cycles, function-local imports, module sizes.

`python scripts/import_graph.py` prints the figures issue #12 tracks; `--strict` exits 1 if there is
a cycle or an undocumented function-local import of our own modules (one whose line, or the line
before it, carries no comment).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "auditor"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        prefix = ".".join(base)
        target = f"{prefix}.{node.module}" if node.module else prefix
    else:
        target = node.module or ""
    # `from auditor import verify` imports a module, `from auditor.x import name` a name.
    return [f"{target}.{a.name}" for a in node.names] + [target]


def scan(
    root: Path, type_checking_edges: bool = False,
) -> tuple[dict[str, set[str]], list[tuple[str, int, str, bool]], dict[str, int]]:
    modules = {
        _module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))
    }
    graph: dict[str, set[str]] = defaultdict(set)
    local: list[tuple[str, int, str, bool]] = []
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules.items()}
    for mod, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        is_pkg = path.name == "__init__.py"
        type_checking: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for sub in ast.walk(node):
                    type_checking.add(id(sub))
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    in_function.add(id(sub))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if id(node) in type_checking and not type_checking_edges:
                continue
            targets = [t for t in _resolve(mod, node, is_pkg) if t in modules and t != mod]
            if not targets:
                continue
            # `from auditor import a, b` imports the modules a and b, not the package.
            named = [t for t in targets[:-1] if t in modules] if isinstance(node, ast.ImportFrom) else targets
            for target in named or targets:
                graph[mod].add(target)
                if id(node) in in_function:
                    line = node.lineno
                    commented = "#" in lines[line - 1] or (line >= 2 and lines[line - 2].strip().startswith("#"))
                    local.append((mod, line, target, commented))
    return graph, local, sizes


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--type-checking", action="store_true",
                        help="count imports under `if TYPE_CHECKING:` as edges too (cycles a type checker sees)")
    args = parser.parse_args()
    graph, local, sizes = scan(args.root, args.type_checking)
    found = cycles(graph)
    edges = {(m, t) for m, _, t, _ in local}
    bare = [x for x in local if not x[3]]
    largest = max(sizes, key=sizes.__getitem__)
    print(f"modules: {len(sizes)}")
    print(f"import cycles (strongly connected groups): {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    print(f"function-local imports of own modules: {len(local)} ({len(edges)} distinct edges), "
          f"{len(bare)} without a comment")
    for mod, line, target, commented in local:
        print(f"  {mod}:{line} -> {target}{'' if commented else '  (no comment)'}")
    print(f"largest module: {largest} ({sizes[largest]} lines)")
    return 1 if args.strict and (found or bare) else 0


if __name__ == "__main__":
    sys.exit(main())
