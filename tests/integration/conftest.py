"""Integration tests: root, real UML and QEMU guests, DAC enforced by the kernel."""

from __future__ import annotations

import pytest

from svirt.testing import require_root


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    require_root()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
