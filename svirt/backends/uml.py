"""User-Mode-Linux: argv builder and an mconsole client.

The "kernel" of a UML guest is the ``linux`` executable itself.  Its console
is the socket the launcher passes as fd 3 (``con0=fd:3,fd:3``); its control
channel is the mconsole datagram socket UML creates in ``uml_dir/umid/``,
where ``uml_dir`` is the guest's private run directory.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import struct
from dataclasses import replace
from pathlib import Path

from svirt.backends.base import (
    CONSOLE_FD,
    Command,
    GuestControl,
    JailNeeds,
    Prepared,
    base_resources,
)
from svirt.backends.uml_options import refuse_host_options
from svirt.deadline import Deadline, recvmsg, send_all
from svirt.errors import ControlError, HostError
from svirt.host import UML_BINARY, HostInfo
from svirt.resources import Access, Resource, ResourceKind, uml_ubd_value
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
# one mconsole exchange (send, every reply fragment), whole: UML's kernel
# answers at once; a guest that does not is moved down the ladder
MCONSOLE_TIMEOUT = 2.0
MCONSOLE_MAX_REPLIES = 64  # fragments of one answer (64 x 512 bytes is plenty)
#: where a jail = false UML keeps the guest's RAM (the jail has its own)
HOST_SHM = Path("/dev/shm")  # noqa: S108
_REQUEST = struct.Struct(f"=III{MCONSOLE_MAX_DATA}s")
_REPLY = struct.Struct(f"=III{MCONSOLE_MAX_DATA}s")


class UmlBackend:
    name = "uml"

    def preflight(self, spec: GuestSpec, host: HostInfo) -> Accel:
        refuse_host_options(spec, host)  # before anything is touched
        if host.binary(UML_BINARY) is None and not os.access(spec.kernel_path(), os.X_OK):
            raise HostError(
                "User-Mode-Linux is not installed",
                hint="apt-get install --no-install-recommends user-mode-linux",
            )
        if not os.access(spec.kernel_path(), os.X_OK):
            raise HostError(
                f"guest {spec.name}: kernel {spec.kernel} is not an executable UML kernel",
                hint="a UML guest's kernel is the 'linux' binary, e.g. /usr/bin/linux",
            )
        if not spec.jail:
            check_host_shm(spec.name)
        return Accel.TCG  # not meaningful for UML

    def resources(self, spec: GuestSpec, run_dir: Path) -> list[Resource]:
        # the kernel is an executable (e.g. /usr/bin/linux), not guest data
        return [
            Resource(run_dir, Access.RW, ResourceKind.RUN_DIR),
            *base_resources(spec, run_dir, kernel=False),
        ]

    def uses_control_socket(self) -> bool:
        return False

    def with_accel(self, spec: GuestSpec, accel: Accel) -> GuestSpec:
        return spec  # accel means nothing to UML

    def for_host(self, prepared: Prepared, host: HostInfo) -> Prepared:
        # an AMX host: FXSAVE only, so the guest's glibc must not use AVX
        return replace(prepared, no_avx=host.uml_xstate_fallback)

    def passes_tap_fds(self) -> bool:
        return False

    def opens_tun(self) -> bool:
        return True

    def jail_needs(self, spec: GuestSpec, home: Path) -> JailNeeds:
        # the UML "kernel" is the hypervisor binary itself, not a held object;
        # its RAM is a file in /dev/shm; mconsole replies go to the launcher's sockets
        kernel = Path(os.path.realpath(spec.kernel_path()))
        binaries = () if kernel.is_relative_to("/usr") else (kernel,)
        return JailNeeds(binaries, control_dir=True, shm_mib=spec.memory + 64, home_cwd=True)

    def command(self, spec: GuestSpec, prepared: Prepared) -> Command:
        # no TMPDIR: UML's memory file then goes to /dev/shm, where SELinux
        # policy gives it svirt_tmpfs_t (a file in the run dir would be
        # svirt_image_t, which the guest may not map executable)
        return Command(tuple(build_uml_argv(spec, prepared)))

    def request_shutdown(self, guest: GuestControl, *, hard: bool,
                         deadline: Deadline | None = None) -> None:
        command = "halt" if hard else "cad"
        deadline = (deadline or Deadline(MCONSOLE_TIMEOUT)).within(
            MCONSOLE_TIMEOUT, f"mconsole {command}")
        with guest.creating_sockets():
            mconsole_command(guest.run_dir, guest.name, command,
                             client_dir=guest.control_dir, guest_uid=guest.guest_uid,
                             guest_pid=guest.pid, deadline=deadline)


def check_host_shm(name: str) -> None:
    """HostError unless the host's /dev/shm is a directory every uid may
    create in (sticky, 1777): a jail = false UML makes its RAM file there as
    the guest's uid, and without it dies before its first line."""
    try:
        st = os.stat(HOST_SHM)
    except OSError as err:
        raise HostError(f"guest {name}: {HOST_SHM}: {err.strerror}", hint=_SHM_HINT) from err
    if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) & 0o1777 != 0o1777:
        raise HostError(f"guest {name}: jail = false keeps the guest's RAM in {HOST_SHM}, "
                        f"which is not a world-writable sticky directory "
                        f"(mode {stat.S_IMODE(st.st_mode):o})", hint=_SHM_HINT)


