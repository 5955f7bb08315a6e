"""The registry: shared by every svirt process on the host.

Two directories.  The state directory (``/var/lib/svirt``, or
``$SVIRT_STATE_DIR``) survives a reboot and is root's alone (0700)::

    lock                 fcntl lock: every change below happens under it
    guests/NAME.json     one record per guest: name, uuid, slot, labels, boot,
                         supervisor and hypervisor (pid + start time), journal
    objects/KEY.json     every host object some guest holds: its original
                         state per driver, and which guests hold it how;
                         KEY is DEV-INO[-bBIRTH | -gGENERATION] (files.object_key:
                         a recreated file under a reused inode number is
                         another object, never given this one's originals;
                         the generation only where there is no birth time;
                         keys of older svirt may carry both: then the birth
                         time alone counts, the file's owner may set the other)

The run directory (``/run/svirt``, or ``$SVIRT_RUN_DIR``) holds what dies
with the boot::

    guests/NAME.d/       root's (0755): nothing in it is the guest's but
        home/            the guest's own directory (UML's uml_dir)
                         (while the guest runs NAME.d is a tmpfs of its own,
                         with a size and an inode cap: launcher/storage.py)
    ctl/                 root's (0711): the launcher's control sockets

A registry given only a run directory (tests) keeps its state in
``RUN/state`` unless ``$SVIRT_STATE_DIR`` says otherwise.

Slots and labels are unique on the host, not only here: every registry
claims them in the host-wide claims directory (:mod:`svirt.claims.host`)
under the host lock, always taken after this registry's lock.

Holding an object is a transaction: the intent goes into the guest's record
first, then the holder into the object's table, then the change; release
undoes it in reverse.  A launcher killed at any point leaves state that
:meth:`Registry.reconcile` (every ``run``, ``list`` and ``gc``) finishes,
and an object table whose holders have no record any more (a wiped record,
a crash between two writes) is restored by the sweep.  A restore that fails
keeps its record (status ``restore-failed: ...``) and is retried; nothing is
forgotten silently.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svirt.backends.base import Access, Resource, ResourceKind
from svirt.claims.cluster import ClusterClaims, allocate_claims
from svirt.claims.host import ClaimSession, HostClaims
from svirt.claims.owner import Claim, Owner
from svirt.errors import SecurityError, SlotsExhausted, StateError, SvirtError
from svirt.launcher.safefs import remove_tree
from svirt.security.base import Driver, Label, LiveProcesses, make_driver
from svirt.security.files import (
    OBJECT_KEY,
    OpenedObject,
    open_resource,
    reopen,
    reopen_beneath,
)
from svirt.spec import GuestSpec, SecurityModel

MAX_SLOTS = 65_536
STALE_CHECKS = 8  # held claims a slot scan checks for staleness before only counting files
LISTING_AFTER = 64  # held slots in a row before the scan lists the claims directory once
LABEL_PICKS = 64  # label_for calls per driver before its claims count as exhausted


def default_root() -> Path:
    return Path(os.environ.get("SVIRT_RUN_DIR", "/run/svirt"))


def default_state(root: Path | None = None) -> Path:
    env = os.environ.get("SVIRT_STATE_DIR")
    if env:
        return Path(env)
    if root is not None or os.environ.get("SVIRT_RUN_DIR"):
        return (root or default_root()) / "state"
    from svirt import config

    return config.load().state_dir


_BOOT_ID: list[str] = []  # read once: a process does not outlive its boot


def boot_id() -> str:
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _BOOT_ID.append(f.read().strip())
        except OSError:  # pragma: no cover - every Linux has it
            return ""
    return _BOOT_ID[0]


def read_bytes(path: str) -> bytes:
    """The whole file, through a bare fd (no file object: a registry of
    thousands of records is read on every reserve)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        # a short read of a regular file (or of /proc/PID/stat) is its end
        while len(data) % 65536 == 0 and data:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        os.close(fd)


def stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ...
    (None when the process is gone)."""
    try:
        data = read_bytes(f"/proc/{pid}/stat")
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


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


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if gone)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int

    def alive(self) -> bool:
        """The same process (pid and start time), and not a zombie: a dead
        supervisor whose parent (PID 1, after setsid -f) has not reaped it yet
        is dead to svirt."""
        fields = stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start and fields[0] != b"Z"

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
    boot: str = field(default_factory=boot_id)
    claims: list[str] = field(default_factory=list)  # host-wide claims (claims.py)
    #: a detached guest (svirt start): what its next supervisor needs to adopt
    #: it (svirt/service); its hypervisor outlives a dead supervisor
    detached: dict[str, Any] | None = None

    @property
    def guest_uid(self) -> int | None:
        """The guest's uid under DAC (its ``uid:gid`` label), else None."""
        dac = self.labels.get("dac")
        return int(dac.process.split(":")[0]) if dac is not None else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {k: v.to_dict() for k, v in self.labels.items()}
        return d

    @classmethod
    def from_json(cls, d: Any) -> Record:
        """The record ``d`` describes; ValueError (what is wrong) for anything
        that is not exactly a record's shape: a record that loads is one every
        later step (release, list, orphans, gc) can use without a check."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        detached = d.get("detached")
        if isinstance(detached, dict) and (
                not isinstance(detached.get("spec", {}), dict)
                or not isinstance(detached.get("base"), str | None)):
            raise ValueError("'detached' is not a detached guest's spec and base")
        return cls(
            name=_field(d, "name", str),
            uuid=_field(d, "uuid", str),
            backend=_field(d, "backend", str),
            slot=_field(d, "slot", int),
            supervisor=_process_id(d.get("supervisor"), "supervisor"),
            labels={k: _label(k, v) for k, v in _field(d, "labels", dict).items()},
            hypervisor=_process_id(d["hypervisor"], "hypervisor") if d.get("hypervisor")
            else None,
            journal=_journal(d.get("journal", [])),
            created=float(_field(d, "created", (int, float), 0.0)),
            status=_field(d, "status", str, "unknown"),
            boot=_field(d, "boot", str, ""),
            claims=[k for k in d.get("claims", []) if isinstance(k, str)]
            if isinstance(d.get("claims", []), list) else [],
            detached=detached if isinstance(detached, dict) else None,
        )

    def this_boot(self) -> bool:
        return self.boot == boot_id()

    def alive(self) -> bool:
        return self.this_boot() and (
            self.supervisor.alive() or bool(self.hypervisor and self.hypervisor.alive()))

    @property
    def restore_failed(self) -> bool:
        return self.status.startswith("restore-failed")

    def claim_owner(self, state: Path) -> Owner:
        """This record as the owner of host-wide claims (of registry ``state``)."""
        return Owner(state=str(state), name=self.name, uuid=self.uuid, created=self.created,
                     pid=self.supervisor.pid, start=self.supervisor.start, boot=self.boot)

    def claim(self, state: Path) -> Claim:
        """This record's claims as the claims package takes them: the keys,
        the owner, and the fence that stops the guest (of registry ``state``)."""
        def fence() -> None:
            fence_guest(state, self.name)
        return Claim(tuple(self.claims), self.claim_owner(state), fence)


def _field(d: dict[str, Any], key: str, kind: type | tuple[type, ...],
           default: Any = ...) -> Any:
    """``d[key]``, which must be of ``kind`` (bool is never an int here)."""
    if key not in d and default is not ...:
        return default
    value = d.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key!r} is {type(value).__name__}, not a record's")
    return value


def _process_id(value: Any, key: str) -> ProcessId:
    if (not isinstance(value, dict) or set(value) != {"pid", "start"}
            or not all(type(v) is int and v >= 0 for v in value.values())):
        raise ValueError(f"{key!r} is not a process (pid, start)")
    return ProcessId(value["pid"], value["start"])


def _label(name: Any, value: Any) -> Label:
    fields = ("driver", "process", "image", "content", "shared")
    if not isinstance(value, dict) or not all(isinstance(value.get(f), str) for f in fields):
        raise ValueError(f"label {name!r} is not a label")
    label = Label.from_dict(value)
    if name == "dac" and not _DAC_PROCESS.fullmatch(label.process):
        raise ValueError(f"the dac label's process {label.process!r} is not uid:gid")
    return label


def _journal(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(
            isinstance(e, dict) and isinstance(e.get("op"), str) for e in value):
        raise ValueError("'journal' is not a list of steps")
    return value


def _check_table(data: Any) -> None:
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
            _label(driver, label)


_ACCESSES = frozenset(str(a) for a in Access)
_DAC_PROCESS = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")


def _write_json(path: Path, data: Any) -> None:
    """Write ``path`` whole or not at all (a temp file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write the registry ({path}): {err.strerror}",
                         hint=_hint_for(err.errno, registry=True)) from err


def _sweep_temp_files(directory: Path) -> None:
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


def _conflicts(a: str, b: str) -> bool:
    return not (a == b and a in (Access.RO, Access.SHARED))


