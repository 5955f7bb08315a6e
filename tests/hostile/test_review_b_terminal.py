"""Review findings (review-b): guest bytes that still reach the admin's terminal.

The stand-in refuses every mconsole command with a reason made of terminal
orders (OSC 52 clipboard, a cursor-position query, a title, a bidi override,
a raw C1 byte).  The shutdown ladder keeps why each step was passed over in
the outcome's detail, and the outcome is printed as it is by ``svirt run``,
``svirt stop`` (through the supervisor's answer) and kept in ``status``: it
must hold no control character.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from svirt.host import HostInfo
from svirt.images.build import TinyGuest
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry

from ..integration.helpers import svirt_cli, write_spec
from .helpers import SVIRT, build_spec, read_info, spec_dict

CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))] + ["\u202e"]


def test_review_b_refusal_reason_in_outcome_is_escaped(
    standin: Path, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    spec = spec_dict(standin, "errtext", "errtext", shutdown_timeout=0.5)
    with launch(build_spec(spec), registry=hostile_registry, host=host) as guest:
        guest_uids.add(read_info(guest)["uid"])
        outcome = guest.stop()
    text = str(outcome)
    assert "mconsole cad" in text, text  # the refusal is kept, as data
    found = sorted({repr(c) for c in CONTROLS if c in text})
    assert not found, f"the outcome carries the guest's control characters {found}: {text!r}"


def _run_on_a_pty(argv: list[str], until: bytes, seconds: float = 60) -> bytes:
    """``argv`` with a real terminal on stdin and stdout: what the terminal
    received until ``until`` (then SIGINT: ``svirt run`` stops its guest)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL,
                            close_fds=True)
    os.close(slave)
    got = b""
    deadline = time.monotonic() + seconds
    try:
        while until not in got and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    got += os.read(master, 65536)
                except OSError:
                    break
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    return got


def test_review_b_foreground_run_filters_the_console_on_a_terminal(
    standin: Path, image_dir: Path, hostile_registry: Registry,
) -> None:
    """``svirt run SPEC`` copies the guest's console to its stdout: on a
    terminal, the console filter of ``svirt console`` applies (OSC 52 and
    queries dropped); piped, the bytes stay as they were."""
    spec = image_dir / "errtext.toml"
    spec.write_text(f'name = "errtext"\nbackend = "uml"\nkernel = "{standin}"\n'
                    'memory = 32\ncmdline = "attack=errtext"\nshutdown_timeout = 0.5\n')
    seen = _run_on_a_pty([SVIRT, "run", str(spec)], b"END-ORDERS")
    assert b"END-ORDERS" in seen, seen[-2000:]
    orders = seen.split(b"ORDERS ", 1)[-1]
    for order in (b"\x1b]52;", b"\x1b[6n", b"\x1b]0;owned", b"\xc2\x9b", b"\x9b"):
        assert order not in orders, (order, orders)
    assert not hostile_registry.records()


def test_review_b_run_command_output_is_filtered_on_a_terminal(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path,
) -> None:
    """``svirt run SPEC -- CMD`` prints the command's output, which the guest
    shapes: on a terminal, OSC 52 and queries are dropped (piped: exact)."""
    spec = write_spec(image_dir / "cmd.toml", "rb-cmd", "uml", tiny_uml, mode="shell")
    command = ["printf", "'A\\033]52;c;cm0gLXJmIH4K\\007\\033[6nB-DONE\\n'"]
    seen = _run_on_a_pty([SVIRT, "run", str(spec), "--", *command], b"B-DONE", seconds=120)
    assert b"B-DONE" in seen, seen[-2000:]
    assert b"\x1b]52;" not in seen and b"\x1b[6n" not in seen, seen[-500:]
    piped = svirt_cli("run", str(spec), "--", *command, timeout=120)
    assert "\x1b]52;c;cm0gLXJmIH4K\x07" in piped.stdout, piped  # piped: as the guest wrote


def test_review_b_printed_panic_line_does_not_make_a_clean_stop_a_panic(
    standin: Path, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    spec = spec_dict(standin, "fakepanic", "fakepanic", shutdown_timeout=2.0)
    with launch(build_spec(spec), registry=hostile_registry, host=host) as guest:
        guest_uids.add(read_info(guest)["uid"])
        guest.console.expect(b"FAKED", 10)
        outcome = guest.stop()
    assert str(outcome.kind) == "poweroff", str(outcome)
