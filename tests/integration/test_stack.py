"""The SELinux + DAC stack on this host, up to setexeccon (no SELinux in this
kernel: labels are real xattrs nothing enforces; enforcement is the lab's)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.errors import SecurityError
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.resources import Access
from svirt.security.base import ConfinementWarning, Driver, Label
from svirt.security.dac import DacDriver
from svirt.security.selinux import XATTR, SELinuxDriver
from svirt.spec import Backend, Console, Disk
from svirt.testing import tiny_spec


def _selinux(enforcing: bool = False) -> SELinuxDriver:
    return SELinuxDriver(
        launcher_context="system_u:system_r:unconfined_t:s0-s0:c0.c1023",
        domain_context="system_u:system_r:svirt_t:s0",
        image_context="system_u:object_r:svirt_image_t:s0",
        content_context="system_u:object_r:virt_content_t:s0",
        enforcing=enforcing,
    )


def _ctx(path: Path) -> str | None:
    try:
        return os.getxattr(path, XATTR).rstrip(b"\0").decode()
    except OSError:
        return None


def _disk(path: Path, ctx: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    path.chmod(0o644)
    os.setxattr(path, XATTR, ctx.encode() + b"\0")
    return path


def test_stacked_drivers_label_each_guest_with_its_own_pair(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    original = "system_u:object_r:var_t:s0"
    disks = [_disk(image_dir / f"s{i}.img", original) for i in range(2)]
    logs = [image_dir / f"s{i}.log" for i in range(2)]
    guests = [launch_guest(tiny_spec(tiny_uml, f"stack-{i}", Backend.UML,
                                     disks=(Disk(disks[i]),), console=Console(log=logs[i])),
                           drivers=[_selinux(), DacDriver()]) for i in range(2)]
    for g in guests:
        g.console.expect_line("SVIRT-READY", timeout=60)
    labels = [g.record.labels["selinux"] for g in guests]
    assert labels[0].process != labels[1].process
    for i, g in enumerate(guests):
        assert labels[i].process.startswith("system_u:system_r:svirt_t:s0:c")
        assert _ctx(disks[i]) == labels[i].image
        assert _ctx(logs[i]) == labels[i].image
        assert labels[i].image.endswith(labels[i].process.rsplit(":", 1)[1])
        assert str(disks[i].stat().st_uid) == g.labels["dac"].split(":")[0]
    assert _ctx(tiny_uml.initrd) == "system_u:object_r:virt_content_t:s0"
    for g in guests:
        g.stop()


def test_labels_restored_after_the_stack_ends(
    tiny_uml: TinyGuest, image_dir: Path, registry: Registry
) -> None:
    original = "system_u:object_r:var_t:s0"
    disk = _disk(image_dir / "r.img", original)
    initrd_before = _ctx(tiny_uml.initrd)
    with launch(tiny_spec(tiny_uml, "restore-se", Backend.UML, disks=(Disk(disk),)),
                registry=registry, drivers=[_selinux(), DacDriver()]) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=60)
        assert _ctx(disk) != original
    assert _ctx(disk) == original
    assert _ctx(tiny_uml.initrd) == initrd_before
    assert disk.stat().st_uid == 0


class FailingDac(DacDriver):
    """DAC that fails on the disk: what the SELinux driver did must be undone."""

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        if access is Access.RW and not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise SecurityError("injected failure")
        super().apply(fd, st_mode, access, label)


def test_failure_in_one_driver_rolls_back_the_others(
    tiny_uml: TinyGuest, image_dir: Path, registry: Registry
) -> None:
    original = "system_u:object_r:var_t:s0"
    disk = _disk(image_dir / "f.img", original)
    drivers: list[Driver] = [_selinux(), FailingDac()]
    with pytest.raises(SecurityError, match="injected failure"):
        with launch(tiny_spec(tiny_uml, "rollback", Backend.UML, disks=(Disk(disk),)),
                    registry=registry, drivers=drivers):
            pass
    assert _ctx(disk) == original
    assert disk.stat().st_uid == 0 and disk.stat().st_mode & 0o777 == 0o644
    assert registry.records() == []


def test_enforcing_selinux_driver_fails_launch_when_setexeccon_fails(
    tiny_uml: TinyGuest, registry: Registry
) -> None:
    """No SELinux in this kernel: an enforcing driver must refuse, not run unconfined."""
    with pytest.raises(SecurityError):
        with launch(tiny_spec(tiny_uml, "enforce", Backend.UML), registry=registry,
                    drivers=[_selinux(enforcing=True), DacDriver()]):
            pass
    assert registry.records() == []


def test_permissive_selinux_says_so_on_every_launch(
    tiny_uml: TinyGuest, registry: Registry
) -> None:
    """A permissive driver (a permissive host) labels, but enforces nothing: each
    launch warns (ConfinementWarning, the library's channel; the CLI prints it)."""
    for _ in range(2):
        with pytest.warns(ConfinementWarning, match="permissive") as caught:
            with launch(tiny_spec(tiny_uml, "permissive", Backend.UML), registry=registry,
                        drivers=[_selinux(enforcing=False), DacDriver()]) as guest:
                label = guest.record.labels["selinux"].process
                assert any("permissive" in w and label in w for w in guest.warnings)
                guest.stop()
        assert any(label in str(w.message) for w in caught)
