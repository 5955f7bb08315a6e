"""The lab's passes, started together for the modules a session selected
(``tests/lab/passes.py``)."""

from __future__ import annotations

import pytest

from .passes import PASSES, Passes


@pytest.fixture(scope="session")
def lab_passes(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Passes:
    modules = {item.path.stem for item in request.session.items}
    names = [n for n, p in PASSES.items() if p.test_module in modules]
    return Passes(names, tmp_path_factory.mktemp("lab-passes"))

