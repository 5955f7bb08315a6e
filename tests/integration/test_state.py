"""The registry as a transaction log that survives crashes, wipes and refusals.

Real files, real owners, ACLs and xattrs, real processes; the registry runs
with DAC (root).  Each test breaks the state the way a crash, an operator or
the filesystem would, then checks that gc finishes the job exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.errors import StateError
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.procfs import ProcessId
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.dac import ACL_XATTR, DacDriver
from svirt.spec import GuestSpec

from .helpers import SVIRT, svirt_cli


def _spec(name: str, kernel: Path) -> GuestSpec:
    return GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4())


def _file(path: Path, mode: int = 0o640, data: bytes = b"x" * 512) -> Path:
    path.write_bytes(data)
    os.chown(path, 0, 0)
    path.chmod(mode)
    return path


def _state(path: Path) -> tuple[int, int, int, bytes | None, dict[str, bytes]]:
    st = os.lstat(path)
    try:
        acl: bytes | None = os.getxattr(path, ACL_XATTR)
    except OSError:
        acl = None
    xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path)}
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), acl, xattrs


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "run", tmp_path / "state")


@pytest.fixture
def files(image_dir: Path) -> Iterator[dict[str, Path]]:
    kernel = _file(image_dir / "vmlinuz", 0o600)
    disk = _file(image_dir / "disk.img", 0o640)
    yield {"kernel": kernel, "disk": disk, "root": image_dir}
    subprocess.run(["chattr", "-i", str(disk)], check=False, capture_output=True)


def _dead_supervisor(record: Record, reg: Registry) -> None:
    """Make the record's launcher look gone (as after SIGKILL)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    record.supervisor = ProcessId(proc.pid, 1)
    reg.save(record)


def test_state_is_roots_alone(reg: Registry, files: dict[str, Path]) -> None:
    record = reg.reserve(_spec("perm", files["kernel"]), [DacDriver()])
    for d in (reg.guests, reg.objects):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    # traversable (the default image root is below it), never listable
    assert stat.S_IMODE(reg.state.stat().st_mode) == 0o711
    assert stat.S_IMODE((reg.state / "lock").stat().st_mode) == 0o600
    assert stat.S_IMODE(reg.record_path("perm").stat().st_mode) == 0o600
    # the run dir is root's; only home is handed to the guest later
    assert reg.run_dir("perm").stat().st_uid == 0
    assert stat.S_IMODE(reg.run_dir("perm").stat().st_mode) == 0o755
    assert stat.S_IMODE(reg.control_dir.stat().st_mode) == 0o711
    reg.release(record)


