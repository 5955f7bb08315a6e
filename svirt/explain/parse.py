"""Kernel log text to denials: which lines are audit records, and what they say.

Pure functions over lines (kmsg records, audit.log, dmesg, journal and syslog
text): see the package docstring for what counts as a record.  Nothing here
reads a file or looks anything up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

MAX_LINE = 16_384  # an audit record is at most 8970 bytes (MAX_AUDIT_MESSAGE_LENGTH)


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