_SHM_HINT = ("mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm, or run the guest "
             "jailed (jail = true)")


def build_uml_argv(spec: GuestSpec, prepared: Prepared) -> list[str]:
    argv = [str(spec.kernel_path())]
    argv.append(f"mem={spec.memory}M")
    argv.append(f"umid={spec.name}")
    argv.append(f"uml_dir={prepared.run_dir}")
    argv += ["con=null", "ssl=null", f"con0=fd:{CONSOLE_FD},fd:{prepared.console_out_fd}"]
    if spec.initrd is not None:
        argv.append(f"initrd={spec.initrd}")
    for i, disk in enumerate(spec.disks):
        if disk.ephemeral:  # UML creates the COW file and opens the base read-only
            argv.append(f"ubd{i}={uml_ubd_value(spec, i, prepared.run_dir)}")
            continue
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


_CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def control_socket_name() -> str:
    """The name of a launcher's mconsole reply socket in the registry's
    control directory: ``mc.PID.START.HEX`` (START: the launcher's start in
    clock ticks since boot), so ``svirt gc`` tells a dead launcher's socket
    from a live one's even when the pid was given to another process
    (:meth:`svirt.launcher.registry.Registry.sweep_control`)."""
    from svirt.procfs import start_time

    pid = os.getpid()
    return f"mc.{pid}.{start_time(pid) or 0}.{secrets.token_hex(4)}"


