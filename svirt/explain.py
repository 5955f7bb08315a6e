"""``svirt explain``: which guest a kernel denial concerns, and what it means.

Three steps, each testable alone:

1. **Sources** (:func:`gather`): the kernel ring buffer (``/dev/kmsg``, read
   non-blocking: every record it holds now), the audit log
   (``/var/log/audit/audit.log`` when present), or a file / stdin.  Lines are
   read with a length cap; a longer one is skipped, never held whole.
2. **Parsing** (:func:`parse_lines`): pure functions over lines.  A line
   counts only when its message *starts* as an audit record (:func:`audit_head`):
   a kmsg ``PRI,SEQ,USEC,FLAGS;`` record of the kernel facility whose message
   is ``audit: type=N audit(STAMP): ``; an audit.log / ausearch line
   ``type=T msg=audit(STAMP): ``; dmesg text (``[ 1.23] ``, ``-T``, ``-r``,
   ``-x``) or journal / syslog text (``TIME HOST kernel: `` or the audit
   transport's ``TIME HOST audit[PID]: TYPE ``) followed by the same.  The
   body must then begin with SELinux ``avc:  denied``, AppArmor
   ``apparmor="DENIED"`` or SMACK ``lsm=SMACK``: never a match in the middle
   of another message (a process that segfaults in a file it named after an
   AVC record gets its name into kmsg, after its comm and fixed text).
   Audit ``PATH``/``CWD``/``SYSCALL`` records of the same event (the same
   rule) add the full path, the device and the uids.  DAC denials never
   reach the log (a plain EACCES): they are not explained.  Journal text
   cannot show the transport: a local user may write a ``kernel:`` line to
   syslog; a jailed guest has no syslog socket.
3. **Mapping** (:class:`Explainer`): records and object tables of the
   registry in, one :class:`Finding` per denial out: the guest (by MCS pair,
   AppArmor profile ``svirt-<uuid>``, SMACK label, then the hypervisor pid,
   then the DAC uid), the object (path from the record, else by inode from
   the object tables), and a classification: ``cross-guest`` (the object is
   another guest's: confinement working), ``policy gap`` (the guest's own or
   a shared/system object: the rule that would allow it, written as
   audit2allow or an AppArmor profile would, never by running a tool) or
   ``mislabelled`` (the guest's object carries a label svirt never gave it).

Nothing here prints; ``svirt/cli.py`` does.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from svirt.errors import SvirtError
from svirt.launcher.state import Record, start_time
from svirt.security.base import Label

KMSG = Path("/dev/kmsg")
AUDIT_LOG = Path("/var/log/audit/audit.log")
MAX_LINE = 16_384  # an audit record is at most 8970 bytes (MAX_AUDIT_MESSAGE_LENGTH)
MAX_RECORDS = 1_000_000  # per source: a runaway file cannot keep us reading forever
MAX_TABLE = 1 << 20  # bytes of one object table

CROSS_GUEST = "cross-guest"
POLICY_GAP = "policy gap"
MISLABELLED = "mislabelled"


class ExplainError(SvirtError):
    """A log cannot be read, or an argument (``--since``) makes no sense."""


# ------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class Denial:
    """One denial as the kernel logged it (nothing looked up yet)."""

    lsm: str  # "selinux", "apparmor", "smack"
    source: str  # "kmsg", the audit log's path, a file's name, "stdin"
    time: float | None  # wall clock (audit's own stamp, else kmsg's converted)
    event: str | None  # audit's "1700000000.123:456": the same event in two logs
    subject: str  # scontext, AppArmor profile, SMACK subject label
    target: str | None  # tcontext, SMACK object label (AppArmor: none)
    perms: tuple[str, ...]  # SELinux permissions, AppArmor mask letters, SMACK access
    tclass: str  # SELinux tclass, AppArmor operation, SMACK hook (fn=)
    pid: int | None = None
    comm: str | None = None
    name: str | None = None  # name= (SELinux: last component; AppArmor: a path)
    path: str | None = None  # a full path when some record gives one
    ino: int | None = None
    dev: str | None = None  # "vda", "tmpfs" (s_id), or "fd:00" from a PATH record
    fields: Mapping[str, str] = field(default_factory=dict)
    raw: str = ""


# ``audit_log_untrustedstring``: quoted, or hex when the value holds a quote,
# a space, a control or a non-ASCII byte; these are the fields written by it
UNTRUSTED = frozenset({"name", "path", "comm", "exe", "profile", "subject", "object",
                       "cwd", "proctitle", "peer", "target", "info"})
_FIELD = re.compile(r'([A-Za-z_][\w-]{0,40})=("[^"]*"|\S*)')
_AUDIT_ID = re.compile(r"audit\((\d{1,12}(?:\.\d{1,9})?):(\d{1,20})\)")
_KMSG = re.compile(r"(\d{1,3}),(\d{1,20}),(\d{1,20}),[^;]{0,40};")
_AVC = re.compile(r"avc:\s+denied\s+\{([^}]{0,2000})\}\s+for\s")
_STAMP = r"audit\((\d{1,12}(?:\.\d{1,9})?):(\d{1,20})\): "
#: the kernel's own printk of an audit record (kernel/audit.c kauditd_printk_skb)
_KERNEL_HEAD = re.compile(r"audit: type=(\d{4}) " + _STAMP)
#: auditd's audit.log and ausearch (node= when records are forwarded)
_LOG_HEAD = re.compile(r"(?:node=[\w.:-]{1,255} )?type=([A-Z_]{1,30}|\d{4}) msg=" + _STAMP)
#: journald's audit transport: the stamp moved to fields, the type's name first
_JOURNAL_AUDIT_HEAD = re.compile(r"audit(?:\[\d{1,10}\])?: ([A-Z_]{1,30}|\d{4}) ")
#: what comes before a kernel message in text: dmesg's raw level (kernel
#: facility only), -x facility, time stamp
_DMESG_PREFIX = re.compile(
    r"(?:<(\d{1,3})>)?(?:kern\s{0,3}:\s{0,3}[a-z]{1,7}\s{0,3}:\s?)?"
    r"(?:\[[ \d.]{1,30}\] |\[[A-Z][a-z]{2} [A-Za-z]{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] )?")
#: journal / syslog text: TIME HOST TAG
_SYSLOG_PREFIX = re.compile(
    r"(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d(?:\.\d{1,9})?"
    r"|\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?"
    r"|\[[ \d.]{1,30}\]) [A-Za-z0-9_.-]{1,255} (?=kernel: |audit(?:\[\d{1,10}\])?: )")
#: the record types a denial comes as (names in audit.log and the journal,
#: numbers in kmsg), and those that add to one
DENIAL_TYPES = {"AVC", "1400", "APPARMOR_DENIED", "1503"}
_TYPES = {"1300": "SYSCALL", "1302": "PATH", "1307": "CWD", "1400": "AVC",
          "1503": "APPARMOR_DENIED"}
_HEX = re.compile(r"(?:[0-9A-F]{2})+")
_FILE_MASK = re.compile(r"[rwaxmlkcdNiupU:]*")
#: AppArmor's word for a path outside the process's root (a jail's, a
#: namespace's): an fd opened before pivot_root, say
DISCONNECTED = "Failed name lookup - disconnected path"


def _value(key: str, raw: str) -> str:
    if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
        return raw[1:-1]
    if key in UNTRUSTED and _HEX.fullmatch(raw):
        return bytes.fromhex(raw).decode("utf-8", errors="replace")
    return raw


def fields_of(text: str) -> dict[str, str]:
    """``key=value`` pairs of an audit record (the first of a repeated key)."""
    out: dict[str, str] = {}
    for m in _FIELD.finditer(text):
        out.setdefault(m.group(1), _value(m.group(1), m.group(2)))
    return out


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and len(text) < 20 else None


def boot_time() -> float:
    """The wall-clock time of boot: now minus /proc/uptime (for kmsg stamps)."""
    with open("/proc/uptime", encoding="ascii") as f:
        return time.time() - float(f.read().split()[0])


@dataclass
class _Aux:
    """What PATH, CWD and SYSCALL records of one event add to its denial."""

    paths: list[dict[str, str]] = field(default_factory=list)
    cwd: str | None = None
    syscall: dict[str, str] = field(default_factory=dict)


def parse_lines(lines: Iterable[tuple[str, str]], boot: float | None = None) -> list[Denial]:
    """The denials in ``lines`` ((source, text) pairs), once each, in order.

    ``boot`` (wall-clock time of boot) turns a kmsg record's monotonic stamp
    into a time when the record has no audit stamp of its own."""
    denials: list[Denial] = []
    aux: dict[str, _Aux] = {}
    seen: set[tuple[str, str]] = set()
    for source, line in lines:
        parsed = parse_line(line, source, boot, aux)
        if parsed is None:
            continue
        key = (parsed.lsm, parsed.event or parsed.raw)
        if key in seen:
            continue  # the same event from kmsg and the audit log
        seen.add(key)
        denials.append(parsed)
    return [_with_aux(d, aux.get(d.event or "")) for d in denials]


@dataclass(frozen=True)
class AuditHead:
    """Where an audit record starts in a line, and what it says of itself."""

    kind: str  # "AVC", "PATH", ... (numbers in kmsg mapped to names)
    time: float | None  # audit's stamp; kmsg's converted when it has none
    event: str | None  # "STAMP:SERIAL"
    body: str  # the record after its head


def audit_head(line: str, boot: float | None = None) -> AuditHead | None:
    """The audit record ``line`` is, or None when it is anything else.

    Only a message that *starts* as an audit record counts (see the module
    docstring): the kernel never prints one in the middle of another
    message, while other messages quote what processes chose (a comm, a
    file name)."""
    # audit.log ENRICHED fields after GS.  Only the end is stripped: a line
    # that begins with blanks is the continuation of the message above it
    # (dmesg and journalctl indent what follows a newline in a record; a
    # process puts one there through a file name or its comm), never a record
    text = line.split("\x1d", 1)[0].rstrip()
    m = _KMSG.match(text)
    if m:  # a /dev/kmsg record: the kernel's own facility only (a write
        # to /dev/kmsg is LOG_USER whatever it asks for)
        if int(m.group(1)) >> 3 != 0:
            return None
        head = _KERNEL_HEAD.match(text, m.end())
        if head is None:
            return None
        return _head(_TYPES.get(head.group(1), head.group(1)), head, text)
    head = _LOG_HEAD.match(text)
    if head is not None:
        return _head(_TYPES.get(head.group(1), head.group(1)), head, text)
    syslog = _SYSLOG_PREFIX.match(text)
    if syslog is not None:
        pos = syslog.end()
        journal = _JOURNAL_AUDIT_HEAD.match(text, pos)
        if journal is not None:
            kind = journal.group(1)
            return AuditHead(_TYPES.get(kind, kind), None, None, text[journal.end():])
        pos += len("kernel: ")
    else:
        pos = 0
    prefix = _DMESG_PREFIX.match(text, pos)
    if prefix is not None:
        if prefix.group(1) is not None and int(prefix.group(1)) >> 3 != 0:
            return None  # dmesg -r: not the kernel's facility
        pos = prefix.end()
    head = _KERNEL_HEAD.match(text, pos)
    if head is None:
        return None
    return _head(_TYPES.get(head.group(1), head.group(1)), head, text)


def _head(kind: str, head: re.Match[str], text: str) -> AuditHead:
    stamp, serial = head.group(2), head.group(3)
    return AuditHead(kind, float(stamp), f"{stamp}:{serial}", text[head.end():])


def parse_line(line: str, source: str = "file", boot: float | None = None,
               aux: dict[str, _Aux] | None = None) -> Denial | None:
    """One line: a denial, or None (recording PATH/CWD/SYSCALL records in ``aux``)."""
    if len(line) > MAX_LINE:
        return None
    head = audit_head(line, boot)
    if head is None:
        return None
    when, event, body = head.time, head.event, head.body
    if aux is not None and event is not None:
        kind = head.kind
        if kind in ("PATH", "CWD", "SYSCALL"):
            entry = aux.setdefault(event, _Aux())
            f = fields_of(body)
            if kind == "PATH" and len(entry.paths) < 16:
                entry.paths.append(f)
            elif kind == "CWD":
                entry.cwd = f.get("cwd")
            elif kind == "SYSCALL":
                entry.syscall = f
            return None
    if head.kind not in DENIAL_TYPES:
        return None
    raw = line.split("\x1d", 1)[0].strip()[:500]
    avc = _AVC.match(body)
    if avc:
        f = fields_of(body[avc.end():])
        if "scontext" not in f or "tcontext" not in f:
            return None
        return Denial("selinux", source, when, event, f["scontext"], f["tcontext"],
                      tuple(avc.group(1).split()), f.get("tclass", "?"), _int(f.get("pid")),
                      f.get("comm"), f.get("name"), f.get("path"), _int(f.get("ino")),
                      f.get("dev"), f, raw)
    if body.startswith('apparmor="DENIED" '):
        f = fields_of(body)
        if "profile" not in f:
            return None
        mask = f.get("denied_mask") or f.get("requested_mask") or ""
        name = f.get("name")
        # a file mask is letters ("rw", "::x"); others are words ("create",
        # "send receive": network, signal, ptrace)
        perms = (tuple(c for c in mask if c.isalpha()) if _FILE_MASK.fullmatch(mask)
                 else tuple(mask.split()))
        return Denial("apparmor", source, when, event, f["profile"], None, perms,
                      f.get("operation", "?"), _int(f.get("pid")), f.get("comm"), name,
                      name if name and name.startswith("/") else None, None, None, f, raw)
    if body.startswith("lsm=SMACK "):
        f = fields_of(body)
        if f.get("action") != "denied" or "subject" not in f or "object" not in f:
            return None
        return Denial("smack", source, when, event, f["subject"], f["object"],
                      tuple(f.get("requested", "")), f.get("fn", "?"), _int(f.get("pid")),
                      f.get("comm"), f.get("name"), f.get("path"), _int(f.get("ino")),
                      f.get("dev"), f, raw)
    return None


def _with_aux(d: Denial, extra: _Aux | None) -> Denial:
    if extra is None:
        return d
    fields = dict(d.fields)
    for key in ("uid", "euid", "fsuid", "exe"):
        if key in extra.syscall:
            fields.setdefault(f"syscall_{key}", extra.syscall[key])
    path, dev = d.path, d.dev
    if path is None:
        for p in extra.paths:  # the PATH record of the object the denial names
            name = p.get("name", "")
            if not name or name == "(null)":
                continue
            if d.ino is not None:
                if _int(p.get("inode")) != d.ino:
                    continue
            elif not d.name or os.path.basename(name.rstrip("/")) != d.name:
                continue  # without an inode, only the very name will do
            if not name.startswith("/"):
                if not extra.cwd:
                    continue
                name = os.path.normpath(os.path.join(extra.cwd, name))
            path, dev = name, p.get("dev") or dev
            break
    return replace(d, path=path, dev=dev, fields=fields)


# ------------------------------------------------------------------- since
_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
          "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800,
          "weeks": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: ISO-8601 (local time unless it says otherwise), ``@EPOCH``,
    or a span back from now: ``10m``, ``2h``, ``1d``, ``10 minutes ago``."""
    now = time.time() if now is None else now
    t = text.strip()
    m = re.fullmatch(r"(\d{1,9}(?:\.\d{1,6})?)\s*([a-zA-Z]{1,7})(?:\s+ago)?", t)
    if m and m.group(2).lower() in _UNITS:
        return now - float(m.group(1)) * _UNITS[m.group(2).lower()]
    if re.fullmatch(r"@\d{1,12}(?:\.\d{1,9})?", t):
        return float(t[1:])
    try:
        return datetime.fromisoformat(t).timestamp()  # naive: local time
    except (ValueError, OverflowError, OSError):
        raise ExplainError(
            f"--since {text!r}: not a time",
            hint="give ISO-8601 (2024-05-01T12:00, 2024-05-01 12:00:00+02:00) or a span "
                 "back from now (90s, 10m, 2h, 1d, '10 minutes ago')") from None


