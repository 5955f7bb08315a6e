"""Where the lines come from: the kernel ring buffer, the audit log, a file
or stdin, each read with a line-length cap; and ``--since``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

from svirt.errors import SvirtError
from svirt.explain.parse import MAX_LINE

KMSG = Path("/dev/kmsg")
AUDIT_LOG = Path("/var/log/audit/audit.log")
MAX_RECORDS = 1_000_000  # per source: a runaway file cannot keep us reading forever


class ExplainError(SvirtError):
    """A log cannot be read, or an argument (``--since``) makes no sense."""


def boot_time() -> float:
    """The wall-clock time of boot: now minus /proc/uptime (for kmsg stamps)."""
    with open("/proc/uptime", encoding="ascii") as f:
        return time.time() - float(f.read().split()[0])


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


