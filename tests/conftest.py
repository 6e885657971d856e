"""Shared pytest setup. Its presence puts tests/ on sys.path, so tests import `helpers`."""

import pytest

FAST_TIMEOUT_S = 120
"""A test of the fast tier (not `slow`) that runs this long has hung: fail it."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests not marked `slow` get FAST_TIMEOUT_S unless they set their own timeout."""
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
