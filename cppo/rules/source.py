"""Which source files a rule's results depend on, and a digest of them.

A run's numbers depend on the code of its rule: the module that defines the rule's function and
every module of the same project that it imports, directly or through other modules (for the
rules of this package: cppo.rules.base, ops, registry, aggregation and cppo.divergence). The
pipeline writes the digest into run.yaml (`rule_code`), so an edit of any of those files changes
the run.yaml of exactly the runs whose rule reads that file, and Snakemake reruns them.

Imports are followed statically (ast) through the modules of the rule's own project: the cppo
package, and for a rule registered outside it the top-level package (or single module) it lives
in. A name imported from a package (``from cppo.rules import RuleBatch``) counts as the module
that defines it, not the package's ``__init__``, so a rule does not depend on every other rule
the package re-exports.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["source_digest", "source_modules"]

CPPO_ROOT = Path(__file__).resolve().parents[1]


def _file(module: ModuleType) -> Path | None:
    name = getattr(module, "__file__", None)
    return Path(name).resolve() if name else None


def _project_roots(module: ModuleType) -> list[Path]:
    """cppo/ and the directory (package) or file (single module) of `module`'s project."""
    top = sys.modules[module.__name__.split(".")[0]]
    path = _file(top)
    roots = [CPPO_ROOT]
    if path is not None:
        roots.append(path.parent if path.name == "__init__.py" else path)
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _imported(module: ModuleType) -> set[str]:
    """Names of the modules `module`'s source imports, names from packages resolved to the
    module that defines them."""
    path = _file(module)
    if path is None or path.suffix != ".py":
        return set()
    package = module.__name__ if path.name == "__init__.py" else module.__name__.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            try:
                source = importlib.import_module(base)
            except ImportError:
                continue
            for alias in node.names:
                obj = getattr(source, alias.name, None)
                if inspect.ismodule(obj):
                    out.add(obj.__name__)
                elif getattr(obj, "__module__", None) in sys.modules:
                    out.add(obj.__module__)
                else:
                    out.add(base)
    return out


def source_modules(module_name: str) -> dict[str, Path]:
    """`module_name` and the project modules it imports, transitively: name -> file."""
    start = importlib.import_module(module_name)
    roots = _project_roots(start)
    seen: dict[str, Path] = {}
    todo = [start.__name__]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        path = _file(module)
        if path is None or not _inside(path, roots):
            continue
        seen[name] = path
        todo.extend(sorted(_imported(module) - set(seen)))
    return dict(sorted(seen.items()))


def source_digest(module_name: str) -> str:
    """16 hex digits of sha256 over the source of `module_name` and the project modules it
    imports (see the module doc)."""
    h = hashlib.sha256()
    for name, path in source_modules(module_name).items():
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
