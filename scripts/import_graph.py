"""Draw sepconv's import graph as docs/architecture.md shows it: one box per module or stage subpackage of
sepconv.convert and sepconv.deploy, ranked by the layers of the import contract (pyproject.toml), an arrow per import.

    .venv/bin/python scripts/import_graph.py docs/import-graph.png     (needs Graphviz's dot: apt-get install graphviz)

grimp reads the tree laid out as sepconv/convert and sepconv/deploy (a temporary copy), as tests/test_architecture.py
does; imports under TYPE_CHECKING are left out, imports inside functions are drawn like the others."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layers() -> dict[str, list[list[str]]]:
    """{container: [[module, ...] per layer, top first]} from the contract's layers contracts."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return {contract["containers"][0]: [[m.strip() for m in layer.replace("|", ":").split(":")]
                                        for layer in contract["layers"]]
            for contract in config if contract["type"] == "layers"}


def edges(tree: Path) -> set[tuple[str, str]]:
    sys.path.insert(0, str(tree))
    import grimp

    graph = grimp.build_graph("sepconv", exclude_type_checking_imports=True)
    found = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = _box(module), _box(imported)
            if a and b and a != b:
                found.add((a, b))
    return found


def _box(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[1:3]) if len(parts) >= 3 else None


def dot(stack: dict[str, list[list[str]]], arrows: set[tuple[str, str]]) -> str:
    lines = ["digraph sepconv {", '  rankdir=TB; newrank=true; node [shape=box, fontname="Helvetica", fontsize=11];',
             '  edge [color="#00000055", arrowsize=0.6];']
    for container, tiers in stack.items():
        side = container.split(".")[1]
        lines.append(f'  subgraph cluster_{side} {{ label="sepconv.{side}"; fontname="Helvetica"; color="#888888";')
        for tier in tiers:
            lines.append("    { rank=same; " + " ".join(f'"{side}.{m}" [label="{m}"];' for m in tier) + " }")
        for upper, lower in zip(tiers, tiers[1:]):  # invisible edges keep the tiers in order
            lines.append(f'    "{side}.{upper[0]}" -> "{side}.{lower[0]}" [style=invis];')
        lines.append("  }")
    lines += [f'  "{a}" -> "{b}";' for a, b in sorted(arrows)] + ["}"]
    return "\n".join(lines) + "\n"


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder)
        for name in ("convert", "deploy"):
            shutil.copytree(ROOT / name, tree / "sepconv" / name, ignore=shutil.ignore_patterns("__pycache__"))
        (tree / "sepconv" / "__init__.py").write_text("")
        source = dot(layers(), edges(tree))
    fmt = Path(out).suffix.lstrip(".") or "png"
    subprocess.run(["dot", f"-T{fmt}", "-Gdpi=110", "-o", out], input=source, text=True, check=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/import-graph.png")
