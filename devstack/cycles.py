"""The lint step's check that no modules import each other in a loop: `python -m devstack.cycles`.

Every import counts, wherever it stands (inside a function, under TYPE_CHECKING): a loop of
imports is a loop of meaning, however it is spelled. Exit 1 with a line per circle, naming
each import that closes it; 0 and one line when there is none. Standard library only.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOTS = ("etcd_compute", "md_server", "devstack", "bench")


def modules(repo: Path, roots: Iterable[str] = ROOTS) -> dict[str, Path]:
    """Module name -> file, for every .py file under the roots (a package is its __init__)."""
    found = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The modules of `known` that module `name` imports, each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name: the nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected parts of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def report(repo: Path, roots: Iterable[str] = ROOTS) -> list[str]:
    """A line per circle, with the imports that tie it (module:line -> module)."""
    known = modules(repo, roots)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    lines = []
    for part in circles(graph):
        ties = [f"{a}:{graph[a][b]} -> {b}" for a in part for b in sorted(graph[a]) if b in part]
        lines.append(f"circle of {len(part)} modules: {', '.join(ties)}")
    return lines


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    lines = report(repo)
    for line in lines:
        print(line)
    print(f"import circles: {len(lines)} ({', '.join(ROOTS)}: {len(modules(repo))} modules)")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
