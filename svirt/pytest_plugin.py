"""The pytest plugin svirt installs (entry point ``pytest11``: loaded by every
pytest run in an environment that has svirt; ``-p no:svirt.pytest_plugin``
turns it off).

``svirt_guest`` is a factory fixture: give it your own spec (a
:class:`~svirt.spec.GuestSpec`, a mapping with the TOML's keys, or the path
of a TOML file) and get a running, confined :class:`~svirt.launcher.launch.Guest`;
at teardown it is stopped and released, and the test fails if any of its
processes survived.  Disks are ephemeral by default (a copy-on-write layer
in the guest's run directory, thrown away at the end: the base image never
changes), so many tests and workers can boot one base image at once.  When
a test fails, each guest's console tail is attached to its report.

Parallel workers (pytest-xdist) never share a guest: each worker's guests get
the worker id in their names (``web`` becomes ``web-gw1``), and uids and
category pairs are unique on the host whichever registry a worker uses.

Nothing here changes the host config or the registry a test runs against:
the host's (``/etc/svirt/svirt.toml``, ``/run/svirt``) unless the
environment (``SVIRT_CONFIG``, ``SVIRT_RUN_DIR``) or ``registry=`` says
otherwise.

(PYTEST_DONT_REWRITE: svirt.testing imports this module before pytest
registers it, and it has no assert statements to rewrite.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from svirt.launcher.launch import Guest, launch
from svirt.spec import GuestSpec, load_spec, spec_from_mapping

GUESTS_KEY = pytest.StashKey[list[Guest]]()
CONSOLE_TAIL = 4000


def as_spec(spec: GuestSpec | Mapping[str, Any] | str | Path) -> GuestSpec:
    """A GuestSpec from a GuestSpec, a mapping of TOML keys or a TOML path."""
    if isinstance(spec, GuestSpec):
        return spec
    if isinstance(spec, Mapping):
        return spec_from_mapping(spec)
    return load_spec(spec)


def worker_name(name: str) -> str:
    """``name`` with this xdist worker's id, so that workers never collide."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or name.endswith(f"-{worker}"):
        return name
    return f"{name[:63 - len(worker)]}-{worker}"


def track(item: pytest.Item, guest: Guest) -> None:
    """Attach ``guest``'s console to ``item``'s report if the test fails."""
    if GUESTS_KEY not in item.stash:
        item.stash[GUESTS_KEY] = []
    item.stash[GUESTS_KEY].append(guest)


def assert_gone(guests: list[Guest]) -> None:
    for guest in guests:
        try:
            os.kill(guest.pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"guest {guest.name}: hypervisor pid {guest.pid} survived")


@contextmanager
def started_guests(item: pytest.Item) -> Iterator[Callable[..., Guest]]:
    """``start(spec, **launch_kwargs)``: launched, tracked for ``item``'s report,
    stopped and released when the block ends, then checked gone."""
    stack = ExitStack()
    started: list[Guest] = []

    def start(spec: GuestSpec, **kwargs: Any) -> Guest:
        guest = stack.enter_context(launch(spec, **kwargs))
        started.append(guest)
        track(item, guest)
        return guest

    with stack:
        yield start
    assert_gone(started)


@pytest.fixture
def svirt_guest(request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Start guests from your own specs; each is stopped and released at teardown.

    ``svirt_guest(spec, *, ephemeral=True, **launch_kwargs)``: ``spec`` as
    :func:`as_spec` takes it; ``ephemeral=False`` keeps the disks' writes;
    ``launch_kwargs`` go to :func:`svirt.launcher.launch.launch` (e.g.
    ``registry=``)."""
    with started_guests(request.node) as start_one:

        def start(spec: GuestSpec | Mapping[str, Any] | str | Path, *, ephemeral: bool = True,
                  **kwargs: Any) -> Guest:
            resolved = as_spec(spec)
            resolved = resolved.with_changes(name=worker_name(resolved.name))
            if ephemeral:
                resolved = resolved.with_ephemeral_disks()
            return start_one(resolved, **kwargs)

        yield start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for guest in item.stash.get(GUESTS_KEY, []):
            report.sections.append((f"console of guest {guest.name}",
                                    guest.console.tail(CONSOLE_TAIL)))
    return report