# ----------------------------------------------------------------- sources
def read_lines(stream: IO[bytes], limit: int = MAX_LINE) -> Iterator[str]:
    """Lines of ``stream``; a line longer than ``limit`` is skipped in pieces."""
    skipping = False
    for _ in range(4 * MAX_RECORDS):  # reads, long lines' pieces included
        chunk = stream.readline(limit + 1)
        if not chunk:
            return
        whole = chunk.endswith(b"\n")
        if not skipping and (whole or len(chunk) <= limit):
            yield chunk.decode("utf-8", errors="replace").rstrip("\n")
        skipping = not whole


def read_kmsg(path: Path = KMSG) -> Iterator[str]:
    """Every record the kernel ring buffer holds now (non-blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ExplainError(f"cannot read the kernel log ({path}): {err.strerror}",
                           hint="reading /dev/kmsg needs root (CAP_SYSLOG) where "
                                "kernel.dmesg_restrict=1; or give a file: "
                                "journalctl -k | svirt explain -") from err
    try:
        for _ in range(MAX_RECORDS):
            try:
                data = os.read(fd, 2 * MAX_LINE)
            except BlockingIOError:
                return  # the end of what the buffer holds now
            except BrokenPipeError:
                continue  # records overwritten while we read: go on from the next
            except OSError:  # EINVAL: a record larger than our buffer (never: 32K)
                return
            if not data:
                return
            # a record: "PRI,SEQ,USEC,FLAGS;message" then " KEY=value" lines
            yield data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def gather(file: str | None, *, stdin: IO[bytes] | None = None, kmsg: Path = KMSG,
           audit_log: Path = AUDIT_LOG) -> tuple[list[tuple[str, str]], list[str]]:
    """(source, line) pairs to explain, and problems worth a warning.

    ``file``: a path, or ``-`` for ``stdin``; None: the kernel log and (when
    present) the audit log, both."""
    if file == "-":
        if stdin is None:
            raise ExplainError("no standard input to read")
        return [("stdin", line) for line in read_lines(stdin)], []
    if file is not None:
        try:
            with open(file, "rb") as f:
                return [(file, line) for line in read_lines(f)], []
        except OSError as err:
            raise ExplainError(f"cannot read {file}: {err.strerror}") from err
    out: list[tuple[str, str]] = []
    problems: list[str] = []
    audit_read = False
    if audit_log.exists():
        try:
            with open(audit_log, "rb") as f:
                out += [(str(audit_log), line) for line in read_lines(f)]
            audit_read = True
        except OSError as err:
            problems.append(f"cannot read {audit_log}: {err.strerror}")
    try:
        out += [("kmsg", line) for line in read_kmsg(kmsg)]
    except ExplainError as err:
        if not audit_read:
            raise
        problems.append(err.message)
    return out, problems


# ----------------------------------------------------------------- objects
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


# ---------------------------------------------------------------- mapping
class Processes(Protocol):
    """What the mapping asks of the live process table (a fake in tests)."""

    def uid(self, pid: int) -> int | None: ...

    def start(self, pid: int) -> int | None: ...


class LiveTable:
    def uid(self, pid: int) -> int | None:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return None

    def start(self, pid: int) -> int | None:
        return start_time(pid)


@dataclass(frozen=True)
class Finding:
    """A denial explained."""

    denial: Denial
    guest: str | None  # the guest that was denied (None: no guest, e.g. the launcher)
    guest_by: str  # how it was found: "MCS pair s0:c1,c2", "profile", "pid 123", ...
    target_guest: str | None  # whose object it was, when another guest's
    object: str  # a path when it resolves, else what the record names
    classification: str  # CROSS_GUEST, POLICY_GAP, MISLABELLED
    summary: str
    rule: str | None = None  # policy gap: what would allow it
    label: str | None = None  # mislabelled: the label the object has
    wanted: str | None = None  # mislabelled: the label svirt gives it

    def to_json(self) -> dict[str, Any]:
        d = self.denial
        return {
            "time": d.time, "source": d.source, "event": d.event, "lsm": d.lsm,
            "guest": self.guest, "guest_by": self.guest_by, "pid": d.pid, "comm": d.comm,
            "subject": d.subject, "target": d.target, "permissions": list(d.perms),
            "class": d.tclass, "object": self.object, "ino": d.ino, "dev": d.dev,
            "target_guest": self.target_guest, "classification": self.classification,
            "summary": self.summary, "rule": self.rule, "label": self.label,
            "wanted": self.wanted, "permissive": d.fields.get("permissive") == "1",
        }


#: AppArmor's file operations (security/apparmor/include/audit.h OP_*): what
#: a record without ``class=`` (kernels before 6.2 or so) was about
APPARMOR_FILE_OPS = frozenset({
    "open", "getattr", "mkdir", "rmdir", "mknod", "truncate", "link", "symlink",
    "rename_src", "rename_dest", "chmod", "chown", "unlink", "file_perm", "file_lock",
    "file_mmap", "file_mprotect", "file_inherit", "file_receive", "exec"})


def mcs_pair(context: str) -> tuple[int, int] | None:
    """The category pair of a context's (low) level, a < b: ``...:s0:c1,c2``."""
    parts = context.split(":", 3)
    if len(parts) < 4:
        return None
    m = re.fullmatch(r"s\d+:c(\d+),c(\d+)", parts[3].split("-", 1)[0])
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    return (a, b) if a < b else (b, a) if a != b else None


