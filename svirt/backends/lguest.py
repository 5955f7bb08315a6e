"""lguest: the documented launcher command line and a preflight.

lguest left Linux in 4.14, so on any current kernel ``/dev/lguest`` is absent
and the preflight fails with that reason; the argv builder stays so a host
with an old kernel and the launcher binary can still use it.
"""

from __future__ import annotations

from pathlib import Path

from svirt.backends.base import Command, GuestControl, JailNeeds, Prepared, base_resources
from svirt.deadline import Deadline
from svirt.errors import ControlError, HostError
from svirt.host import LGUEST_BINARY, HostInfo
from svirt.resources import Resource
from svirt.spec import Accel, GuestSpec


class LguestBackend:
    name = "lguest"

    def preflight(self, spec: GuestSpec, host: HostInfo) -> Accel:
        if not host.lguest_device:
            raise HostError(
                f"guest {spec.name}: /dev/lguest does not exist",
                hint="lguest was removed from Linux in 4.14; use backend = \"qemu\" or \"uml\"",
            )
        if host.binary(LGUEST_BINARY) is None:
            raise HostError(
                f"guest {spec.name}: the lguest launcher binary is not installed",
                hint="build it from Documentation/virtual/lguest of a kernel before 4.14",
            )
        return Accel.TCG

    def resources(self, spec: GuestSpec, run_dir: Path) -> list[Resource]:
        return base_resources(spec, run_dir)

    def uses_control_socket(self) -> bool:
        return False

    def with_accel(self, spec: GuestSpec, accel: Accel) -> GuestSpec:
        return spec

    def for_host(self, prepared: Prepared, host: HostInfo) -> Prepared:
        return prepared

    def passes_tap_fds(self) -> bool:
        return False

    def opens_tun(self) -> bool:
        return False

    def jail_needs(self, spec: GuestSpec, home: Path) -> JailNeeds:
        return JailNeeds()

    def command(self, spec: GuestSpec, prepared: Prepared) -> Command:
        return Command(tuple(build_lguest_argv(spec, prepared)))

    def request_shutdown(self, guest: GuestControl, *, hard: bool,
                         deadline: Deadline | None = None) -> None:
        raise ControlError("lguest has no control channel; the launcher signals it")


def build_lguest_argv(spec: GuestSpec, prepared: Prepared) -> list[str]:
    argv = [LGUEST_BINARY]
    for i, nic in enumerate(spec.nics):
        if nic.bridge is not None:
            argv.append(f"--tunnet=bridge:{nic.bridge}:{prepared.nic_macs[i]}")
    for disk in spec.disks:
        argv.append(f"--block={disk.path}")
    if spec.initrd is not None:
        argv.append(f"--initrd={spec.initrd}")
    argv.append(str(spec.memory))
    argv.append(str(spec.kernel_path()))
    argv += ["console=hvc0", *spec.cmdline.split()]
    return argv
