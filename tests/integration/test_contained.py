"""A failure stays in its record: one guest's release that fails, or one
record or object table with bad content, never stops reconcile, ``list``,
``gc`` or a launch for the other guests.  The failed one is kept as
``restore-failed: <why>`` and retried; an unreadable one is shown and kept.

Real files, owners and processes; the one mock is the injected failure of
``test_a_failed_release_stays_in_its_record`` (an exception raised at one
step of one guest's release, of a kind the step's own code does not expect:
the class of bug, whatever raises it).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import StateError
from svirt.launcher import uidstate
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.procfs import ProcessId
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.dac import DacDriver
from svirt.spec import GuestSpec

from .helpers import svirt_cli


def _spec(name: str, kernel: Path) -> GuestSpec:
    return GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4())


def _file(path: Path) -> Path:
    path.write_bytes(b"x" * 512)
    os.chown(path, 0, 0)
    path.chmod(0o640)
    return path


def _owner(path: Path) -> int:
    return os.lstat(path).st_uid


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("SVIRT_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SVIRT_STATE_DIR", str(tmp_path / "state"))
    # uids of this file alone: svirt gc kills what runs in its range unaccounted
    monkeypatch.setenv("SVIRT_UID_BASE", "2700000")
    return Registry(tmp_path / "run", tmp_path / "state")


@pytest.fixture
def kernel(image_dir: Path) -> Iterator[Path]:
    yield _file(image_dir / "vmlinuz")


def _guest(reg: Registry, name: str, kernel: Path, image_dir: Path) -> tuple[Record, Path]:
    """A reserved guest holding a disk of its own (owned by its uid now)."""
    dac = DacDriver()
    record = reg.reserve(_spec(name, kernel), [dac])
    disk = _file(image_dir / f"{name}.img")
    reg.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), [dac], (image_dir,))
    (reg.home(name) / "mess").mkdir()  # something of the guest's to remove
    return record, disk


def _dead(reg: Registry, *records: Record) -> None:
    """Their launchers are gone, as after SIGKILL."""
    for record in records:
        proc = subprocess.Popen(["true"])
        proc.wait()
        record.supervisor = ProcessId(proc.pid, 1)
        reg.save(record)


def _inject(monkeypatch: pytest.MonkeyPatch, where: str, victim: Record) -> None:
    """Make one step of ``victim``'s release raise what that step's code
    does not expect (RecursionError: what a deep tree raised)."""
    if where == "undo":
        from svirt.safefs import remove_tree as real_remove

        def remove_tree(parent_fd: int, name: str, **kw: Any) -> int:
            if name == f"{victim.name}.d":
                raise RecursionError("maximum recursion depth exceeded (injected)")
            return real_remove(parent_fd, name, **kw)

        monkeypatch.setattr("svirt.launcher.journal.remove_tree", remove_tree)
    elif where == "leftovers":
        real_kill = uidstate.kill_guest_leftovers

        def kill(record: Record, *args: Any, **kw: Any) -> int:
            # kill_guest_leftovers takes the record now (it kills by cgroup)
            if record.name == victim.name:
                raise RuntimeError("the process table is unreadable (injected)")
            return real_kill(record, *args, **kw)

        monkeypatch.setattr(uidstate, "kill_guest_leftovers", kill)
    else:
        real_claims = Registry.release_claims

        def release_claims(self: Registry, record: Record) -> list[str]:
            if record.name == victim.name:
                raise AttributeError("'NoneType' object has no attribute 'release' (injected)")
            return real_claims(self, record)

        monkeypatch.setattr(Registry, "release_claims", release_claims)


@pytest.mark.parametrize("where", ["undo", "leftovers", "claims"])
def test_a_failed_release_stays_in_its_record(
        reg: Registry, kernel: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    bad, bad_disk = _guest(reg, "bad", kernel, image_dir)
    good, good_disk = _guest(reg, "good", kernel, image_dir)
    _dead(reg, bad, good)
    with monkeypatch.context() as m:
        _inject(m, where, bad)
        done = dict(reg.reconcile())  # raises nothing
        assert "injected" in done["bad"][0] and done["bad"][0].startswith("restore failed"), done
        # every other guest is released
        assert not reg.run_dir("good").exists() and _owner(good_disk) == 0
        kept = reg.records()
        assert [r.name for r in kept] == ["bad"]
        assert kept[0].status.startswith("restore-failed: ") and "injected" in kept[0].status
        # launches go on; the failed guest's name and labels stay taken
        other, _ = _guest(reg, "other", kernel, image_dir)
        assert other.labels["dac"] != bad.labels["dac"]
        reg.release(other)
        with pytest.raises(StateError, match="could not be restored"):
            reg.reserve(_spec("bad", kernel), [DacDriver()])
        # retried by every reconcile, and kept while it fails
        assert [r.name for r in reg.reconcile_records()] == ["bad"]
    # the cause is gone: the next gc finishes it
    gc = svirt_cli("gc")
    assert gc.returncode == 0 and "released guest bad" in gc.stdout, gc
    assert reg.records() == [] and not reg.run_dir("bad").exists()
    assert _owner(bad_disk) == 0


def test_a_failed_release_is_retried_while_its_supervisor_lives(
        reg: Registry, kernel: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service supervises many guests and outlives each: a release that
    failed in it is retried by the next reconcile, not kept while it lives."""
    record, disk = _guest(reg, "svc", kernel, image_dir)  # supervised by this process
    with monkeypatch.context() as m:
        _inject(m, "undo", record)
        with pytest.raises(StateError, match="injected"):
            reg.release(record)
    assert record.supervisor.alive() and reg.records()[0].restore_failed
    done = dict(reg.reconcile())
    assert "svc" in done and reg.records() == [], done
    assert not reg.run_dir("svc").exists() and _owner(disk) == 0