def _type_of(context: str) -> str:
    parts = context.split(":")
    return parts[2] if len(parts) >= 3 else context


class Explainer:
    """Maps denials to guests through records and object tables."""

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
            if (dac := labels.get("dac")) and (uid := _int(dac.process.split(":")[0])):
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

    # ----------------------------------------------------------- the rest
    def explain(self, d: Denial) -> Finding:
        guest, by = self.guest_of(d)
        entry = self.object_of(d)
        obj = entry.path if entry else d.path or _name(d)
        noun = d.tclass if d.lsm == "selinux" else d.fields.get("class") or (
            "file" if d.lsm == "apparmor" and d.tclass in APPARMOR_FILE_OPS else "object")
        how = "" if d.lsm == "selinux" else f" ({d.tclass})"
        what = f"{_perms(d)}{how} on {noun} {obj}"
        owner = self._owner_by_label(d)
        if entry is not None and entry.holders:
            if guest in entry.holders:  # its own: another guest's label on it is a mislabel
                owner = owner if owner in entry.holders else None
            else:
                owner = owner or sorted(entry.holders)[0]
        confined = guest is not None or self._confined(d)
        who = f"guest {guest}" if guest else "an unknown guest" if confined else "no guest"
        if owner is not None and owner != guest and confined:
            tried = _perms(d) + (f", {d.tclass}" if how else "")
            return Finding(d, guest, by, owner, obj, CROSS_GUEST,
                           f"sVirt stopped {who} from reaching guest {owner}'s {noun} "
                           f"{obj} ({tried}): expected, this is the confinement working")
        wrong = self._mislabel(d, guest, entry)
        if wrong is not None:
            has, wanted, why = wrong
            return Finding(d, guest, by, None, obj, MISLABELLED,
                           f"{who} was denied {what}: it is labelled {has}, {why} {wanted}",
                           label=has, wanted=wanted)
        rule = policy_rule(d)
        whose = ("its own" if entry is not None and guest in entry.holders
                 else f"guest {owner}'s" if owner else "a shared or system")
        return Finding(d, guest, by, None, obj, POLICY_GAP,
                       f"{who} was denied {what} ({whose} object): the policy lacks a rule"
                       + ("" if rule else f" (none derived for {d.tclass})"), rule=rule)

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

    def _confined(self, d: Denial) -> bool:
        """The subject is a guest's confinement, even if no record is left."""
        if d.lsm == "selinux":
            return mcs_pair(d.subject) is not None
        return d.subject.startswith("svirt-")

    def _mislabel(self, d: Denial, guest: str | None, entry: ObjectEntry | None
                  ) -> tuple[str, str, str] | None:
        """(label it has, label svirt gives, why) when the guest's object is mislabelled."""
        if d.lsm == "selinux" and "trawcon" in d.fields:
            return (d.fields["trawcon"], "a context the loaded policy defines",
                    "a context the policy does not know; it should have")
        if guest is None or d.target is None or d.lsm not in ("selinux", "smack"):
            return None
        record = self._by_name.get(guest)
        label = record.labels.get(d.lsm) if record else None
        if label is None:
            return None
        if entry is not None and guest in entry.holders:
            access = str(entry.holders[guest].get("access", "rw"))
            wanted = {"ro": label.content, "shared": label.shared}.get(access, label.image)
            if not _same_label(d.lsm, d.target, wanted):
                return d.target, wanted, f"svirt gives {guest}'s {access} objects"
            return None
        if d.lsm == "selinux":
            pair, ours = mcs_pair(d.target), mcs_pair(label.process)
            svirt_types = {_type_of(x) for x in (label.image, label.content, label.shared)}
            if pair is not None and pair != ours and _type_of(d.target) in svirt_types:
                return (d.target, label.image,
                        "a level no guest svirt knows holds (left from an earlier run, or "
                        f"another tool's); {guest}'s own objects get")
        return None


