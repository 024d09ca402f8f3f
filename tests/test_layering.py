"""The package layers: cppo.run (the run contract) is the floor that the trainer, the verl backend
and the pipeline share; none of those three imports another. Every import statement of every
module counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cppo"
LAYERS = ("cppo.run", "cppo.training", "cppo.pipeline", "cppo.backends")
# what each layer must not import
FORBIDDEN = {
    "cppo.run": ("cppo.training", "cppo.pipeline", "cppo.backends"),
    "cppo.training": ("cppo.pipeline", "cppo.backends"),
    "cppo.pipeline": ("cppo.training", "cppo.backends"),
    "cppo.backends": ("cppo.training", "cppo.pipeline"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from cppo import training` imports the subpackage
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def layer_of(name: str) -> str | None:
    return next((la for la in LAYERS if name == la or name.startswith(la + ".")), None)


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(module_name(path, root))
        if layer is None:
            continue
        for line, name in imported_modules(path, root):
            target = layer_of(name)
            if target in FORBIDDEN[layer]:
                found.append(f"{path.relative_to(root.parent)}:{line}: {layer} imports {name}")
    return found


def test_no_layer_imports_another_but_the_run_contract():
    assert violations() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    # the checker itself must be able to fail: a module-level and a function-level import
    pkg = tmp_path / "cppo"
    (pkg / "training").mkdir(parents=True)
    (pkg / "pipeline").mkdir()
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "pipeline" / "__init__.py").write_text("")
    (pkg / "training" / "a.py").write_text("def f():\n    from cppo.pipeline import plan\n")
    (pkg / "pipeline" / "b.py").write_text("from ..training import a\n")
    assert violations(pkg) == [
        "cppo/pipeline/b.py:1: cppo.pipeline imports cppo.training.a",
        "cppo/training/a.py:2: cppo.training imports cppo.pipeline.plan",
    ]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_has_modules(layer):
    # a renamed package would make the walk vacuous
    assert any(module_name(p).startswith(layer) for p in ROOT.rglob("*.py"))
