"""Ephemeral disks on real guests: one read-only base, a private layer each.

Every guest writes through its block device (``/init`` mode ``diskwrite``)
and reads its write back from the device; the base's bytes never change;
the layer is gone after every kind of exit.  The attacks play the guest
(its uid writing the base) and an earlier root mistake (a symlink where the
layer is to be made).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from svirt import config
from svirt.errors import RelabelRefused
from svirt.images.build import TinyGuest
from svirt.images.chain import read_qcow2_backing
from svirt.launcher import storage
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind
from svirt.security.dac import ACL_XATTR, parse_acl
from svirt.spec import Backend, Backing, Disk, DiskFormat, GuestSpec
from svirt.testing import tiny_spec

from .helpers import open_as, pids_of_uid, svirt_cli, wait_for, write_spec

ROOT = Path(__file__).resolve().parents[2]
BASE_LINE = "SVIRT-BASE-CONTENT"
BEFORE = re.compile(rb"SVIRT-DISK before ([^\r\n]*)\r?\n")
AFTER = re.compile(rb"SVIRT-DISK after ([^\r\n]*)\r?\n")
GUESTS = 20
AT_ONCE = 20  # all at once: two shared cores boot twenty UML guests in ~6 s


def _base(image_dir: Path, mode: int = 0o600, name: str = "base.img") -> Path:
    path = image_dir / name
    with open(path, "wb") as f:
        f.write(f"{BASE_LINE}\n".encode())
        f.truncate(1 << 20)
    path.chmod(mode)
    return path


def _fingerprint(path: Path) -> tuple[str, int, int, int, int, bytes | None]:
    """Bytes, mtime (UML's COW header records it), owner, mode and ACL."""
    st = path.stat()
    try:
        acl: bytes | None = os.getxattr(path, ACL_XATTR)
    except OSError:
        acl = None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest, st.st_mtime_ns, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), acl


def _uid(guest: Guest) -> tuple[int, int]:
    uid, gid = guest.labels["dac"].split(":")
    return int(uid), int(gid)


def _disk_lines(guest: Guest, timeout: float = 120) -> tuple[str, str]:
    before = BEFORE.search(guest.console.expect(BEFORE, timeout))
    after = AFTER.search(guest.console.expect(AFTER, timeout))
    assert before is not None and after is not None
    return before.group(1).decode(), after.group(1).decode()


def _writer(tiny: TinyGuest, name: str, backend: Backend, base: Path, pattern: str
            ) -> GuestSpec:
    return tiny_spec(tiny, name, backend, mode="diskwrite",
                     extra_cmdline=f"svirt.pattern={pattern}",
                     disks=(Disk(base, ephemeral=True),))


@dataclass(frozen=True)
class _Run:
    seen: tuple[str, str]  # the disk's first line before and after the guest's write
    uid: int
    cow_uid: int
    cow_mode: int
    outcome: OutcomeKind | None
    window: tuple[float, float]  # from exec to the read-back
    run_dir_left: bool


# ------------------------------------------------------------------ use


def test_twenty_uml_guests_write_at_once_over_one_base(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    base = _base(image_dir)
    before = _fingerprint(base)

    def one(i: int) -> _Run:
        registry = Registry(run_root)  # its lock depth is per object: one per thread
        name = f"eph-{i}"
        with launch(_writer(tiny_uml, name, Backend.UML, base, f"guest-{i}"),
                    registry=registry) as guest:
            up = time.monotonic()
            seen = _disk_lines(guest)
            wrote = time.monotonic()
            cow = (registry.home(name) / ".disk0.cow").stat()
            outcome = guest.wait(60)
        return _Run(seen, _uid(guest)[0], cow.st_uid, stat.S_IMODE(cow.st_mode),
                    outcome.kind if outcome else None, (up, wrote),
                    registry.run_dir(name).exists())

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=AT_ONCE) as pool:
        results = list(pool.map(one, range(GUESTS)))
    windows = [r.window for r in results]
    # how many guests were between exec and their read-back at the busiest moment
    peak = max(sum(1 for s, e in windows if s <= t < e) for t, _ in windows)
    print(f"{GUESTS} ephemeral UML guests, {AT_ONCE} at once: "
          f"{time.monotonic() - started:.1f} s; at most {peak} writing at the same time")
    assert peak > 1
    for i, r in enumerate(results):
        # each saw the base, then its own write, never another guest's
        assert r.seen == (BASE_LINE, f"guest-{i}"), r
        assert r.outcome is OutcomeKind.POWEROFF
        assert (r.cow_uid, r.cow_mode) == (r.uid, 0o600)
        assert not r.run_dir_left
    assert _fingerprint(base) == before  # bytes, mtime, owner, mode, ACL
    assert Registry(run_root).records() == []
    assert all(pids_of_uid(r.uid) == [] for r in results)


