"""What reconcile and ``svirt gc`` sweep that no record holds any more.

Each sweep finds what a crash or a lost record left behind and removes it
only when nothing that runs still owns it: registry files half written by a
writer that is gone (:func:`temp_files`), the mconsole reply sockets of
launchers that are gone (:func:`control_sockets`), and this registry's
cgroups and tmpfs mounts that no record names (:func:`host_leftovers`).
Each reports what it did; a failure is named, never raised, and the next
sweep tries again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from svirt.launcher.record import Record, why
from svirt.procfs import start_time


def temp_files(directory: Path) -> None:
    """Remove .NAME.PID.tmp files whose writer is gone (a crash mid-write)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith(".") and name.endswith(".tmp"):
            pid = name[:-4].rsplit(".", 1)[-1]
            if pid.isdigit() and start_time(int(pid)) is None:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def control_sockets(control_dir: Path, problems: list[str]) -> list[str]:
    """Remove the mconsole reply sockets of launchers that are gone (``svirt
    gc``).  A launcher binds ``mc.PID.START.HEX`` in the control directory
    and chowns it to the guest's uid for one exchange; one killed
    mid-exchange leaves it behind.  The directory is reached by a
    descriptor (no symlink followed, it must be root's and writable by
    root alone), names are unlinked relative to it (unlink follows no
    symlink); a name whose pid runs with that start time is kept.  What
    went wrong goes to ``problems``."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(control_dir, flags)
    except FileNotFoundError:
        return []
    except OSError as err:
        problems.append(f"control directory {control_dir}: {err.strerror}")
        return []
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            problems.append(f"control directory {control_dir} is not this "
                            "user's alone: nothing swept")
            return []
        with os.scandir(fd) as entries:
            names = [e.name for e in entries if e.name.startswith("mc.")]
        return [f"removed the mconsole reply socket {name} of a launcher that is gone"
                for name in names
                if not _launcher_alive(name) and _unlink(fd, name, control_dir, problems)]
    finally:
        os.close(fd)


def _unlink(fd: int, name: str, control_dir: Path, problems: list[str]) -> bool:
    """Unlink ``name`` (not a directory) in the control directory ``fd``."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            return False  # never a launcher's: not ours to remove
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return False  # its launcher removed it meanwhile
    except OSError as err:
        problems.append(f"cannot remove {control_dir / name}: {err.strerror}")
        return False
    return True


def _launcher_alive(name: str) -> bool:
    """Whether the launcher that named a control socket ``mc.PID.START.HEX``
    (``mc.PID.HEX`` before the start time was in it) still runs."""
    parts = name.split(".")
    if len(parts) < 3 or not parts[1].isdigit() or len(parts[1]) > 10:
        return False  # not a name a launcher gives
    started = start_time(int(parts[1]))
    if started is None:
        return False
    if len(parts) == 3:
        return True  # the old name: its pid runs (maybe reused; kept to be safe)
    return parts[2].isdigit() and len(parts[2]) <= 20 and int(parts[2]) == started


def host_leftovers(state: Path, run_dirs: Path, kept: Sequence[Record],
                   has_record: Callable[[str], bool], problem: Callable[[str], None]
                   ) -> list[tuple[str, list[str]]]:
    """The cgroups (``svirt/NAME.SLOT.TAG``, with no task) and tmpfs mounts
    of the registry at ``state`` that no record (``kept``) holds."""
    from svirt.launcher import cgroupfs, cgroups, storage

    done = []
    try:
        # cgroups: this registry's svirt/NAME.SLOT.TAG dirs with no record, no tasks
        tag = cgroupfs.registry_tag(state)
        gone = cgroups.sweep((cgroupfs.leaf_name(r.name, r.slot, tag) for r in kept), tag)
    except Exception as err:  # noqa: BLE001 - tried again by the next reconcile
        gone = []
        problem(f"the sweep of cgroups failed: {why(err)}")
    if gone:
        done.append(("(cgroups no record holds)", gone))
    # mounts of guests whose record is gone
    unmounted = storage.sweep(run_dirs, cgroupfs.registry_tag(state), has_record)
    if unmounted:
        done.append(("(storage no record holds)", unmounted))
    return done
