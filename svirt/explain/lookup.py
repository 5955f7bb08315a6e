"""Which guest a denial concerns, and whose object it names.

The registry's records and object tables (read only, bounded) are indexed by
what identifies a guest: its MCS pair, AppArmor profile, SMACK label,
hypervisor pid and DAC uid.  The live process table is behind the
:class:`Processes` seam (a fake in tests; :class:`LiveTable` on the host).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from svirt.errors import SecurityError
from svirt.explain.parse import Denial, _int
from svirt.launcher.record import Record
from svirt.procfs import owner_uid, start_time
from svirt.security.base import Label
from svirt.security.base import mcs_pair as context_pair

MAX_TABLE = 1 << 20  # bytes of one object table


@dataclass(frozen=True)
class ObjectEntry:
    """One object table of the registry: an inode some guest holds."""

    dev: int
    ino: int
    path: str
    holders: Mapping[str, Mapping[str, Any]]  # guest name -> {"access", "slot", "labels"}


def load_tables(objects: Path) -> tuple[list[ObjectEntry], list[str]]:
    """The registry's object tables (``STATE/objects/DEV-INO[-gGEN][-bBIRTH].json``), read only."""
    out: list[ObjectEntry] = []
    problems: list[str] = []
    try:
        entries = sorted(os.scandir(objects), key=lambda e: e.name)
    except OSError:
        return out, problems
    for entry in entries:
        m = re.fullmatch(r"(\d+)-(\d+)(?:-[gb][\d.]+){0,2}\.json", entry.name)  # + identity
        if not m:
            continue
        try:
            with open(entry.path, "rb") as f:
                data = json.loads(f.read(MAX_TABLE))
            holders = data["holders"]
            if not isinstance(holders, dict) or not isinstance(data.get("path", ""), str):
                raise ValueError("not an object table")
            out.append(ObjectEntry(int(m.group(1)), int(m.group(2)), data.get("path", ""),
                                   holders))
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"object table {entry.path} is unreadable ({err}); skipped")
    return out, problems


def block_device(name: str) -> int | None:
    """st_dev of a block device's filesystem from the name audit gives
    (``vda``, ``dm-0``; ``fd:00`` from a PATH record); None when unknown."""
    m = re.fullmatch(r"([0-9a-f]{1,4}):([0-9a-f]{1,6})", name)
    if m:
        return os.makedev(int(m.group(1), 16), int(m.group(2), 16))
    if not re.fullmatch(r"[\w.-]{1,64}", name):
        return None
    try:
        with open(f"/sys/class/block/{name}/dev", encoding="ascii") as f:
            major, minor = f.read().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


class Processes(Protocol):
    """What the mapping asks of the live process table (a fake in tests)."""

    def uid(self, pid: int) -> int | None: ...

    def start(self, pid: int) -> int | None: ...


class LiveTable:
    """The live processes, as explain asks about them (tests give a fake)."""

    def uid(self, pid: int) -> int | None:
        return owner_uid(pid)

    def start(self, pid: int) -> int | None:
        return start_time(pid)


def mcs_pair(context: str) -> tuple[int, int] | None:
    """The category pair of a context's (low) level, a < b: ``...:s0:c1,c2``
    (the security package's one parser; a pair of one category is no guest's)."""
    pair = context_pair(context)
    return pair if pair is not None and pair[0] != pair[1] else None


def _type_of(context: str) -> str:
    parts = context.split(":")
    return parts[2] if len(parts) >= 3 else context


def label_uid(label: Label) -> int | None:
    """The uid of a DAC label's "uid:gid" (the one place explain splits it)."""
    try:
        return label.ids()[0]
    except SecurityError:
        return None


