"""Parsing a spec never asks the host; preflight does, with the same clear errors.

A spec written for another host (its kernel and disks elsewhere, more memory
than this host has) parses here; ``svirt check``, ``plan`` and ``launch``
refuse it at preflight, naming the field, before anything is reserved."""

from __future__ import annotations

from pathlib import Path

import pytest

from svirt import cli
from svirt.errors import HostError, SpecError
from svirt.host import QEMU_BINARY, Binary, HostInfo, KvmStatus, SELinuxMode, host_memory_mib
from svirt.launcher.launch import launch, plan
from svirt.preflight import check_memory, preflight
from svirt.spec import Accel, Backing, Console, Disk, DiskFormat, GuestSpec, load_spec


def fake_host(*, qemu: bool = True) -> HostInfo:
    return HostInfo(
        binaries={QEMU_BINARY: Binary(f"/usr/bin/{QEMU_BINARY}", "9.9", ()) if qemu else None},
        kvm=KvmStatus(False, "no KVM in this test"), selinux=SELinuxMode.DISABLED,
        selinux_mls=False, selinux_policy=None, smack=False, lsms=("capability",),
        lguest_device=False, cpus=2)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A spec for another host: none of its files are here, its memory is too big."""
    too_much = host_memory_mib() + 1024
    path = tmp_path / "other-host.toml"
    path.write_text(
        'name = "remote"\nkernel = "/srv/other-host/vmlinuz"\naccel = "tcg"\n'
        f"memory = {too_much}\n"
        '[console]\nlog = "/srv/other-host/logs/console.log"\n'
        '[[disk]]\npath = "/srv/other-host/root.qcow2"\nformat = "qcow2"\n'
        'backing = [{path = "/srv/other-host/base.img", format = "raw"}]\n'
        '[[disk]]\npath = "/srv/other-host/data.img"\n')
    return path


def preflight_error(spec: GuestSpec, host: HostInfo | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        preflight(spec, host or fake_host())
    return info.value


def test_a_spec_for_another_host_parses(elsewhere: Path) -> None:
    spec = load_spec(elsewhere)
    assert spec.kernel == Path("/srv/other-host/vmlinuz")
    assert [d.path for d in spec.disks] == [Path("/srv/other-host/root.qcow2"),
                                            Path("/srv/other-host/data.img")]
    assert spec.disks[0].backing[0].path == Path("/srv/other-host/base.img")
    assert spec.memory == host_memory_mib() + 1024
    assert spec.console.log == Path("/srv/other-host/logs/console.log")


def test_preflight_names_each_missing_field_then_the_memory(elsewhere: Path,
                                                            tmp_path: Path) -> None:
    spec = load_spec(elsewhere)
    err = preflight_error(spec)
    assert err.key == "kernel"
    assert err.message == "kernel: /srv/other-host/vmlinuz does not exist"

    # move the spec's objects here one at a time: each next error names its field
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    spec = spec.with_changes(kernel=kernel)
    err = preflight_error(spec)
    assert err.message == "disk[0].path: /srv/other-host/root.qcow2 does not exist"

    root, base, data = (tmp_path / n for n in ("root.qcow2", "base.img", "data.img"))
    for p in (root, base, data):
        p.write_bytes(b"\0" * 512)
    disks = (Disk(root, format=DiskFormat.QCOW2, backing=spec.disks[0].backing), spec.disks[1])
    err = preflight_error(spec.with_changes(disks=disks))
    assert err.message == "disk[0].backing[0].path: /srv/other-host/base.img does not exist"

    with pytest.raises(SpecError, match="is listed twice"):  # the same path: parsing sees it
        spec.with_changes(disks=(disks[0], disks[0]))

    spec = spec.with_changes(disks=(
        Disk(root, format=DiskFormat.QCOW2, backing=(Backing(base),)), Disk(data)))
    err = preflight_error(spec)
    assert err.message == "console.log: directory /srv/other-host/logs does not exist"

    spec = spec.with_changes(console=Console(log=tmp_path / "console.log"))
    err = preflight_error(spec)
    host = host_memory_mib()
    assert err.key == "memory"
    assert err.message == f"memory: {host + 1024} MiB is more than this host's {host} MiB"

    backend, accel = preflight(spec.with_changes(memory=64), fake_host())
    assert backend.name == "qemu" and accel is Accel.TCG


def test_memory_is_checked_against_the_host_given() -> None:
    spec = GuestSpec(name="m", kernel=Path("/nowhere/vmlinuz"), memory="2G")  # type: ignore[arg-type]
    check_memory(spec, host_mib=4096)
    with pytest.raises(SpecError, match="memory: 2048 MiB is more than this host's 1024 MiB"):
        check_memory(spec, host_mib=1024)


def test_files_come_before_the_backend(elsewhere: Path) -> None:
    """A missing kernel is a spec error (exit 2) even where the backend is missing too."""
    err = preflight_error(load_spec(elsewhere), fake_host(qemu=False))
    assert err.key == "kernel"


def test_backend_preflight_still_runs(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    with pytest.raises(HostError):
        preflight(GuestSpec(name="q", kernel=kernel), fake_host(qemu=False))


def test_plan_and_launch_refuse_before_reserving(elsewhere: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from svirt.launcher import launch as launch_module

    def no_registry() -> None:
        raise AssertionError("a registry was opened before preflight refused")

    monkeypatch.setattr(launch_module, "Registry", no_registry)
    spec = load_spec(elsewhere)
    with pytest.raises(SpecError, match="^kernel: /srv/other-host/vmlinuz does not exist$"):
        plan(spec, fake_host())
    with pytest.raises(SpecError, match="^kernel: "), launch(spec, host=fake_host()):
        pass


def test_svirt_check_names_the_file_the_field_and_exits_2(
        elsewhere: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    spec = tmp_path / "guest.toml"
    spec.write_text(f'name = "c"\nkernel = "{kernel}"\n[[disk]]\npath = "gone.img"\n')
    assert cli.main(["check", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[0] == (
        f"svirt: error: {spec}: disk[0].path: {tmp_path / 'gone.img'} does not exist")
    assert cli.main(["check", str(elsewhere)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"svirt: error: {elsewhere}: kernel: /srv/other-host/vmlinuz does not exist")


def test_jail_false_uml_refuses_a_host_shm_no_guest_can_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A jail = false UML makes its RAM file in the host's /dev/shm as the
    guest's uid: a /dev/shm that is not 1777 (a tmpfs unmounted from under a
    chroot leaves devtmpfs's 0755 directory) is a clear HostError at
    preflight, not a guest that dies before its first line."""
    from svirt.backends import uml
    from svirt.errors import HostError

    shm = tmp_path / "shm"
    shm.mkdir(mode=0o755)
    shm.chmod(0o755)
    monkeypatch.setattr(uml, "HOST_SHM", shm)
    with pytest.raises(HostError, match="not a world-writable sticky directory") as info:
        uml.check_host_shm("g")
    assert info.value.hint is not None and "mode=1777" in info.value.hint
    shm.chmod(0o1777)
    uml.check_host_shm("g")  # accepted
