"""scion's import graph, and the rooms (layers) it must respect.

    python -m scion.tools.imports            every module and the scion modules it imports
    python -m scion.tools.imports --check    only the imports that reach a higher layer (exit 1 if any)
    python -m scion.tools.imports --dot      the graph between rooms, for Graphviz's `dot -Tsvg`

The layers are read from the table in docs/architecture.md (`| layer | rooms |`), so the picture
there and the check agree. An import inside a function counts like one at the top: a lazy import
is still a dependency. A module may import its own layer or any lower one.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scion_imports(path: Path) -> list[Import]:
    """Every import of a scion module in a file, top-level or inside a function."""
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from scion import checkpoint` imports the module scion.checkpoint
            names = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        found += [Import(importer, name, node.lineno) for name in names if name.split(".")[0] == "scion"]
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def all_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in scion_imports(path)]


def read_layers(doc: Path = ARCHITECTURE) -> dict[str, int]:
    """Room (a module or package, dotted) -> layer number, from the doc's `| layer | rooms |` table."""
    layers = {}
    for line in doc.read_text().splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|[^|]*\|\s*(.+?)\s*\|\s*$", line)
        if m:
            for room in re.findall(r"`([\w.]+)`", m.group(2)):
                layers[room] = int(m.group(1))
    if not layers:
        raise SystemExit(f"{doc}: no `| layer | name | rooms |` table found")
    return layers


def room_of(module: str, layers: dict[str, int]) -> str | None:
    """The most specific room that holds `module` (scion.train.loop before scion.train); the bare
    package `scion` holds nothing of its own."""
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        if ".".join(parts[:i]) in layers:
            return ".".join(parts[:i])
    return None


def upward(imports: list[Import], layers: dict[str, int]) -> list[str]:
    """Each import that reaches a higher layer, and each module no room holds, as a message."""
    problems = []
    for imp in imports:
        if imp.importer == "scion":  # the package's __init__: its version and nothing else
            continue
        a, b = room_of(imp.importer, layers), room_of(imp.imported, layers)
        if a is None:
            problems.append(f"{imp.importer}: in no room of {ARCHITECTURE.name}; add it to the layer table")
        elif b is None:
            problems.append(f"{imp.imported}: in no room of {ARCHITECTURE.name}; add it to the layer table")
        elif layers[b] > layers[a]:
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported}: layer {layers[a]} ({a}) "
                            f"reaches up to layer {layers[b]} ({b})")
    return sorted(set(problems))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="list imports that reach a higher layer; exit 1 if any")
    ap.add_argument("--dot", action="store_true", help="the graph between rooms in Graphviz's dot language")
    args = ap.parse_args(argv)
    imports = all_imports()
    if args.check:
        problems = upward(imports, read_layers())
        print("\n".join(problems) or "no upward imports")
        return 1 if problems else 0
    if args.dot:
        layers = read_layers()
        edges = {(room_of(i.importer, layers), room_of(i.imported, layers)) for i in imports}
        print("digraph scion {\n  rankdir=BT;")
        for a, b in sorted(e for e in edges if None not in e and e[0] != e[1]):
            print(f'  "{a}" -> "{b}";')
        print("}")
        return 0
    graph = defaultdict(set)
    for imp in imports:
        graph[imp.importer].add(imp.imported)
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(graph[module]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
