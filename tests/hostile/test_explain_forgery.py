"""A real segfault whose file is named after an AVC record must not become one.

The kernel logs a segfault as ``COMM[PID]: segfault at ... in FILE[...]``
(arch/x86/mm/fault.c show_signal_msg), FILE being the name the process chose
for its own executable.  Named after a complete audit record, that line
carried the record into /dev/kmsg and dmesg, and ``svirt explain`` (which
matched ``avc:  denied`` anywhere in a line) blamed guest web1 for reaching
db1's disk.  Here an unprivileged process really faults in such a file; the
kernel's own line is read back from /dev/kmsg and from ``dmesg`` and must
explain nothing, while the same record with the kernel's head still counts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.explain import parse_lines, read_kmsg

from ..unit.test_explain import IMG, WEB_CTX, Host

NOBODY = 65534
EXCEPTION_TRACE = Path("/proc/sys/debug/exception-trace")


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory nobody may reach (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="svirt-forge-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fault_in(directory: Path, name: str) -> None:
    """Compile a program that writes to address 0, named ``name``, and run it
    as nobody: the kernel logs its segfault with that name."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build the faulting program")
    source = directory / "fault.c"
    source.write_text("int main(void) { *(volatile int *)0 = 1; return 0; }\n")
    binary = directory / name
    subprocess.run([gcc, "-O0", "-o", str(binary), str(source)], check=True,
                   capture_output=True)
    binary.chmod(0o755)
    proc = subprocess.run([str(binary)], cwd="/", capture_output=True, check=False,
                          user=NOBODY, group=NOBODY, extra_groups=[], timeout=30)
    assert proc.returncode == -11, proc  # SIGSEGV: a real fault


def _kernel_lines(marker: str) -> list[str]:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        found = [r for r in read_kmsg() if marker in r]
        if found:
            return found
        time.sleep(0.1)
    return []


def _logged_fault(directory: Path, name: str, marker: str) -> list[str]:
    """The kernel's lines for a fault in ``name``; the segfault message goes
    through printk_ratelimit() (10 per 5 s, shared with every other caller
    on the machine): try again after a window."""
    for attempt in range(3):
        if attempt:
            time.sleep(5.5)
        _fault_in(directory, name)
        found = _kernel_lines(marker)
        if found:
            return found
    pytest.skip("the kernel did not log the segfault in 3 tries (printk_ratelimit)")


def test_a_segfault_in_a_file_named_after_an_avc_blames_nobody(tmp_path: Path,
                                                                 work: Path) -> None:
    if EXCEPTION_TRACE.exists() and EXCEPTION_TRACE.read_text().strip() == "0":
        pytest.skip("debug.exception-trace = 0: the kernel logs no segfault here")
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg is not readable")
    host = Host(tmp_path)
    serial = 700_000 + os.getpid() % 100_000  # the marker: this run's record
    record = (f"audit(1700000000.000:{serial}): avc:  denied  {{ write }} for  pid=4242 "
              f'comm="x" name="db1.img" dev="vda" ino={host.ino("db1.img")} '
              f"scontext={WEB_CTX} tcontext={IMG}:c30,c40 tclass=file")
    name = "audit: type=1400 " + record
    assert len(name.encode()) < 255 and "/" not in name
    marker = f":{serial}): avc:"
    kmsg = _logged_fault(work, name, marker)
    assert all("segfault at" in line for line in kmsg), kmsg
    print(f"the kernel's line: {kmsg[0][:300]}")
    lines = [("kmsg", line) for line in kmsg]
    dmesg = shutil.which("dmesg")
    if dmesg is not None:
        out = subprocess.run([dmesg], capture_output=True, text=True, check=False).stdout
        lines += [("dmesg", line) for line in out.splitlines() if marker in line]
        out = subprocess.run([dmesg, "-x"], capture_output=True, text=True, check=False).stdout
        lines += [("dmesg", line) for line in out.splitlines() if marker in line]
    assert parse_lines(lines) == []
    assert host.explain([line for _, line in lines]) == []
    # what the forged name says, had the kernel written it as a record, is a
    # cross-guest denial: the test can fail
    real = host.explain([f"5,1,1,-;audit: type=1400 {record}"])
    assert [(f.guest, f.target_guest) for f in real] == [("web1", "db1")]


def test_svirt_explain_reads_the_forged_kernel_line_as_nothing(tmp_path: Path,
                                                                work: Path) -> None:
    """The CLI over a file holding the kernel's real line and a real record."""
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg is not readable")
    host = Host(tmp_path)
    serial = 800_000 + os.getpid() % 100_000
    record = (f"audit(1700000000.000:{serial}): avc:  denied  {{ read }} for  pid=4242 "
              f'comm="x" name="db1.img" dev="vda" ino={host.ino("db1.img")} '
              f"scontext={WEB_CTX} tcontext={IMG}:c30,c40 tclass=file permissive=0")
    kmsg = _logged_fault(work, "audit: type=1400 " + record, f":{serial}): avc:")
    log = tmp_path / "kernel.log"
    log.write_text("\n".join(kmsg) + "\n")
    svirt = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "svirt"
    env = {**os.environ, "SVIRT_RUN_DIR": str(host.registry.root),
           "SVIRT_STATE_DIR": str(host.registry.state)}
    proc = subprocess.run([str(svirt), "explain", str(log), "--json"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "web1" not in proc.stdout and "db1" not in proc.stdout, proc.stdout
