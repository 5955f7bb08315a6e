"""What a guest's uid leaves behind: stray processes, and kernel objects.

**Processes.**  Release kills what is left of a guest: its cgroup whole,
then any process with its uid in no svirt cgroup
(:func:`kill_guest_leftovers`); reconcile finds processes no record of the
registry accounts for (:func:`find_orphans`).  Both by what root controls
(cgroups, uids), never by what a process carries.

**Kernel objects that belong to the uid, not to its processes.**
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

Release (:meth:`svirt.launcher.registry.Registry.release`) calls
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
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from svirt.errors import StateError, SvirtError
from svirt.launcher.record import Record, why
from svirt.procfs import has_uid, kill_process, processes_by_uid, uids_of

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



# ------------------------------------------------------------- processes
def kill_guest_leftovers(record: Record, state: Path) -> int:
    """SIGKILL what is left of a guest: its cgroup, whole (cgroupkill.kill_dirs:
    cgroup.kill, or freeze-kill-thaw until empty, so a fork chain cannot
    outrun it); then, as a second net, any process with its DAC uid (real,
    effective or saved) that is in no svirt cgroup, or in this guest's
    (never one in another guest's or another registry's: the kernel says
    which cgroup a process is in, the process cannot).  How many processes
    were signalled.  Raises StateError when the cgroup does not empty."""
    from svirt.launcher import cgroupfs, cgroupkill, cgroups

    killed = cgroupkill.kill_dirs(cgroups.journal_dirs(record.journal))
    uid = record.guest_uid
    if uid is None or uid < 1000:
        return killed
    own = cgroupfs.leaf_name(record.name, record.slot, cgroupfs.registry_tag(state))

    def still_ours(pid: int) -> bool:
        return _has_uid(pid, uid, (None, own))

    for _ in range(50):
        pids = [pid for pid, _uid in processes_by_uid(lambda u: u == uid) if still_ours(pid)]
        if not pids:
            break
        killed += sum(cgroupkill.kill_checked(pid, still_ours) for pid in pids)
        time.sleep(0.02)
    return killed


def release_processes(record: Record, state: Path, report: list[str]) -> list[str]:
    """Release's first step (this boot's records only): kill what is left
    of the guest, then remove what its uid owns.  What was done goes to
    ``report``; the errors are returned (kept in the record, retried)."""
    errors: list[str] = []
    if not record.this_boot():
        return errors
    try:
        # also when the launcher died before it recorded the hypervisor
        killed = kill_guest_leftovers(record, state)
        if killed:
            report.append(f"killed {killed} leftover process(es) of the guest")
    except Exception as err:  # noqa: BLE001 - kept in the record, retried
        errors.append(f"leftover processes: {why(err)}")
    if not errors:
        # what belongs to the uid, not to a process (SysV IPC, keyrings):
        # removed once no process of the guest is left to make more
        try:
            report += remove_guest_uid_objects(record)
        except Exception as err:  # noqa: BLE001 - kept in the record, retried
            errors.append(f"uid objects: {why(err)}")
    return errors


def remove_guest_uid_objects(record: Record) -> list[str]:
    """The guest's uid's SysV IPC objects and keyrings (above): they outlive
    its processes and cgroup, and a ``jail = false`` guest makes them in the
    host's namespaces.  What was done."""
    uid = record.guest_uid
    if uid is None or uid < 1000:
        return []
    return remove_uid_objects(uid)


