"""The jail: what a hypervisor can see of the host once it runs.

Every backend runs jailed unless the spec says ``jail = false``.  Between
fork and exec the child (still root) builds it, in this order:

1. its own mount, IPC and UTS namespaces (the PID namespace is made by the
   parent around the fork: :func:`new_pid_namespace`, so the hypervisor is
   PID 1 of a namespace holding only itself and its helpers);
2. a tmpfs as the new root, in the guest's run directory (root's), holding
   only: ``/usr`` bound read-only (nosuid, nodev) with the ``/bin``,
   ``/sbin`` and ``/lib*`` links or binds the host has; the guest's objects,
   each bound at its own path from the fd the launcher checked (read-only
   unless the guest may write it); its home and its control directory;
   ``/dev`` with only null, zero, full, random, urandom, and kvm and
   net/tun when used (bind mounts of the host's nodes: their labels stay);
   a private ``/dev/shm`` and ``/tmp``; ``/proc`` of its PID namespace;
   and its init, tini, as an execute-only file (:func:`init_copy`);
3. ``pivot_root`` into it and the old root detached (in a chroot, where
   pivot_root cannot work, ``chroot`` into it instead: without capabilities
   the guest cannot leave it either way);
4. a fixed umask, RLIMIT_CORE = 0, RLIMIT_NOFILE, ``no_new_privs``, an
   empty ambient capability set (the DAC driver's uid switch then empties
   the rest), and a seccomp filter: no user namespaces, no ptrace or
   process_vm/pidfd access to PID 1;
5. a network namespace of its own (loopback only) unless it is a UML guest
   with nics (QEMU gets its taps as fds, which work from any namespace).

Nothing here runs a shell or reads a path the guest controls: sources are
fds opened by the launcher (``/proc/self/fd/N``) or host system paths.

PID 1 of the jail is tini (the hypervisor is its child), and it runs as the
guest's uid: to the kernel the hypervisor may then ptrace it, open its
``/proc/1/mem`` read-write, read its environ, maps and fds (the same uid
and a dumpable process is all ``ptrace_may_access`` asks).  seccomp sees
system call numbers, not paths, so it cannot refuse ``open("/proc/1/mem")``.
What holds is the kernel's own rule: a process that execs a file it may not
read is made non-dumpable (``would_dump()`` in fs/exec.c), and a
non-dumpable process's ``/proc`` files belong to root and refuse every
ptrace-mode access (mem, environ, maps, auxv, fd, exe/cwd/root links,
ptrace, process_vm_*, pidfd_getfd) to a process without CAP_SYS_PTRACE.
``PR_SET_DUMPABLE`` would not do: exec resets it.  So the jail's init is a
copy of tini, root's, mode 0111, that the launcher writes in the guest's
run directory (:func:`init_copy`) and the jail binds read-only at
:data:`JAIL_INIT`; tini's own exec of the hypervisor (a readable file)
makes the hypervisor dumpable again, for itself and UML's tracing of its
children.  Signals need nothing: the init of a PID namespace gets no signal from inside it
that it has no handler for (SIGKILL and SIGSTOP included), and tini
forwards the others to the hypervisor, which may signal itself anyway.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.errors import LaunchError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
SYS_PIVOT_ROOT = 155
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

DEVICES = ("null", "zero", "full", "random", "urandom")
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: the first fd number a bind source is moved to in the child (closed before exec)
FIRST_BIND_FD = 200
NOFILE = 4096
UMASK = 0o077
HOSTNAME = b"svirt-guest"
#: where the jail's init (the execute-only copy of tini) is, inside the jail
JAIL_INIT = "/.svirt-init"
#: the copy's name in the guest's run directory (root's, 0755; removed at release)
INIT_COPY = "init"
INIT_MODE = 0o111
#: the security labels the copy takes over from tini (the policies label
#: tini's exec as the guest domains' entrypoint: svirt_init_exec_t)
INIT_XATTRS = ("security.selinux", "security.SMACK64")


@dataclass(frozen=True)
class Bind:
    """One object bound into the jail at ``target`` (its own path)."""

    fd: int  # the launcher's O_PATH fd of the checked object (a child fd number in the plan)
    target: Path
    is_dir: bool
    writable: bool


@dataclass(frozen=True)
class JailPlan:
    root: Path  # an empty directory only root can write (mounted over with a tmpfs)
    binds: tuple[Bind, ...]
    devices: tuple[str, ...]  # under /dev: "null", ..., "kvm", "net/tun"
    shm_mib: int  # the private /dev/shm (UML keeps the guest's RAM there)
    cwd: Path
    #: the security drivers' options for the jail's tmpfs mounts (root, /tmp,
    #: /dev/shm): SELinux's guest tmpfs type at its level
    #: (``context="...svirt_tmpfs_t:s0:cA,cB"``), SMACK's ``smackfsroot=`` and
    #: ``smackfsdef=`` the guest's label
    tmpfs_options: str = ""
    #: a network namespace of its own (only loopback): every guest but a UML
    #: one with nics, which opens its taps by name in the current namespace
    new_netns: bool = True
    #: the execute-only copy of tini (:func:`init_copy`), bound read-only at
    #: :data:`JAIL_INIT`
    init: Path | None = None


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"jail: {what}: {os.strerror(err)}")


def fork_in_new_pid_namespace() -> int:
    """fork(), the child being PID 1 of a new PID namespace.  The setting is
    per thread and put back at once in the parent, so other launcher threads
    and later forks are unaffected."""
    libc = _libc()
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        pid = os.fork()
        if pid != 0:
            _check(libc.setns(own, CLONE_NEWPID), "setns back to the launcher's PID namespace")
        return pid
    finally:
        os.close(own)


class _Tree:
    """The jail's tree, built from the parent's plan: mounts below ``root``
    (the calls the child makes, their arguments prepared in the parent)."""

    def __init__(self, libc: Any, plan: JailPlan) -> None:
        self.libc = libc
        self.root = os.fsencode(plan.root)
        self.ctx = f",{plan.tmpfs_options}" if plan.tmpfs_options else ""

    def mount(self, src: bytes | None, dst: bytes, fstype: bytes | None, flags: int,
              data: bytes | None, what: str) -> None:
        _check(self.libc.mount(src, dst, fstype, flags, data), what)

    def inside(self, path: Path | str) -> bytes:
        return self.root + os.fsencode(path if str(path).startswith("/") else f"/{path}")

    @staticmethod
    def mkdirs(path: bytes) -> None:
        os.makedirs(path, mode=0o755, exist_ok=True)

    def bind(self, src: bytes, dst: bytes, *, is_dir: bool, writable: bool,
             device: bool = False) -> None:
        if is_dir:
            self.mkdirs(dst)
        else:
            self.mkdirs(os.path.dirname(dst))
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        self.mount(src, dst, None, MS_BIND, None, f"bind {os.fsdecode(dst)}")
        # what the guest may write it may not execute (its home, its disks:
        # svirt/launcher/storage.py mounts the home noexec, which a bind drops)
        flags = (MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if device else MS_NODEV)
                 | (0 if writable else MS_RDONLY) | (MS_NOEXEC if writable and not device
                                                     else 0))
        self.mount(None, dst, None, flags, None, f"remount {os.fsdecode(dst)}")

    def system(self) -> None:
        """The tmpfs root, with ``/usr`` read-only and the host's ``/bin``,
        ``/sbin`` and ``/lib*`` links (or binds)."""
        self.mount(b"svirt-jail", self.root, b"tmpfs", MS_NOSUID | MS_NODEV,
                   f"mode=0755,size=1m{self.ctx}".encode(), "tmpfs as the new root")
        self.bind(b"/usr", self.inside("/usr"), is_dir=True, writable=False)
        for name in SYSTEM_LINKS:
            host = f"/{name}"
            if os.path.islink(host):
                os.symlink(os.readlink(host), self.inside(host))
            elif os.path.isdir(host):
                self.bind(os.fsencode(host), self.inside(host), is_dir=True, writable=False)

    def objects(self, binds: tuple[Bind, ...]) -> None:
        """The guest's objects, each at its own path."""
        for b in binds:
            # the launcher's fd names a mount of the old namespace, which cannot
            # be bound from here: open the path in this namespace and bind it only
            # if it is the very inode the launcher checked
            checked = os.fstat(b.fd)
            fd = os.open(b.target, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
                raise LaunchError(f"jail: {b.target} was replaced since it was checked")
            self.bind(f"/proc/self/fd/{fd}".encode(), self.inside(b.target), is_dir=b.is_dir,
                      writable=b.writable)
            os.close(fd)
            os.close(b.fd)

    def runtime(self, plan: JailPlan) -> None:
        """``/dev`` (its few nodes), ``/dev/shm`` and ``/tmp``, the init, ``/proc``."""
        self.mkdirs(self.inside("/dev"))
        for dev in (*DEVICES, *plan.devices):
            self.bind(os.fsencode(f"/dev/{dev}"), self.inside(f"/dev/{dev}"), is_dir=False,
                      writable=True, device=True)
        os.symlink("/proc/self/fd", self.inside("/dev/fd"))
        for path, size in (("/dev/shm", plan.shm_mib), ("/tmp", 64)):  # noqa: S108
            self.mkdirs(self.inside(path))
            self.mount(b"svirt-" + path.rsplit("/", 1)[1].encode(), self.inside(path), b"tmpfs",
                       MS_NOSUID | MS_NODEV, f"mode=1777,size={size}m{self.ctx}".encode(),
                       f"tmpfs on {path}")
        if plan.init is not None:
            self.bind(os.fsencode(plan.init), self.inside(JAIL_INIT), is_dir=False,
                      writable=False)
        self.mkdirs(self.inside("/proc"))
        self.mount(b"proc", self.inside("/proc"), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   None, "mount /proc")


def build_in_child(plan: JailPlan) -> Callable[[], None]:
    """The child step that builds the jail and enters it (prepared in the
    parent: after fork only system calls run)."""
    from svirt.launcher.seccomp import install_in_child, jail_filter

    libc = _libc()
    tree = _Tree(libc, plan)
    confine = install_in_child(jail_filter())

    def setup() -> None:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
                            | (CLONE_NEWNET if plan.new_netns else 0)), "unshare")
        _check(libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")
        # nothing below may propagate back to the host (in a chroot "/" is no
        # mount point: then the run directory's mount is made private)
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            tree.mount(b"none", b"/run", None, MS_REC | MS_PRIVATE, None, "make /run private")
        tree.system()
        tree.objects(plan.binds)
        tree.runtime(plan)
        _enter(libc, tree.root)
        os.chdir(plan.cwd)
        os.umask(UMASK)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
               "clear the ambient capabilities")
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        confine()  # no user namespaces, hands off PID 1 (svirt/launcher/seccomp.py)

    return setup


