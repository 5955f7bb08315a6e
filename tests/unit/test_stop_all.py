"""svirt stop --all of many guests: a guest that answered ``cad`` and halted
before a loaded host read its reply is not a forger (4 of 20 UML guests
were SIGTERMed and called "killed" that way), and exit 1 always comes
with a message naming every guest that did not power off."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from svirt import cli
from svirt.backends.uml import _same_session
from svirt.cli import detached as cli_detached


def test_a_reply_from_a_sender_that_has_ended() -> None:
    child = subprocess.Popen(["/bin/true"])
    child.wait()  # reaped: its pid names nobody now
    # the kernel vouched for the guest's uid: the guest's own process, gone since
    assert _same_session(child.pid, os.getpid(), uid_checked=True)
    # without that, nothing tells who sent it
    assert not _same_session(child.pid, os.getpid())
    # a live process of another session is refused either way
    assert not _same_session(1, os.getpid(), uid_checked=True)


def test_stop_all_names_every_guest_that_did_not_power_off(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from svirt.service import client

    names = [f"g{i}" for i in range(6)]
    monkeypatch.setattr(cli_detached, "_adoptable", lambda: False)
    monkeypatch.setattr(client, "running", lambda registry: True)
    monkeypatch.setattr(client, "ask", lambda registry, request, start=True: {
        "ok": True, "guests": [{"name": n} for n in names]})

    def stop(args: Any) -> int:
        if args.name == "g1":
            return 5  # killed (its own line is printed by cmd_stop)
        if args.name == "g2":
            raise SystemExit(2)  # not an Exception: used to end the thread silently
        return 0

    monkeypatch.setattr(cli_detached, "cmd_stop", stop)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["stop", "--all"]) == 1
    err = capsys.readouterr().err
    assert "guest g2: SystemExit: 2" in err
    assert "2 of 6 guests did not power off cleanly: g1 (exit 5), g2 (exit 1)" in err
