"""The registry: one directory shared by every svirt process on the host.

Layout (``/run/svirt`` or ``$SVIRT_RUN_DIR``)::

    lock                 fcntl lock: every change below happens under it
    guests/NAME.json     one record per guest: name, uuid, slot, labels,
                         supervisor and hypervisor (pid + start time), journal
    guests/NAME.d/       the guest's private run directory (uml_dir)
    objects/DEV-INO.json every host object some guest holds: its original
                         state per driver, and which guests hold it how

The journal is written before the change it describes, so a launcher killed
at any point leaves a record that :meth:`Registry.release` can finish; every
command reconciles first (records whose processes are gone are released).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svirt.backends.base import Access, Resource, ResourceKind
from svirt.errors import SecurityError, StateError, SvirtError
from svirt.security.base import Driver, Label, LiveProcesses, make_driver
from svirt.security.files import open_object, reopen
from svirt.spec import GuestSpec, SecurityModel

MAX_SLOTS = 65_536


def default_root() -> Path:
    return Path(os.environ.get("SVIRT_RUN_DIR", "/run/svirt"))


def stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ...
    (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if gone)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int

    def alive(self) -> bool:
        return start_time(self.pid) == self.start

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        st = start_time(pid)
        if st is None:
            raise StateError(f"process {pid} is gone")
        return cls(pid, st)


@dataclass
class Record:
    name: str
    uuid: str
    backend: str
    slot: int
    supervisor: ProcessId
    labels: dict[str, Label] = field(default_factory=dict)
    hypervisor: ProcessId | None = None
    journal: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    status: str = "starting"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {k: v.to_dict() for k, v in self.labels.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        return cls(
            name=d["name"],
            uuid=d["uuid"],
            backend=d["backend"],
            slot=d["slot"],
            supervisor=ProcessId(**d["supervisor"]),
            labels={k: Label.from_dict(v) for k, v in d["labels"].items()},
            hypervisor=ProcessId(**d["hypervisor"]) if d.get("hypervisor") else None,
            journal=d.get("journal", []),
            created=d.get("created", 0.0),
            status=d.get("status", "unknown"),
        )

    def alive(self) -> bool:
        return self.supervisor.alive() or bool(self.hypervisor and self.hypervisor.alive())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _conflicts(a: str, b: str) -> bool:
    return not (a == b and a in (Access.RO, Access.SHARED))


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()
        self.guests = self.root / "guests"
        self.objects = self.root / "objects"
        self._lock_depth = 0
        self._lock_fd = -1

    # ---------------------------------------------------------------- lock
    def _ensure(self) -> None:
        for d in (self.root, self.guests, self.objects):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self._ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd, self._lock_depth = fd, 1
            yield
        finally:
            self._lock_depth = 0
            os.close(fd)

    # ------------------------------------------------------------- records
    def record_path(self, name: str) -> Path:
        return self.guests / f"{name}.json"

    def run_dir(self, name: str) -> Path:
        return self.guests / f"{name}.d"

    def records(self) -> list[Record]:
        out = []
        try:
            entries = list(os.scandir(self.guests))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                try:
                    with open(entry.path, encoding="utf-8") as f:
                        out.append(Record.from_json(json.load(f)))
                except (OSError, ValueError, KeyError):
                    continue  # removed meanwhile, or half-written by a crash
        return sorted(out, key=lambda r: r.created)

    def save(self, record: Record) -> None:
        with self.locked():
            _write_json(self.record_path(record.name), record.to_json())

    def reserve(self, spec: GuestSpec, drivers: Sequence[Driver]) -> Record:
        """Reserve the name and a slot, allocate labels, create the run dir."""
        with self.locked():
            records = self._reconcile()[1]
            if any(r.name == spec.name for r in records):
                raise StateError(
                    f"a guest named {spec.name} is already running",
                    hint="pick another name, or stop it first (svirt list)",
                )
            used = {r.slot for r in records}
            live = LiveProcesses()
            slot = next(
                (s for s in range(MAX_SLOTS)
                 if s not in used and all(d.slot_usable(s, live) for d in drivers)),
                None,
            )
            if slot is None:
                from svirt.errors import SlotsExhausted

                raise SlotsExhausted(f"all {MAX_SLOTS} guest slots are in use")
            labels: dict[str, Label] = {}
            for d in drivers:
                taken = [r.labels[d.name] for r in records if d.name in r.labels]
                labels[d.name] = d.label_for(spec, slot, taken, live)
            record = Record(spec.name, str(spec.uuid), str(spec.backend), slot,
                            ProcessId.of(os.getpid()), labels)
            run_dir = self.run_dir(spec.name)
            record.journal.append({"op": "dir", "path": str(run_dir)})
            self.save(record)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(mode=0o700)
            return record

    # ------------------------------------------------------------- objects
    def hold(self, record: Record, resource: Resource, drivers: Sequence[Driver],
             roots: tuple[Path, ...], live: LiveProcesses | None = None) -> None:
        """Label one object for ``record``'s guest, journalled and ref-counted."""
        check_roots = roots if resource.kind in (
            ResourceKind.DISK, ResourceKind.KERNEL, ResourceKind.INITRD, ResourceKind.BACKING
        ) else ()
        with self.locked():
            obj = open_object(resource.path, roots=check_roots)
            try:
                table_path = self.objects / f"{obj.key}.json"
                table = self._load_table(table_path)
                live_names = {o for o in table["holders"] if self.record_path(o).exists()}
                for other, info in list(table["holders"].items()):
                    if other not in live_names:
                        continue
                    if _conflicts(info["access"], resource.access):
                        raise SecurityError(
                            f"{resource.path} is in use by guest {other} "
                            f"({info['access']}); {record.name} wants it {resource.access}",
                            path=resource.path,
                            hint="give each guest its own image, or mark both disks shared",
                        )
                first = not any(o in live_names for o in table["holders"])
                if first and resource.access is not Access.RO:
                    live = live or LiveProcesses()
                    for d in drivers:
                        why = d.held_by_other(obj.fd, record.labels[d.name], live)
                        if why:
                            raise SecurityError(
                                f"{resource.path} belongs to another running guest: {why}",
                                path=resource.path,
                                hint="stop that guest first, or give this guest its own image",
                            )
                if first:
                    table = {"path": str(obj.path), "originals": {
                        d.name: d.snapshot(obj.fd) for d in drivers}, "holders": {}}
                else:
                    for d in drivers:  # a driver the earlier holders did not use
                        table["originals"].setdefault(d.name, d.snapshot(obj.fd))
                table["holders"][record.name] = {
                    "access": str(resource.access),
                    "labels": {n: lab.to_dict() for n, lab in record.labels.items()},
                }
                _write_json(table_path, table)  # journal before the change
                record.journal.append({"op": "object", "key": obj.key, "path": str(obj.path)})
                self.save(record)
                if resource.relabel:
                    for d in drivers:
                        if d.wants_change(obj.fd, obj.st_mode, resource.access,
                                          record.labels[d.name]):
                            d.apply(obj.fd, obj.st_mode, resource.access, record.labels[d.name])
            finally:
                obj.close()

    def _load_table(self, path: Path) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (OSError, ValueError):
            return {"path": "", "originals": {}, "holders": {}}

    def _release_object(self, name: str, entry: dict[str, Any], report: list[str]) -> None:
        table_path = self.objects / f"{entry['key']}.json"
        table = self._load_table(table_path)
        holder = table["holders"].pop(name, None)
        if holder is None:
            return
        # a holder counts while its record exists (checked per holder, not by
        # reading every record of the registry)
        last = not any(o != name and self.record_path(o).exists() for o in table["holders"])
        obj = reopen(Path(entry["path"]), entry["key"])
        if obj is None:
            report.append(f"{entry['path']}: gone or replaced, left alone")
        else:
            try:
                for dname, original in table["originals"].items():
                    label = holder["labels"].get(dname)
                    driver = make_driver(SecurityModel(dname))
                    driver.restore(obj.fd, original,
                                   Label.from_dict(label) if label else _no_label(dname),
                                   last=last)
                report.append(f"{entry['path']}: {'restored' if last else 'released'}")
            finally:
                obj.close()
        if last:
            table_path.unlink(missing_ok=True)
        else:
            _write_json(table_path, table)

    # ------------------------------------------------------------- release
    def release(self, record: Record) -> list[str]:
        """Undo everything the journal says, in reverse order; drop the record."""
        report: list[str] = []
        with self.locked():
            errors: list[str] = []
            dac = record.labels.get("dac")
            if dac is not None and record.hypervisor is not None:
                killed = kill_guest_leftovers(int(dac.process.split(":")[0]),
                                              record.hypervisor.pid)
                if killed:
                    report.append(f"killed {killed} leftover process(es) of the guest's uid")
            for entry in reversed(record.journal):
                try:
                    self._undo(record, entry, report)
                except (OSError, SvirtError) as err:
                    errors.append(f"{entry.get('path') or entry.get('name')}: {err}")
            self.record_path(record.name).unlink(missing_ok=True)
        if errors:
            raise StateError(f"guest {record.name}: could not undo: " + "; ".join(errors))
        return report

    def _undo(self, record: Record, entry: dict[str, Any], report: list[str]) -> None:
        op = entry["op"]
        if op == "object":
            self._release_object(record.name, entry, report)
        elif op == "dir":
            shutil.rmtree(entry["path"], ignore_errors=True)
        elif op == "tap":
            from svirt.launcher.network import delete_tap

            if delete_tap(entry["name"], entry.get("netns")):
                report.append(f"tap {entry['name']}: deleted")

    def reconcile(self) -> list[tuple[str, list[str]]]:
        """Release every record whose processes are gone; kill orphans."""
        return self._reconcile()[0]

    def _reconcile(self) -> tuple[list[tuple[str, list[str]]], list[Record]]:
        """Reconcile; also return the records still alive (read once)."""
        done: list[tuple[str, list[str]]] = []
        alive: list[Record] = []
        with self.locked():
            for record in self.records():
                if record.supervisor.alive():
                    alive.append(record)
                    continue
                hv = record.hypervisor
                if hv is not None and hv.alive():
                    _kill(hv)
                done.append((record.name, self.release(record)))
        return done, alive


def _kill(proc: ProcessId) -> None:
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        return
    try:
        if proc.alive():
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            for _ in range(100):
                if not proc.alive():
                    break
                time.sleep(0.01)
    finally:
        os.close(fd)


def kill_guest_leftovers(uid: int, session: int) -> int:
    """SIGKILL what is left of a guest: processes running as its own uid in the
    session its hypervisor started (UML forks host processes); how many."""
    if uid < 1000:
        return 0
    killed = 0
    for _ in range(50):
        pids = [int(e.name) for e in os.scandir("/proc")
                if e.name.isdigit() and _uid_of(e.path) == uid
                and _session_of(e.name) == session and not is_zombie(e.name)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.02)
    return killed


def _session_of(pid: str) -> int | None:
    fields = stat_fields(pid)
    return int(fields[3]) if fields else None


def is_zombie(pid: int | str) -> bool:
    """True for an exited process nobody reaped yet (it holds nothing but its pid)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] in (b"Z", b"X")


def _uid_of(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def _no_label(driver: str) -> Label:
    return Label(driver, "", "", "", "")
