"""Kernel objects that belong to a guest's uid, not to its processes.

A process's files, memory and children end with it (and with its cgroup,
which release kills whole), but a few kernel objects belong to the uid and
outlive every process of it:

- **SysV IPC** (shared memory segments, semaphore sets, message queues):
  they live in their IPC namespace until removed.  A jailed guest has an
  IPC namespace of its own, which goes with its last process; a
  ``jail = false`` guest shares the host's, so what it made there held host
  memory after its release and the next guest given its uid could attach
  it.  :func:`remove_sysv_ipc` removes every object of the host's IPC
  namespace whose owner or creator (``uid``/``cuid`` in
  ``/proc/sysvipc/{shm,sem,msg}``) is the guest's uid (``IPC_RMID``, as
  root).
- **The kernel keyring**: the user keyring (``@u``) and user session
  keyring (``@us``) hang off the uid in the user namespace and keep what
  was linked into them.  The seccomp filter refuses the keyring calls to
  every hypervisor (jailed or not, :mod:`svirt.launcher.seccomp`), so none
  should be there; :func:`clear_keyrings` still clears both when
  ``/proc/key-users`` lists the uid (a forked child that takes the uid and
  calls ``keyctl(KEYCTL_CLEAR)``: root cannot name another uid's user
  keyring).  That child has the guest's uid, so any process whose real or
  effective uid is the guest's may stop it: it is waited for at most
  :data:`KEYRING_CHILD_SECONDS`, then killed, and the record is
  restore-failed.

Release (:meth:`svirt.launcher.state.Registry.release`) calls
:func:`remove_uid_objects` after the guest's processes are killed and
before its uid is given back; what cannot be removed makes the record
``restore-failed`` (the uid is then not handed out again).  Neither
survives a reboot, so records of an earlier boot skip it.  POSIX message
queues (``mq_open``) and files in a world-writable ``/dev/shm`` or
``/tmp`` of a ``jail = false`` guest are not covered (see README).
"""

from __future__ import annotations

import ctypes
import errno
import os

from svirt.errors import StateError

IPC_RMID = 0
#: /proc/sysvipc file, its id column, and how to remove one (ctypes call)
_KINDS = (("shm", "shmid", "shared memory segment"), ("sem", "semid", "semaphore set"),
          ("msg", "msqid", "message queue"))
SYS_KEYCTL = 250  # x86_64
KEYCTL_CLEAR = 7
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def sysv_objects(uid: int, base: str = "/proc/sysvipc") -> list[tuple[str, int]]:
    """(kind, id) of every SysV IPC object owned or created by ``uid`` in
    this process's IPC namespace."""
    found: list[tuple[str, int]] = []
    for kind, id_column, _what in _KINDS:
        try:
            with open(f"{base}/{kind}", encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue  # a kernel without SysV IPC
        if not lines:
            continue
        header = lines[0].split()
        try:
            at_id, at_uid, at_cuid = (header.index(c) for c in (id_column, "uid", "cuid"))
        except ValueError:
            continue
        for line in lines[1:]:
            fields = line.split()
            if len(fields) != len(header):
                continue
            try:
                if uid in (int(fields[at_uid]), int(fields[at_cuid])):
                    found.append((kind, int(fields[at_id])))
            except ValueError:
                continue
    return found


def remove_sysv_ipc(uid: int) -> list[str]:
    """Remove ``uid``'s SysV IPC objects (see the module's text); what was done."""
    libc = _libc()
    done, errors = [], []
    for kind, ident in sysv_objects(uid):
        if kind == "shm":
            rc = libc.shmctl(ctypes.c_int(ident), ctypes.c_int(IPC_RMID), None)
        elif kind == "sem":
            rc = libc.semctl(ctypes.c_int(ident), ctypes.c_int(0), ctypes.c_int(IPC_RMID))
        else:
            rc = libc.msgctl(ctypes.c_int(ident), ctypes.c_int(IPC_RMID), None)
        what = dict((k, w) for k, _c, w in _KINDS)[kind]
        if rc == 0:
            done.append(f"SysV {what} {ident} of uid {uid}: removed")
            continue
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.EIDRM):  # gone meanwhile
            errors.append(f"SysV {what} {ident}: {os.strerror(err)}")
    if errors:
        raise StateError(f"cannot remove uid {uid}'s SysV IPC objects: " + "; ".join(errors),
                         hint="ipcs shows them; ipcrm removes one by id")
    return done


def has_keys(uid: int, path: str = "/proc/key-users") -> bool:
    """Whether the kernel keeps keys (or keyrings) for ``uid``."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return any(line.split(":", 1)[0].strip() == str(uid) for line in f)
    except OSError:
        return False  # a kernel without keys


def clear_keyrings(uid: int) -> bool:
    """Clear ``uid``'s user and user session keyrings (a child takes the uid
    for it: only the uid reaches its own); whether there was anything to
    clear.  Raises StateError when the child fails."""
    if not has_keys(uid):
        return False
    libc = _libc()
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: system calls only, then _exit
        code = 1
        try:
            if (libc.setgroups(ctypes.c_size_t(0), None) == 0
                    and libc.setresgid(uid, uid, uid) == 0
                    and libc.setresuid(uid, uid, uid) == 0):
                code = 0
                for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
                    if syscall(ctypes.c_long(SYS_KEYCTL), ctypes.c_long(KEYCTL_CLEAR),
                               ctypes.c_long(ring)) != 0:
                        code = 2
        finally:
            os._exit(code)
    status = _wait_bounded(pid, KEYRING_CHILD_SECONDS)
    if status is None:
        raise StateError(
            f"cannot clear uid {uid}'s keyrings: the child that took the uid did not end "
            f"within {KEYRING_CHILD_SECONDS:g} s (stopped by a process of that uid?); killed",
            hint=f"look for processes whose effective or saved uid is {uid} "
                 f"(ps -eo pid,ruid,euid,suid,cmd), kill them, then run svirt gc")
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise StateError(f"cannot clear uid {uid}'s keyrings (child status {status})",
                         hint="as root: setpriv --reuid UID --regid UID --clear-groups "
                              "keyctl clear @u")
    return True


#: how long release waits for the keyring child (it makes three system calls):
#: any process whose real or effective uid is the guest's may signal it
#: (SIGSTOP), and one such process can outlive the guest (a set-uid file of
#: the guest's run by another user), so the wait has a bound
KEYRING_CHILD_SECONDS = 5.0


def _wait_bounded(pid: int, seconds: float) -> int | None:
    """The wait status of child ``pid`` once it ends within ``seconds``; else
    SIGKILL it (root may, stopped or not), reap it, and None."""
    import select
    import signal
    import time

    fd = os.pidfd_open(pid)
    try:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                if left <= 0:
                    break
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            # readable but not reapable: a stop, not an end; keep waiting
            time.sleep(0.01)
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    os.waitpid(pid, 0)  # SIGKILL ends even a stopped process
    return None


def remove_uid_objects(uid: int) -> list[str]:
    """Everything above for ``uid``: what was done."""
    done = remove_sysv_ipc(uid)
    if clear_keyrings(uid):
        done.append(f"keyrings of uid {uid}: cleared")
    return done


__all__ = ["remove_uid_objects", "remove_sysv_ipc", "clear_keyrings", "sysv_objects",
           "has_keys"]