def _same_label(lsm: str, has: str, wanted: str) -> bool:
    if lsm == "selinux":  # the SELinux user of a file does not matter under MCS
        return has.split(":", 2)[2:] == wanted.split(":", 2)[2:]
    return has == wanted


def _name(d: Denial) -> str:
    cap = d.fields.get("capname") or d.fields.get("capability")
    if d.name:
        bits = [d.name]
    elif cap:
        bits = [f"capability {_CAPABILITIES.get(_int(cap) or -1, cap)}"]
    else:
        bits = ["(unnamed)"]
    if d.ino is not None:
        bits.append(f"(inode {d.ino}{' on ' + d.dev if d.dev else ''})")
    return " ".join(bits)


def _perms(d: Denial) -> str:
    if d.lsm == "selinux":
        return "{ " + " ".join(d.perms) + " }"
    return "".join(d.perms) or d.fields.get("requested_mask") or "labels_differ"


_CAPABILITIES = {0: "chown", 1: "dac_override", 2: "dac_read_search", 3: "fowner",
                 4: "fsetid", 5: "kill", 6: "setgid", 7: "setuid", 8: "setpcap",
                 10: "net_bind_service", 12: "net_admin", 13: "net_raw", 14: "ipc_lock",
                 19: "sys_ptrace", 21: "sys_admin", 23: "sys_nice", 24: "sys_resource",
                 27: "mknod", 33: "mac_admin"}


