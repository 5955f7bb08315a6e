"""A guest's record: what the registry keeps of one guest, and its file.

``STATE/guests/NAME.json`` holds one :class:`Record`: name, uuid, slot,
labels, boot, supervisor and hypervisor (pid + start time), host-wide
claims and the journal of what was done for the guest (undone by
:mod:`svirt.launcher.journal`).  A record is read through
:meth:`Record.from_json`, which refuses anything that is not exactly a
record's shape, so every later step can use it without a check.  Files
under the state directory are written whole or not at all
(:func:`write_json`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svirt.claims.owner import Owner
from svirt.errors import StateError, SvirtError
from svirt.procfs import ProcessId, boot_id, read_bytes
from svirt.security.base import Label, guest_ids

#: a DAC label's process part: the guest's "uid:gid"
DAC_PROCESS = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")


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
        ids = guest_ids(self.labels)
        return ids[0] if ids is not None else None

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
            labels={k: check_label(k, v) for k, v in _field(d, "labels", dict).items()},
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


def check_label(name: Any, value: Any) -> Label:
    """The label ``value`` (of driver ``name``) as saved in a record or an
    object table; ValueError unless it is exactly a label's shape."""
    fields = ("driver", "process", "image", "content", "shared")
    if not isinstance(value, dict) or not all(isinstance(value.get(f), str) for f in fields):
        raise ValueError(f"label {name!r} is not a label")
    label = Label.from_dict(value)
    if name == "dac" and not DAC_PROCESS.fullmatch(label.process):
        raise ValueError(f"the dac label's process {label.process!r} is not uid:gid")
    return label


def _journal(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(
            isinstance(e, dict) and isinstance(e.get("op"), str) for e in value):
        raise ValueError("'journal' is not a list of steps")
    return value


def load_records(directory: Path) -> tuple[list[Record], dict[str, str]]:
    """Every readable record in ``directory`` (oldest first), and the guest
    names of those that cannot be read, with why."""
    out = []
    unreadable: dict[str, str] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return [], {}
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
                unreadable[name] = f"{type(err).__name__}: {str(err)[:200]}"
    return sorted(out, key=lambda r: r.created), unreadable


def write_json(path: Path, data: Any) -> None:
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
                         hint=hint_for(err.errno, registry=True)) from err


def hint_for(errno_value: int | None, *, registry: bool = False) -> str | None:
    """What a person can do about ``errno_value``: writing the registry
    (``registry``), else changing an object's labels."""
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


def why(err: BaseException) -> str:
    """One line for a failure kept in a record or a report."""
    if isinstance(err, SvirtError):
        return err.message
    if isinstance(err, OSError):
        return str(err)
    return f"{type(err).__name__}: {err}"[:300]
