"""Object tables: each host object a guest holds, its originals and holders.

``STATE/objects/KEY.json`` remembers one object (an inode) that some guest
holds: its original state per security driver (label, owner, mode, ACL,
taken before the first change) and which guests hold it how (access, slot,
labels).  KEY is DEV-INO[-bBIRTH | -gGENERATION] (files.object_key: a
recreated file under a reused inode number is another object, never given
this one's originals; the generation only where there is no birth time;
keys of older svirt may carry both: then the birth time alone counts, the
file's owner may set the other).

Holding is a transaction: the intent goes into the guest's record first
(journal op ``object``), then the holder into the table, then the change.
Dropping a holder puts back its part; the last holder puts back the
originals and removes the table.  A table that cannot be read is kept and
named as a problem, never overwritten or forgotten; a slot or label an
object still remembers is not handed out again
(:meth:`ObjectTables.remembered_labels`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from svirt.errors import SecurityError, StateError, SvirtError
from svirt.launcher import journal
from svirt.launcher.record import DAC_PROCESS, Record, check_label, why, write_json
from svirt.procfs import LiveProcesses, read_bytes
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.base import Driver, Label
from svirt.security.files import OpenedObject, get_xattr, reopen, reopen_beneath
from svirt.security.inodes import OBJECT_KEY
from svirt.security.stack import SecurityStack, make_driver
from svirt.spec import SecurityModel

Table = dict[str, Any]
_ACCESSES = frozenset(str(a) for a in Access)


def _driver_for(name: str) -> Driver:
    return make_driver(SecurityModel(name))


class ObjectTables:
    """The registry's ``objects/`` directory.  ``record_exists(name)``: a
    record file names guest ``name``; ``save_record``: write a record (the
    intent, before the change); ``problem``: name a table that cannot be read;
    ``driver_for``: the driver that restores a driver name's originals."""

    def __init__(self, directory: Path, *, record_exists: Callable[[str], bool],
                 save_record: Callable[[Record], None], problem: Callable[[str], None],
                 driver_for: Callable[[str], Driver] = _driver_for) -> None:
        self.directory = directory
        self._record_exists = record_exists
        self._save_record = save_record
        self._problem = problem
        self._driver_for = driver_for

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, path: Path) -> Table | None:
        """The table at ``path``; empty when absent; None (and a problem
        named) when it is unreadable or not exactly a table's shape."""
        try:
            data = json.loads(read_bytes(str(path)))
            check_table(data)
            return data  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {"path": "", "originals": {}, "holders": {}}
        except Exception as err:  # noqa: BLE001 - one table's trouble is its own
            # (deeply nested JSON is a RecursionError, a huge one MemoryError)
            self._problem(f"object table {path} is unreadable ({type(err).__name__}: "
                          f"{str(err)[:200]}); left for a person to inspect")
            return None

    def tables(self) -> Iterator[tuple[Path, Table]]:
        """Every readable table (unreadable ones are named as problems)."""
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                path = Path(entry.path)
                table = self.load(path)
                if table is not None:
                    yield path, table

    def remembered_labels(self) -> list[tuple[int, dict[str, Label]]]:
        """(slot, labels) of every holder an object table still remembers: a
        uid or category pair is not handed out again while an object has it."""
        out = []
        for _path, table in self.tables():
            for holder in table["holders"].values():
                try:
                    labels = {n: Label.from_dict(v) for n, v in holder["labels"].items()}
                    out.append((int(holder.get("slot", -1)), labels))
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
        return out

    def has_record(self, name: str) -> bool:
        """A record file (readable or not) names guest ``name``; a name that
        cannot be a record's file name (a corrupt table) counts as held."""
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            return True
        return self._record_exists(name)

    # ---------------------------------------------------------------- hold
    def hold(self, record: Record, resource: Resource, drivers: Sequence[Driver],
             obj: OpenedObject, live: LiveProcesses | None,
             lock_image: Callable[[OpenedObject], None] | None = None) -> None:
        """Hold ``obj`` (opened from ``resource``) for ``record``'s guest:
        refused when another guest holds it in a conflicting way; the
        originals remembered by the first holder; then labelled.
        ``lock_image``: the cluster's lock on a disk written here."""
        stack = SecurityStack.of(drivers)
        table_path = self.path(obj.key)
        table = self.load(table_path)
        if table is None:
            raise StateError(f"the registry's table for {resource.path} ({table_path}) is "
                             "unreadable", hint="inspect or remove it by hand, then retry")
        holders = table["holders"]
        live_names = {o for o in holders if o != record.name and self._record_exists(o)}
        _check_conflicts(record.name, resource, {o: holders[o] for o in live_names})
        if (lock_image is not None and resource.access is Access.RW
                and resource.kind is ResourceKind.DISK):
            lock_image(obj)  # refused if another host writes it
        first = not live_names
        if first and resource.access is not Access.RO:
            owner = stack.held_by_other(obj.fd, record.labels, live or LiveProcesses())
            if owner:
                raise SecurityError(
                    f"{resource.path} belongs to another running guest: {owner}",
                    path=resource.path,
                    hint="stop that guest first, or give this guest its own image",
                )
        if first and not holders:
            table = {"path": str(obj.path), "originals": stack.snapshot(obj.fd), "holders": {}}
        else:  # completed for a driver the earlier holders did not use
            table["originals"] = stack.snapshot(obj.fd, table["originals"])
        # 1. intent in the guest's record, 2. holder in the table, 3. the change:
        # a crash after 1 leaves an entry release skips; after 2 one it restores
        record.journal.append(journal.entry("object", key=obj.key, path=str(obj.path)))
        self._save_record(record)
        self._add_holder(table_path, table, record, resource, obj)
        if resource.relabel:
            stack.apply(obj.fd, obj.st_mode, resource.access, record.labels,
                        table["originals"], path=resource.path, last=first)

    def _add_holder(self, table_path: Path, table: Table, record: Record,
                    resource: Resource, obj: OpenedObject) -> None:
        table["path"] = str(obj.path)
        if obj.root is not None:  # restore walks from the same root
            table["root"] = str(obj.root)
        table["holders"][record.name] = {
            "access": str(resource.access),
            "slot": record.slot,
            "labels": {n: lab.to_dict() for n, lab in record.labels.items()},
        }
        write_json(table_path, table)

    # ------------------------------------------------------------- release
    def release(self, name: str, entry: journal.Entry, report: list[str]) -> None:
        """Undo the journal entry ``entry`` (op ``object``) of guest ``name``."""
        key = entry.get("key")
        if not isinstance(key, str) or not OBJECT_KEY.fullmatch(key):
            raise StateError(f"the journal names object {key!r}, which is no object's key")
        table_path = self.path(key)
        table = self.load(table_path)
        if table is None:
            raise StateError(f"object table {table_path} is unreadable")
        if name not in table["holders"]:
            return  # the launcher died between journalling the intent and holding
        self.drop_holder(table_path, table, name, report)

    def drop_holder(self, table_path: Path, table: Table, name: str,
                    report: list[str]) -> None:
        """Undo ``name``'s hold; restore the originals when it was the last."""
        holder = table["holders"][name]
        others = [o for o in table["holders"] if o != name and self.has_record(o)]
        last = not others
        key = table_path.name[:-len(".json")]
        obj = _reopen(table, key)
        if obj is None:
            _check_replaced(table, table_path, key, holder)
            report.append(f"{table['path']}: gone or replaced, left alone")
        else:
            try:
                self._restore(obj, table, holder, last)
                report.append(f"{table['path']}: {'restored' if last else 'released'}")
            finally:
                obj.close()
        if last:
            table_path.unlink(missing_ok=True)
        else:
            del table["holders"][name]
            write_json(table_path, table)

    def _restore(self, obj: OpenedObject, table: Table, holder: dict[str, Any],
                 last: bool) -> None:
        SecurityStack.restore(obj.fd, table["originals"], holder["labels"], last=last,
                              path=Path(table["path"]), driver_for=self._driver_for)

    def sweep(self) -> list[str]:
        """Drop holders that have no record any more (a wiped or lost record,
        a crash between two writes) and restore what they held."""
        report: list[str] = []
        for path, table in list(self.tables()):
            for name in [n for n in table["holders"] if not self.has_record(n)]:
                try:
                    self.drop_holder(path, table, name, report)
                except Exception as err:  # noqa: BLE001 - the table stays, retried
                    report.append(f"{table.get('path')}: restore failed, kept for the next "
                                  f"gc: {why(err)}")
                    break
        return report


