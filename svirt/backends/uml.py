"""User-Mode-Linux: argv builder and an mconsole client.

The "kernel" of a UML guest is the ``linux`` executable itself.  Its console
is the socket the launcher passes as fd 3 (``con0=fd:3,fd:3``); its control
channel is the mconsole datagram socket UML creates in ``uml_dir/umid/``,
where ``uml_dir`` is the guest's private run directory.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from svirt.backends.base import (
    CONSOLE_FD,
    Access,
    Command,
    GuestControl,
    Prepared,
    Resource,
    ResourceKind,
    base_resources,
)
from svirt.errors import ControlError, HostError
from svirt.host import UML_BINARY, HostInfo
from svirt.spec import Accel, GuestSpec

# handed to the guest's init as environment by the guest kernel: glibc then
# picks no AVX code, whose registers UML's FXSAVE fallback would not preserve
NO_AVX_TUNABLES = (
    "GLIBC_TUNABLES=glibc.cpu.hwcaps="
    "-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"
)
MCONSOLE_MAGIC = 0xCAFEBABE
MCONSOLE_VERSION = 2
MCONSOLE_MAX_DATA = 512
_REQUEST = struct.Struct(f"=III{MCONSOLE_MAX_DATA}s")
_REPLY = struct.Struct(f"=III{MCONSOLE_MAX_DATA}s")


class UmlBackend:
    name = "uml"

    def preflight(self, spec: GuestSpec, host: HostInfo) -> Accel:
        if host.binary(UML_BINARY) is None and not os.access(spec.kernel, os.X_OK):
            raise HostError(
                "User-Mode-Linux is not installed",
                hint="apt-get install --no-install-recommends user-mode-linux",
            )
        if not os.access(spec.kernel, os.X_OK):
            raise HostError(
                f"guest {spec.name}: kernel {spec.kernel} is not an executable UML kernel",
                hint="a UML guest's kernel is the 'linux' binary, e.g. /usr/bin/linux",
            )
        return Accel.TCG  # not meaningful for UML

    def resources(self, spec: GuestSpec, run_dir: Path) -> list[Resource]:
        # the kernel is an executable (e.g. /usr/bin/linux), not guest data
        return [
            Resource(run_dir, Access.RW, ResourceKind.RUN_DIR),
            *base_resources(spec, kernel=False),
        ]

    def uses_control_socket(self) -> bool:
        return False

    def command(self, spec: GuestSpec, prepared: Prepared) -> Command:
        # no TMPDIR: UML's memory file then goes to /dev/shm, where SELinux
        # policy gives it svirt_tmpfs_t (a file in the run dir would be
        # svirt_image_t, which the guest may not map executable)
        return Command(tuple(build_uml_argv(spec, prepared)))

    def request_shutdown(self, guest: GuestControl, *, hard: bool) -> None:
        with guest.creating_sockets():
            mconsole_command(mconsole_path(guest.run_dir, guest.name),
                             "halt" if hard else "cad")


def build_uml_argv(spec: GuestSpec, prepared: Prepared) -> list[str]:
    argv = [str(spec.kernel)]
    argv.append(f"mem={spec.memory}M")
    argv.append(f"umid={spec.name}")
    argv.append(f"uml_dir={prepared.run_dir}")
    argv += ["con=null", "ssl=null", f"con0=fd:{CONSOLE_FD},fd:{CONSOLE_FD}"]
    if spec.initrd is not None:
        argv.append(f"initrd={spec.initrd}")
    for i, disk in enumerate(spec.disks):
        flags = ("r" if disk.readonly else "") + ("c" if disk.shared else "")
        argv.append(f"ubd{i}{flags}={disk.path}")
    for i, _nic in enumerate(spec.nics):
        argv.append(f"eth{i}=tuntap,{prepared.tap_names[i]},{prepared.nic_macs[i]}")
    argv.append("console=tty0")
    if prepared.no_avx:
        argv.append(NO_AVX_TUNABLES)
    argv += spec.cmdline.split()
    return argv


def mconsole_path(run_dir: Path, umid: str) -> Path:
    return run_dir / umid / "mconsole"


def mconsole_command(path: Path, command: str, timeout: float = 5.0) -> str:
    """Send one mconsole command and return the reply text."""
    data = command.encode()
    if len(data) >= MCONSOLE_MAX_DATA:
        raise ControlError(f"mconsole command too long: {command[:40]!r}")
    request = _REQUEST.pack(MCONSOLE_MAGIC, MCONSOLE_VERSION, len(data), data)
    client = path.parent / f"svirt-mc.{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            client.unlink(missing_ok=True)
            sock.bind(str(client))
            # UML answers from its own uid: let the owner of its socket write to ours
            owner = os.stat(path)
            os.chown(client, owner.st_uid, owner.st_gid)
        except OSError as err:
            raise ControlError(f"mconsole: cannot bind {client}: {err.strerror}") from err
        try:
            sock.settimeout(timeout)
            sock.sendto(request, str(path))
            replies: list[str] = []
            while True:
                raw = sock.recv(_REPLY.size)
                code, more, length, payload = _REPLY.unpack(raw.ljust(_REPLY.size, b"\0"))
                text = payload[:length].decode(errors="replace")
                replies.append(text)
                if code:
                    raise ControlError(f"mconsole {command}: {text}")
                if not more:
                    return "".join(replies)
        except TimeoutError:
            raise ControlError(f"mconsole {command}: no reply from {path}") from None
        except OSError as err:
            raise ControlError(f"mconsole {command}: {path}: {err.strerror}") from err
        finally:
            client.unlink(missing_ok=True)