def test_a_run_directory_that_cannot_be_made_leaves_nothing(
        reg: Registry, kernel: Path) -> None:
    """An earlier run's directory with a mount point in it: the launch is
    refused with a StateError, and neither its record nor its claims stay."""
    reg.reconcile()
    stale = reg.run_dir("stale")
    (stale / "home" / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(stale / "home/mnt")],
                   check=True)
    try:
        with pytest.raises(StateError, match="mount point"):
            reg.reserve(_spec("stale", kernel), [DacDriver()])
        kept = reg.records()
        assert all(r.restore_failed for r in kept), kept
    finally:
        for mnt in stale.rglob("mnt"):
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
    reg.reconcile()  # the mount is gone: the retry finishes
    assert reg.records() == [] and not stale.exists()


RECORD_SHAPED = {"uuid": "u", "backend": "uml", "slot": 7, "supervisor": {"pid": 1, "start": 1},
                 "labels": {}, "journal": [], "created": 1.0, "status": "running", "boot": "b"}


def _corrupt(reg: Registry) -> dict[str, bytes]:
    """Records and tables no svirt wrote: a crash on a bad disk, a person's
    edit, a bug.  Each raised out of reconcile before."""
    records = {
        "trunc": b'{"name": "trunc", "slot": ',
        "deep": b"[" * 200_000,  # json: RecursionError
        "binary": b"\xff\xfe\x00garbage",
        "typed": json.dumps({**RECORD_SHAPED, "name": "typed", "journal": 5}).encode(),
        "badlabel": json.dumps({**RECORD_SHAPED, "name": "badlabel", "labels": {"dac": {
            "driver": "dac", "process": "x:y", "image": "", "content": "",
            "shared": ""}}}).encode(),
        "renamed": json.dumps({**RECORD_SHAPED, "name": "someone-else"}).encode(),
        "evil": json.dumps({**RECORD_SHAPED, "name": "evil", "journal": [
            {"op": "object", "key": "../guests/good", "path": "/x"}]}).encode(),
    }
    out = {}
    for name, data in records.items():
        path = reg.guests / f"{name}.json"
        path.write_bytes(data)
        out[str(path)] = data
    tables = {
        "1-1": b"[" * 200_000,
        "1-2": json.dumps({"path": "/x", "originals": {"dac": {}},
                           "holders": {"ghost": {"access": "rw", "labels": []}}}).encode(),
        "1-3": json.dumps({"path": 5, "originals": {}, "holders": {}}).encode(),
    }
    for key, data in tables.items():
        path = reg.objects / f"{key}.json"
        path.write_bytes(data)
        out[str(path)] = data
    return out


def test_corrupt_records_and_tables_stop_no_one(
        reg: Registry, kernel: Path, image_dir: Path) -> None:
    alive, alive_disk = _guest(reg, "good", kernel, image_dir)
    dead, dead_disk = _guest(reg, "dead", kernel, image_dir)
    _dead(reg, dead)
    corrupt = _corrupt(reg)
    done = dict(reg.reconcile())  # raises nothing
    problems = list(reg.problems)
    assert "dead" in done and _owner(dead_disk) == 0
    assert not reg.run_dir("dead").exists()
    records = {r.name: r for r in reg.records()}
    assert set(records) == {"good", "evil"}
    # a readable record whose journal points out of the object tables: its
    # release fails (nothing is touched) and it is kept, restore-failed
    assert records["evil"].status.startswith("restore-failed: ")
    assert "no object's key" in records["evil"].status
    assert reg.record_path("good").exists()
    assert set(reg.unreadable) == {"trunc", "deep", "binary", "typed", "badlabel", "renamed"}
    for path in corrupt:
        if not path.endswith("/evil.json"):
            assert any(path in p for p in problems), (path, problems)
    # a new guest launches; the names of unreadable records stay taken
    other, _ = _guest(reg, "other", kernel, image_dir)
    reg.release(other)
    with pytest.raises(StateError, match="unreadable"):
        reg.reserve(_spec("typed", kernel), [DacDriver()])
    # list and gc: no traceback, every bad one named, the good guest listed
    listed = svirt_cli("list", "--json")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed
    entries = {e["name"]: e["status"] for e in json.loads(listed.stdout)}
    assert entries["good"] == alive.status
    for name in reg.unreadable:
        assert entries[name].startswith("restore-failed: unreadable record"), entries
    table = svirt_cli("list")
    assert table.returncode == 0 and "Traceback" not in table.stderr, table
    assert "restore-failed: unreadable record" in table.stdout
    gc = svirt_cli("gc")
    assert gc.returncode == 1 and "Traceback" not in gc.stderr, gc
    for path in corrupt:
        if not path.endswith("/evil.json"):
            assert path in gc.stderr, gc.stderr
    assert "could not release guest evil" in gc.stdout, gc.stdout
    # kept for a person, byte for byte; the good guest's record and disk untouched
    for path, data in corrupt.items():
        if not path.endswith("/evil.json"):
            assert Path(path).read_bytes() == data
    assert _owner(alive_disk) != 0
    assert [r.name for r in reg.records()] == ["evil", "good"]
    reg.release(alive)
    assert _owner(alive_disk) == 0
