"""Review finding (review-b): what the console filter lets through can stay
in the admin's terminal after ``svirt console`` ends.

SGR 8 (concealed text), black on black, ``ESC ( 0`` (DEC line drawing as
the character set), insert mode and a hidden cursor are all "drawing" and
pass the filter; nothing undid them at detach, so the admin's own shell then
drew invisibly or in line-drawing glyphs (including svirt's "detached" line),
a screen the guest had set up.  The guest here is the real tiny UML guest
printing them from its shell; ``svirt console`` runs on a real pty.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from svirt.launcher.registry import Registry
from svirt.service.api import attach
from svirt.termsafe import ConsoleFilter

from ..integration.helpers import SVIRT
from .test_terminal import printing_guest  # noqa: F401

LEAVE = "printf '\\033[8m\\033[30;40m\\033(0\\033[4h\\033[?25l\\033[?1049h\\033[2;3r LEFT9\\n'"


def _console_until_it_ends(name: str, until: bytes) -> bytes:
    """``svirt console --read-only NAME`` on a real pty: everything the
    terminal received, Ctrl-] once ``until`` was seen, read to the end."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([SVIRT, "console", "--read-only", name], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    got = b""
    detached = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not detached and until in got.split(b"printf", 1)[-1]:
                os.write(master, b"\x1d")  # Ctrl-] detaches
                detached = True
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every end of the slave is closed
                    break
                if not chunk:
                    break
                got += chunk
            elif detached and proc.poll() is not None:
                break
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return got


def test_review_b_console_undoes_what_the_guest_left(printing_guest: str,  # noqa: F811
                                                    run_root: object) -> None:
    guest = attach(printing_guest, registry=Registry())
    assert guest.shell(LEAVE, timeout=60)[0] == 0
    guest.detach()
    seen = _console_until_it_ends(printing_guest, b"LEFT9")
    after = seen.rsplit(b"LEFT9", 1)[-1]
    assert b"\x1b[8m" in seen.split(b"printf", 1)[-1]  # the guest's orders passed, as drawing
    for undo in (b"\x1b[0m", b"\x1b(B", b"\x1b[4l", b"\x1b[?25h", b"\x1b[r", b"\x1b[?1049l"):
        assert undo in after, (undo, after)


def test_review_b_filter_reset_undoes_only_what_was_set() -> None:
    screen = ConsoleFilter()
    screen.feed(b"\x1b[?1049h\x1b[5;9r")
    first = screen.reset()
    assert b"\x1b[?1049l" in first and b"\x1b[r" in first
    second = screen.reset()  # nothing set since: no cursor-moving undo
    assert b"\x1b[?1049l" not in second and b"\x1b[r" not in second
    assert b"\x1b[0m" in second
    # the guest's saved cursor (ESC 7 saves its attributes: concealed text)
    # is overwritten by the clean state, so a later ESC 8 brings nothing back
    screen.feed(b"\x1b[8m\x1b7")
    assert screen.reset().endswith(b"\x1b7")
