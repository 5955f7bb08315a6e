"""The tiny guests' ``/init`` and the kernel command line that drives it.

One ``/init`` (``init.sh``, package data) serves every behaviour the tests
and the demo need; it reads its orders from the kernel command line (see
:func:`guest_cmdline`):

``svirt.mode=poweroff``
    print the marker, power off at once.
``svirt.mode=stay``
    print the marker, stay up until asked to shut down (UML: mconsole
    ``cad``; QEMU: QMP ``system_powerdown``), then print ``SVIRT-POWEROFF``
    and power off.
``svirt.mode=panic``
    print the marker, then let ``/init`` exit so the kernel panics
    ("Attempted to kill init!").
``svirt.mode=chatty``
    print 1 MiB of text, then the marker, then power off.
``svirt.mode=shell``
    as ``stay``, with a shell reading commands from the console (no echo, no
    prompt, kernel messages off the console): what :meth:`Guest.shell` and
    ``svirt run SPEC -- COMMAND`` talk to.
``svirt.mode=diskwrite`` (``svirt.pattern=TEXT``)
    on the first disk (``/dev/ubda`` or ``/dev/vda``): print
    ``SVIRT-DISK before <its first line>``, write ``TEXT`` and a newline at
    its start, sync, drop the page cache, print ``SVIRT-DISK after <its
    first line>`` (read back from the device), then the marker; power off.
``svirt.marker=TEXT``
    the marker line (default ``SVIRT-READY``).
``svirt.net=IP/PREFIX``
    configure ``eth0`` (else the first non-loopback interface) with that
    address before the marker.
``svirt.ping=IP[,IP...]`` (``svirt.pingtries=N``: up to N one-second tries each)
    after the marker, ping each once and print ``SVIRT-PING <ip> ok|fail``.

Modules listed in ``lib/modules/<release>/svirt.order`` are loaded first, in
that order (QEMU: power button, evdev, virtio, pvpanic); busybox ``acpid``
turns the power button press into a clean shutdown.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from svirt.errors import ImageBuildError

__all__ = [
    "ACPI_POWER_HANDLER",
    "DEFAULT_MARKER",
    "DISK_PREFIX",
    "GUEST_MODES",
    "MODULE_ORDER_FILE",
    "PING_PREFIX",
    "POWEROFF_MARKER",
    "guest_cmdline",
    "init_script",
]

GUEST_MODES = ("poweroff", "stay", "panic", "chatty", "shell", "diskwrite")
DEFAULT_MARKER = "SVIRT-READY"
POWEROFF_MARKER = "SVIRT-POWEROFF"
PING_PREFIX = "SVIRT-PING"
DISK_PREFIX = "SVIRT-DISK"

MODULE_ORDER_FILE = "svirt.order"
"""Names the modules ``/init`` loads, one a line, dependencies first."""

_CHATTY_LINES = 8192  # x 128 bytes = 1 MiB

# Run by busybox acpid on KEY_POWER (its built-in tables map it to
# "PWRF/00000080", relative to the -c directory).
ACPI_POWER_HANDLER = "#!/bin/sh\nkill -USR1 1\n"


@functools.cache
def init_script() -> str:
    """The text of ``/init``: ``init.sh`` with its ``@NAME@`` placeholders filled."""
    try:
        template = resources.files(__package__).joinpath("init.sh").read_text(encoding="utf-8")
    except OSError as exc:
        raise ImageBuildError(f"the guest /init script is missing from svirt: {exc}",
                              hint="reinstall svirt: svirt/images/init.sh is package data") \
            from exc
    return (
        template.replace("@DEFAULT_MARKER@", DEFAULT_MARKER)
        .replace("@POWEROFF_MARKER@", POWEROFF_MARKER)
        .replace("@PING_PREFIX@", PING_PREFIX)
        .replace("@DISK_PREFIX@", DISK_PREFIX)
        .replace("@ORDER_FILE@", MODULE_ORDER_FILE)
        .replace("@CHATTY_LINES@", str(_CHATTY_LINES))
    )


_MARKER_RE = re.compile(r"[A-Za-z0-9._:+@%/=-]+")


def guest_cmdline(mode: str, marker: str = DEFAULT_MARKER, extra: str = "") -> str:
    """The kernel command-line fragment selecting the ``/init`` behaviour.

    ``extra`` is appended as is, e.g. ``"svirt.net=10.0.0.2/24 svirt.ping=10.0.0.1"``.
    No ``console=`` part: the backend adds that.
    """
    if mode not in GUEST_MODES:
        raise ImageBuildError(
            f"unknown guest mode {mode!r}", hint="one of " + ", ".join(GUEST_MODES)
        )
    if not _MARKER_RE.fullmatch(marker):
        raise ImageBuildError(
            f"invalid marker {marker!r}", hint="use letters, digits and ._:+@%/=- only (no spaces)"
        )
    parts = [f"svirt.mode={mode}", f"svirt.marker={marker}"]
    if extra.strip():
        parts.append(extra.strip())
    return " ".join(parts)
