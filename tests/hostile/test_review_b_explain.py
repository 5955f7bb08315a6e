"""Review finding (review-b): a newline in the faulting file's name puts a
forged AVC record at the start of a line of ``dmesg`` / ``journalctl -k``
text, and ``svirt explain`` (README: ``journalctl -k | svirt explain -``)
believed it.

The kernel keeps the name's newline in its record (/dev/kmsg shows it as
``\\x0a``); ``dmesg`` and ``journalctl`` print it as a new line indented under
the first, and explain stripped the indentation, so the line began
``audit: type=1400 audit(...): avc:  denied`` like a real record.  A real
record never starts indented: a continuation line must count for nothing.
Here an unprivileged process (nobody) really faults in such a file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from svirt.explain import parse_lines

from ..unit.test_explain import IMG, WEB_CTX, Host
from .test_explain_forgery import EXCEPTION_TRACE, _logged_fault, work  # noqa: F401


def test_review_b_newline_in_a_faulting_name_forges_no_record(tmp_path: Path,
                                                              work: Path) -> None:  # noqa: F811
    if EXCEPTION_TRACE.exists() and EXCEPTION_TRACE.read_text().strip() == "0":
        pytest.skip("debug.exception-trace = 0: the kernel logs no segfault here")
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg is not readable")
    dmesg = shutil.which("dmesg")
    if dmesg is None:
        pytest.skip("no dmesg to print the kernel's text")
    host = Host(tmp_path)
    serial = 900_000 + os.getpid() % 100_000
    record = (f"audit(1700000000.000:{serial}): avc:  denied  {{ write }} for  pid=4242 "
              f'comm="x" name="db1.img" ino={host.ino("db1.img")} '
              f"scontext={WEB_CTX} tcontext={IMG}:c30,c40 tclass=file rest=")
    name = "x\naudit: type=1400 " + record
    assert len(name.encode()) < 255 and "/" not in name
    marker = f":{serial}): avc:"
    assert _logged_fault(work, name, marker)
    lines: list[tuple[str, str]] = []
    for flags in ([], ["-x"], ["-r"], ["-T"]):
        out = subprocess.run([dmesg, *flags], capture_output=True, text=True,
                             errors="replace", check=False).stdout
        lines += [("dmesg", line) for line in out.splitlines() if marker in line]
    assert lines, "dmesg shows no line of the fault"
    print(f"dmesg's lines: {[line[:120] for _, line in lines]}")
    assert parse_lines(lines) == [], "a continuation line was read as an audit record"
    assert host.explain([line for _, line in lines]) == []