class Registry:
    def __init__(self, root: Path | None = None, state: Path | None = None,
                 claims: HostClaims | None = None,
                 cluster: ClusterClaims | None | bool = True) -> None:
        self.root = root or default_root()
        self.state = (state or default_state(root)).absolute()
        self.claims = claims or HostClaims()
        #: allocations also unique across hosts (svirt/cluster/): True = as the
        #: host config's [cluster] says, False = this host alone
        self.cluster = _cluster_from_config() if cluster is True else cluster or None
        self.guests = self.state / "guests"
        self.objects = self.state / "objects"
        self.run_dirs = self.root / "guests"
        self.control_dir = self.root / "ctl"
        self.problems: list[str] = []  # corrupt records and tables, by name
        #: records that cannot be read (guest name: why), from the last records()
        self.unreadable: dict[str, str] = {}
        self._lock_depth = 0
        self._lock_fd = -1
        # the flock is per open file, so it cannot exclude this process's own
        # threads (svirt's supervisor serves requests in threads, on one
        # Registry): they take turns here first, and _lock_depth counts the
        # nesting of the one thread that holds the registry
        self._thread_lock = threading.RLock()

    # ---------------------------------------------------------------- lock
    def _ensure(self) -> None:
        # the state dir is 0711, not 0700: the default image root
        # (/var/lib/svirt/images) is below it and guest uids walk to their
        # images; they can list nothing here, and lock, guests/ and objects/
        # are root's alone
        for d, mode in ((self.state, 0o711), (self.guests, 0o700), (self.objects, 0o700),
                        (self.root, 0o755), (self.run_dirs, 0o755), (self.control_dir, 0o711)):
            try:
                d.mkdir(mode=mode, parents=True, exist_ok=True)
                st = os.lstat(d)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                    raise StateError(f"{d} is not a directory of this user's",
                                     hint="remove it; svirt creates it")
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(d, mode)
            except OSError as err:
                raise StateError(f"cannot create the registry directory {d}: {err.strerror}",
                                 hint=_hint_for(err.errno, registry=True)) from err

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock, self._locked():
            yield

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self._ensure()
        try:
            fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(f"cannot open the registry lock: {err.strerror}",
                             hint=_hint_for(err.errno, registry=True)) from err
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
        """The guest's run directory: root's; only its ``home`` is the guest's."""
        return self.run_dirs / f"{name}.d"

    def home(self, name: str) -> Path:
        """The guest's own directory (UML's uml_dir), below its run directory."""
        return self.run_dir(name) / "home"

    def records(self) -> list[Record]:
        """Every readable record; unreadable ones are named in ``problems``
        and in ``unreadable`` (guest name: why), and left for a person: a
        record that cannot be read cannot be released (its journal is what
        says what to undo), so it is kept, never dropped."""
        out = []
        # read again: the records' problems are replaced, the tables' kept
        self.problems = [p for p in self.problems if not p.startswith("record ")]
        self.unreadable = {}
        try:
            entries = list(os.scandir(self.guests))
        except OSError:
            return []
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                name = entry.name[: -len(".json")]
                try:  # json decodes the UTF-8 itself
                    record = Record.from_json(json.loads(read_bytes(entry.path)))
                    if record.name != name:
                        raise ValueError(f"it names guest {record.name!r}")
                    out.append(record)
                except FileNotFoundError:
                    continue  # released meanwhile
                except Exception as err:  # noqa: BLE001 - one record's trouble is its own
                    # (deeply nested JSON is a RecursionError, a huge one MemoryError)
                    why = f"{type(err).__name__}: {str(err)[:200]}"
                    self.unreadable[name] = why
                    self.problems.append(f"record {entry.path} is unreadable ({why}); "
                                         "left for a person to inspect")
        return sorted(out, key=lambda r: r.created)

    def save(self, record: Record) -> None:
        with self.locked():
            _write_json(self.record_path(record.name), record.to_json())

    def reserve(self, spec: GuestSpec, drivers: Sequence[Driver],
                previous: Record | None = None) -> Record:
        """Reserve the name and a slot, allocate labels, create the run dir.
        ``previous`` (the guest's last run, restarted): its slot and labels are
        not handed out again, so each run is a new sVirt instance."""
        with self.locked():
            records = self._reconcile()[1]
            if spec.name in self.unreadable:
                raise StateError(
                    f"the record of guest {spec.name} is unreadable "
                    f"({self.unreadable[spec.name]})",
                    hint=f"inspect {self.record_path(spec.name)}: what it holds is not "
                         "restored until a person repairs or removes it")
            if self.record_path(spec.name).exists():
                taken = next((r for r in records if r.name == spec.name), None)
                if taken is not None and taken.restore_failed:
                    raise StateError(
                        f"guest {spec.name} ended but could not be restored: {taken.status}",
                        hint="fix the cause, then run svirt gc (it retries)")
                raise StateError(
                    f"a guest named {spec.name} is already running",
                    hint="pick another name, or stop it first (svirt list)",
                )
            remembered = self._remembered_labels()
            used = {r.slot for r in records} | {slot for slot, _ in remembered}
            if previous is not None:
                used.add(previous.slot)
                remembered = [*remembered, (previous.slot, previous.labels)]
            live = LiveProcesses()
            # lock order: this registry's lock (held), then the host's
            with self.claims.locked(live) as host:
                def pick(taken: frozenset[str]) -> tuple[Record, Claim]:
                    picked = self._allocate(spec, drivers, records, remembered, set(used),
                                            live, host, taken)
                    return picked, picked.claim(self.state)

                # picked again while another host takes a key (the cluster's too)
                record = allocate_claims(host, self.cluster, pick)
                self.problems += host.problems
            run_dir = self.run_dir(spec.name)
            record.journal.append({"op": "dir", "path": str(run_dir)})
            try:
                self.save(record)
            except BaseException:
                self.release_claims(record)
                raise
            try:
                parent = os.open(self.run_dirs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    remove_tree(parent, run_dir.name)  # an earlier run's, left over
                    os.mkdir(run_dir.name, 0o755, dir_fd=parent)
                    os.mkdir(f"{run_dir.name}/home", 0o700, dir_fd=parent)
                finally:
                    os.close(parent)
            except (OSError, StateError) as err:
                why = err.message if isinstance(err, StateError) else err.strerror
                try:
                    self.release(record)  # a long-lived caller (the supervisor) keeps nothing
                except StateError as release_err:  # kept as restore-failed, retried
                    why = f"{why}; and then: {release_err.message}"
                raise StateError(f"cannot make the run directory {run_dir}: {why}",
                                 hint=_hint_for(getattr(err, "errno", None))) from err
            return record

    def peek(self, spec: GuestSpec, drivers: Sequence[Driver]) -> tuple[int, dict[str, Label]]:
        """The slot and labels :meth:`reserve` would give ``spec``'s guest now,
        by the same scan, reserving and claiming nothing (``svirt check``).
        An approximation in three ways: a record of a guest that is gone still
        counts (reserve releases it first), the cluster's claims are not read,
        and a driver that picks at random (SELinux's pair) picks again."""
        with self.locked():
            records = self.records()
            remembered = self._remembered_labels()
            used = {r.slot for r in records} | {slot for slot, _ in remembered}
            live = LiveProcesses()
            with self.claims.locked(live) as host:
                record = self._allocate(spec, drivers, records, remembered, used, live, host,
                                        claim=False)
            return record.slot, record.labels

    def _allocate(self, spec: GuestSpec, drivers: Sequence[Driver], records: list[Record],
                  remembered: list[tuple[int, dict[str, Label]]], used: set[int],
                  live: LiveProcesses, host: ClaimSession,
                  taken: frozenset[str] = frozenset(), *, claim: bool = True) -> Record:
        """Pick a slot and labels no record here, no live process and no
        host-wide claim holds (nor the cluster: ``taken``); claim them (unless
        ``claim`` is False: :meth:`peek`).  Under both locks."""
        space = "_".join(k for d in drivers if (k := d.slot_claim(0)) is not None)
        start = host.hint(space) if space else 0
        if not 0 <= start < MAX_SLOTS:
            start = 0
        checks, held = STALE_CHECKS, 0
        slot = None
        for s in itertools.chain(range(start, MAX_SLOTS), range(start)):
            if s in used:
                continue
            keys = [k for d in drivers if (k := d.slot_claim(s)) is not None]
            if taken and any(k in taken for k in keys):
                continue  # another host's
            if any(host.exists(k) for k in keys):
                # held, or stale: only the first few are read; past a run of
                # held ones the scan answers from one listing of the directory
                held += 1
                if held == LISTING_AFTER:
                    host.list_names()
                if checks <= 0 or not all(host.free(k) for k in keys):
                    checks -= 1
                    continue
            if not all(d.slot_usable(s, live) for d in drivers):
                continue
            slot = s
            break
        if slot is None:
            raise SlotsExhausted(f"all {MAX_SLOTS} guest slots are in use")
        slot_keys = [k for d in drivers if (k := d.slot_claim(slot)) is not None]
        labels: dict[str, Label] = {}
        label_keys: list[str] = []
        for d in drivers:
            taken_labels = [r.labels[d.name] for r in records if d.name in r.labels]
            taken_labels += [lab[d.name] for _, lab in remembered if d.name in lab]
            for _ in range(LABEL_PICKS):
                label = d.label_for(spec, slot, taken_labels, live)
                key = d.label_claim(spec, label)
                if key is None or (key not in label_keys and key not in taken
                                   and host.free(key)):
                    break
                if label in taken_labels:  # the spec's own label: no other to pick
                    raise SecurityError(
                        f"the {d.name} label {label.process} is held by another guest "
                        f"(claim {key})", label=label.process,
                        hint="give this guest a label of its own, or stop that guest")
                taken_labels.append(label)  # held by a guest of another registry
            else:
                raise SlotsExhausted(
                    f"the {d.name} driver found no label free on this host in "
                    f"{LABEL_PICKS} picks", hint="stop a guest, or run svirt gc")
            labels[d.name] = label
            if key is not None:
                label_keys.append(key)
        record = Record(spec.name, str(spec.uuid), str(spec.backend), slot,
                        ProcessId.of(os.getpid()), labels, claims=slot_keys + label_keys)
        if not claim:
            return record
        host.claim(record.claims, record.claim_owner(self.state),
                   space=space or None, slot=slot, hinted=slot_keys)
        if space:
            host.set_hint(space, slot + 1)
        return record

    def release_claims(self, record: Record) -> list[str]:
        """Drop ``record``'s host-wide claims (those still its own)."""
        if not record.claims:
            return []
        with self.claims.locked() as host:
            removed = host.release(record.claims, record.claim_owner(self.state))
            if self.cluster is not None:
                self.problems += self.cluster.release(host, record.claim(self.state))
            self.problems += host.problems
        return removed

    def sweep_control(self) -> list[str]:
        """Remove the mconsole reply sockets of launchers that are gone (``svirt
        gc``).  A launcher binds ``mc.PID.START.HEX`` in the control directory
        and chowns it to the guest's uid for one exchange; one killed
        mid-exchange leaves it behind.  The directory is reached by a
        descriptor (no symlink followed, it must be root's and writable by
        root alone), names are unlinked relative to it (unlink follows no
        symlink); a name whose pid runs with that start time is kept."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.control_dir, flags)
        except FileNotFoundError:
            return []
        except OSError as err:
            self.problems.append(f"control directory {self.control_dir}: {err.strerror}")
            return []
        removed: list[str] = []
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                self.problems.append(f"control directory {self.control_dir} is not this "
                                     "user's alone: nothing swept")
                return []
            with os.scandir(fd) as entries:
                names = [e.name for e in entries if e.name.startswith("mc.")]
            for name in names:
                if _launcher_alive(name):
                    continue
                try:
                    if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        continue  # never a launcher's: not ours to remove
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # its launcher removed it meanwhile
                except OSError as err:
                    self.problems.append(f"cannot remove {self.control_dir / name}: "
                                         f"{err.strerror}")
                    continue
                removed.append(f"removed the mconsole reply socket {name} of a launcher "
                               "that is gone")
        finally:
            os.close(fd)
        return removed

    def sweep_claims(self) -> list[str]:
        """Remove every stale host-wide claim, of any registry (``svirt gc``)."""
        with self.claims.locked(LiveProcesses()) as host:
            report = host.sweep()
            self.problems += host.problems
        return report

    def _remembered_labels(self) -> list[tuple[int, dict[str, Label]]]:
        """(slot, labels) of every holder an object table still remembers: a
        uid or category pair is not handed out again while an object has it."""
        out = []
        for _path, table in self._tables():
            for holder in table["holders"].values():
                try:
                    labels = {n: Label.from_dict(v) for n, v in holder["labels"].items()}
                    out.append((int(holder.get("slot", -1)), labels))
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
        return out

    def _tables(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        try:
            entries = sorted(os.scandir(self.objects), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                path = Path(entry.path)
                table = self._load_table(path)
                if table is not None:
                    yield path, table

    # ------------------------------------------------------------- objects
    def hold(self, record: Record, resource: Resource, drivers: Sequence[Driver],
             roots: tuple[Path, ...], live: LiveProcesses | None = None) -> None:
        """Label one object for ``record``'s guest, journalled and ref-counted."""
        with self.locked():
            # walked from the root for its kind (roots: launch_roots(), or spec roots)
            obj = open_resource(resource, roots)
            try:
                self._hold_opened(record, resource, drivers, obj, live)
            finally:
                obj.close()

    def _hold_opened(self, record: Record, resource: Resource, drivers: Sequence[Driver],
                     obj: OpenedObject, live: LiveProcesses | None) -> None:
        table_path = self.objects / f"{obj.key}.json"
        table = self._load_table(table_path)
        if table is None:
            raise StateError(f"the registry's table for {resource.path} ({table_path}) is "
                             "unreadable", hint="inspect or remove it by hand, then retry")
        holders = table["holders"]
        live_names = {o for o in holders if o != record.name and self.record_path(o).exists()}
        for other in live_names:
            info = holders[other]
            if _conflicts(info["access"], resource.access):
                raise SecurityError(
                    f"{resource.path} is in use by guest {other} "
                    f"({info['access']}); {record.name} wants it {resource.access}",
                    path=resource.path,
                    hint="give each guest its own image, or mark both disks shared",
                )
        if (self.cluster is not None and resource.access is Access.RW
                and resource.kind is ResourceKind.DISK):
            # refused if another host writes it
            self.cluster.lock_image(self.claims, record.claim_owner(self.state), record.claims,
                                    obj, lambda: self.save(record))
        first = not live_names
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
        if first and not holders:
            table = {"path": str(obj.path), "originals": {
                d.name: d.snapshot(obj.fd) for d in drivers}, "holders": {}}
        else:
            for d in drivers:  # a driver the earlier holders did not use
                table["originals"].setdefault(d.name, d.snapshot(obj.fd))
        # 1. intent in the guest's record, 2. holder in the table, 3. the change:
        # a crash after 1 leaves an entry release skips; after 2 one it restores
        record.journal.append({"op": "object", "key": obj.key, "path": str(obj.path)})
        self.save(record)
        table["path"] = str(obj.path)
        if obj.root is not None:  # restore walks from the same root
            table["root"] = str(obj.root)
        table["holders"][record.name] = {
            "access": str(resource.access),
            "slot": record.slot,
            "labels": {n: lab.to_dict() for n, lab in record.labels.items()},
        }
        _write_json(table_path, table)
        if resource.relabel:
            for d in drivers:
                if d.wants_change(obj.fd, obj.st_mode, resource.access, record.labels[d.name]):
                    try:
                        d.apply(obj.fd, obj.st_mode, resource.access, record.labels[d.name])
                    except OSError as err:
                        raise SecurityError(
                            f"{resource.path}: the {d.name} driver cannot label it: "
                            f"{err.strerror or err}",
                            path=resource.path,
                            hint=_hint_for(err.errno),
                        ) from err

    def _load_table(self, path: Path) -> dict[str, Any] | None:
        """The table at ``path``; empty when absent; None (and a problem
        named) when it is unreadable or not exactly a table's shape."""
        try:
            data = json.loads(read_bytes(str(path)))
            _check_table(data)
            return data  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {"path": "", "originals": {}, "holders": {}}
        except Exception as err:  # noqa: BLE001 - one table's trouble is its own
            # (deeply nested JSON is a RecursionError, a huge one MemoryError)
            problem = (f"object table {path} is unreadable ({type(err).__name__}: "
                       f"{str(err)[:200]}); left for a person to inspect")
            if problem not in self.problems:
                self.problems.append(problem)
            return None

    def _release_object(self, name: str, entry: dict[str, Any], report: list[str]) -> None:
        key = entry.get("key")
        if not isinstance(key, str) or not OBJECT_KEY.fullmatch(key):
            raise StateError(f"the journal names object {key!r}, which is no object's key")
        table_path = self.objects / f"{key}.json"
        table = self._load_table(table_path)
        if table is None:
            raise StateError(f"object table {table_path} is unreadable")
        if name not in table["holders"]:
            return  # the launcher died between journalling the intent and holding
        self._drop_holder(table_path, table, name, report)

    def _drop_holder(self, table_path: Path, table: dict[str, Any], name: str,
                     report: list[str]) -> None:
        """Undo ``name``'s hold; restore the originals when it was the last."""
        holder = table["holders"][name]
        others = [o for o in table["holders"] if o != name and self._has_record(o)]
        last = not others
        key = table_path.name[:-len(".json")]
        path, root = Path(table["path"]), table.get("root")

        def reopen_it(want: str | None) -> OpenedObject | None:
            if root and path != Path(root) and Path(root) in path.parents:
                return reopen_beneath(Path(root), str(path.relative_to(root)), want)
            return reopen(path, want)

        obj = reopen_it(key)
        if obj is None:
            # another inode there that still carries this guest's uid or label
            # is not "replaced": the guest changed what identifies it (or a
            # second net for what the key does not cover).  Its table stays,
            # the record is restore-failed, and a person looks.
            now = reopen_it(None)
            if now is not None:
                try:
                    why = _carries(now.fd, holder["labels"])
                finally:
                    now.close()
                if why:
                    raise StateError(
                        f"{table['path']}: not the object held (key {key}, now "
                        f"{now.key}), yet it {why}; left as the guest made it",
                        hint="inspect the file, give it back its owner and labels by "
                             f"hand and remove {table_path}, then run svirt gc")
            report.append(f"{table['path']}: gone or replaced, left alone")
        else:
            try:
                for dname, original in table["originals"].items():
                    label = holder["labels"].get(dname)
                    if label is None and not last:
                        continue  # this holder never changed anything for dname
                    driver = make_driver(SecurityModel(dname))
                    try:
                        driver.restore(obj.fd, original,
                                       Label.from_dict(label) if label else _no_label(dname),
                                       last=last)
                    except OSError as err:
                        raise StateError(
                            f"{table['path']}: cannot restore its {dname} state: "
                            f"{err.strerror or err}", hint=_hint_for(err.errno)) from err
                report.append(f"{table['path']}: {'restored' if last else 'released'}")
            finally:
                obj.close()
        if last:
            table_path.unlink(missing_ok=True)
        else:
            del table["holders"][name]
            _write_json(table_path, table)

    # ------------------------------------------------------------- release
    def release(self, record: Record) -> list[str]:
        """Undo everything the journal says, in reverse order; drop the record.

        What cannot be undone stays journalled: the record is kept with status
        ``restore-failed: <the first error>`` and every reconcile retries it.
        Raises nothing but StateError: whatever one step raises (an OSError, a
        guest's mess in its own directory, a bug) is that step's failure, kept
        for the next try, and the other steps still run.
        """
        report: list[str] = []
        errors: list[str] = []
        with self.locked():
            failed: list[dict[str, Any]] = []
            try:
                if record.this_boot():
                    # also when the launcher died before it recorded the hypervisor
                    killed = kill_guest_leftovers(record, self.state)
                    if killed:
                        report.append(f"killed {killed} leftover process(es) of the guest")
            except Exception as err:  # noqa: BLE001 - kept in the record, retried
                errors.append(f"leftover processes: {_why(err)}")
            if not errors and record.this_boot():
                # what belongs to the uid, not to a process (SysV IPC, keyrings):
                # removed once no process of the guest is left to make more
                try:
                    report += remove_uid_objects(record)
                except Exception as err:  # noqa: BLE001 - kept in the record, retried
                    errors.append(f"uid objects: {_why(err)}")
            for entry in reversed(record.journal):
                try:
                    self._undo(record, entry, report)
                except Exception as err:  # noqa: BLE001 - kept in the record, retried
                    what = entry.get("path") or entry.get("name") or entry.get("op")
                    errors.append(f"{what}: {_why(err)}")
                    failed.insert(0, entry)
            if not errors:
                try:
                    self.release_claims(record)
                except Exception as err:  # noqa: BLE001 - kept in the record, retried
                    errors.append(f"claims: {_why(err)}")
            if errors:
                # the claims stay: objects may still carry the guest's uid or level
                record.journal = failed
                record.status = f"restore-failed: {errors[0]}"
                try:
                    self.save(record)
                except StateError as err:  # the old record stays: retried as it was
                    errors.append(f"and its record could not be updated: {err.message}")
            else:
                try:
                    self.record_path(record.name).unlink(missing_ok=True)
                except OSError as err:  # every step is undone: a retry finds nothing
                    errors.append(f"its record could not be removed: {err.strerror}")
        if errors:
            raise StateError(f"guest {record.name}: could not restore: " + "; ".join(errors),
                             hint="svirt gc retries; svirt list shows it until then")
        return report

    def _undo(self, record: Record, entry: dict[str, Any], report: list[str]) -> None:
        op = entry["op"]
        if op == "object":
            self._release_object(record.name, entry, report)
        elif op == "dir":
            path = Path(entry["path"])
            if path.parent != self.run_dirs:
                raise StateError(f"{path} is not a run directory of this registry")
            try:
                parent = os.open(self.run_dirs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                return  # /run was wiped: nothing left to remove
            try:
                remove_tree(parent, path.name)
            finally:
                os.close(parent)
        elif op == "tap":
            from svirt.launcher.network import delete_tap

            if delete_tap(entry["name"], entry.get("netns")):
                report.append(f"tap {entry['name']}: deleted")
        elif op == "apparmor":  # the guest's profile (svirt/security/apparmor.py)
            from svirt.security.apparmor import unload_profile

            path = Path(entry["path"])
            if path.parent.parent != self.run_dirs:
                raise StateError(f"{path} is not in a run directory of this registry")
            if unload_profile(entry["profile"], path):
                report.append(f"AppArmor profile {entry['profile']}: removed")
        elif op == "smack-rules":  # the guest's SMACK rules (svirt/security/smack.py)
            from svirt.security.smack import unload_rules

            report += [f"SMACK rule {r}: removed" for r in unload_rules(entry["rules"])]
        elif op == "cgroup":  # cgroups: still-populated is an error (restore-failed)
            from svirt.launcher import cgroups

            cgroups.remove_dirs(entry["dirs"].values())
        elif op == "storage":  # the guest's tmpfs over its run dir (launcher/storage.py)
            from svirt.launcher import storage

            if (done := storage.undo(entry, self.run_dirs)) is not None:
                report.append(done)

    def reconcile_records(self) -> list[Record]:
        """Reconcile, then the records that are left (read once, not again)."""
        return self._reconcile()[1]

    def reconcile(self) -> list[tuple[str, list[str]]]:
        """Release every record whose processes are gone; restore objects no
        record holds any more; kill orphans.  Never raises for one bad entry:
        what failed is in the report (and stays for the next try)."""
        return self._reconcile()[0]

    def _reconcile(self) -> tuple[list[tuple[str, list[str]]], list[Record]]:
        """Reconcile; also return the records still kept (read once).  One
        record's or one table's trouble stays its own: it is reported (and a
        record that cannot be released is kept as ``restore-failed``), and
        every other record is reconciled all the same."""
        done: list[tuple[str, list[str]]] = []
        kept: list[Record] = []
        with self.locked():
            self.problems = []  # this reconcile's (a long-lived supervisor keeps none)
            for directory in (self.guests, self.objects):
                _sweep_temp_files(directory)
            for record in self.records():
                try:
                    if self._reconcile_one(record):
                        kept.append(record)
                    else:
                        done.append((record.name, self.release(record)))
                except Exception as err:  # noqa: BLE001 - this record's alone
                    why = _why(err)
                    done.append((record.name, [f"restore failed: {why}"]))
                    kept.append(record)
                    if not record.restore_failed:  # failed before release marked it
                        record.status = f"restore-failed: {why}"
                        try:
                            self.save(record)
                        except StateError as save_err:
                            self._problem(f"guest {record.name}: {save_err.message}")
            try:
                swept = self._sweep_tables()
            except Exception as err:  # noqa: BLE001 - tried again by the next reconcile
                swept = []
                self._problem(f"the sweep of object tables failed: {_why(err)}")
            if swept:
                done.append(("(objects no record holds)", swept))
            try:
                # cgroups: this registry's svirt/NAME.SLOT.TAG dirs with no record, no tasks
                from svirt.launcher import cgroups

                tag = cgroups.registry_tag(self.state)
                gone = cgroups.sweep((cgroups.leaf_name(r.name, r.slot, tag) for r in kept),
                                     tag)
            except Exception as err:  # noqa: BLE001 - tried again by the next reconcile
                gone = []
                self._problem(f"the sweep of cgroups failed: {_why(err)}")
            if gone:
                done.append(("(cgroups no record holds)", gone))
            from svirt.launcher import storage  # mounts of guests whose record is gone

            unmounted = storage.sweep(self.run_dirs, tag,
                                      lambda name: self.record_path(name).exists())
            if unmounted:
                done.append(("(storage no record holds)", unmounted))
        return done, kept

    def _reconcile_one(self, record: Record) -> bool:
        """True when ``record``'s guest is still there (kept); else its
        hypervisor, if it outlived its supervisor, is killed (to be released).
        A failed release is retried whoever ran it: its supervisor (a
        long-lived one: the service's) is done with it."""
        hv = record.hypervisor
        if not record.restore_failed:
            if record.this_boot() and record.supervisor.alive():
                return True
            if (record.detached is not None and hv is not None and record.this_boot()
                    and hv.alive()):
                return True  # a detached guest: the next supervisor adopts it
        if hv is not None and record.this_boot() and hv.alive():
            kill_process(hv)
        return False

    def _problem(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def _sweep_tables(self) -> list[str]:
        """Drop holders that have no record any more (a wiped or lost record,
        a crash between two writes) and restore what they held."""
        report: list[str] = []
        for path, table in list(self._tables()):
            for name in [n for n in table["holders"] if not self._has_record(n)]:
                try:
                    self._drop_holder(path, table, name, report)
                except Exception as err:  # noqa: BLE001 - the table stays, retried
                    report.append(f"{table.get('path')}: restore failed, kept for the next "
                                  f"gc: {_why(err)}")
                    break
        return report

    def _has_record(self, name: str) -> bool:
        """A record file (readable or not) names guest ``name``; a name that
        cannot be a record's file name (a corrupt table) counts as held."""
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            return True
        return self.record_path(name).exists()

    def orphans(self, uid_range: range | None = None,
                records: Sequence[Record] | None = None) -> list[tuple[int, int]]:
        """(pid, uid) of live processes that no record of this registry
        accounts for: guests whose record was lost.  Found by what root
        controls, never by what the process carries: every process in one of
        this registry's cgroups (``*.TAG``) whose leaf no record names, and
        every process in the DAC uid range that is in no svirt cgroup (a
        guest cannot leave its cgroup) unless its uid is a record's.  A
        process in another registry's cgroup is that registry's.  ``records``:
        this registry's, when the caller just read them."""
        return [(pid, uid) for pid, uid, _leaf in self._orphans(uid_range, records)]

    def _orphans(self, uid_range: range | None = None,
                 records: Sequence[Record] | None = None
                 ) -> list[tuple[int, int, str | None]]:
        """:meth:`orphans`, each with the svirt leaf it is in (or None)."""
        from svirt.launcher import cgroups

        if uid_range is None:
            from svirt.security.dac import DacDriver

            dac = DacDriver()
            uid_range = range(dac.uid_base, dac.uid_base + dac.uid_count)
        tag = cgroups.registry_tag(self.state)
        records = self.records() if records is None else records
        known = {cgroups.leaf_name(r.name, r.slot, tag) for r in records}
        ours = set()
        for record in records:
            if record.guest_uid is not None:
                ours.add(record.guest_uid)
        out: dict[int, tuple[int, str | None]] = {}
        for leaf, dirs in cgroups.leaves(tag).items():
            if leaf not in known and cgroups.tasks_of(dirs):
                with cgroups.frozen(dirs):  # a fork chain holds still to be listed
                    for pid in cgroups.tasks_of(dirs):
                        owner = next(iter(_uids_of(pid)), None)  # the real uid
                        if owner is not None:
                            out[pid] = (owner, leaf)
        for pid, uid in _processes_by_uid(lambda u: u in uid_range):
            if pid in out:
                continue
            where = cgroups.leaf_of(pid)
            if where is None:
                if uid not in ours:
                    out[pid] = (uid, None)
            elif cgroups.tag_of(where) == tag and where not in known:
                out[pid] = (uid, where)
        return sorted((pid, uid, leaf) for pid, (uid, leaf) in out.items())

    def kill_orphans(self) -> list[str]:
        """SIGKILL every orphan: a whole cgroup at once where it is in one of
        this registry's (so a fork chain cannot outrun it), else the process."""
        from svirt.launcher import cgroups

        report = []
        done: set[str] = set()
        # under the lock: a launch journals its cgroup in its record (under the
        # lock) before it creates it, so no new guest looks like an orphan here
        with self.locked():
            for pid, uid, leaf in self._orphans():
                if leaf is not None and leaf not in done:
                    done.add(leaf)
                    try:
                        cgroups.kill_dirs(cgroups.dirs_of_leaf(leaf))
                    except StateError as err:
                        report.append(f"orphan cgroup {leaf}: {err.message}")
                if leaf is None and not cgroups.kill_checked(pid, _loose_of(uid)):
                    continue  # gone, or its pid reused meanwhile
                report.append(f"killed orphan pid {pid} (uid {uid}, no record)")
        return report


def _cluster_from_config() -> ClusterClaims | None:
    from svirt import config

    cluster = config.load().cluster
    return None if cluster is None else ClusterClaims(cluster)


def _hint_for(errno_value: int | None, *, registry: bool = False) -> str | None:
    if registry:
        return {
            30: "the state directory is on a read-only filesystem ($SVIRT_STATE_DIR, "
                "state_dir in /etc/svirt/svirt.toml)",
            28: "the state directory's disk is full: make room, then run svirt gc",
            13: "svirt needs root to change the registry",
            1: "svirt needs root to change the registry",
        }.get(errno_value or 0)
    return {
        30: "the file is on a read-only filesystem: use readonly = true, or copy it",
        1: "the file may be immutable (lsattr) or on a filesystem that refuses owners",
        95: "the filesystem does not support this (ACLs or xattrs)",
        28: "the disk is full",
    }.get(errno_value or 0)


def kill_process(proc: ProcessId) -> None:
    """SIGKILL ``proc`` (if it is still that process) and wait briefly for it."""
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


def kill_guest_leftovers(record: Record, state: Path) -> int:
    """SIGKILL what is left of a guest: its cgroup, whole (cgroups.kill_dirs:
    cgroup.kill, or freeze-kill-thaw until empty, so a fork chain cannot
    outrun it); then, as a second net, any process with its DAC uid (real,
    effective or saved) that is in no svirt cgroup, or in this guest's
    (never one in another guest's or another registry's: the kernel says
    which cgroup a process is in, the process cannot).  How many processes
    were signalled.  Raises StateError when the cgroup does not empty."""
    from svirt.launcher import cgroups

    killed = cgroups.kill_dirs(cgroups.journal_dirs(record.journal))
    uid = record.guest_uid
    if uid is None or uid < 1000:
        return killed
    own = cgroups.leaf_name(record.name, record.slot, cgroups.registry_tag(state))

    def still_ours(pid: int) -> bool:
        return _has_uid(pid, uid, (None, own))

    for _ in range(50):
        pids = [pid for pid, _uid in _processes_by_uid(lambda u: u == uid) if still_ours(pid)]
        if not pids:
            break
        killed += sum(cgroups.kill_checked(pid, still_ours) for pid in pids)
        time.sleep(0.02)
    return killed


def fence_guest(state: Path, name: str) -> None:
    """SIGKILL a guest whose cluster keys are about to be freed: its
    hypervisor (pid and start time checked), then its cgroup.  The fence
    the registry hands the cluster claims (:meth:`Record.claim`)."""
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


def remove_uid_objects(record: Record) -> list[str]:
    """The guest's uid's SysV IPC objects and keyrings (launcher/uidstate.py):
    they outlive its processes and cgroup, and a ``jail = false`` guest
    makes them in the host's namespaces.  What was done."""
    from svirt.launcher import uidstate

    uid = record.guest_uid
    if uid is None or uid < 1000:
        return []
    return uidstate.remove_uid_objects(uid)


def _loose_of(uid: int) -> Callable[[int], bool]:
    """A check for :func:`cgroups.kill_checked`: the process has ``uid`` (real,
    effective, saved or file-system) and is in no svirt cgroup."""
    return lambda pid: _has_uid(pid, uid, (None,))


def _has_uid(pid: int, uid: int, leaves: tuple[str | None, ...]) -> bool:
    """``pid`` has ``uid`` (real, effective, saved or file-system) and is in
    one of ``leaves`` (None: in no svirt cgroup)."""
    from svirt.launcher import cgroups

    return uid in _uids_of(pid) and cgroups.leaf_of(pid) in leaves


def _processes_by_uid(wanted: Callable[[int], bool]) -> list[tuple[int, int]]:
    """(pid, uid) of live processes (zombies are not) whose real, effective or
    saved uid is wanted (the first of them that is).
    psutil here (gc, release, orphans: off the launch path, whose own process
    checks read /proc/PID/stat through a bare fd: importing psutil costs
    ~11 ms, measured)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            ids = proc.info["uids"]
            # any of its uids: a process with another real uid and the guest's
            # effective and saved one (a set-uid file of the guest's, run by
            # another user) may become the guest's uid whenever it likes
            uid = next((u for u in (ids.real, ids.effective, ids.saved) if wanted(u)), None)
        except (AttributeError, TypeError):
            continue  # gone while it was read
        if uid is not None and proc.info["status"] not in (psutil.STATUS_ZOMBIE,
                                                           psutil.STATUS_DEAD):
            out.append((proc.pid, uid))
    return out


def _uids_of(pid: int) -> tuple[int, ...]:
    """The real, effective, saved and file-system uids of ``pid`` (empty when
    gone), from /proc/PID/status."""
    try:
        data = read_bytes(f"/proc/{pid}/status")
    except OSError:
        return ()
    for line in data.splitlines():
        if line.startswith(b"Uid:"):
            return tuple(int(x) for x in line.split()[1:5])
    return ()


def is_zombie(pid: int | str) -> bool:
    """True for an exited process nobody reaped yet (it holds nothing but its pid)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] in (b"Z", b"X")


def _carries(fd: int, labels: dict[str, Any]) -> str | None:
    """How the inode at ``fd`` still carries a guest's identity (its DAC uid
    or gid as owner, or its SELinux or SMACK image label), else None."""
    st = os.fstat(fd)
    dac = labels.get("dac")
    if isinstance(dac, dict) and _DAC_PROCESS.fullmatch(str(dac.get("process", ""))):
        uid, gid = (int(x) for x in str(dac["process"]).split(":"))
        if st.st_uid == uid or st.st_gid == gid:
            return f"is owned by the guest's uid {uid} (owner {st.st_uid}:{st.st_gid})"
    from svirt.security.files import get_xattr

    if isinstance(dac, dict) and _DAC_PROCESS.fullmatch(str(dac.get("process", ""))):
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


def _why(err: BaseException) -> str:
    """One line for a failure kept in a record or a report."""
    if isinstance(err, SvirtError):
        return err.message
    if isinstance(err, OSError):
        return str(err)
    return f"{type(err).__name__}: {err}"[:300]


def _no_label(driver: str) -> Label:
    return Label(driver, "", "", "", "")