def policy_rule(d: Denial) -> str | None:
    """What would allow ``d``: an SELinux allow rule (audit2allow's form), an
    AppArmor profile line, or a SMACK rule (``/sys/fs/smackfs/load2`` form)."""
    if d.lsm == "selinux":
        if not d.perms or not d.target:
            return None
        stype, ttype = _type_of(d.subject), _type_of(d.target)
        if d.subject == d.target:
            ttype = "self"
        perms = sorted(set(d.perms))
        shown = perms[0] if len(perms) == 1 else "{ " + " ".join(perms) + " }"
        return f"allow {stype} {ttype}:{d.tclass} {shown};"
    if d.lsm == "apparmor":
        f = d.fields
        if f.get("capname") or (d.tclass == "capable" and "capability" in f):
            cap = f.get("capname") or _CAPABILITIES.get(_int(f.get("capability")) or -1)
            return f"capability {cap}," if cap else None
        if f.get("family") and f.get("sock_type"):
            return f"network {f['family']} {f['sock_type']},"
        if f.get("info") == DISCONNECTED:
            # no path rule can name it: the profile's flag names it from its
            # mount instead (what the object is, the record does not say)
            return "flags=(attach_disconnected)"
        if d.tclass == "mount" and d.name and d.name.startswith("/"):
            fstype = f" fstype={f['fstype']}" if f.get("fstype") else ""
            source = f" {f['srcname']}" if f.get("srcname") else ""
            return f"mount{fstype}{source} -> {_apparmor_path(d.name)},"
        if d.name and d.name.startswith("/") and d.perms:
            return f"{_apparmor_path(d.name)} {_apparmor_mask(d.perms)},"
        return None
    if d.lsm == "smack":
        if not d.perms or not d.target:
            return None
        return f"{d.subject} {d.target} {''.join(d.perms)}"
    return None


