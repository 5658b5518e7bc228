"""The house's import contract (pyproject.toml's [tool.importlinter], drawn in docs/architecture.md): deploy never
imports convert or TensorFlow, convert's stages and deploy's modules run one way, no library module imports a command
module, no cycles between siblings; and an import inside a function only defers a heavy or optional dependency.

import-linter reads packages from folders, and the package-dir mapping (`convert/` -> `sepconv.convert`) hides them, so
the contract is checked on a copy of the tree laid out as sepconv/convert and sepconv/deploy."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
# Packages an import inside a function may defer: they load TensorFlow, a runtime or a plotting stack (seconds, or
# hundreds of MiB), or are optional extras a device or a bare install lacks.
HEAVY = frozenset({"tensorflow", "keras", "tf_keras", "tf2onnx", "onnx", "onnxruntime", "ai_edge_litert",
                   "matplotlib", "h5py", "sklearn", "PIL"})
# Command modules import their work on demand so that --help is instant (STYLE.md, CLI): the rule is for libraries.
COMMANDS = frozenset({"sepconv.convert.cli", "sepconv.deploy.cli", "sepconv.deploy.clikit"})


def laid_out(tmp_path: Path) -> Path:
    """The checkout's convert/ and deploy/ as sepconv/convert and sepconv/deploy, with the contract beside them."""
    tree = tmp_path / "tree"
    for name in ("convert", "deploy"):
        shutil.copytree(ROOT / name, tree / "sepconv" / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "sepconv" / "__init__.py").write_text("")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(LINT), "--no-cache", "pyproject.toml"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_import_contract_holds(tmp_path):
    checked = lint(laid_out(tmp_path))
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in checked.stdout, checked.stdout[-2000:]


@pytest.mark.parametrize("module, line, contract", [
    ("deploy/stats.py", "from sepconv.convert import errors", "deploy never imports convert"),
    ("deploy/report/charts.py", "import tensorflow", "deploy never imports convert"),
    ("convert/export/verification.py", "from sepconv.convert.recovery import budget", "convert's stages run one way"),
    ("convert/separation/policy.py", "from sepconv.convert.separation import walk", "no import cycles"),
    ("deploy/timing.py", "from sepconv.deploy import cli", "deploy's modules run one way"),
])
def test_the_contract_fails_on_a_forbidden_import(tmp_path, module, line, contract):
    """The contract is not a check that cannot fail: one forbidden import added to a copy breaks it, named."""
    tree = laid_out(tmp_path)
    target = tree / "sepconv" / module
    target.write_text(target.read_text() + f"\n\ndef _added():\n    {line}\n")  # inside a function: still seen
    checked = lint(tree)
    assert checked.returncode == 1, checked.stdout[-3000:]
    broken = checked.stdout.split("Broken contracts")[-1]
    assert f"{contract}" in broken and "BROKEN" in checked.stdout, checked.stdout[-3000:]


def _module_name(path: Path) -> str:
    parts = ["sepconv", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text()) for name in ("convert", "deploy")
            for path in sorted((ROOT / name).rglob("*.py"))}


def _imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _top_level_imports(tree: ast.Module) -> list[str]:
    """What importing the module imports at once (its TYPE_CHECKING block aside)."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else (node,):
            found += _imported(inner)
    return found


def _heavy_modules(sources: dict[str, ast.Module]) -> set[str]:
    """The sepconv modules whose import loads a HEAVY package, directly or through another sepconv module."""
    direct = {name: _top_level_imports(tree) for name, tree in sources.items()}
    heavy = {name for name, imports in direct.items() if any(i.split(".")[0] in HEAVY for i in imports)}
    while True:
        more = {name for name, imports in direct.items() if name not in heavy and any(i in heavy for i in imports)}
        if not more:
            return heavy
        heavy |= more


def _deferred_imports(tree: ast.Module):
    """(line, imported names) of every import inside a function, except those guarded by `except ImportError` (an
    optional part that may be absent, e.g. the report on a device)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers):
            guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
                    yield node.lineno, _imported(node)


def test_an_import_inside_a_function_defers_only_a_heavy_or_optional_dependency():
    """A sepconv module imported inside a library function must load a HEAVY package itself (else the import belongs
    at the top, and inside a function it can only hide a cycle)."""
    sources = _sources()
    heavy = _heavy_modules(sources)
    assert "sepconv.convert.separation.walk" in heavy and "sepconv.deploy.stats" not in heavy, sorted(heavy)
    hidden = [f"{name}:{line} imports {names[0]}" for name, tree in sources.items() if name not in COMMANDS
              for line, names in _deferred_imports(tree)
              if names[0].startswith("sepconv.") and not any(n in heavy for n in names)]
    assert not hidden, "move these imports to the top of their module:\n" + "\n".join(hidden)
