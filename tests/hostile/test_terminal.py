"""A guest that prints terminal orders (OSC 52 clipboard, device queries, a
DCS request, a title) at the admin: ``svirt logs`` shows them escaped,
``svirt console`` (on a real pty) drops them and keeps colours, and the
``--raw`` forms pass them on as asked."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.images.build import TinyGuest
from svirt.launcher.registry import Registry
from svirt.service.api import attach
from svirt.service.client import supervisor_pid

from ..integration.helpers import SVIRT, svirt_cli, write_spec

# printf in the guest: \033 is ESC, \007 BEL; the command's echo holds only the
# backslashed text, the output holds the real bytes
ATTACK = ("printf 'T1 \\033]52;c;cm0gLXJmIH4K\\007 \\033[6n \\033[c \\033P$q\"p\\033\\\\ "
          "\\033]0;owned\\007 \\033[31mRED\\033[0m END1\\n'")
CLIPBOARD = b"\x1b]52;c;cm0gLXJmIH4K\x07"
ORDERS = [CLIPBOARD, b"\x1b[6n", b"\x1b[c", b"\x1bP$q", b"\x1b]0;owned"]


@pytest.fixture
def printing_guest(tiny_uml: TinyGuest, image_dir: Path, run_root: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("SVIRT_UID_BASE", "1731000")  # apart from other suites' guests
    reg = Registry(run_root)
    spec = write_spec(image_dir / "t.toml", "term", "uml", tiny_uml, mode="shell")
    out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", timeout=120)
    assert out.returncode == 0, out.stderr
    guest = attach("term", registry=reg)
    assert guest.shell(ATTACK, timeout=60)[0] == 0
    guest.detach()
    yield "term"
    pid = supervisor_pid(reg)
    killed = []
    for r in reg.records():
        if r.hypervisor is not None and r.hypervisor.alive():
            os.killpg(r.hypervisor.pid, signal.SIGKILL)
            killed.append(r.hypervisor)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    # a SIGKILL is not a death yet: a record still alive is not released, and
    # its storage mount would outlive the run directory
    deadline = time.monotonic() + 30
    while any(h.alive() for h in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    reg.reconcile()
    assert not reg.records(), [r.name for r in reg.records()]


def _logs(name: str, *extra: str) -> bytes:
    out = subprocess.run([SVIRT, "logs", name, "-n", "200", *extra], capture_output=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _console_on_a_pty(name: str, *extra: str, until: bytes = b"END1") -> bytes:
    """``svirt console --read-only NAME`` with a real terminal on its stdin and
    stdout; what the terminal received until ``until``, then Ctrl-]."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([SVIRT, "console", "--read-only", name, *extra], stdin=slave,
                            stdout=slave, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(slave)
    got = b""
    deadline = time.monotonic() + 30
    try:
        while until not in got.split(b"printf", 1)[-1] and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    got += os.read(master, 65536)
                except OSError:
                    break
        os.write(master, b"\x1d")  # Ctrl-] detaches
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return got


def test_logs_escape_what_the_guest_printed(printing_guest: str) -> None:
    shown = _logs(printing_guest)
    assert b"END1" in shown
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"\\x1b]52;c;cm0gLXJmIH4K\\x07" in shown  # visible, as text
    raw = _logs(printing_guest, "--raw")
    assert CLIPBOARD in raw  # --raw is the bytes as they were


def test_console_drops_orders_and_keeps_colours(printing_guest: str) -> None:
    seen = _console_on_a_pty(printing_guest)
    assert b"END1" in seen and b"\x1b[31mRED\x1b[0m" in seen
    for order in ORDERS:
        assert order not in seen, order
    raw = _console_on_a_pty(printing_guest, "--raw")
    assert CLIPBOARD in raw