def check_table(data: Any) -> None:
    """ValueError unless ``data`` is an object table: {"path": str, "root":
    str (optional), "originals": {driver: {...}}, "holders": {guest:
    {"access": rw|ro|shared, "slot": int, "labels": {driver: label}}}}."""
    if not isinstance(data, dict):
        raise ValueError("not an object table")
    if not isinstance(data.get("path"), str) or not isinstance(data.get("root", ""), str):
        raise ValueError("its path is not a path")
    originals, holders = data.get("originals"), data.get("holders")
    if not isinstance(originals, dict) or not all(
            isinstance(v, dict) for v in originals.values()):
        raise ValueError("its originals are not a driver's state each")
    if not isinstance(holders, dict):
        raise ValueError("its holders are not a table")
    for name, holder in holders.items():
        if (not isinstance(holder, dict) or holder.get("access") not in _ACCESSES
                or type(holder.get("slot", 0)) is not int
                or not isinstance(holder.get("labels"), dict)):
            raise ValueError(f"holder {name!r} is not a holder")
        for driver, label in holder["labels"].items():
            check_label(driver, label)


def _conflicts(a: str, b: str) -> bool:
    return not (a == b and a in (Access.RO, Access.SHARED))


def _check_conflicts(name: str, resource: Resource, others: dict[str, Any]) -> None:
    """SecurityError when a guest in ``others`` (name: holder) holds the
    object in a way ``resource``'s access cannot share."""
    for other, info in others.items():
        if _conflicts(info["access"], resource.access):
            raise SecurityError(
                f"{resource.path} is in use by guest {other} "
                f"({info['access']}); {name} wants it {resource.access}",
                path=resource.path,
                hint="give each guest its own image, or mark both disks shared",
            )


