"""The journal (svirt.launcher.journal): one table from op to undo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from svirt.errors import StateError
from svirt.launcher import journal
from svirt.launcher.cgroups import GuestCgroup
from svirt.launcher.storage import GuestStorage


def _undoing(run_dirs: Path, seen: list[Any] | None = None) -> journal.Undoing:
    def release_object(entry: journal.Entry, report: list[str]) -> None:
        assert seen is not None
        seen.append(entry)
        report.append("released")

    return journal.Undoing(run_dirs, release_object)


def test_every_op_a_launch_writes_has_an_undo(tmp_path: Path) -> None:
    planned = [GuestStorage(tmp_path, 1, 1, "t").journal_entry(),
               GuestCgroup(2, "a.0.t", {"memory": tmp_path}, 1, 1).journal_entry()]
    # launch.py writes tap, apparmor and smack-rules entries; the registry dir
    # and object; the planned steps their own
    written = {"object", "dir", "tap", "apparmor", "smack-rules", *(e["op"] for e in planned)}
    assert written == set(journal.UNDO)


def test_an_entry_is_built_only_for_an_op_with_an_undo() -> None:
    assert journal.entry("dir", path="/run/svirt/guests/a.d") == {
        "op": "dir", "path": "/run/svirt/guests/a.d"}
    with pytest.raises(StateError, match="no undo"):
        journal.entry("rm-rf", path="/")


def test_undo_dispatches_by_op(tmp_path: Path) -> None:
    seen: list[Any] = []
    report: list[str] = []
    entry = journal.entry("object", key="1-2", path="/x")
    journal.undo(entry, report, _undoing(tmp_path, seen))
    assert seen == [entry] and report == ["released"]
    journal.undo({"op": "from-a-newer-svirt"}, report, _undoing(tmp_path, seen))
    assert report == ["released"]  # an op this svirt does not know is left alone


def test_a_run_dir_is_removed_only_in_this_registrys_run_dirs(tmp_path: Path) -> None:
    run_dirs = tmp_path / "guests"
    (run_dirs / "a.d" / "home").mkdir(parents=True)
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    with pytest.raises(StateError, match="not a run directory"):
        journal.undo(journal.entry("dir", path=str(victim)), [], _undoing(run_dirs))
    assert victim.exists()
    journal.undo(journal.entry("dir", path=str(run_dirs / "a.d")), [], _undoing(run_dirs))
    assert not (run_dirs / "a.d").exists()