def _apparmor_path(path: str) -> str:
    return f'"{path}"' if re.search(r'[\s"#]', path) else path


def _apparmor_mask(letters: Sequence[str]) -> str:
    got = set(letters)
    if got & {"c", "d"}:  # create and delete are covered by w
        got = (got - {"c", "d"}) | {"w"}
    if "w" in got:
        got.discard("a")
    order = "rwamlk"
    mask = "".join(c for c in order if c in got)
    return mask + ("ix" if "x" in got else "")


# ------------------------------------------------------------------ the verb
def explain(lines: Iterable[tuple[str, str]], records: Sequence[Record],
            tables: Sequence[ObjectEntry], *, since: float | None = None,
            guest: str | None = None, boot: float | None = None,
            processes: Processes | None = None) -> list[Finding]:
    """Every denial in ``lines`` explained; ``since`` drops older ones (one
    without any time is kept), ``guest`` keeps those of that guest, as the
    one denied or as the one whose object it was."""
    explainer = Explainer(records, tables, processes)
    out = []
    for d in parse_lines(lines, boot):
        if since is not None and d.time is not None and d.time < since:
            continue
        finding = explainer.explain(d)
        if guest is not None and guest not in (finding.guest, finding.target_guest):
            continue
        out.append(finding)
    return out


def explain_host(file: str | None, *, since: str | None = None, guest: str | None = None,
                 stdin: IO[bytes] | None = None) -> tuple[list[Finding], list[str]]:
    """``svirt explain``: the host's registry, the host's logs (or ``file``)."""
    from svirt.launcher.state import Registry

    cutoff = parse_since(since) if since is not None else None
    lines, problems = gather(file, stdin=stdin)
    registry = Registry()
    records = registry.records()
    tables, table_problems = load_tables(registry.objects)
    try:
        boot: float | None = boot_time()
    except (OSError, ValueError, IndexError):
        boot = None
    findings = explain(lines, records, tables, since=cutoff, guest=guest, boot=boot)
    return findings, [*problems, *registry.problems, *table_problems]
