"""svirt: launch QEMU, User-Mode-Linux and lguest guests confined sVirt-style.

Public API::

    spec = svirt.load("guest.toml")            # or svirt.GuestSpec(...)
    with svirt.launch(spec) as guest:
        guest.console.expect("login:", timeout=30)
        outcome = guest.stop()
"""

from __future__ import annotations

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
from svirt.spec import Accel, Backend, Console, Disk, GuestSpec, Nic, Security, load_spec

load = load_spec
__version__ = "0.1.0"

__all__ = [
    "Accel", "Backend", "Console", "ConsoleTimeout", "ControlError", "Disk", "Guest",
    "GuestSpec", "HostError", "ImageBuildError", "LaunchError", "NetworkError", "Nic",
    "Outcome", "OutcomeKind", "RelabelRefused", "SecurityError", "Security", "SlotsExhausted",
    "SpecError", "StateError", "SvirtError", "launch", "load", "load_spec", "__version__",
]
