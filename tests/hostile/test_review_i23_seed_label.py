"""Review i23 (design note, svirt/images/seed.py, not wired yet): the cloud-init
seed is handed to the drivers as ``Access.RO``, which every MAC driver reads
as *shared read-only content*: SELinux ``virt_content_t:s0`` (no categories:
every guest's svirt_t level dominates it), SMACK the floor label ``_`` (every
label may read it).  A seed carries user-data: passwords, SSH keys, tokens.
Only DAC (0400 root + an ACL for the guest's uid) and the jail keep another
guest out; the MAC wall DESIGN.md calls "second, independent" is not there
for it.  The module says so itself ("NB: ... see the report"); this test
pins it so the wiring cannot forget: the seed must get the guest's private
label from each MAC driver.
"""

from __future__ import annotations

from pathlib import Path

from svirt.images.seed import Seed
from svirt.security.base import Label

SELINUX = Label("selinux", "system_u:system_r:svirt_t:s0:c11,c22",
                "system_u:object_r:svirt_image_t:s0:c11,c22",
                "system_u:object_r:virt_content_t:s0",
                "system_u:object_r:svirt_image_t:s0")
SMACK = Label("smack", "svirt-3", "svirt-3", "_", "svirt-shared")


def test_review_i23_seed_gets_a_private_mac_label() -> None:
    access = Seed(Path("/run/svirt/guests/g.d/seed.iso"), 4096).resource().access
    assert SELINUX.for_access(access) == SELINUX.image, (
        f"the seed (user-data: secrets) would be labelled {SELINUX.for_access(access)}, "
        "readable by every guest's domain")
    assert SMACK.for_access(access) == SMACK.image, (
        f"the seed would carry SMACK label {SMACK.for_access(access)!r}, readable by every label")