def test_wiped_run_dir_and_lost_record_are_restored_by_gc(
        reg: Registry, files: dict[str, Path]) -> None:
    before = _state(files["disk"])
    dac = DacDriver()
    record = reg.reserve(_spec("wiped", files["kernel"]), [dac])
    reg.hold(record, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    uid = int(record.labels["dac"].process.split(":")[0])
    assert os.stat(files["disk"]).st_uid == uid
    # /run is wiped (reboot, crash, an operator): the state dir keeps the record
    subprocess.run(["rm", "-rf", str(reg.root)], check=True)
    _dead_supervisor(record, reg)
    done = Registry(reg.root, reg.state).reconcile()
    assert [name for name, _ in done] == ["wiped"]
    assert _state(files["disk"]) == before
    # and a lost record: the object table alone is enough
    record = reg.reserve(_spec("lost", files["kernel"]), [dac])
    reg.hold(record, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    reg.record_path("lost").unlink()
    report = Registry(reg.root, reg.state).reconcile()
    assert any("restored" in line for _, lines in report for line in lines), report
    assert _state(files["disk"]) == before
    assert list(reg.objects.iterdir()) == []


def test_crash_between_intent_and_hold_leaves_nothing_stuck(
        reg: Registry, files: dict[str, Path]) -> None:
    """The intent is journalled first: a record that names an object its
    table does not list is released cleanly, and the disk is usable again."""
    dac = DacDriver()
    record = reg.reserve(_spec("half", files["kernel"]), [dac])
    key = f"{os.stat(files['disk']).st_dev}-{os.stat(files['disk']).st_ino}"
    record.journal.append({"op": "object", "key": key, "path": str(files["disk"])})
    _dead_supervisor(record, reg)
    reg.reconcile()
    assert reg.records() == []
    again = reg.reserve(_spec("again", files["kernel"]), [dac])
    reg.hold(again, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    reg.release(again)


def test_failed_restore_is_kept_shown_and_retried(
        reg: Registry, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    before = _state(files["disk"])
    dac = DacDriver()
    record = reg.reserve(_spec("stuck", files["kernel"]), [dac])
    reg.hold(record, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    subprocess.run(["chattr", "+i", str(files["disk"])], check=True)
    with pytest.raises(StateError, match="not permitted") as info:
        reg.release(record)
    assert "could not restore" in info.value.message
    _dead_supervisor(record, reg)  # the launcher has exited since
    kept = reg.records()
    assert [r.name for r in kept] == ["stuck"]
    assert kept[0].status.startswith("restore-failed:")
    # the name and the uid stay taken while the disk still carries them
    with pytest.raises(StateError, match="could not be restored"):
        reg.reserve(_spec("stuck", files["kernel"]), [dac])
    other = reg.reserve(_spec("other", files["kernel"]), [dac])
    assert other.labels["dac"].process != record.labels["dac"].process
    reg.release(other)
    # list shows it, gc says it failed and exits non-zero
    monkeypatch.setenv("SVIRT_RUN_DIR", str(reg.root))
    monkeypatch.setenv("SVIRT_STATE_DIR", str(reg.state))
    listed = svirt_cli("list")
    assert "restore-failed" in listed.stdout, listed
    gc = svirt_cli("gc")
    assert gc.returncode == 1 and "could not release guest stuck" in gc.stdout, gc
    assert _state(files["disk"])[0] != before[0]
    # the cause is fixed: the next gc finishes
    subprocess.run(["chattr", "-i", str(files["disk"])], check=True)
    gc = svirt_cli("gc")
    assert gc.returncode == 0, gc
    assert "released guest stuck" in gc.stdout
    assert _state(files["disk"]) == before
    assert reg.records() == []


def test_real_error_is_shown_when_relabel_is_refused(
        reg: Registry, files: dict[str, Path]) -> None:
    subprocess.run(["chattr", "+i", str(files["disk"])], check=True)
    dac = DacDriver()
    record = reg.reserve(_spec("ro", files["kernel"]), [dac])
    from svirt.errors import SecurityError

    with pytest.raises(SecurityError, match="cannot label it: Operation not permitted") as info:
        reg.hold(record, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
                 (files["root"],))
    assert info.value.hint and "immutable" in info.value.hint
    reg.release(record)  # nothing changed, so nothing needs undoing
    assert reg.records() == []


def test_read_only_media_needs_no_change_at_stop(
        reg: Registry, image_dir: Path) -> None:
    media = image_dir / "media"
    media.mkdir()
    media.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "media", str(media)],
                   check=True)
    try:
        disk = _file(media / "cd.iso", 0o644)
        kernel = _file(media / "vmlinuz", 0o644)
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        before = _state(disk)
        dac = DacDriver()
        record = reg.reserve(_spec("cd", kernel), [dac])
        reg.hold(record, Resource(disk, Access.RO, ResourceKind.DISK), [dac], (media,))
        assert reg.release(record) == [f"{disk}: restored"]
        assert _state(disk) == before
    finally:
        subprocess.run(["umount", str(media)], check=False)


def test_corrupt_record_and_table_are_named_not_fatal(
        reg: Registry, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    dac = DacDriver()
    record = reg.reserve(_spec("fine", files["kernel"]), [dac])
    reg.hold(record, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    (reg.guests / "broken.json").write_text('{"name": "broken", "slot": ')
    table = next(reg.objects.iterdir())
    (reg.objects / "1-2.json").write_text("[1, 2, 3]")
    records = reg.records()
    assert [r.name for r in records] == ["fine"]
    assert any("broken.json" in p for p in reg.problems)
    reg.reconcile()  # does not raise
    assert any("1-2.json" in p for p in reg.problems)
    monkeypatch.setenv("SVIRT_RUN_DIR", str(reg.root))
    monkeypatch.setenv("SVIRT_STATE_DIR", str(reg.state))
    for verb in ("list", "gc"):
        out = svirt_cli(verb)
        assert "Traceback" not in out.stderr, out
        assert "broken.json" in out.stderr, out
    assert json.loads(table.read_text())["holders"]  # the good table is untouched
    reg.release(record)


def test_uid_is_not_reused_while_an_object_remembers_it(
        reg: Registry, files: dict[str, Path]) -> None:
    dac = DacDriver()
    first = reg.reserve(_spec("first", files["kernel"]), [dac])
    reg.hold(first, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    # the record is lost but the disk still carries the uid, and the restore
    # cannot happen yet (immutable): the uid must not go to a new guest
    subprocess.run(["chattr", "+i", str(files["disk"])], check=True)
    reg.record_path("first").unlink()
    second = reg.reserve(_spec("second", files["kernel"]), [dac])
    assert second.labels["dac"].process != first.labels["dac"].process
    assert second.slot != first.slot
    reg.release(second)
    subprocess.run(["chattr", "-i", str(files["disk"])], check=True)
    reg.reconcile()
    assert list(reg.objects.iterdir()) == []


def test_unconfined_guest_may_share_with_a_confined_one(
        reg: Registry, files: dict[str, Path]) -> None:
    before = _state(files["kernel"])
    dac = DacDriver()
    confined = reg.reserve(_spec("conf", files["kernel"]), [dac])
    plain = reg.reserve(_spec("plain", files["kernel"]), [])
    kernel = Resource(files["kernel"], Access.RO, ResourceKind.KERNEL)
    reg.hold(plain, kernel, [], (files["root"],))
    reg.hold(confined, kernel, [dac], (files["root"],))
    reg.release(plain)
    reg.release(confined)
    assert _state(files["kernel"]) == before


def test_orphans_are_listed_and_stopped_by_gc(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest process whose record is gone: found by the svirt uid range."""
    uid = DacDriver().uid_base + 4000
    orphan = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "60"],
        env={"SVIRT_STATE_DIR": str(reg.state), "PATH": os.environ["PATH"]})
    other = subprocess.Popen(  # another registry's guest is not ours to stop
        ["setpriv", f"--reuid={uid + 1}", f"--regid={uid + 1}", "--clear-groups",
         "sleep", "60"], env={"PATH": os.environ["PATH"]})
    # what makes it another registry's: the cgroup root put it in (its leaf
    # carries that registry's tag), never its environment
    from svirt.launcher import cgroupfs

    layout = cgroupfs.detect()
    assert layout is not None
    elsewhere = layout.base("pids") / cgroupfs.leaf_name(  # type: ignore[operator]
        "other", 0, cgroupfs.registry_tag("/elsewhere"))
    elsewhere.mkdir(parents=True, exist_ok=True)
    (elsewhere / "cgroup.procs").write_text(str(other.pid))
    try:
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{orphan.pid}").st_uid != uid and time.monotonic() < deadline:
            time.sleep(0.01)
        monkeypatch.setenv("SVIRT_RUN_DIR", str(reg.root))
        monkeypatch.setenv("SVIRT_STATE_DIR", str(reg.state))
        listed = svirt_cli("list")
        assert "(orphan)" in listed.stdout and str(orphan.pid) in listed.stdout, listed
        assert str(other.pid) not in listed.stdout
        gc = svirt_cli("gc")
        assert f"killed orphan pid {orphan.pid}" in gc.stdout, gc
        assert orphan.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (orphan, other):
            p.kill()
            p.wait()
        with contextlib.suppress(OSError):
            elsewhere.rmdir()


def test_swept_temp_files(reg: Registry, files: dict[str, Path]) -> None:
    record = reg.reserve(_spec("tmp", files["kernel"]), [])
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = reg.guests / f".tmp.json.{dead.pid}.tmp"
    stale.write_text("{")
    mine = reg.guests / f".x.json.{os.getpid()}.tmp"
    mine.write_text("{")
    reg.reconcile()
    assert not stale.exists()
    assert mine.exists()  # its writer still lives
    mine.unlink()
    reg.release(record)
    assert SVIRT  # the CLI exists for the tests above


def test_records_of_an_earlier_boot_are_released(
        reg: Registry, files: dict[str, Path]) -> None:
    """After a reboot pids are reused: a record of another boot is dead even
    when a live process has its pid and start time."""
    before = _state(files["disk"])
    dac = DacDriver()
    record = reg.reserve(_spec("oldboot", files["kernel"]), [dac])
    reg.hold(record, Resource(files["disk"], Access.RW, ResourceKind.DISK), [dac],
             (files["root"],))
    record.boot = "00000000-0000-0000-0000-000000000000"
    reg.save(record)  # its supervisor (this very process) is alive
    done = reg.reconcile()
    assert [name for name, _ in done] == ["oldboot"]
    assert _state(files["disk"]) == before


@pytest.mark.parametrize("trouble", ["read-only", "full"])
def test_state_disk_trouble_is_one_line(image_dir: Path, files: dict[str, Path],
                                        trouble: str) -> None:
    state = image_dir / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "st", str(state)],
                   check=True)
    try:
        Registry(image_dir / "run", state).reconcile()  # the layout exists
        if trouble == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        else:
            filler = state / "filler"
            with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        spec = image_dir / "g.toml"
        spec.write_text(f'name = "g"\nbackend = "uml"\nkernel = "/usr/bin/linux"\n'
                        f'memory = 64\n[[disk]]\npath = "{files["disk"]}"\n')
        env = {**os.environ, "SVIRT_RUN_DIR": str(image_dir / "run"),
               "SVIRT_STATE_DIR": str(state)}
        proc = subprocess.run([SVIRT, "run", "--console", "none", str(spec)], env=env,
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 1, proc
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith("svirt: error: "), proc.stderr
        assert ("read-only" in proc.stderr.lower()) if trouble == "read-only" else (
            "No space left" in proc.stderr), proc.stderr
        assert os.stat(files["disk"]).st_uid == 0  # nothing was changed
    finally:
        subprocess.run(["umount", str(state)], check=False)