@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_qemu_tcg_guest_writes_an_overlay_backed_by_the_base(
    base_format: str, tiny_qemu: TinyGuest, image_dir: Path, registry: Registry
) -> None:
    raw = _base(image_dir, mode=0o644)
    if base_format == "raw":
        base, disk = raw, Disk(raw, ephemeral=True)
    else:  # a qcow2 base over a raw one: the overlay goes on top of the declared chain
        base = image_dir / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(raw),
                        str(base)], check=True)
        base.chmod(0o644)
        disk = Disk(base, format=DiskFormat.QCOW2, ephemeral=True,
                    backing=(Backing(raw, DiskFormat.RAW),))
    before = {p: _fingerprint(p) for p in {raw, base}}
    spec = tiny_spec(tiny_qemu, "eph-qemu", Backend.QEMU, mode="diskwrite", accel="tcg",
                     extra_cmdline="svirt.pattern=qemu-wrote-this", disks=(disk,))
    overlay = registry.run_dir("eph-qemu") / "layers" / "disk0.qcow2"
    with launch(spec, registry=registry) as guest:
        uid, _ = _uid(guest)
        with open(overlay, "rb") as f:
            header = f.read(65536)
        assert read_qcow2_backing(header) == (str(base), base_format)
        assert int.from_bytes(header[24:32], "big") == 1 << 20  # the base's virtual size
        st = overlay.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (uid, 0o600, 1)
        layers = overlay.parent.stat()
        assert (layers.st_uid, stat.S_IMODE(layers.st_mode)) == (0, 0o711)
        # on the guest's own storage mount, sized from the base (svirt/launcher/storage.py)
        assert guest.storage is not None and st.st_dev != registry.run_dirs.stat().st_dev
        assert st.st_dev == registry.run_dir("eph-qemu").stat().st_dev
        vfs = os.statvfs(overlay)
        assert vfs.f_blocks * vfs.f_frsize == guest.storage.size_mib << 20
        assert guest.storage.size == (config.load().guest_storage_mib << 20) + \
            storage.layer_bound(1 << 20)  # the base's virtual size counted
        assert _disk_lines(guest, 180) == (BASE_LINE, "qemu-wrote-this")
        outcome = guest.wait(60)
        assert outcome is not None and outcome.kind is OutcomeKind.POWEROFF
    assert not overlay.exists() and not registry.run_dir("eph-qemu").exists()
    assert {p: _fingerprint(p) for p in {raw, base}} == before
    assert registry.records() == []
    assert list(registry.objects.iterdir()) == []  # the overlay's table went too


def test_failed_launch_removes_the_overlay_and_restores_the_base(
    tiny_qemu: TinyGuest, image_dir: Path, registry: Registry
) -> None:
    base = _base(image_dir)
    before = _fingerprint(base)
    linked = image_dir / "linked.img"
    linked.write_bytes(b"\0" * 512)
    os.link(linked, image_dir / "second-link.img")  # two links: never labelled
    spec = tiny_spec(tiny_qemu, "eph-fail", Backend.QEMU,
                     disks=(Disk(base, ephemeral=True), Disk(linked)))
    with pytest.raises(RelabelRefused, match="hard links"):
        with launch(spec, registry=registry):
            pass
    assert not registry.run_dir("eph-fail").exists()
    assert _fingerprint(base) == before
    assert registry.records() == [] and list(registry.objects.iterdir()) == []


# --------------------------------------------------------------- attacks


def test_guest_uid_cannot_write_the_base(
    tiny_uml: TinyGuest, image_dir: Path, registry: Registry
) -> None:
    base = _base(image_dir, mode=0o600)  # readable by no one: each guest gets an ACL entry
    before = _fingerprint(base)
    with ExitStack() as stack:
        guests = [stack.enter_context(launch(
            tiny_spec(tiny_uml, f"eph-ro-{i}", Backend.UML, disks=(Disk(base, ephemeral=True),)),
            registry=registry)) for i in range(2)]
        for guest in guests:
            guest.console.expect_line("SVIRT-READY", timeout=60)
        _attack_base(base, guests)
    assert _fingerprint(base) == before  # both released: the ACL entries are gone
    assert not any(registry.run_dir(g.name).exists() for g in guests)


