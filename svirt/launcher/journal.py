"""A guest's journal: each step written before it is made, undone in reverse.

A record's ``journal`` is a list of entries ``{"op": OP, ...}``, one per
step a launch took for the guest (its run directory, each object held, a
tap, a cgroup, a tmpfs, a MAC profile or rules).  Each is written (and the
record saved) *before* the step is made, so a launcher killed at any point
leaves a journal that :meth:`svirt.launcher.registry.Registry.release`
undoes: every entry through :data:`UNDO`, the one table from an op to the
function that undoes it.  Entries are built by :func:`entry`, which refuses
an op nothing could undo.  What the guest could have changed is checked
again here (a path must lie in this registry's run directories), never
trusted because the journal says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.errors import StateError
from svirt.safefs import remove_tree

Entry = dict[str, Any]


@dataclass(frozen=True)
class Undoing:
    """What an undo step may reach: the registry's run directories, and the
    object tables (``release_object(entry, report)``, for the record's guest)."""

    run_dirs: Path
    release_object: Callable[[Entry, list[str]], None]


def entry(op: str, **fields: Any) -> Entry:
    """The journal entry for one step; ``op`` must be one :data:`UNDO`
    knows (a step that release could not undo is never journalled)."""
    if op not in UNDO:
        raise StateError(f"no undo for journal op {op!r}")
    return {"op": op, **fields}


def checked(step: Mapping[str, Any]) -> Entry:
    """A step's own journal entry (cgroup, storage, a driver's), refused like
    :func:`entry` when release could not undo its op."""
    op = step.get("op")
    if not isinstance(op, str):
        raise StateError(f"a journal entry without an op: {dict(step)!r}")
    return entry(op, **{k: v for k, v in step.items() if k != "op"})


def undo(step: Entry, report: list[str], undoing: Undoing) -> None:
    """Undo one journal entry (what was done goes to ``report``).  An op
    this svirt does not know is left alone."""
    action = UNDO.get(step["op"])
    if action is not None:
        action(step, report, undoing)


def _object(step: Entry, report: list[str], undoing: Undoing) -> None:
    undoing.release_object(step, report)


def _run_dir(step: Entry, report: list[str], undoing: Undoing) -> None:
    path = Path(step["path"])
    if path.parent != undoing.run_dirs:
        raise StateError(f"{path} is not a run directory of this registry")
    try:
        parent = os.open(undoing.run_dirs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # /run was wiped: nothing left to remove
    try:
        remove_tree(parent, path.name)
    finally:
        os.close(parent)


def _tap(step: Entry, report: list[str], undoing: Undoing) -> None:
    from svirt.launcher.network import delete_tap

    if delete_tap(step["name"], step.get("netns")):
        report.append(f"tap {step['name']}: deleted")


def _apparmor(step: Entry, report: list[str], undoing: Undoing) -> None:
    """The guest's profile (svirt/security/apparmor.py)."""
    from svirt.security.apparmor import unload_profile

    path = Path(step["path"])
    if path.parent.parent != undoing.run_dirs:
        raise StateError(f"{path} is not in a run directory of this registry")
    if unload_profile(step["profile"], path):
        report.append(f"AppArmor profile {step['profile']}: removed")


def _smack_rules(step: Entry, report: list[str], undoing: Undoing) -> None:
    """The guest's SMACK rules (svirt/security/smack.py)."""
    from svirt.security.smack import unload_rules

    report += [f"SMACK rule {r}: removed" for r in unload_rules(step["rules"])]


def _cgroup(step: Entry, report: list[str], undoing: Undoing) -> None:
    """Still-populated is an error (restore-failed)."""
    from svirt.launcher import cgroups

    cgroups.remove_dirs(step["dirs"].values())


def _storage(step: Entry, report: list[str], undoing: Undoing) -> None:
    """The guest's tmpfs over its run dir (launcher/storage.py)."""
    from svirt.launcher import storage

    if (done := storage.undo(step, undoing.run_dirs)) is not None:
        report.append(done)


#: every journal op and the function that undoes it
UNDO: dict[str, Callable[[Entry, list[str], Undoing], None]] = {
    "object": _object,
    "dir": _run_dir,
    "tap": _tap,
    "apparmor": _apparmor,
    "smack-rules": _smack_rules,
    "cgroup": _cgroup,
    "storage": _storage,
}
