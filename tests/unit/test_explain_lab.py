"""svirt explain on denial lines the lab's kernel really wrote (Debian 12,
Linux 6.1): copied from the output of ``tests/lab/test_lab_svirt.py`` and
``tests/lab/test_lab_apparmor.py`` (their ``explain`` and ``jail_attack``
checks): the text of a kernel log record (what follows the ``;`` of a
/dev/kmsg record) and, for the jail attack's, as busybox ``dmesg`` prints it.

The registry is rebuilt here to match the lab's at that moment: the guests'
records (their MCS pairs, profiles and uids) and the object tables of the
disks, with the inode numbers the kernel logged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from svirt.explain import CROSS_GUEST, MISLABELLED, POLICY_GAP, Finding, ObjectEntry, explain
from svirt.launcher.record import Record
from svirt.procfs import ProcessId
from svirt.security.base import Label

IMAGES = "/var/lib/svirt-lab/images"
IMAGE = "system_u:object_r:svirt_image_t:s0"
CONTENT = "system_u:object_r:virt_content_t:s0"
SHARED = "system_u:object_r:svirt_image_t:s0"

# ------------------------------------------------------------- SELinux pass
G1_CTX = "system_u:system_r:svirt_t:s0:c242,c921"
G2_CTX = "system_u:system_r:svirt_t:s0:c151,c549"
#: g1's context (g2's uid, so that DAC lets it through) reads g2's disk
SELINUX_CROSS = (
    "audit: type=1400 audit(1796232564.592:123): avc:  denied  { read } for "
    ' pid=1548 comm="python3" name="g2.img" dev="vda" ino=16813 '
    f"scontext={G1_CTX} tcontext={IMAGE}:c151,c549 tclass=file permissive=0")
#: g1 (context and uid) reads its own disk, relabelled at a level no guest holds
SELINUX_MISLABELLED = (
    "audit: type=1400 audit(1796232565.300:125): avc:  denied  { read } for "
    ' pid=1552 comm="python3" name="g1.img" dev="vda" ino=16811 '
    f"scontext={G1_CTX} tcontext={IMAGE}:c1000,c1001 tclass=file permissive=0")
#: another run, as svirt explain read them from /dev/kmsg (PRI,SEQ,USEC,FLAGS;)
KMSG_G1_CTX = "system_u:system_r:svirt_t:s0:c145,c342"
KMSG_G2_CTX = "system_u:system_r:svirt_t:s0:c720,c857"
SELINUX_KMSG = (
    "5,511,29190396,-;audit: type=1400 audit(1796233341.136:123): avc:  denied  { read } "
    'for  pid=1537 comm="python3" name="g2.img" dev="vda" ino=16813 '
    f"scontext={KMSG_G1_CTX} tcontext={IMAGE}:c720,c857 tclass=file permissive=0",
    "5,514,29583394,-;audit: type=1400 audit(1796233341.528:125): avc:  denied  { read } "
    'for  pid=1538 comm="python3" name="g1.img" dev="vda" ino=16811 '
    f"scontext={KMSG_G1_CTX} tcontext={IMAGE}:c1000,c1001 tclass=file permissive=0",
)

# ------------------------------------------------------------ AppArmor pass
G1_PROFILE = "svirt-dd48db3e-45d4-4ae4-b4b7-4b72c6d02a1b"
G2_PROFILE = "svirt-00000000-0000-0000-0000-000000000002"  # no line names it
JA_PROFILE = "svirt-699a6113-b1a1-4733-abf3-042532dc3a2e"
G1_UID, G2_UID, JA_UID = 1500000, 1500001, 1500001
#: g1's profile with g2's uid (DAC lets it through) opens g2's disk
APPARMOR_CROSS = (
    'audit: type=1400 audit(1796233138.924:133): apparmor="DENIED" '
    f'operation="open" profile="{G1_PROFILE}" name="{IMAGES}/g2.img" pid=1559 '
    f'comm="python3" requested_mask="r" denied_mask="r" fsuid={G2_UID} ouid={G2_UID}')
#: g1 (profile and uid) opens a world-readable host file outside its profile
APPARMOR_GAP = (
    'audit: type=1400 audit(1796233139.272:135): apparmor="DENIED" '
    f'operation="open" profile="{G1_PROFILE}" name="/var/lib/svirt-lab/host-secret" '
    f'pid=1560 comm="python3" requested_mask="r" denied_mask="r" fsuid={G1_UID} ouid=0')
#: the jail attack's stand-in (python3, as UML's linux): fstat of its stdin,
#: /dev/null opened by the launcher outside the jail; a TCP socket; a mount
APPARMOR_DISCONNECTED = (
    '[  117.976488] audit: type=1400 audit(1796233204.220:181): apparmor="DENIED" '
    'operation="getattr" info="Failed name lookup - disconnected path" error=-13 '
    f'profile="{JA_PROFILE}" name="dev/null" pid=2972 comm="linux-standin" '
    f'requested_mask="r" denied_mask="r" fsuid={JA_UID} ouid=0')
APPARMOR_NETWORK = (
    '[  118.400156] audit: type=1400 audit(1796233204.640:191): apparmor="DENIED" '
    f'operation="create" profile="{JA_PROFILE}" pid=2972 comm="linux-standin" '
    'family="inet" sock_type="stream" protocol=0 requested_mask="create" '
    'denied_mask="create"')
APPARMOR_MOUNT = (
    '[  118.471341] audit: type=1400 audit(1796233204.712:192): apparmor="DENIED" '
    'operation="mount" info="failed mntpnt match" error=-13 '
    f'profile="{JA_PROFILE}" name="/tmp/svirt-mnt/" pid=2972 comm="linux-standin" '
    'fstype="tmpfs" srcname="none"')


def record(name: str, uuid: str, slot: int, ctx: str | None, uid: int) -> Record:
    labels = {"dac": Label("dac", f"{uid}:{uid}", f"{uid}:{uid}", "", "")}
    if ctx is not None:
        level = ctx.split(":", 3)[3]
        labels["selinux"] = Label("selinux", ctx, f"{IMAGE}:{level.split(':', 1)[1]}",
                                  CONTENT, SHARED)
    else:
        labels["apparmor"] = Label("apparmor", f"svirt-{uuid}", "", "", "")
    return Record(name, uuid, "qemu" if name == "g1" else "uml", slot,
                  ProcessId(os.getpid(), 0), labels, created=1796232000.0)


def disk(rec: Record, ino: int) -> ObjectEntry:
    holder = {"access": "rw", "slot": rec.slot,
              "labels": {k: v.to_dict() for k, v in rec.labels.items()}}
    return ObjectEntry(os.makedev(254, 0), ino, f"{IMAGES}/{rec.name}.img", {rec.name: holder})


def run(lines: Sequence[str], records: Sequence[Record], tables: Sequence[ObjectEntry]
        ) -> list[Finding]:
    return explain([("dmesg", line) for line in lines], records, tables)


def test_selinux_cross_guest_and_mislabelled() -> None:
    g1 = record("g1", "11111111-1111-1111-1111-111111111111", 0, G1_CTX, G1_UID)
    g2 = record("g2", "22222222-2222-2222-2222-222222222222", 1, G2_CTX, G2_UID)
    tables = [disk(g1, 16811), disk(g2, 16813)]
    x, m = run([SELINUX_CROSS, SELINUX_MISLABELLED], [g1, g2], tables)
    assert (x.classification, x.guest, x.target_guest) == (CROSS_GUEST, "g1", "g2")
    assert x.object == f"{IMAGES}/g2.img" and x.guest_by == "MCS pair c242,c921"
    assert x.denial.time == 1796232564.592 and x.denial.ino == 16813
    assert "reaching guest g2's file" in x.summary
    assert (m.classification, m.guest, m.object) == (MISLABELLED, "g1", f"{IMAGES}/g1.img")
    assert m.label == f"{IMAGE}:c1000,c1001" and m.wanted == f"{IMAGE}:c242,c921"


def test_selinux_kmsg_records() -> None:
    g1 = record("g1", "11111111-1111-1111-1111-111111111111", 0, KMSG_G1_CTX, G1_UID)
    g2 = record("g2", "22222222-2222-2222-2222-222222222222", 1, KMSG_G2_CTX, G2_UID)
    found = explain([("kmsg", line) for line in SELINUX_KMSG], [g1, g2],
                    [disk(g1, 16811), disk(g2, 16813)], since=1796233341.0, boot=1796233312.0)
    assert [(f.classification, f.guest, f.target_guest, f.object) for f in found] == [
        (CROSS_GUEST, "g1", "g2", f"{IMAGES}/g2.img"),
        (MISLABELLED, "g1", None, f"{IMAGES}/g1.img")]
    # the audit stamp, not the record's monotonic one, is the time
    assert [f.denial.time for f in found] == [1796233341.136, 1796233341.528]
    assert found[0].denial.event == "1796233341.136:123"


def test_apparmor_cross_guest_and_policy_gap() -> None:
    g1 = record("g1", G1_PROFILE.removeprefix("svirt-"), 0, None, G1_UID)
    g2 = record("g2", G2_PROFILE.removeprefix("svirt-"), 1, None, G2_UID)
    x, gap = run([APPARMOR_CROSS, APPARMOR_GAP], [g1, g2], [disk(g1, 1), disk(g2, 2)])
    assert (x.classification, x.guest, x.target_guest) == (CROSS_GUEST, "g1", "g2")
    assert x.object == f"{IMAGES}/g2.img" and x.guest_by == f"profile {G1_PROFILE}"
    # Linux 6.1 writes no class="file": the operation says it is one
    assert "reaching guest g2's file" in x.summary and x.denial.perms == ("r",)
    assert (gap.classification, gap.guest, gap.target_guest) == (POLICY_GAP, "g1", None)
    assert gap.rule == "/var/lib/svirt-lab/host-secret r,"
    assert "denied r (open) on file /var/lib/svirt-lab/host-secret" in gap.summary


def test_apparmor_disconnected_path_network_and_mount() -> None:
    ja = record("ja", JA_PROFILE.removeprefix("svirt-"), 1, None, JA_UID)
    d, n, m = run([APPARMOR_DISCONNECTED, APPARMOR_NETWORK, APPARMOR_MOUNT], [ja], [])
    assert all(f.guest == "ja" and f.classification == POLICY_GAP for f in (d, n, m))
    # no path rule names a path outside the jail's root
    assert d.object == "dev/null" and d.rule == "flags=(attach_disconnected)"
    # a network mask is a word, not letters
    assert n.denial.perms == ("create",) and n.rule == "network inet stream,"
    assert "denied create (create)" in n.summary
    assert m.rule == "mount fstype=tmpfs none -> /tmp/svirt-mnt/,"
