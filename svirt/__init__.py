"""svirt: launch QEMU, User-Mode-Linux and lguest guests confined sVirt-style.

Public API::

    spec = svirt.load("guest.toml")            # or svirt.GuestSpec(...)
    with svirt.launch(spec) as guest:
        guest.console.expect("login:", timeout=30)
        outcome = guest.stop()

    handle = svirt.start(spec)                 # detached: outlives this process
    svirt.attach("web1").stop()
"""

from __future__ import annotations

from importlib import import_module

# not typing's: importing typing costs ~2 ms of `svirt --version` (mypy and
# ruff read this name as typing.TYPE_CHECKING)
TYPE_CHECKING = False
if TYPE_CHECKING:  # the real imports, for type checkers; at run time they are lazy
    from typing import Any

    from svirt.errors import (
        ConsoleTimeout,
        ControlError,
        HostError,
        ImageBuildError,
        LaunchError,
        NetworkError,
        RelabelRefused,
        SecurityError,
        SlotsExhausted,
        SpecError,
        StateError,
        SvirtError,
    )
    from svirt.launcher.launch import Guest, launch
    from svirt.launcher.supervisor import Outcome, OutcomeKind
    from svirt.service.api import GuestHandle, attach, start
    from svirt.spec import Accel, Backend, Console, Disk, GuestSpec, Nic, Security, load_spec

# name -> module: imported on first use, so `svirt --version` stays fast
_LAZY = {
    **dict.fromkeys(
        ["ConsoleTimeout", "ControlError", "HostError", "ImageBuildError", "LaunchError",
         "NetworkError", "RelabelRefused", "SecurityError", "SlotsExhausted", "SpecError",
         "StateError", "SvirtError"], "svirt.errors"),
    "Guest": "svirt.launcher.launch",
    "launch": "svirt.launcher.launch",
    "Outcome": "svirt.launcher.supervisor",
    **dict.fromkeys(["GuestHandle", "attach", "start"], "svirt.service.api"),
    "OutcomeKind": "svirt.launcher.supervisor",
    **dict.fromkeys(["Accel", "Backend", "Console", "Disk", "GuestSpec", "Nic", "Security",
                     "load_spec"], "svirt.spec"),
}


def __getattr__(name: str) -> Any:
    if name == "load":
        name = "load_spec"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'svirt' has no attribute {name!r}")
    return getattr(import_module(module), name)


if TYPE_CHECKING:
    load = load_spec
__version__ = "0.1.0"

__all__ = [
    "Accel", "Backend", "Console", "ConsoleTimeout", "ControlError", "Disk", "Guest",
    "GuestSpec", "HostError", "ImageBuildError", "LaunchError", "NetworkError", "Nic",
    "Outcome", "OutcomeKind", "RelabelRefused", "SecurityError", "Security", "SlotsExhausted",
    "SpecError", "StateError", "SvirtError", "launch", "load", "load_spec", "__version__",
    "GuestHandle", "attach", "start",
]
