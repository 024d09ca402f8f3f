"""The rule's source as an input of its runs (cppo.rules.source): the digest follows the files a
rule's module imports from its project, and only those."""

from __future__ import annotations

import sys

import pytest

from cppo.rules import get_rule
from cppo.rules.source import source_digest, source_modules


def test_a_rule_depends_on_its_module_and_the_shared_rule_code_only():
    mods = source_modules(get_rule("grpo").fn.__module__)
    assert set(mods) == {
        "cppo.rules.grpo", "cppo.rules.base", "cppo.rules.ops", "cppo.rules.registry",
        "cppo.rules.aggregation", "cppo.divergence",
    }  # fmt: skip
    assert mods["cppo.rules.grpo"].name == "grpo.py"
    # CPPO's file is not an input of GRPO's runs, and the reverse
    assert "cppo.rules.cppo" not in mods
    assert "cppo.rules.grpo" not in source_modules(get_rule("cppo").fn.__module__)
    # GSPO builds on GRPO's clipped loss: GRPO's file is an input of GSPO's runs
    assert "cppo.rules.grpo" in source_modules(get_rule("gspo").fn.__module__)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An out-of-tree package of two rules sharing a helper module, re-exported by __init__."""
    pkg = tmp_path / "myrules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .helpers import scale\nfrom . import first, second\n")
    (pkg / "helpers.py").write_text("def scale(x):\n    return 2.0 * x\n")
    body = (
        "from cppo.rules import get_rule, register_rule\n"
        "from myrules import scale\n"
        "_grpo = get_rule('grpo')\n"
        "@register_rule('{name}', params=dict(_grpo.params))\n"
        "def rule(batch, cfg):\n"
        "    out = _grpo.fn(batch, cfg)\n"
        "    out.per_token_loss = scale(out.per_token_loss)\n"
        "    return out\n"
    )
    (pkg / "first.py").write_text(body.format(name="src_first"))
    (pkg / "second.py").write_text(
        body.format(name="src_second").replace(
            "from myrules import scale", "from myrules.helpers import scale"
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from cppo.rules import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for name in [m for m in sys.modules if m == "myrules" or m.startswith("myrules.")]:
        monkeypatch.delitem(sys.modules, name)
    __import__("myrules")
    return pkg


def test_an_edit_changes_the_digest_of_exactly_the_rules_that_read_the_file(project):
    first, second = "myrules.first", "myrules.second"
    # a name imported from the package counts as the module defining it, not the __init__
    assert set(source_modules(first)) >= {"myrules.first", "myrules.helpers", "cppo.rules.base"}
    assert "myrules.second" not in source_modules(first)
    assert "myrules" not in source_modules(first)
    before = {m: source_digest(m) for m in (first, second)}
    (project / "second.py").write_text((project / "second.py").read_text() + "# an edit\n")
    assert source_digest(first) == before[first]
    assert source_digest(second) != before[second]
    before = {m: source_digest(m) for m in (first, second)}
    (project / "helpers.py").write_text("def scale(x):\n    return 3.0 * x\n")
    assert all(source_digest(m) != before[m] for m in (first, second))
    assert get_rule("src_first").fn.__module__ == first
