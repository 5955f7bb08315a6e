"""Guest-writable storage is bounded per guest (svirt/launcher/storage.py).

A stand-in UML (``attack=fill``), jailed and running as its guest's uid,
writes into its home without end: one growing file, its ephemeral disk's
COW file, or many small files.  It must get ENOSPC inside its own cap,
while ``/run`` keeps its free space, another guest still writes, and
release (or ``svirt gc`` after a SIGKILLed launcher) leaves no mount and no
directory behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from svirt import config
from svirt.errors import StateError
from svirt.host import HostInfo
from svirt.launcher import cgroupfs, storage
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.spec import Disk, GuestSpec

from .helpers import PYTHON, ROOT, build_spec, read_info, spec_dict, svirt_gc, wait_for

FILL_LINE = re.compile(rb"FILL (\{[^\n]*\})\r?\n")
MIB = 1 << 20


def _fill_spec(standin: Path, name: str, variant: int, most: int, fillname: str = "fill",
               ephemeral: Path | None = None) -> GuestSpec:
    d = spec_dict(standin, name, "fill", variant)
    d["cmdline"] += f" fillmax={most} fillname={fillname}"
    spec = build_spec(d)
    if ephemeral is not None:
        spec = spec.with_changes(disks=(Disk(ephemeral, ephemeral=True),))
    return spec


def _read_fill(guest: Guest, timeout: float = 60.0) -> dict[str, object]:
    line = guest.console.expect(FILL_LINE, timeout)
    m = FILL_LINE.search(line)
    assert m is not None
    report: dict[str, object] = json.loads(m.group(1))
    return report


def _storage_mounts(run_root: Path) -> list[str]:
    return [str(p) for p, _fstype, src in storage.mounts()
            if src.startswith(storage.SOURCE) and run_root in p.parents]


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _assert_nothing_left(registry: Registry, run_root: Path, names: list[str]) -> None:
    assert not _storage_mounts(run_root), f"storage mounts left: {_storage_mounts(run_root)}"
    for name in names:
        assert not registry.run_dir(name).exists(), f"{registry.run_dir(name)} left"
    assert registry.records() == []


def test_a_guest_filling_its_home_gets_enospc_in_its_own_cap(
    standin: Path, hostile_registry: Registry, dirs: tuple[Path, Path], host: HostInfo,
    guest_uids: set[int],
) -> None:
    run_root = dirs[0]
    cap = getattr(config.load(), "guest_storage_mib", 16)
    free_before = _free(run_root)
    spec = _fill_spec(standin, "filler", 0, 512)  # far past the cap
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _read_fill(guest)
        guest_uids.add(read_info(guest)["uid"])
        free_during = _free(run_root)
        home = hostile_registry.home("filler")
        assert report["error"] == "ENOSPC", f"the guest wrote without end: {report}"
        # what it wrote it cannot run (noexec, kept by the jail's bind of the home)
        assert report["exec"] == "denied: EACCES", report
        assert isinstance(report["done"], int) and report["done"] <= cap * MIB, report
        assert report["bytes_max"] == cap * MIB, report
        assert os.stat(home).st_dev != os.stat(run_root).st_dev, \
            "the guest's home is on /run's file system"
        # /run lost nothing to the guest (other processes of this host may write
        # meanwhile: a margin far below the 512 MiB it tried)
        assert free_before - free_during < 128 * MIB, \
            f"/run lost {(free_before - free_during) // MIB} MiB while the guest wrote"
        assert guest.running, "the guest was killed (its memory cgroup?) instead of ENOSPC"
        assert guest.storage is not None and guest.cgroup is not None
        assert guest.cgroup.memory_max >= (spec.memory + guest.storage.size_mib) * MIB
        # another guest, launched after the first filled its cap, still writes
        other = _fill_spec(standin, "bystander", 0, 4)
        with launch(other, registry=hostile_registry, host=host) as second:
            got = _read_fill(second)
            guest_uids.add(read_info(second)["uid"])
            assert got["error"] is None and got["done"] == 4 * MIB, got
            second.stop()
        guest.stop()
    _assert_nothing_left(hostile_registry, run_root, ["filler", "bystander"])


def test_many_small_files_exhaust_only_the_guests_own_inodes(
    standin: Path, hostile_registry: Registry, dirs: tuple[Path, Path], host: HostInfo,
    guest_uids: set[int],
) -> None:
    run_root = dirs[0]
    inodes = getattr(config.load(), "guest_storage_inodes", 4096)
    spec = _fill_spec(standin, "inodes", 1, 50_000)
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _read_fill(guest)
        guest_uids.add(read_info(guest)["uid"])
        assert report["error"] == "ENOSPC", f"the guest made files without end: {report}"
        assert isinstance(report["done"], int) and report["done"] < inodes, report
        assert report["inodes_max"] == inodes, report
        # root's own inodes are gone too: the registry still works for another guest
        other = _fill_spec(standin, "inodes-other", 1, 100)
        with launch(other, registry=hostile_registry, host=host) as second:
            got = _read_fill(second)
            guest_uids.add(read_info(second)["uid"])
            assert got["error"] is None and got["done"] == 100, got
            second.stop()
        started = time.monotonic()
        guest.stop()
    _assert_nothing_left(hostile_registry, run_root, ["inodes", "inodes-other"])
    assert time.monotonic() - started < 10


def test_a_deep_tree_in_the_home_goes_with_the_mount(
    standin: Path, hostile_registry: Registry, dirs: tuple[Path, Path], host: HostInfo,
    guest_uids: set[int],
) -> None:
    """3,000 nested directories: release unmounts, it never walks them."""
    spec = _fill_spec(standin, "deep", 2, 3000)
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _read_fill(guest)
        guest_uids.add(read_info(guest)["uid"])
        assert report["error"] is None and report["done"] == 3000, report
        started = time.monotonic()
        guest.stop()
    assert time.monotonic() - started < 10
    _assert_nothing_left(hostile_registry, dirs[0], ["deep"])


def test_an_ephemeral_layer_is_capped_by_its_base_size(
    standin: Path, image_dir: Path, hostile_registry: Registry, dirs: tuple[Path, Path],
    host: HostInfo, guest_uids: set[int],
) -> None:
    """UML's COW file lives in the home: the hypervisor grows it past anything
    its disk could need; the cap is the config's MiB plus the layer's bound.
    The base (160 MiB) is larger than the guest's memory headroom (32 MiB of
    RAM + 64 of overhead): the tmpfs pages it writes are charged to its own
    memory cgroup, whose limit grows by the cap, so it meets ENOSPC, not the
    OOM killer."""
    base = image_dir / "fill-base.img"
    with open(base, "wb") as f:
        f.truncate(160 * MIB)
    base.chmod(0o644)
    spec = _fill_spec(standin, "layered", 0, 512, ".disk0.cow", ephemeral=base)
    base_mib = getattr(config.load(), "guest_storage_mib", 16)
    expected = storage.plan(Path("/x"), [160 * MIB], "0" * 8, base_mib, 64)
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _read_fill(guest)
        guest_uids.add(read_info(guest)["uid"])
        assert report["error"] == "ENOSPC", report
        assert report["bytes_max"] == expected.size_mib * MIB, report
        assert isinstance(report["done"], int) and report["done"] > 160 * MIB, report
        assert guest.running, "killed (by its memory cgroup?) instead of ENOSPC"
        guest.stop()
    _assert_nothing_left(hostile_registry, dirs[0], ["layered"])


@pytest.mark.parametrize("record", ["kept", "wiped"])
def test_launcher_sigkilled_then_gc_unmounts(
    record: str, standin: Path, image_dir: Path, hostile_registry: Registry,
    dirs: tuple[Path, Path], guest_uids: set[int],
) -> None:
    """The launcher dies with the guest's storage mounted (and full); gc
    releases the record (kept) or sweeps the mount no record names (wiped)."""
    run_root, state_dir = dirs
    spec = spec_dict(standin, "killed", "fill", 0)
    spec["cmdline"] += " fillmax=512"
    spec_file = image_dir / "killed.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen([PYTHON, "-m", "tests.hostile.driver", str(spec_file), "--hold"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the launcher died before its guest was up"
        guest_uids.add(json.loads(line)["info"]["uid"])
        assert _storage_mounts(run_root) == [str(hostile_registry.run_dir("killed"))]
    finally:
        proc.kill()
        proc.wait(10)
    if record == "wiped":
        (state_dir / "guests" / "killed.json").unlink()
    gc = svirt_gc(dict(os.environ))
    assert gc.returncode == 0, gc.stderr
    assert wait_for(lambda: not _storage_mounts(run_root), 5), \
        f"gc left the storage mounted: {gc.stdout}"
    if record == "kept":  # released: the run directory goes too
        assert not hostile_registry.run_dir("killed").exists()
    assert hostile_registry.records() == []


def test_mount_and_unmount_cost(tmp_path: Path) -> None:
    """What the storage step adds to a launch and a release (printed)."""
    tmp_path.chmod(0o755)
    times = []
    for i in range(20):
        run_dir = tmp_path / f"g{i}.d"
        run_dir.mkdir(0o755)
        (run_dir / "home").mkdir(0o700)
        planned = storage.plan(run_dir, [], cgroupfs.registry_tag(tmp_path), 16, 4096)
        t0 = time.perf_counter()
        planned.create()
        t1 = time.perf_counter()
        assert storage.remove(run_dir, planned.source)
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1))
        assert storage.mounted(run_dir) is None
    mount_ms = sorted(a for a, _ in times)[len(times) // 2] * 1000
    umount_ms = sorted(b for _, b in times)[len(times) // 2] * 1000
    print(f"\nstorage: mount {mount_ms:.2f} ms, unmount {umount_ms:.2f} ms (median of 20)")
    assert mount_ms < 50 and umount_ms < 50


def test_remove_leaves_a_foreign_mount_alone(tmp_path: Path) -> None:
    """A mount at the run directory that is not svirt's storage is refused."""
    tmp_path.chmod(0o755)
    target = tmp_path / "x.d"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "someone-else", str(target)],
                   check=True)
    try:
        with pytest.raises(StateError):
            storage.remove(target, storage.source_name("0" * 8))
        assert storage.mounted(target) == "someone-else"
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_a_busy_mount_is_detached(tmp_path: Path) -> None:
    """A process (an unjailed guest's leftover) keeps its cwd and a file open
    in the storage: release detaches the mount rather than fail."""
    tmp_path.chmod(0o755)
    run_dir = tmp_path / "busy.d"
    run_dir.mkdir(0o755)
    planned = storage.plan(run_dir, [], cgroupfs.registry_tag(tmp_path), 1, 64)
    planned.create()
    with open(run_dir / "home" / "held", "wb") as held:
        holder = subprocess.Popen(["sleep", "60"], cwd=run_dir / "home", stdout=held)
    try:
        assert storage.remove(run_dir, planned.source)
        assert storage.mounted(run_dir) is None
        assert not (run_dir / "home").exists()  # gone from the host's view at once
    finally:
        holder.kill()
        holder.wait()