def _attack_base(base: Path, guests: list[Guest]) -> None:
    st = base.stat()
    assert (st.st_uid, st.st_gid) == (0, 0)  # never handed over
    assert stat.S_IMODE(st.st_mode) & 0o022 == 0  # no write bit for group or others
    entries = parse_acl(os.getxattr(base, ACL_XATTR))
    for guest in guests:
        uid, gid = _uid(guest)
        assert [(perm) for tag, perm, who in entries if tag == 0x02 and who == uid] == [4]
        for flags in (os.O_RDWR, os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_TRUNC):
            assert open_as(uid, gid, base, flags) == errno.EACCES
        assert open_as(uid, gid, base, os.O_RDONLY) == 0
        # in its jail the base is a read-only bind as well
        mounts = Path(f"/proc/{guest.pid}/mountinfo").read_text().splitlines()
        line = next(m for m in mounts if m.split()[4] == str(base))
        assert "ro" in line.split()[5].split(",")
    a, b = guests
    a_cow = a.run_dir / ".disk0.cow"
    assert wait_for(a_cow.exists, 10)
    # the layer is the guest's alone
    b_uid, b_gid = _uid(b)
    assert open_as(b_uid, b_gid, a_cow, os.O_RDONLY) == errno.EACCES


class _PlantingRegistry(Registry):
    """Plants a symlink where the layer will be made, right after the run
    directory is made new (reserve) and mounted as the guest's storage
    (svirt/launcher/storage.py), so nothing earlier survives."""

    def __init__(self, root: Path, backend: Backend, target: Path) -> None:
        super().__init__(root)
        self.backend = backend
        self.target = target
        self.link: Path | None = None

    def plant(self, name: str) -> None:
        if self.backend is Backend.UML:
            self.link = self.home(name) / ".disk0.cow"
        else:
            (self.run_dir(name) / "layers").mkdir(mode=0o711)
            self.link = self.run_dir(name) / "layers" / "disk0.qcow2"
        self.link.symlink_to(self.target)


@pytest.mark.parametrize("backend", [Backend.QEMU, Backend.UML])
def test_symlink_planted_at_the_layer_is_not_followed(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest, image_dir: Path,
    run_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _base(image_dir)
    canary = image_dir / "canary"
    canary.write_text("root's own file\n")
    canary.chmod(0o644)
    canary_before = _fingerprint(canary)
    registry = _PlantingRegistry(run_root, backend, canary)
    create = storage.GuestStorage.create

    def create_then_plant(self: storage.GuestStorage) -> None:
        create(self)
        registry.plant(self.path.name.removesuffix(".d"))

    monkeypatch.setattr(storage.GuestStorage, "create", create_then_plant)
    tiny = tiny_uml if backend is Backend.UML else tiny_qemu
    spec = tiny_spec(tiny, f"eph-plant-{backend}", backend, disks=(Disk(base, ephemeral=True),))
    with pytest.raises(RelabelRefused, match="already exists") as info:
        with launch(spec, registry=registry):
            pass
    assert info.value.path == str(registry.link)
    assert _fingerprint(canary) == canary_before  # not written, chowned nor relabelled
    assert not registry.run_dir(spec.name).exists()  # the link went with the run dir
    assert canary.exists()
    assert Registry(run_root).records() == []


@pytest.mark.parametrize("backend", [Backend.UML, Backend.QEMU])
def test_layer_is_gone_after_the_launcher_is_killed_and_gc_runs(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest, image_dir: Path,
    run_root: Path
) -> None:
    base = _base(image_dir)
    before = _fingerprint(base)
    name = f"eph-killed-{backend}"
    tiny = tiny_uml if backend is Backend.UML else tiny_qemu
    accel = 'accel = "tcg"\n' if backend is Backend.QEMU else ""
    extra = f'{accel}[[disk]]\npath = "{base}"\nephemeral = true\n'
    spec = write_spec(image_dir / "k.toml", name, str(backend), tiny, extra=extra)
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc", str(spec)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    uid = int(info["labels"]["dac"].split(":")[0])
    run_dir = Registry(run_root).run_dir(name)
    layer = (run_dir / "home" / ".disk0.cow" if backend is Backend.UML
             else run_dir / "layers" / "disk0.qcow2")
    assert wait_for(layer.exists, 10) and layer.stat().st_uid == uid
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"), 10)
    assert layer.exists()  # left for gc
    gc = svirt_cli("gc")
    assert gc.returncode == 0, gc.stderr
    assert f"released guest {name}" in gc.stdout
    assert not layer.exists() and not run_dir.exists()
    assert _fingerprint(base) == before
    assert pids_of_uid(uid) == []
    assert Registry(run_root).records() == []


def test_svirt_run_ephemeral_makes_every_writable_disk_ephemeral(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    base = _base(image_dir)
    before = _fingerprint(base)
    spec = write_spec(image_dir / "cli.toml", "eph-cli", "uml", tiny_uml, mode="diskwrite",
                      extra=f'[[disk]]\npath = "{base}"\n')  # not ephemeral in the spec
    run = svirt_cli("run", "--ephemeral", "--console", "stdio", str(spec))
    assert run.returncode == 0, run.stderr
    assert f"SVIRT-DISK before {BASE_LINE}" in run.stdout
    assert "SVIRT-DISK after svirt-diskwrite" in run.stdout
    assert _fingerprint(base) == before
    assert not (run_root / "guests" / "eph-cli.d").exists()
