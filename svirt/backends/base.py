"""The Backend protocol and the data passed between a backend and the launcher.

A backend knows one hypervisor: what it needs from the host (``preflight``),
which host objects the guest will open (``resources``), the exact argv
(``command``, a pure function of the spec and what the launcher prepared) and
how to ask it to stop (``request_shutdown``, one :class:`~svirt.deadline.Deadline`
for the whole exchange with the guest's control channel).  It never touches labels, fds or
processes itself: the launcher passes data between backends and security
drivers.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from svirt.deadline import Deadline
from svirt.host import HostInfo
from svirt.resources import Access, Resource, ResourceKind, layer_path
from svirt.spec import Accel, GuestSpec

# fd numbers the child sees; child.py dup2()s the launcher's fds onto these
CONSOLE_FD = 3
CONTROL_FD = 4
FIRST_EXTRA_FD = 5
#: the guest agent's listening socket (QEMU ``agent = true``): past the taps
#: (FIRST_EXTRA_FD + at most 8 nics) and any other extra fds
AGENT_FD = 30


@dataclass(frozen=True)
class Prepared:
    """What the launcher prepared before the argv is built."""

    run_dir: Path
    accel: Accel = Accel.TCG  # resolved: never AUTO here
    sandbox: bool = False
    tap_fds: tuple[int, ...] = ()  # child fd numbers, one per nic (QEMU)
    tap_names: tuple[str, ...] = ()  # one per nic (UML, lguest)
    nic_macs: tuple[str, ...] = ()
    no_avx: bool = False  # UML on an AMX host: FXSAVE only, guest glibc must not use AVX
    #: where the console's output goes in the child: CONSOLE_FD (a socket, both
    #: ways) or 1 (a detached guest's output FIFO; CONSOLE_FD is then its input)
    console_out_fd: int = CONSOLE_FD
    #: CONTROL_FD is a listening socket (a detached guest's QMP), not a connected one
    control_listening: bool = False


@dataclass(frozen=True)
class JailNeeds:
    """What a backend's hypervisor needs in the jail beyond its resources."""

    #: files bound read-only at their own paths, not held (UML's kernel binary)
    binaries: tuple[Path, ...] = ()
    #: the launcher's control directory (UML writes its mconsole replies there)
    control_dir: bool = False
    shm_mib: int = 64  # the jail's private /dev/shm
    home_cwd: bool = False  # it starts in its home (else in /)


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    #: the console socket is also the hypervisor's stdin (QEMU's ``-serial
    #: stdio`` reads the guest's keyboard there); else stdin is /dev/null
    console_stdin: bool = False


class GuestControl(Protocol):
    """What request_shutdown needs of a running guest."""

    name: str

    @property
    def run_dir(self) -> Path:
        """The guest's own directory (UML's uml_dir): the guest may change
        anything in it, so only fd-relative, no-follow walks go there."""
        ...

    @property
    def control_dir(self) -> Path:
        """A directory only root can write: the launcher's control sockets."""
        ...

    @property
    def guest_uid(self) -> int | None:
        """The uid the hypervisor runs as (None: no DAC, the launcher's own)."""
        ...

    @property
    def pid(self) -> int: ...

    def control_socket(self, deadline: Deadline) -> socket.socket | None:
        """The connected control socket (QMP), connected within ``deadline``."""
        ...

    def creating_sockets(self) -> AbstractContextManager[None]:
        """Sockets created inside carry the guest's labels (SELinux MCS
        would deny the guest a reply to a socket at the launcher's level)."""
        ...


class Backend(Protocol):
    name: str

    def preflight(self, spec: GuestSpec, host: HostInfo) -> Accel:
        """Check the host can run this spec; return the resolved accel."""
        ...

    def resources(self, spec: GuestSpec, run_dir: Path) -> list[Resource]: ...

    def command(self, spec: GuestSpec, prepared: Prepared) -> Command: ...

    def uses_control_socket(self) -> bool: ...

    def with_accel(self, spec: GuestSpec, accel: Accel) -> GuestSpec:
        """The spec as this backend runs it, given the accel preflight resolved."""
        ...

    def for_host(self, prepared: Prepared, host: HostInfo) -> Prepared:
        """``prepared`` with what this backend takes from the host (QEMU's
        sandbox, UML's AVX fallback)."""
        ...

    def passes_tap_fds(self) -> bool:
        """The hypervisor gets one open tap fd per nic (else tap names)."""
        ...

    def opens_tun(self) -> bool:
        """The hypervisor opens its taps by name through /dev/net/tun, in the
        launcher's network namespace: it needs the node, owned by its uid."""
        ...

    def jail_needs(self, spec: GuestSpec, home: Path) -> JailNeeds: ...

    def request_shutdown(self, guest: GuestControl, *, hard: bool,
                         deadline: Deadline | None = None) -> None:
        """Ask the guest to stop: gracefully, or (hard) at once.  The whole
        exchange (connect, send, every reply) ends by ``deadline`` and by
        the backend's own bound, whichever is first: ControlError then."""
        ...


def base_resources(spec: GuestSpec, home: Path, *, kernel: bool = True) -> list[Resource]:
    """Kernel, initrd, disks and console log: common to every backend.

    An ephemeral disk's base is read-only shared content; QEMU's overlay (in
    the run directory around ``home``) is the guest's private disk; UML's COW
    file is made by UML in ``home``, which the guest holds already."""
    out: list[Resource] = []
    if kernel and spec.kernel is not None:
        out.append(Resource(spec.kernel, Access.RO, ResourceKind.KERNEL))
    if spec.initrd is not None:
        out.append(Resource(spec.initrd, Access.RO, ResourceKind.INITRD))
    for i, disk in enumerate(spec.disks):
        if disk.ephemeral:
            if spec.backend == "qemu":
                out.append(Resource(layer_path(spec, i, home), Access.RW, ResourceKind.LAYER))
            out.append(Resource(disk.path, Access.RO, ResourceKind.BACKING,
                                relabel=disk.relabel))
            continue
        access = Access.RO if disk.readonly else Access.SHARED if disk.shared else Access.RW
        out.append(Resource(disk.path, access, ResourceKind.DISK, relabel=disk.relabel))
    if spec.console.log is not None:
        out.append(Resource(spec.console.log, Access.RW, ResourceKind.CONSOLE_LOG))
    return out