class GuestLookup:
    """Which guest a denial concerns, and which object: records and object
    tables in, indexed by MCS pair, DAC uid and SMACK label."""

    def __init__(self, records: Sequence[Record], tables: Sequence[ObjectEntry],
                 processes: Processes | None = None) -> None:
        self.records = list(records)
        self.tables = list(tables)
        self.processes = processes or LiveTable()
        self._by_name = {r.name: r for r in self.records}
        self._by_pair: dict[tuple[int, int], str] = {}
        self._by_uid: dict[int, str] = {}
        self._by_smack: dict[str, str] = {}
        holders: list[tuple[str, dict[str, Label]]] = []
        for t in self.tables:  # what the tables still remember: after the record
            for name, h in t.holders.items():
                try:
                    holders.append((name, {k: Label.from_dict(v)
                                           for k, v in h["labels"].items()}))
                except (KeyError, TypeError, AttributeError):
                    continue
        holders += [(r.name, r.labels) for r in self.records]  # records win
        for name, labels in holders:
            if (sel := labels.get("selinux")) and (pair := mcs_pair(sel.process)):
                self._by_pair[pair] = name
            if (dac := labels.get("dac")) and (uid := label_uid(dac)):
                self._by_uid[uid] = name
            if smack := labels.get("smack"):
                self._by_smack[smack.process] = name

    # ---------------------------------------------------------- the guest
    def guest_of(self, d: Denial) -> tuple[str | None, str]:
        if d.lsm == "selinux" and (pair := mcs_pair(d.subject)):
            if pair in self._by_pair:
                return self._by_pair[pair], f"MCS pair c{pair[0]},c{pair[1]}"
        if d.lsm == "apparmor":
            # svirt-<uuid>; or a spec's own profile when one guest alone runs in
            # it, and ran in it at the denial's time
            profile = d.subject.split("//", 1)[0]
            named = {r.name for r in self.records if profile == f"svirt-{r.uuid}" or (
                (aa := r.labels.get("apparmor")) is not None and aa.process == profile
                and (d.time is None or d.time >= r.created))}
            if len(named) == 1:
                return named.pop(), f"profile {profile}"
        if d.lsm == "smack" and d.subject in self._by_smack:
            return self._by_smack[d.subject], f"SMACK label {d.subject}"
        if d.pid is not None:
            start = self.processes.start(d.pid)
            for r in self.records:
                hv = r.hypervisor
                if hv is None or hv.pid != d.pid:
                    continue
                if start == hv.start or (start is None and r.this_boot() and (
                        d.time is None or d.time >= r.created)):
                    return r.name, f"hypervisor pid {d.pid}"
            uid = self.processes.uid(d.pid)
            if uid is not None and uid in self._by_uid:
                return self._by_uid[uid], f"pid {d.pid} runs as uid {uid}"
        for key in ("fsuid", "syscall_fsuid", "syscall_euid", "syscall_uid"):
            uid = _int(d.fields.get(key))
            if uid is not None and uid in self._by_uid:
                return self._by_uid[uid], f"uid {uid}"
        return None, "no record matches"

    # --------------------------------------------------------- the object
    def object_of(self, d: Denial) -> ObjectEntry | None:
        if d.path:
            found = [t for t in self.tables if t.path == d.path]
            if found:
                return found[0]
        if d.ino is None:
            return None
        found = [t for t in self.tables if t.ino == d.ino]
        if d.name and len(found) > 1:
            found = [t for t in found if os.path.basename(t.path) == d.name] or found
        if d.dev and len(found) > 1:
            dev = block_device(d.dev)
            found = [t for t in found if t.dev == dev] or found
        if d.name and len(found) == 1 and os.path.basename(found[0].path) != d.name:
            return None  # the same inode number on another filesystem
        return found[0] if len(found) == 1 else None

    def _owner_by_label(self, d: Denial) -> str | None:
        if d.lsm == "selinux" and d.target and (pair := mcs_pair(d.target)):
            return self._by_pair.get(pair)
        if d.lsm == "smack" and d.target:
            for r in self.records:
                lab = r.labels.get("smack")
                if lab and d.target in (lab.process, lab.image):
                    return r.name
        if d.lsm == "apparmor" and (uid := _int(d.fields.get("ouid"))) is not None:
            return self._by_uid.get(uid)
        return None