def mconsole_command(
    home: Path,
    umid: str,
    command: str,
    *,
    client_dir: Path,
    guest_uid: int | None,
    guest_pid: int | None,
    timeout: float = MCONSOLE_TIMEOUT,
    deadline: Deadline | None = None,
) -> str:
    """Send one mconsole command to the guest whose home is ``home``.

    The home directory belongs to the guest, so its socket is reached by an
    fd walk that follows no symlink (:func:`open_beneath`), must be a socket
    owned by the guest's uid, and is connected through that fd: a guest can
    never point the launcher at another guest's socket or at a host file.
    The launcher's own socket is bound in ``client_dir``, which only root can
    write; the guest gets write access to that one socket.  Replies count
    only when the kernel says they came from the guest (SCM_CREDENTIALS).
    The whole exchange (the request and every fragment of the reply) ends
    by ``deadline`` (else ``timeout`` seconds from now): a guest that
    trickles fragments gains nothing.
    """
    from svirt.safefs import open_beneath, open_dir

    deadline = deadline or Deadline(timeout, f"mconsole {command}")
    data = command.encode()
    if len(data) >= MCONSOLE_MAX_DATA:
        raise ControlError(f"mconsole command too long: {command[:40]!r}")
    request = _REQUEST.pack(MCONSOLE_MAGIC, MCONSOLE_VERSION, len(data), data)
    try:
        home_fd = open_dir(str(home))
        try:
            server_fd = open_beneath(home_fd, f"{umid}/mconsole")
        finally:
            os.close(home_fd)
    except OSError as err:
        raise ControlError(f"mconsole: {home}/{umid}/mconsole: {err.strerror or err}") from None
    try:
        st = os.fstat(server_fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"mconsole: {umid}/mconsole in {home} is not a socket")
        if guest_uid is not None and st.st_uid != guest_uid:
            raise ControlError(
                f"mconsole: {umid}/mconsole in {home} belongs to uid {st.st_uid}, "
                f"not the guest's {guest_uid}")
        name = control_socket_name()
        ctl_fd = open_dir(str(client_dir))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                # by its real path: the guest answers to the address it sees.
                # Every directory on it is root's, so the name cannot be swapped
                sock.bind(str(client_dir / name))
                if guest_uid is not None:
                    # root's directory: nobody else can swap the name
                    os.chown(name, guest_uid, -1, dir_fd=ctl_fd, follow_symlinks=False)
                    os.chmod(f"/proc/self/fd/{ctl_fd}/{name}", 0o600)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                sock.connect(f"/proc/self/fd/{server_fd}")  # a datagram socket: at once
                send_all(sock, request, deadline)
                return _read_replies(sock, command, guest_uid, guest_pid, deadline)
            except OSError as err:
                raise ControlError(f"mconsole {command}: {err.strerror or err}") from None
            finally:
                try:
                    os.unlink(name, dir_fd=ctl_fd)
                except OSError:
                    pass
                os.close(ctl_fd)
    finally:
        os.close(server_fd)


def _read_replies(sock: socket.socket, command: str, guest_uid: int | None,
                  guest_pid: int | None, deadline: Deadline) -> str:
    """Replies are data from a hostile peer: sizes, counts and the time for
    all of them are bounded."""
    replies: list[str] = []
    for _ in range(MCONSOLE_MAX_REPLIES):  # UML splits long answers
        raw, ancillary, flags, _addr = recvmsg(sock, _REPLY.size,
                                               socket.CMSG_SPACE(_CRED.size), deadline)
        creds = [_CRED.unpack(d[:_CRED.size]) for lvl, typ, d in ancillary
                 if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS
                 and len(d) >= _CRED.size]
        if not creds or (guest_uid is not None and creds[0][1] != guest_uid):
            raise ControlError(f"mconsole {command}: a reply not sent by the guest")
        if guest_pid is not None and not _same_session(creds[0][0], guest_pid,
                                                       uid_checked=guest_uid is not None):
            raise ControlError(f"mconsole {command}: a reply from pid {creds[0][0]}, "
                               "which is not the guest's")
        if len(raw) < 12:
            raise ControlError(f"mconsole {command}: a short reply ({len(raw)} bytes)")
        code, more, length, payload = _REPLY.unpack(raw.ljust(_REPLY.size, b"\0"))
        if flags & socket.MSG_TRUNC or more > 1 or length > min(MCONSOLE_MAX_DATA,
                                                                   len(raw) - 12):
            raise ControlError(f"mconsole {command}: a malformed reply")
        text = payload[:length].decode(errors="replace")
        replies.append(text)
        if code:
            raise ControlError(f"mconsole {command}: {text[:200]}")
        if not more:
            return "".join(replies)
    raise ControlError(f"mconsole {command}: the guest would not stop replying")


def _same_session(pid: int, leader: int, *, uid_checked: bool = False) -> bool:
    """``pid`` is the guest's hypervisor or one of its helpers (same session).

    A sender that is gone by the time we look (a guest told ``cad`` may
    answer and halt before a loaded host reads the reply: 4 guests of 20 in
    a ``svirt stop --all``) counts when the kernel already vouched for its
    uid, the guest's own: nobody else runs as it."""
    from svirt.procfs import stat_fields

    if pid == leader:
        return True
    fields = stat_fields(pid)
    if fields is None:
        return uid_checked
    return len(fields) > 3 and int(fields[3]) == leader
