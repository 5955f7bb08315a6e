"""What a guest makes the host write is bounded (svirt/launcher/bounds.py).

- A stand-in UML that prints without end under ``svirt run`` with
  ``[console] log = PATH``: the log stays under ``console_log_max_mib``, its
  file system keeps its free space, the run goes on and ends normally on
  SIGTERM.  On a log file system that fills (ENOSPC) the supervisor drops
  and counts, keeps draining, and says so in the log when room returns.
- A stand-in that grows its writable disk past its size (a far write,
  ftruncate, fallocate, ``FALLOC_FL_KEEP_SIZE``, writes across the limit,
  raising the limit): every way fails (EFBIG, EOPNOTSUPP, EPERM) and the
  file stays under the bound; with SIGXFSZ restored to its default the
  hypervisor is killed by it instead, the file unchanged.
- A real QEMU with a writable qcow2 disk boots with the limit set and
  SIGXFSZ ignored (nothing legitimate breaks).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.host import HostInfo
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.spec import Backend, Disk, DiskFormat, GuestSpec
from svirt.testing import TEST_IMAGE_ROOTS, tiny_spec, write_host_config

from .helpers import SVIRT, UID_BASE, build_spec, read_info, spec_dict, wait_for

MIB = 1 << 20
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]  # Python names 95 ENOTSUP
GROW_LINE = re.compile(rb"GROW (\{[^\n]*\})\r?\n")
STANDIN_MEMORY_MIB = 32  # standin_spec.build_spec
#: the bound for a UML guest whose disks are smaller than its memory file's
#: (svirt/launcher/bounds.py: RAM + 64 MiB + 1 GiB of brk randomisation gap)
SMALL_DISK_BOUND = (STANDIN_MEMORY_MIB + 64 + 1024) * MIB
LOST = re.compile(rb"\[svirt: (\d+) bytes of console output lost: (E[A-Z]+) ")
CAPPED = re.compile(rb"\[svirt: console log reached its cap of (\d+) bytes: (\d+) earlier")



@pytest.fixture(autouse=True)
def _own_uids(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest uids apart from the other hostile tests' (UID_BASE + slot): their
    cleanup kills by uid, and suites running at the same time on one host
    would kill these flooding guests (seen: SIGKILL mid-flood)."""
    monkeypatch.setenv("SVIRT_UID_BASE", str(UID_BASE + 50_000))


# ------------------------------------------------------------------ console
@pytest.fixture
def log_root() -> Iterator[Path]:
    """A log root that is a small file system of its own (a tmpfs), so that
    "the disk keeps its floor" is measured where nothing else writes."""
    path = Path(tempfile.mkdtemp(prefix="svirt-logroot-", dir="/var/tmp"))
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    path.rmdir()


def _mount_tmpfs(path: Path, mib: int) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "svirt-test-log",
                    str(path)], check=True)


def _host_config(directory: Path, log_root: Path, cap_mib: int | None) -> Path:
    cache = os.environ.get("SVIRT_CACHE") or "/var/cache/svirt"
    path = write_host_config(directory / "host.toml", image_roots=(*TEST_IMAGE_ROOTS, cache),
                             log_roots=(log_root,))
    if cap_mib is not None:
        with path.open("a") as f:
            f.write(f"console_log_max_mib = {cap_mib}\n")
    return path


def _flood_spec(directory: Path, standin: Path, name: str, log: Path) -> Path:
    spec = directory / f"{name}.toml"
    spec.write_text(f'name = "{name}"\nbackend = "uml"\nkernel = "{standin}"\n'
                    f'memory = {STANDIN_MEMORY_MIB}\ncmdline = "attack=flood variant=0"\n'
                    f'shutdown_timeout = 2\n[console]\nlog = "{log}"\n')
    return spec


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _stop_run(proc: subprocess.Popen[str]) -> tuple[int, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"svirt run did not end within 60 s of SIGTERM: {err[-2000:]}")
    assert time.monotonic() - started < 30, "svirt run took long to stop"
    return proc.returncode, err