def init_copy(source: str, directory: Path) -> Path:
    """The execute-only copy of ``source`` (tini's real path, a host system
    file) in ``directory`` (the guest's run directory: root's, 0755), made or
    checked: a regular file of root's, mode 0111, one link, the same bytes
    and security labels as ``source``.  Anything else of that name is
    replaced through a temporary name and a rename; nothing is followed,
    opened for writing or waited on.  Per guest rather than per host, so
    release takes it with the run directory and no guest's launch writes a
    file another guest's jail execs.  Cost: 27 KiB read and written, ~0.2 ms."""
    try:
        with open(source, "rb") as f:
            data = f.read()
        labels = {name: value for name in INIT_XATTRS
                  if (value := _xattr(source, name)) is not None}
        parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise LaunchError(f"jail: the init's copy: {err}") from err
    try:
        if not _is_copy(parent, data, labels):
            tmp = f".{INIT_COPY}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o100, dir_fd=parent)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, INIT_MODE)
                for name, value in labels.items():
                    os.setxattr(fd, name, value)
            except BaseException:
                os.unlink(tmp, dir_fd=parent)
                raise
            finally:
                os.close(fd)
            os.rename(tmp, INIT_COPY, src_dir_fd=parent, dst_dir_fd=parent)
    except OSError as err:
        raise LaunchError(f"jail: the init's copy in {directory}: {err}") from err
    finally:
        os.close(parent)
    return directory / INIT_COPY


