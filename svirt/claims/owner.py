"""Who holds a claim, and whether that holder still holds it.

An :class:`Owner` is one record of one registry and the launcher that wrote
the claim; a :class:`Claim` is a record's keys with their owner, the plain
data the claims package is given (never the registry).  The checks below
are what :meth:`svirt.claims.host.ClaimSession.stale` asks of the host: the
boot, the launcher's process, the registry's directory and its record file
(read directly, whole files written by rename: no registry lock is taken).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from svirt.procfs import boot_id as boot_id
from svirt.procfs import start_time


class LiveTable(Protocol):
    """What a claim check asks of the live process table (the registry passes
    :class:`svirt.security.base.LiveProcesses`; tests a fake)."""

    @property
    def uids(self) -> set[int]: ...

    @property
    def contexts(self) -> set[str]: ...


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: one record of one registry, and its launcher."""

    state: str  # the registry's state directory, absolute
    name: str
    uuid: str
    created: float
    pid: int  # the launcher that wrote the claim
    start: int  # and its start time (clock ticks since boot)
    boot: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Owner:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        owner = cls(state=data["state"], name=data["name"], uuid=data["uuid"],
                    created=data["created"], pid=data["pid"], start=data["start"],
                    boot=data["boot"])
        if not (isinstance(owner.state, str) and os.path.isabs(owner.state)
                and isinstance(owner.name, str) and isinstance(owner.uuid, str)
                and isinstance(owner.created, (int, float)) and isinstance(owner.boot, str)
                and type(owner.pid) is int and type(owner.start) is int):
            raise ValueError("a field has the wrong type")
        if not owner.name or "/" in owner.name or "\0" in owner.name or owner.name in (
                ".", ".."):
            raise ValueError(f"guest name {owner.name!r} is not a file name")
        return owner

    def same_record(self, other: Owner) -> bool:
        return (self.state, self.name, self.uuid, self.created) == (
            other.state, other.name, other.uuid, other.created)


def _no_fence() -> None:
    pass


@dataclass(frozen=True)
class Claim:
    """One record's claims as plain data: the keys, their owner, and how its
    guest is stopped (``fence``) when the cluster may hand the keys to another
    guest.  All the claims package is given of a record: never the registry."""

    keys: tuple[str, ...]
    owner: Owner
    fence: Callable[[], None] = field(default=_no_fence, compare=False)



def launcher_alive(pid: int, start: int) -> bool:
    """``pid`` runs and started at ``start`` (clock ticks since boot)."""
    return pid > 0 and start_time(pid) == start


def registry_dir(state: str) -> bool:
    """``state`` is still a registry's directory: a directory (not a symlink)
    of this user's; anything else at that path is not the registry that claimed."""
    try:
        st = os.lstat(state)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def record_matches(owner: Owner) -> bool:
    """The owner's registry still has its record (same uuid, same creation)."""
    if not registry_dir(owner.state):
        return False
    path = os.path.join(owner.state, "guests", f"{owner.name}.json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        with open(fd, "rb", closefd=False) as f:
            data = json.loads(f.read(1 << 24))
    except (OSError, ValueError):
        # unreadable: the registry names it; its claim stays held
        return True
    finally:
        os.close(fd)
    return (isinstance(data, dict) and data.get("uuid") == owner.uuid
            and data.get("created") == owner.created)