def test_svirt_run_console_log_stays_under_its_cap(
    standin: Path, dirs: tuple[Path, Path], image_dir: Path, log_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _mount_tmpfs(log_root, 24)
    log = log_root / "flood.log"
    monkeypatch.setenv("SVIRT_CONFIG", str(_host_config(image_dir, log_root, 1)))
    spec = _flood_spec(image_dir, standin, "flood", log)
    free_before = _free(log_root)
    proc = subprocess.Popen([SVIRT, "run", str(spec)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: CAPPED.search(log.read_bytes()[:256]) is not None
                        if log.exists() else False, 60), \
            f"the flood never reached the 1 MiB cap (log: {_size(log)} bytes)"
        sizes, dropped = [], []
        for _ in range(20):  # the flood goes on: every look sees the cap kept
            sizes.append(_size(log))
            m = CAPPED.search(log.read_bytes()[:256])
            if m:  # (none between a truncation and its marker)
                dropped.append(int(m.group(2)))
            assert _free(log_root) >= free_before - 2 * MIB, \
                f"the log's file system lost {(free_before - _free(log_root)) // MIB} MiB"
            time.sleep(0.1)
        assert max(sizes) <= MIB, f"the console log passed its 1 MiB cap: {sizes}"
        assert dropped[-1] > dropped[0], "the supervisor stopped draining the console"
        assert dropped[-1] > 8 * MIB, f"the flood was small: {dropped[-1]} bytes"
        if proc.poll() is not None:
            pytest.fail(f"svirt run ended during the flood: {proc.communicate()[1][-3000:]}")
    finally:
        code, err = _stop_run(proc) if proc.poll() is None else (proc.returncode, "")
    assert "Traceback" not in err, err
    # poweroff (0), or the ladder's later step (5) when the flooding stand-in is slow
    # to answer mconsole on a loaded host: both are a normal end, with its message
    assert code in (0, 5), f"svirt run exited {code}: {err[-2000:]}"
    assert re.search(r"svirt: guest \w+: (poweroff|killed): ", err), err
    assert _size(log) <= MIB


def test_svirt_run_console_log_on_a_full_disk_drops_counts_and_goes_on(
    standin: Path, dirs: tuple[Path, Path], image_dir: Path, log_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _mount_tmpfs(log_root, 4)
    filler = log_root / "filler"
    filler.write_bytes(b"\0" * (2 * MIB))
    log = log_root / "full.log"
    monkeypatch.setenv("SVIRT_CONFIG", str(_host_config(image_dir, log_root, None)))
    spec = _flood_spec(image_dir, standin, "full", log)
    proc = subprocess.Popen([SVIRT, "run", str(spec)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _free(log_root) == 0, 60), "the log never filled its disk"
        full_size = _size(log)
        time.sleep(1.0)  # the flood goes on against a full disk
        if proc.poll() is not None:
            pytest.fail(f"svirt run ended on a full log disk: {proc.communicate()[1][-3000:]}")
        filler.unlink()  # room again: the supervisor writes again, and says what it lost
        assert wait_for(lambda: _size(log) > full_size + MIB, 30), \
            "after ENOSPC the console log was never written again"
        data = log.read_bytes()
        lost = LOST.findall(data)
        assert lost, "the log does not say that output was lost"
        assert lost[0][1] == b"ENOSPC", lost
        assert int(lost[0][0]) > 0
        assert proc.poll() is None, "svirt run ended"
    finally:
        code, err = _stop_run(proc) if proc.poll() is None else (proc.returncode, "")
    assert "Traceback" not in err, err
    # poweroff (0), or the ladder's later step (5) when the flooding stand-in is slow
    # to answer mconsole on a loaded host: both are a normal end, with its message
    assert code in (0, 5), f"svirt run exited {code}: {err[-2000:]}"
    assert re.search(r"svirt: guest \w+: (poweroff|killed): ", err), err


# --------------------------------------------------------------------- disks
def _read_grow(guest: Guest, timeout: float = 30.0) -> dict[str, object]:
    line = guest.console.expect(GROW_LINE, timeout)
    m = GROW_LINE.search(line)
    assert m is not None
    report: dict[str, object] = json.loads(m.group(1))
    return report


def _grow_spec(standin: Path, name: str, variant: int, disk: Path) -> GuestSpec:
    d = spec_dict(standin, name, "grow", variant, disks=[disk])
    d["cmdline"] += " growmax=4096"
    return build_spec(d)


def test_a_guest_cannot_grow_its_disk_file_past_the_bound(
    standin: Path, hostile_registry: Registry, image_dir: Path, host: HostInfo,
    guest_uids: set[int],
) -> None:
    disk = image_dir / "grow.img"
    disk.write_bytes(b"\0" * (4 * MIB))
    spec = _grow_spec(standin, "grower", 0, disk)
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _read_grow(guest)
        guest_uids.add(read_info(guest)["uid"])
        assert report["limit"] == SMALL_DISK_BOUND, f"RLIMIT_FSIZE not set: {report}"
        assert str(report["raise"]).startswith("refused"), report
        assert report["far_write"] == "EFBIG", report
        assert report["truncate"] == "EFBIG", report
        assert report["fallocate"] == "EFBIG", report
        assert report["fallocate_keep_size"] == NOTSUP, report
        assert report["zero_range_keep_size"] == NOTSUP, report
        assert report["across_limit"] == 100, report  # cut at the limit
        assert report["at_limit"] == "EFBIG", report
        assert guest.running, "the hypervisor died of its EFBIG (SIGXFSZ not ignored?)"
        guest.stop()
    st = disk.stat()
    assert st.st_size <= SMALL_DISK_BOUND, f"the disk grew to {st.st_size} bytes"
    assert st.st_blocks * 512 <= 4 * MIB + MIB, f"{st.st_blocks * 512} bytes allocated"


def test_sigxfsz_restored_kills_the_hypervisor_and_the_file_stays(
    standin: Path, hostile_registry: Registry, image_dir: Path, host: HostInfo,
    guest_uids: set[int],
) -> None:
    disk = image_dir / "grow1.img"
    disk.write_bytes(b"\0" * (4 * MIB))
    spec = _grow_spec(standin, "grower1", 1, disk)
    with launch(spec, registry=hostile_registry, host=host) as guest:
        assert guest.wait(30) is not None, "the hypervisor outlived its SIGXFSZ"
        outcome = guest.outcome
        assert outcome is not None and outcome.signal == signal.SIGXFSZ, outcome
    assert disk.stat().st_size == 4 * MIB


def test_qemu_boots_with_its_file_size_limit_and_sigxfsz_ignored(
    tiny_qemu: TinyGuest, registry: Registry, image_dir: Path, host: HostInfo,
) -> None:
    disk = image_dir / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "600M"], check=True)
    spec = tiny_spec(tiny_qemu, "fsize-q", Backend.QEMU).with_changes(
        disks=(Disk(disk, format=DiskFormat.QCOW2),))
    from svirt.launcher.storage import layer_bound

    bound = max(layer_bound(600 * MIB), (spec.memory + 64) * MIB)
    with launch(spec, registry=registry, host=host) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=120)
        pids = [guest.pid, *_children(guest.pid)]
        qemu = [p for p in pids if "qemu" in Path(f"/proc/{p}/exe").resolve().name]
        assert qemu, f"no QEMU among {pids}"
        for pid in pids:
            limits = Path(f"/proc/{pid}/limits").read_text()
            m = re.search(r"Max file size\s+(\d+)\s+(\d+)", limits)
            assert m and int(m.group(1)) == int(m.group(2)) == bound, (pid, limits)
            sig = re.search(r"SigIgn:\s+([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())
            assert sig is not None
            ign = int(sig.group(1), 16)
            assert ign & (1 << (signal.SIGXFSZ - 1)), f"pid {pid} does not ignore SIGXFSZ"
        # the limit may only meet its disk: no log or other file is QEMU's to write
        for pid in qemu:
            written = _files_open_for_writing(pid)
            disk_st = disk.stat()
            assert written and all(key == (disk_st.st_dev, disk_st.st_ino)
                                   for key in written), f"QEMU writes regular files {written}"
        assert guest.stop().ok


def _files_open_for_writing(pid: int) -> dict[tuple[int, int], str]:
    """(dev, ino) -> path of the regular files ``pid`` holds open for writing
    (by inode: a path read back through the jail's root names it from
    wherever the reader's root is, e.g. in a chroot)."""
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            st = fd.stat()
            flags = int(re.search(r"flags:\s+([0-7]+)",
                                  (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text())
                        .group(1), 8)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            continue
        if stat.S_ISREG(st.st_mode) and flags & (os.O_WRONLY | os.O_RDWR):
            out[(st.st_dev, st.st_ino)] = os.readlink(fd)
    return out


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_children(int(child))]
    return out