def _reopen(table: Table, want: str | None) -> OpenedObject | None:
    """The table's object again, from the root it was reached from (None:
    gone, or another inode than ``want``)."""
    path, root = Path(table["path"]), table.get("root")
    if root and path != Path(root) and Path(root) in path.parents:
        return reopen_beneath(Path(root), str(path.relative_to(root)), want)
    return reopen(path, want)


def _check_replaced(table: Table, table_path: Path, key: str,
                    holder: dict[str, Any]) -> None:
    """The held object is gone or replaced: StateError when the inode there
    now still carries this guest's uid or label."""
    # another inode there that still carries this guest's uid or label
    # is not "replaced": the guest changed what identifies it (or a
    # second net for what the key does not cover).  Its table stays,
    # the record is restore-failed, and a person looks.
    now = _reopen(table, None)
    if now is None:
        return
    try:
        carried = _carries(now.fd, holder["labels"])
    finally:
        now.close()
    if carried:
        raise StateError(
            f"{table['path']}: not the object held (key {key}, now "
            f"{now.key}), yet it {carried}; left as the guest made it",
            hint="inspect the file, give it back its owner and labels by "
                 f"hand and remove {table_path}, then run svirt gc")


def _carries(fd: int, labels: dict[str, Any]) -> str | None:
    """How the inode at ``fd`` still carries a guest's identity (its DAC uid
    or gid as owner, or its SELinux or SMACK image label), else None."""
    st = os.fstat(fd)
    dac = labels.get("dac")
    if isinstance(dac, dict) and DAC_PROCESS.fullmatch(str(dac.get("process", ""))):
        uid, gid = Label.from_dict({**dac, "driver": "dac"}).ids()
        if st.st_uid == uid or st.st_gid == gid:
            return f"is owned by the guest's uid {uid} (owner {st.st_uid}:{st.st_gid})"
    if isinstance(dac, dict) and DAC_PROCESS.fullmatch(str(dac.get("process", ""))):
        from svirt.security import dac as dac_driver

        try:
            acl = get_xattr(fd, dac_driver.ACL_XATTR)
            if acl is not None and any(tag == dac_driver._ACL_USER and who == uid
                                       for tag, _perm, who in dac_driver.parse_acl(acl)):
                return f"has an ACL entry for the guest's uid {uid}"
        except (OSError, SvirtError):
            pass

    for driver, xattr in (("selinux", "security.selinux"), ("smack", "security.SMACK64")):
        label = labels.get(driver)
        if not isinstance(label, dict) or not label.get("image"):
            continue
        try:
            raw = get_xattr(fd, xattr)
        except OSError:
            continue
        if raw is not None and raw.rstrip(b"\0").decode(errors="replace") == label["image"]:
            return f"carries the guest's {driver} label {label['image']}"
    return None


def _no_label(driver: str) -> Label:
    return Label(driver, "", "", "", "")
