"""The object tables (svirt.launcher.objects) with a fake security driver.

The files and their tables are real (a file in tmp_path, its real inode key,
the table written and read back as JSON); the driver is a fake that keeps
each object's "label" in a dict, so the tests see exactly what the tables
ask of a driver: snapshot once (first holder), apply per holder, restore
this holder's part, and the originals when the last holder goes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import SecurityError, StateError
from svirt.launcher.objects import ObjectTables
from svirt.launcher.record import Record
from svirt.procfs import LiveProcesses, ProcessId
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.base import Driver, Label
from svirt.security.files import OpenedObject
from svirt.security.inodes import object_key


class FakeDriver:
    """A driver whose labels live in ``world`` (inode -> label)."""

    name = "fake"

    def __init__(self) -> None:
        self.world: dict[int, str] = {}
        self.calls: list[tuple[str, Any]] = []
        self.other: str | None = None  # what held_by_other answers

    def _ino(self, fd: int) -> int:
        return os.fstat(fd).st_ino

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        self.calls.append(("held_by_other", label.process))
        return self.other

    def snapshot(self, fd: int) -> dict[str, Any]:
        self.calls.append(("snapshot", None))
        return {"label": self.world.get(self._ino(fd), "original")}

    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        return True

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        self.calls.append(("apply", label.for_access(access)))
        self.world[self._ino(fd)] = label.for_access(access)

    def restore(self, fd: int, original: dict[str, Any], label: Label, *, last: bool) -> None:
        self.calls.append(("restore", (label.process, last)))
        if last:
            self.world[self._ino(fd)] = original["label"]


def _label(n: int) -> Label:
    return Label("fake", f"guest{n}", f"image{n}", f"content{n}", "shared")


def _record(name: str, n: int) -> Record:
    return Record(name, f"uuid-{name}", "uml", n, ProcessId(1, 1), {"fake": _label(n)})


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.driver = FakeDriver()
        self.records: set[str] = set()
        self.saved: list[tuple[str, int]] = []  # (guest, journal length) when saved
        self.problems: list[str] = []
        self.tables = ObjectTables(
            tmp_path / "objects", record_exists=self.records.__contains__,
            save_record=lambda r: self.saved.append((r.name, len(r.journal))),
            problem=self.problem, driver_for=lambda name: self.drivers[0])
        self.tables.directory.mkdir()
        self.file = tmp_path / "disk.img"
        self.file.write_bytes(b"x" * 512)
        self.opened: list[OpenedObject] = []

    def problem(self, problem: str) -> None:
        if problem not in self.problems:  # as the registry's: each named once
            self.problems.append(problem)

    @property
    def drivers(self) -> list[Driver]:
        return [self.driver]  # type: ignore[list-item]

    def open(self) -> OpenedObject:
        fd = os.open(self.file, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(fd)
        obj = OpenedObject(fd, self.file, st.st_mode, object_key(st, fd))
        self.opened.append(obj)
        return obj

    def hold(self, record: Record, access: Access) -> OpenedObject:
        self.records.add(record.name)
        obj = self.open()
        resource = Resource(self.file, access, ResourceKind.DISK)
        self.tables.hold(record, resource, self.drivers, obj, None)
        return obj

    def table(self, obj: OpenedObject) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.tables.path(obj.key).read_text())
        return data

    def label(self) -> str | None:
        return self.driver.world.get(self.file.stat().st_ino)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    for obj in w.opened:
        obj.close()


def test_the_first_holder_remembers_the_original_then_labels(world: World) -> None:
    web = _record("web", 3)
    obj = world.hold(web, Access.RW)
    table = world.table(obj)
    assert table["originals"] == {"fake": {"label": "original"}}
    assert table["path"] == str(world.file)
    assert table["holders"] == {"web": {"access": "rw", "slot": 3,
                                        "labels": {"fake": _label(3).to_dict()}}}
    # the intent is journalled and saved before the table and the change
    assert web.journal == [{"op": "object", "key": obj.key, "path": str(world.file)}]
    assert world.saved == [("web", 1)]
    assert world.label() == "image3"
    assert [c[0] for c in world.driver.calls] == ["held_by_other", "snapshot", "apply"]


def test_a_second_holder_keeps_the_first_originals(world: World) -> None:
    a, b = _record("a", 1), _record("b", 2)
    obj = world.hold(a, Access.SHARED)
    world.driver.calls.clear()
    world.hold(b, Access.SHARED)
    table = world.table(obj)
    # the first holder's originals stay (the object now carries a's label)
    assert table["originals"] == {"fake": {"label": "original"}}
    assert set(table["holders"]) == {"a", "b"}
    assert ("held_by_other", "guest2") not in world.driver.calls  # not the first
    assert world.tables.remembered_labels() == [(1, {"fake": _label(1)}),
                                                (2, {"fake": _label(2)})]


def test_the_last_holder_restores_and_the_table_goes(world: World) -> None:
    a, b = _record("a", 1), _record("b", 2)
    obj = world.hold(a, Access.SHARED)
    world.hold(b, Access.SHARED)
    report: list[str] = []
    world.driver.calls.clear()
    world.tables.release("a", a.journal[0], report)  # a goes: b still holds it
    assert world.driver.calls == [("restore", ("guest1", False))]
    assert set(world.table(obj)["holders"]) == {"b"}
    assert world.label() == "shared"
    world.records.discard("a")
    world.tables.release("b", b.journal[0], report)  # the last: the original comes back
    assert world.driver.calls[-1] == ("restore", ("guest2", True))
    assert world.label() == "original"
    assert not world.tables.path(obj.key).exists()
    assert report == [f"{world.file}: released", f"{world.file}: restored"]


def test_a_holder_without_a_record_is_swept(world: World) -> None:
    obj = world.hold(_record("lost", 4), Access.RW)
    world.records.clear()  # its record was wiped
    assert world.tables.sweep() == [f"{world.file}: restored"]
    assert world.label() == "original"
    assert not world.tables.path(obj.key).exists()


def test_a_conflicting_holder_is_refused_before_anything_is_written(world: World) -> None:
    obj = world.hold(_record("a", 1), Access.RW)
    before = world.table(obj)
    b = _record("b", 2)
    with pytest.raises(SecurityError, match="in use by guest a"):
        world.hold(b, Access.RW)
    assert b.journal == [] and world.table(obj) == before
    assert world.label() == "image1"


def test_another_running_guests_object_is_refused(world: World) -> None:
    world.driver.other = "it has uid 1500007"
    web = _record("web", 3)
    with pytest.raises(SecurityError, match="another running guest"):
        world.hold(web, Access.RW)
    assert web.journal == [] and world.label() is None


def test_a_table_that_fails_to_load_is_kept(world: World) -> None:
    obj = world.open()
    path = world.tables.path(obj.key)
    path.write_text('{"path": 5, "holders": ')  # a torn or hostile table
    web = _record("web", 3)
    with pytest.raises(StateError, match="unreadable"):
        world.hold(web, Access.RW)
    assert path.read_text() == '{"path": 5, "holders": '
    assert web.journal == [] and world.label() is None
    assert len(world.problems) == 1 and str(path) in world.problems[0]
    # release and the sweep leave it too (and name it once)
    with pytest.raises(StateError, match="unreadable"):
        world.tables.release("web", {"op": "object", "key": obj.key}, [])
    assert world.tables.sweep() == [] and world.tables.remembered_labels() == []
    assert path.exists() and len(world.problems) == 1


def test_release_refuses_a_journal_key_that_is_no_objects(world: World) -> None:
    with pytest.raises(StateError, match="no object's key"):
        world.tables.release("web", {"op": "object", "key": "../../etc/passwd"}, [])
