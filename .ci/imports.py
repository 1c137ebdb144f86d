"""The import graph of the `shufflefs` package, checked against docs/DESIGN.md's module table.

    python .ci/imports.py          # prints each module's imports, import circles, rule breaks

A module's imports are every `import` in it, at the top or inside a function: a deferred import
is still a dependency (it only hides a circle until the code path runs). Modules are named as
in the table: `cli`, `fuse/session`, `stores` (the package and every store in it).
Third-party packages are named by their top-level name; the standard library is left out.
"""

from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "shufflefs")
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")
#: modules merged into one row of the table
GROUPS = ("stores", "testing")
#: the package's own files, not in the table: a version string, a docstring, `python -m`
PACKAGE_FILES = ("__init__", "fuse", "__main__")


def module_name(path: str) -> str:
    relative = os.path.relpath(path, PACKAGE)[:-3].removesuffix("/__init__").removesuffix("__init__")
    for group in GROUPS:
        if relative == group or relative.startswith(group + "/"):
            return group
    return relative or "__init__"


def _target(dotted: str) -> str | None:
    """'shufflefs.fuse.session' -> 'fuse/session'; a name inside a module -> that module."""
    parts = dotted.split(".")[1:]
    while parts:
        path = os.path.join(PACKAGE, *parts)
        if os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py")):
            return module_name(path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__init__.py"))
        parts.pop()
    return None


def imports(path: str) -> set[str]:
    """What the module at `path` imports: package modules and third-party top-level names."""
    found: set[str] = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "shufflefs":
                target = _target(name)
                if target is not None:
                    found.add(target)
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def graph() -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for directory, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = module_name(path)
                result.setdefault(module, set()).update(imports(path))
    for module, targets in result.items():
        targets.discard(module)
        targets.difference_update(("__init__", "fuse"))
    return result


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle among package modules (one per strongly connected group)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def table() -> dict[str, set[str]]:
    """DESIGN.md's module table: module -> what it may import ('—': nothing)."""
    rules = {}
    with open(DESIGN) as f:
        for line in f:
            match = re.match(r"\| `([\w/]+?)(?:\.py|/)?` \|.*\| ([^|]*) \|\s*$", line)
            if match:
                allowed = match.group(2).strip()
                rules[match.group(1)] = set() if allowed == "—" else {a.strip() for a in allowed.split(",")}
    return rules


def violations(edges: dict[str, set[str]], rules: dict[str, set[str]]) -> list[str]:
    problems = []
    for module in sorted(edges):
        if module in PACKAGE_FILES:
            continue
        if module not in rules:
            problems.append(f"{module}: not in docs/DESIGN.md's module table")
            continue
        extra = edges[module] - rules[module]
        if extra:
            problems.append(f"{module} imports {', '.join(sorted(extra))}: not allowed by docs/DESIGN.md")
    for module in sorted(set(rules) - set(edges)):
        problems.append(f"{module}: in docs/DESIGN.md's module table, but no such module")
    return problems


def main() -> int:
    edges = graph()
    for module in sorted(edges):
        print(f"{module}: {', '.join(sorted(edges[module])) or '—'}")
    problems = [f"import circle: {' -> '.join(group)}" for group in circles(edges)]
    problems += violations(edges, table())
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
