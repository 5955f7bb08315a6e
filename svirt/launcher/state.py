"""Moved: the registry split by job (re-exports removed at merge).

The registry and its lock, reserve, release and reconcile:
:mod:`svirt.launcher.registry`; a guest's record: :mod:`svirt.launcher.record`;
object tables: :mod:`svirt.launcher.objects`; the journal and its undo:
:mod:`svirt.launcher.journal`; slot and label picking:
:mod:`svirt.launcher.slots`; sweeps: :mod:`svirt.launcher.sweep`; a guest's
leftover processes and uid objects: :mod:`svirt.launcher.uidstate`; /proc:
:mod:`svirt.procfs`; root-side file operations: :mod:`svirt.safefs`.
"""

from svirt.launcher.record import (
    Record,  # moved: svirt.launcher.record (re-export removed at merge)
)
from svirt.launcher.registry import (  # moved: svirt.launcher.registry (re-export removed at merge)
    Registry,
    default_root,
    default_state,
)
from svirt.launcher.uidstate import (  # moved: svirt.launcher.uidstate (re-export removed at merge)
    kill_guest_leftovers,
)
from svirt.procfs import (  # moved: svirt.procfs (re-export removed at merge)
    ProcessId,
    boot_id,
    is_zombie,
    kill_process,
    read_bytes,
    start_time,
    stat_fields,
)

__all__ = ["ProcessId", "Record", "Registry", "boot_id", "default_root", "default_state",
           "is_zombie", "kill_guest_leftovers", "kill_process", "read_bytes", "start_time",
           "stat_fields"]
