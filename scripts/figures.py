#!/usr/bin/env python3
"""Print the code's shape figures: import cycles, process-starting modules, sizes.

The house rules (docs/architecture.md) are: no import cycles among kiln's
modules, function-level imports included; at most two modules start
processes (kiln's tool runner and the helper's); no function over 80 lines;
no module over 500.  This script measures them from the source alone (the
AST, nothing imported), prints one line per figure and exits 1 when a rule
is broken, so the test command can run it.

    python3 scripts/figures.py [--json]
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("builder", "runner", "helper")
MAX_FUNCTION = 80
MAX_MODULE = 500
MAX_SPAWNERS = 2
# Calls and imports that start a process.  `sh` is kiln's tool runner's
# library; the rest are the stdlib's ways to fork or exec.
SPAWN_MODULES = {"subprocess", "sh", "multiprocessing", "pty"}
SPAWN_CALLS = {
    ("os", name)
    for name in (
        "fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen",
        "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
    )
} | {("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell")}


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)
    spawns: list[str] = field(default_factory=list)
    functions: list[tuple[int, str]] = field(default_factory=list)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(mod: str, level: int, target: str | None, is_pkg: bool) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def scan(path: Path) -> Module:
    text = path.read_text()
    tree = ast.parse(text, str(path))
    name = module_name(path)
    mod = Module(name, path, len(text.splitlines()))
    is_pkg = path.name == "__init__.py"
    os_names: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                mod.imports.add(alias.name)
                if alias.name.split(".")[0] in SPAWN_MODULES:
                    mod.spawns.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node.level, node.module, is_pkg)
            if target.split(".")[0] in SPAWN_MODULES:
                mod.spawns.append(f"from {target} import ...")
            for alias in node.names:
                mod.imports.add(f"{target}.{alias.name}")
                if (target, alias.name) in SPAWN_CALLS:
                    os_names[alias.asname or alias.name] = (target, alias.name)
                    mod.spawns.append(f"{target}.{alias.name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            value = node.func.value
            if isinstance(value, ast.Name) and (value.id, node.func.attr) in SPAWN_CALLS:
                mod.spawns.append(f"{value.id}.{node.func.attr}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            mod.functions.append((length, f"{name}.{node.name}:{node.lineno}"))
    return mod


def collect() -> dict[str, Module]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mod = scan(path)
            mods[mod.name] = mod
    return mods


def graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    """Edges between kiln modules; `from a import b` counts a.b when that is a module."""
    edges: dict[str, set[str]] = {}
    for mod in mods.values():
        out = set()
        for imported in mod.imports:
            name = imported
            while name and name not in mods:  # `from a.b import c`: c may be a name in a.b
                name = name.rpartition(".")[0]
            if name and name != mod.name:
                out.add(name)
        edges[mod.name] = out
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@dataclass
class Figures:
    modules: int
    import_cycles: list[list[str]]
    spawning_modules: dict[str, list[str]]
    longest_function: tuple[int, str]
    largest_module: tuple[int, str]
    functions_over_limit: list[tuple[int, str]]
    modules_over_limit: list[tuple[int, str]]

    @property
    def ok(self) -> bool:
        return (not self.import_cycles and len(self.spawning_modules) <= MAX_SPAWNERS
                and not self.functions_over_limit and not self.modules_over_limit)


def figures() -> Figures:
    mods = collect()
    funcs = [f for m in mods.values() for f in m.functions]
    largest = max(mods.values(), key=lambda m: m.lines)
    return Figures(
        modules=len(mods),
        import_cycles=cycles(graph(mods)),
        spawning_modules={m.name: sorted(set(m.spawns)) for m in mods.values() if m.spawns},
        longest_function=max(funcs, default=(0, "-")),
        largest_module=(largest.lines, largest.name),
        functions_over_limit=sorted((f for f in funcs if f[0] > MAX_FUNCTION), reverse=True),
        modules_over_limit=sorted((m.lines, m.name) for m in mods.values()
                                  if m.lines > MAX_MODULE),
    )


def main(argv: list[str]) -> int:
    fig = figures()
    if "--json" in argv:
        print(json.dumps(asdict(fig), indent=2))
        return 0 if fig.ok else 1
    cyc, spawn = fig.import_cycles, fig.spawning_modules
    print(f"modules                {fig.modules}")
    print(f"import cycles          {len(cyc)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cyc))
    print(f"spawning modules       {len(spawn)} (at most {MAX_SPAWNERS})"
          + "".join(f"\n  {k}: {', '.join(v)}" for k, v in sorted(spawn.items())))
    print(f"longest function       {fig.longest_function[0]} lines  {fig.longest_function[1]}"
          f" (at most {MAX_FUNCTION})"
          + "".join(f"\n  {n} {f}" for n, f in fig.functions_over_limit))
    print(f"largest module         {fig.largest_module[0]} lines  {fig.largest_module[1]}"
          f" (at most {MAX_MODULE})"
          + "".join(f"\n  {n} {m}" for n, m in fig.modules_over_limit))
    return 0 if fig.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
