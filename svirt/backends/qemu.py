"""QEMU-KVM (TCG fallback): argv builder and a small QMP client.

Console and QMP are sockets the launcher created (one end of a socketpair
each), passed as fds: ``-chardev socket,id=...,fd=N`` takes an already
connected socket.  Disks go through ``-blockdev``-free ``-drive`` options with
QEMU's comma escaping (``,`` doubled).
"""

from __future__ import annotations

import json
import socket
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from svirt.agent import PORT_NAME as AGENT_PORT
from svirt.backends.base import (
    AGENT_FD,
    CONSOLE_FD,
    CONTROL_FD,
    Command,
    GuestControl,
    JailNeeds,
    Prepared,
    base_resources,
)
from svirt.deadline import Deadline, recv, send_all
from svirt.errors import ControlError, HostError
from svirt.host import QEMU_BINARY, HostInfo
from svirt.images import firmware as fw
from svirt.resources import Access, Resource, ResourceKind, layer_path, seed_path
from svirt.spec import Accel, BootFrom, ConsoleMode, Firmware, GuestSpec, firmware_of


class AccelFallback(UserWarning):
    """accel = "auto" fell back to TCG because KVM cannot boot the guest."""


SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def qemu_escape(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


class QemuBackend:
    name = "qemu"

    def preflight(self, spec: GuestSpec, host: HostInfo) -> Accel:
        if (firmware := firmware_of(spec)) is not None:
            fw.locate(firmware)  # FirmwareMissing: the package hint
        if host.binary(QEMU_BINARY) is None:
            raise HostError(
                f"{QEMU_BINARY} is not installed",
                hint="apt-get install --no-install-recommends qemu-system-x86",
            )
        if spec.accel is Accel.TCG:
            return Accel.TCG
        if host.kvm.usable:
            return Accel.KVM
        if spec.accel is Accel.AUTO:
            warnings.warn(
                f"guest {spec.name}: KVM cannot boot it ({host.kvm.reason}); running under TCG",
                AccelFallback,
                stacklevel=2,
            )
            return Accel.TCG
        if spec.accel is Accel.KVM:
            raise HostError(
                f"guest {spec.name}: KVM acceleration requested but KVM cannot boot it: "
                f"{host.kvm.reason}",
                hint="set accel = \"auto\" or \"tcg\" to run under TCG (slower)",
            )
        return Accel.TCG

    def resources(self, spec: GuestSpec, run_dir: Path) -> list[Resource]:
        return (base_resources(spec, run_dir) + firmware_resources(spec, run_dir)
                + service_resources(spec, run_dir))

    def uses_control_socket(self) -> bool:
        return True

    def with_accel(self, spec: GuestSpec, accel: Accel) -> GuestSpec:
        # the resolved accel: DAC's kvm group and SELinux's TCG type follow it
        return spec if accel is spec.accel else spec.with_changes(accel=accel)

    def for_host(self, prepared: Prepared, host: HostInfo) -> Prepared:
        qemu = host.binary(QEMU_BINARY)
        return replace(prepared, sandbox=bool(qemu and "sandbox" in qemu.features))

    def passes_tap_fds(self) -> bool:
        return True

    def opens_tun(self) -> bool:
        return False

    def jail_needs(self, spec: GuestSpec, home: Path) -> JailNeeds:
        return JailNeeds()

    def command(self, spec: GuestSpec, prepared: Prepared) -> Command:
        return Command(tuple(build_qemu_argv(spec, prepared)),
                       console_stdin=spec.console.mode is not ConsoleMode.PTY)

    def request_shutdown(self, guest: GuestControl, *, hard: bool,
                         deadline: Deadline | None = None) -> None:
        command = "quit" if hard else "system_powerdown"
        deadline = (deadline or Deadline(QMP_SECONDS)).within(QMP_SECONDS, f"QMP {command}")
        sock = guest.control_socket(deadline)
        if sock is None:
            raise ControlError("no QMP socket for this guest")
        qmp = _clients.get(sock)
        if qmp is None:
            qmp = _clients[sock] = QmpClient(sock)
        qmp.execute(command, deadline=deadline)


_clients: weakref.WeakKeyDictionary[socket.socket, QmpClient] = weakref.WeakKeyDictionary()


def build_qemu_argv(spec: GuestSpec, prepared: Prepared) -> list[str]:
    argv = [QEMU_BINARY, "-nodefaults", "-no-user-config", "-nographic"]
    argv += ["-name", f"guest={spec.name},debug-threads=on"]
    argv += ["-uuid", str(spec.uuid)]
    if prepared.accel is Accel.KVM:
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg"]
    argv += ["-m", str(spec.memory)]
    argv += ["-smp", str(spec.vcpus)]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        argv += ["-append", " ".join(p for p in ("console=ttyS0", spec.cmdline) if p)]
    argv += firmware_args(spec, prepared.run_dir)
    if spec.console.mode is ConsoleMode.PTY:
        # interactive: the socket chardev carries keystrokes to the guest too
        argv += ["-chardev", f"socket,id=console,fd={CONSOLE_FD}"]
        argv += ["-serial", "chardev:console"]
    else:
        # stdout and stdin are the console socket (Console.send types there).  The
        # stdio chardev costs QEMU far less per byte than a socket chardev
        # (its serial port writes a byte at a time): measured +400 ms to the
        # marker of a tiny TCG guest with the socket chardev
        argv += ["-serial", "stdio"]
    listening = ",server=on,wait=off" if prepared.control_listening else ""
    argv += ["-chardev", f"socket,id=qmp,fd={CONTROL_FD}{listening}"]
    argv += ["-mon", "chardev=qmp,mode=control"]
    for i, disk in enumerate(spec.disks):
        # an ephemeral disk: the overlay, whose header names the base as backing
        path, fmt = ((layer_path(spec, i, prepared.run_dir), "qcow2") if disk.ephemeral
                     else (disk.path, str(disk.format)))
        drive = [
            f"file={qemu_escape(str(path))}",
            f"format={fmt}",
            "if=none",
            f"id=disk{i}",
        ]
        if disk.readonly:
            drive.append("readonly=on")
        if disk.shared:
            drive.append("file.locking=off")
        argv += ["-drive", ",".join(drive)]
        argv += ["-device", f"virtio-blk-pci,drive=disk{i}" + _bootindex(spec, i, BootFrom.DISK)]
    argv += cdrom_args(spec)
    for i, nic in enumerate(spec.nics):
        argv += ["-netdev", f"tap,id=net{i},fd={prepared.tap_fds[i]},vhost=off"]
        model = "virtio-net-pci" if nic.model == "virtio" else nic.model
        argv += ["-device", f"{model},netdev=net{i},mac={prepared.nic_macs[i]}"]
    argv += service_argv(spec, prepared)
    argv += ["-no-reboot"]
    if prepared.sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


def nvram_path(spec: GuestSpec, home: Path) -> Path:
    """A UEFI guest's variables store: its persistent one, or a fresh copy in
    its run directory (``home``'s parent, root's), gone with it."""
    return spec.nvram or home.parent / fw.TRANSIENT_NVRAM


def firmware_resources(spec: GuestSpec, home: Path) -> list[Resource]:
    """The cdroms (read-only, shared content) and the NVRAM store (read-write,
    this guest's alone: a persistent one held like a private disk, a
    transient one like an ephemeral layer).  The firmware code is not one:
    it lies under /usr, never relabelled, bound read-only in the jail."""
    out = [Resource(cd.path, Access.RO, ResourceKind.CDROM) for cd in spec.cdroms]
    if firmware_of(spec) is Firmware.UEFI:
        kind = ResourceKind.DISK if spec.nvram is not None else ResourceKind.LAYER
        out.append(Resource(nvram_path(spec, home), Access.RW, kind))
    return out


def firmware_args(spec: GuestSpec, home: Path) -> list[str]:
    """SeaBIOS by its path; OVMF as two pflash devices from ``-blockdev`` nodes:
    the shared code read-only, the guest's store read-write (by path: the
    jail binds it there, from the fd its root walk checked)."""
    firmware = firmware_of(spec)
    if firmware is Firmware.BIOS:
        return ["-bios", str(fw.SEABIOS)] if spec.kernel is None else []
    if firmware is not Firmware.UEFI:
        return []
    code = qemu_escape(str(fw.OVMF_CODE))
    store = qemu_escape(str(nvram_path(spec, home)))
    return [
        "-machine", "q35,pflash0=fw-code,pflash1=fw-vars",
        "-blockdev", f"driver=file,filename={code},node-name=fw-code-file,read-only=on",
        "-blockdev", "driver=raw,file=fw-code-file,node-name=fw-code,read-only=on",
        "-blockdev", f"driver=file,filename={store},node-name=fw-vars-file",
        "-blockdev", "driver=raw,file=fw-vars-file,node-name=fw-vars",
    ]


def cdrom_args(spec: GuestSpec) -> list[str]:
    """Each ISO read-only on an IDE cd drive (both firmwares boot from one)."""
    argv: list[str] = []
    for i, cd in enumerate(spec.cdroms):
        argv += ["-drive", f"file={qemu_escape(str(cd.path))},format=raw,if=none,id=cd{i},"
                 "media=cdrom,readonly=on"]
        argv += ["-device", f"ide-cd,drive=cd{i}" + _bootindex(spec, i, BootFrom.CDROM)]
    return argv


def _bootindex(spec: GuestSpec, index: int, kind: BootFrom) -> str:
    """The firmware's first boot device (none with a kernel: argv unchanged)."""
    first = spec.kernel is None and index == 0 and spec.boot is kind
    return ",bootindex=1" if first else ""


def service_resources(spec: GuestSpec, home: Path) -> list[Resource]:
    """The cloud-init seed (made by the launch in the run directory around
    ``home``): read-only, for this guest alone."""
    if spec.cloud_init is None:
        return []
    return [Resource(seed_path(home), Access.PRIVATE_RO, ResourceKind.SEED)]


def service_argv(spec: GuestSpec, prepared: Prepared) -> list[str]:
    """The seed as a read-only virtio disk (cloud-init's NoCloud finds it by
    its ``cidata`` label on any block device; a guest kernel has virtio-blk
    where it may lack an IDE/SATA CD driver), and the agent's virtio-serial
    port on the launcher's listening socket (fd :data:`AGENT_FD`)."""
    argv: list[str] = []
    if spec.cloud_init is not None:
        seed = qemu_escape(str(seed_path(prepared.run_dir)))
        argv += ["-drive", f"file={seed},format=raw,if=none,id=cidata,readonly=on"]
        argv += ["-device", "virtio-blk-pci,drive=cidata"]
    if spec.agent:
        argv += ["-chardev", f"socket,id=qga0,fd={AGENT_FD},server=on,wait=off"]
        argv += ["-device", "virtio-serial-pci,id=vser0"]
        argv += ["-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}"]
    return argv


QMP_MAX_LINE = 1 << 20  # a reply longer than this is not QEMU's
QMP_MAX_MESSAGES = 1000  # events and greetings skipped while waiting for one reply
QMP_MAX_BYTES = 4 << 20  # all bytes read for one exchange (greeting, events, reply)
#: one QMP exchange (connect, negotiate, one command and its reply), whole: QEMU
#: answers within milliseconds; a peer that does not is moved down the ladder
QMP_SECONDS = 5.0


class QmpClient:
    """Just enough QMP: read the greeting, negotiate, run one command.

    What QEMU writes is the guest's after exec: lines are bounded, the bytes
    and the messages read per exchange are bounded, the whole exchange has
    one deadline (a peer that trickles a byte at a time gains nothing), and
    a malformed message is a ControlError, never a crash.
    """

    def __init__(self, sock: socket.socket, timeout: float = QMP_SECONDS) -> None:
        self._sock = sock
        self._timeout = timeout
        self._buf = b""
        self._ready = False

    def _read_message(self, deadline: Deadline, budget: list[int]) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if len(self._buf) > QMP_MAX_LINE:
                raise ControlError(f"QMP: a message over {QMP_MAX_LINE} bytes")
            if budget[0] <= 0:
                raise ControlError(f"QMP: over {QMP_MAX_BYTES} bytes without a reply")
            chunk = recv(self._sock, min(65536, budget[0]), deadline)
            if not chunk:
                raise ControlError("QMP: QEMU closed the monitor")
            budget[0] -= len(chunk)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if len(line) > QMP_MAX_LINE:
            raise ControlError(f"QMP: a message over {QMP_MAX_LINE} bytes")
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise ControlError(f"QMP: not JSON: {line[:80]!r}") from err
        if not isinstance(msg, dict):
            raise ControlError(f"QMP: unexpected message {str(msg)[:80]!r}")
        return msg

    def _command(self, name: str, args: dict[str, Any] | None, deadline: Deadline) -> Any:
        request: dict[str, Any] = {"execute": name}
        if args:
            request["arguments"] = args
        send_all(self._sock, json.dumps(request).encode() + b"\n", deadline)
        budget = [QMP_MAX_BYTES]
        for _ in range(QMP_MAX_MESSAGES):
            msg = self._read_message(deadline, budget)
            if "event" in msg or "QMP" in msg:
                continue
            if "error" in msg:
                error = msg["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise ControlError(f"QMP {name}: {str(desc)[:200]}")
            return msg.get("return")
        raise ControlError(f"QMP {name}: no reply among QEMU's messages")

    def negotiate(self, deadline: Deadline | None = None) -> None:
        if not self._ready:
            deadline = deadline or Deadline(self._timeout, "QMP qmp_capabilities")
            self._command("qmp_capabilities", None, deadline)
            self._ready = True

    def execute(self, name: str, args: dict[str, Any] | None = None,
                deadline: Deadline | None = None) -> Any:
        """Run ``name``: negotiation (the first time) and the command share
        one deadline (``timeout`` seconds from now unless given)."""
        deadline = deadline or Deadline(self._timeout, f"QMP {name}")
        self.negotiate(deadline)
        return self._command(name, args, deadline)
