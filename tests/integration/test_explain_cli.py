"""``svirt explain FILE`` through the installed command, over a real registry.

Two guests reserved (DAC + SMACK labels: the SMACK driver needs no SMACK on
the host to hand out labels) and a disk held by one of them: the object
table the launcher writes.  The log lines are what the kernel would write
for the other guest reaching that disk; the lab provokes real ones.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from svirt.launcher.registry import Registry
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.base import Driver
from svirt.security.dac import DacDriver
from svirt.security.smack import SmackDriver
from svirt.spec import GuestSpec

from .helpers import svirt_cli

ROOT = Path(__file__).resolve().parents[2]


def test_explain_file_names_the_guests_and_the_disk(tmp_path: Path, image_dir: Path) -> None:
    kernel = image_dir / "vmlinuz"
    kernel.write_bytes(b"k")
    disk = image_dir / "b.img"
    disk.write_bytes(b"d" * 512)
    reg = Registry(tmp_path / "run", tmp_path / "state")
    dac = DacDriver()
    drivers: list[Driver] = [SmackDriver(), dac]
    a = reg.reserve(GuestSpec(name="guest-a", kernel=kernel, uuid=uuid.uuid4()), drivers)
    b = reg.reserve(GuestSpec(name="guest-b", kernel=kernel, uuid=uuid.uuid4()), drivers)
    try:
        reg.hold(b, Resource(disk, Access.RW, ResourceKind.DISK), [dac], (image_dir,))
        sa, sb = a.labels["smack"].process, b.labels["smack"].process
        uid_a = a.labels["dac"].process.split(":")[0]
        ino = disk.stat().st_ino
        log = tmp_path / "audit.log"
        log.write_text(
            f'type=AVC msg=audit(1700000000.100:10): lsm=SMACK fn=smack_inode_permission '
            f'action=denied subject="{sa}" object="{sb}" requested=rw pid=4242 comm="linux" '
            f'name="b.img" dev="vda" ino={ino}\n'
            "a line of something else\n"
            f'type=AVC msg=audit(1700000001.100:11): apparmor="DENIED" operation="open" '
            f'class="file" profile="svirt-{a.uuid}" name="/etc/hosts" pid=4242 '
            f'comm="qemu-system-x86" requested_mask="r" denied_mask="r" fsuid={uid_a} ouid=0\n')
        env = {**os.environ, "SVIRT_RUN_DIR": str(reg.root), "SVIRT_STATE_DIR": str(reg.state),
               "PYTHONPATH": str(ROOT)}
        proc = svirt_cli("explain", str(log), env=env)
        assert proc.returncode == 0, proc.stderr
        assert (f"cross-guest: sVirt stopped guest guest-a from reaching guest guest-b's "
                f"object {disk}") in proc.stdout
        assert "/etc/hosts r," in proc.stdout
        proc = svirt_cli("explain", str(log), "--json", "--guest", "guest-b", env=env)
        assert proc.returncode == 0, proc.stderr
        [found] = [json.loads(x) for x in proc.stdout.splitlines()]
        assert (found["guest"], found["target_guest"], found["object"]) == (
            "guest-a", "guest-b", str(disk))
        empty = tmp_path / "empty.log"
        empty.write_text("")
        proc = svirt_cli("explain", str(empty), env=env)
        assert (proc.returncode, proc.stdout) == (0, "no denials found\n")
    finally:
        for r in (b, a):
            reg.release(r)