def find_orphans(state: Path, records: Sequence[Record], uid_range: range | None = None
                 ) -> list[tuple[int, int, str | None]]:
    """(pid, uid, svirt leaf or None) of live processes that no record of the
    registry at ``state`` accounts for: guests whose record was lost.  Every
    process in one of this registry's cgroups (``*.TAG``) whose leaf no
    record names, and every process in the DAC ``uid_range`` that is in no
    svirt cgroup (a guest cannot leave its cgroup) unless its uid is a
    record's.  A process in another registry's cgroup is that registry's.
    ``uid_range``: the DAC driver's unless given."""
    from svirt.launcher import cgroupfs, cgroupkill

    if uid_range is None:
        from svirt.security.dac import DacDriver

        dac = DacDriver()
        uid_range = range(dac.uid_base, dac.uid_base + dac.uid_count)
    tag = cgroupfs.registry_tag(state)
    known = {cgroupfs.leaf_name(r.name, r.slot, tag) for r in records}
    ours = set()
    for record in records:
        if record.guest_uid is not None:
            ours.add(record.guest_uid)
    out: dict[int, tuple[int, str | None]] = {}
    for leaf, dirs in cgroupfs.leaves(tag).items():
        if leaf not in known and cgroupfs.tasks_of(dirs):
            with cgroupkill.frozen(dirs):  # a fork chain holds still to be listed
                for pid in cgroupfs.tasks_of(dirs):
                    owner = next(iter(uids_of(pid)), None)  # the real uid
                    if owner is not None:
                        out[pid] = (owner, leaf)
    for pid, uid in processes_by_uid(lambda u: u in uid_range):
        if pid in out:
            continue
        where = cgroupfs.leaf_of(pid)
        if where is None:
            if uid not in ours:
                out[pid] = (uid, None)
        elif cgroupfs.tag_of(where) == tag and where not in known:
            out[pid] = (uid, where)
    return sorted((pid, uid, leaf) for pid, (uid, leaf) in out.items())


def kill_orphans(orphans: Sequence[tuple[int, int, str | None]]) -> list[str]:
    """SIGKILL every orphan (from :func:`find_orphans`): a whole cgroup at
    once where it is in one of the registry's (so a fork chain cannot
    outrun it), else the process.  What was done."""
    from svirt.launcher import cgroupfs, cgroupkill

    report = []
    done: set[str] = set()
    for pid, uid, leaf in orphans:
        if leaf is not None and leaf not in done:
            done.add(leaf)
            try:
                cgroupkill.kill_dirs(cgroupfs.dirs_of_leaf(leaf))
            except StateError as err:
                report.append(f"orphan cgroup {leaf}: {err.message}")
        if leaf is None and not cgroupkill.kill_checked(pid, _loose_of(uid)):
            continue  # gone, or its pid reused meanwhile
        report.append(f"killed orphan pid {pid} (uid {uid}, no record)")
    return report


def _loose_of(uid: int) -> Callable[[int], bool]:
    """A check for :func:`cgroupkill.kill_checked`: the process has ``uid`` (real,
    effective, saved or file-system) and is in no svirt cgroup."""
    return lambda pid: _has_uid(pid, uid, (None,))


def _has_uid(pid: int, uid: int, leaves: tuple[str | None, ...]) -> bool:
    """``pid`` has ``uid`` (real, effective, saved or file-system) and is in
    one of ``leaves`` (None: in no svirt cgroup)."""
    from svirt.launcher import cgroupfs

    return has_uid(pid, uid) and cgroupfs.leaf_of(pid) in leaves


__all__ = ["remove_uid_objects", "remove_sysv_ipc", "clear_keyrings", "sysv_objects",
           "has_keys", "kill_guest_leftovers", "release_processes", "remove_guest_uid_objects",
           "find_orphans", "kill_orphans"]


def fence_guest(state: Path, name: str) -> None:
    """SIGKILL a guest whose cluster keys are about to be freed: its
    hypervisor (pid and start time checked), then its cgroup.  The fence
    the registry hands the cluster claims (``Registry.claim_of``)."""
    path = state / "guests" / f"{name}.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            data = json.loads(f.read(1 << 24).decode("utf-8", "replace"))
        record = Record.from_json(data if isinstance(data, dict) else {})
    except (OSError, KeyError, TypeError, ValueError):
        return  # released meanwhile
    hv = record.hypervisor
    if hv is not None:
        kill_process(hv)
    try:  # its cgroup, whole (a fork chain cannot outrun it)
        kill_guest_leftovers(record, state)
    except SvirtError:
        pass  # release retries and keeps the record restore-failed