def _xattr(path: str | int, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _is_copy(parent: int, data: bytes, labels: dict[str, bytes]) -> bool:
    try:
        fd = os.open(INIT_COPY, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=parent)
    except OSError:
        return False  # absent, a link, a FIFO nobody writes: replaced
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1
                or stat.S_IMODE(st.st_mode) != INIT_MODE or st.st_size != len(data)):
            return False
        with os.fdopen(os.dup(fd), "rb") as f:
            if f.read(len(data) + 1) != data:
                return False
        return all(_xattr(fd, name) == labels.get(name) for name in INIT_XATTRS)
    finally:
        os.close(fd)


def _enter(libc: Any, root: bytes) -> None:
    """pivot_root into ``root`` and detach the old root; chroot in a chroot."""
    os.chdir(root)
    os.mkdir(b".old-root", 0o700)
    if libc.syscall(SYS_PIVOT_ROOT, b".", b".old-root") == 0:
        os.chdir(b"/")
        _check(libc.umount2(b"/.old-root", MNT_DETACH), "detach the old root")
        os.rmdir(b"/.old-root")
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, "pivot_root")
    os.rmdir(b".old-root")  # "/" is no mount point (a chroot): chroot instead
    os.chroot(b".")
    os.chdir(b"/")


def plan_binds(objects: Sequence[tuple[int, Path, bool, bool]]) -> tuple[Bind, ...]:
    """Binds from (fd, path, is_dir, writable), fds numbered for the child."""
    return tuple(Bind(FIRST_BIND_FD + i, path, is_dir, writable)
                 for i, (_fd, path, is_dir, writable) in enumerate(objects))


def clear_inheritable(prctl: Any) -> None:
    """Empty the inheritable set (a uid switch does not)."""
    prctl.cap_inheritable.limit()
