"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tensor tests on one thread: deterministic and fair on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rule_metric_keys(name: str) -> set[str]:
    """The diagnostic keys a registered rule reports with its default config."""
    from cppo.rules import get_rule

    return set(get_rule(name).metric_keys())
