"""svirt explain: denials parsed from each log format and mapped to guests.

A real Registry in a temporary directory holds two guests' records (web1,
db1) and object tables for real files (their device and inode numbers);
the log lines are the kernel's formats (kmsg records, audit.log, journal /
syslog text), written out here.  No kernel, SELinux or AppArmor needed.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import pytest

from svirt import cli
from svirt.explain import (
    CROSS_GUEST,
    MISLABELLED,
    POLICY_GAP,
    ExplainError,
    Finding,
    ObjectEntry,
    explain,
    gather,
    load_tables,
    parse_line,
    parse_lines,
    parse_since,
    read_kmsg,
    read_lines,
)
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.procfs import ProcessId, start_time
from svirt.security.base import Label

WEB_UUID = str(uuid.UUID(int=1))
DB_UUID = str(uuid.UUID(int=2))
IMG = "system_u:object_r:svirt_image_t:s0"
CONTENT = "system_u:object_r:virt_content_t:s0"
WEB_CTX = "system_u:system_r:svirt_t:s0:c10,c20"
DB_CTX = "system_u:system_r:svirt_t:s0:c30,c40"
T0 = 1_700_000_000.0


def labels(ctx: str, uid: int, smack: str) -> dict[str, Label]:
    level = ctx.split(":", 3)[3]
    return {
        "selinux": Label("selinux", ctx, f"{IMG}:{level.split(':', 1)[1]}", CONTENT, IMG),
        "dac": Label("dac", f"{uid}:{uid}", f"{uid}:{uid}", "", ""),
        "smack": Label("smack", smack, smack, "_", "svirt-shared"),
    }


class Host:
    """Two guests in a real registry, and the files they hold."""

    def __init__(self, tmp: Path) -> None:
        self.registry = Registry(tmp / "run", tmp / "state")
        self.dir = tmp / "images"
        self.dir.mkdir()
        me = ProcessId.of(os.getpid())
        self.web = Record("web1", WEB_UUID, "qemu", 3, me,
                          labels(WEB_CTX, 1760003, "svirt-3"), created=T0 - 3600)
        self.db = Record("db1", DB_UUID, "uml", 4, me,
                         labels(DB_CTX, 1760004, "svirt-4"), created=T0 - 3600)
        for r in (self.web, self.db):
            self.registry.save(r)
        self.files: dict[str, Path] = {}
        self.hold("web1.img", self.web, "rw")
        self.hold("web1.log", self.web, "rw")
        self.hold("db1.img", self.db, "rw")
        self.hold("vmlinuz", self.web, "ro", self.db)

    def hold(self, name: str, record: Record, access: str, *more: Record) -> None:
        path = self.dir / name
        path.write_bytes(b"x")
        st = path.stat()
        holders = {r.name: {"access": access, "slot": r.slot,
                            "labels": {k: v.to_dict() for k, v in r.labels.items()}}
                   for r in (record, *more)}
        table = {"path": str(path), "originals": {}, "holders": holders}
        (self.registry.objects / f"{st.st_dev}-{st.st_ino}.json").write_text(json.dumps(table))
        self.files[name] = path

    def ino(self, name: str) -> int:
        return self.files[name].stat().st_ino

    def explain(self, lines: list[str], **kwargs: object) -> list[Finding]:
        tables, problems = load_tables(self.registry.objects)
        assert problems == []
        return explain([("test", line) for line in lines], self.registry.records(), tables,
                       **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def avc(perms: str, name: str, ino: int, scontext: str, tcontext: str, tclass: str = "file",
        pid: int = 4242, serial: int = 456, extra: str = "") -> str:
    return (f"avc:  denied  {{ {perms} }} for  pid={pid} comm=\"qemu-system-x86\" "
            f"name=\"{name}\" dev=\"vda\" ino={ino} {extra}scontext={scontext} "
            f"tcontext={tcontext} tclass={tclass} permissive=0")


def kmsg(body: str, serial: int = 456, usec: int = 5678901) -> str:
    return f"5,1234,{usec},-;audit: type=1400 audit({T0:.3f}:{serial}): {body}"


def audit_log(body: str, serial: int = 457, kind: str = "AVC") -> str:
    return f"type={kind} msg=audit({T0 + 100:.3f}:{serial}): {body}"


def journal(body: str, serial: int = 460) -> str:
    return (f"Nov 14 22:15:00 host kernel: audit: type=1400 audit({T0 + 200:.3f}:{serial}): "
            f"{body}")


# ------------------------------------------------------------- SELinux
def test_cross_guest_names_both_guests_and_the_disk(host: Host) -> None:
    line = kmsg(avc("read write", "db1.img", host.ino("db1.img"), WEB_CTX,
                    f"{IMG}:c30,c40"))
    [f] = host.explain([line])
    assert f.classification == CROSS_GUEST
    assert (f.guest, f.target_guest) == ("web1", "db1")
    assert f.object == str(host.files["db1.img"])
    assert "sVirt stopped guest web1 from reaching guest db1's file" in f.summary
    assert f.rule is None
    assert f.denial.time == T0 and f.denial.event == f"{T0:.3f}:456"
    assert f.guest_by == "MCS pair c10,c20"


def test_policy_gap_gives_the_audit2allow_rule(host: Host) -> None:
    line = audit_log(avc("write read", "web1.img", host.ino("web1.img"), WEB_CTX,
                         f"{IMG}:c10,c20"))
    [f] = host.explain([line])
    assert f.classification == POLICY_GAP
    assert f.guest == "web1" and f.target_guest is None
    assert f.rule == "allow svirt_t svirt_image_t:file { read write };"
    assert "its own" in f.summary and str(host.files["web1.img"]) in f.summary


def test_policy_gap_single_permission_and_self(host: Host) -> None:
    one = audit_log(avc("getattr", "null", 5, WEB_CTX, "system_u:object_r:null_device_t:s0",
                        tclass="chr_file"))
    cap = audit_log(f"avc:  denied  {{ sys_admin }} for  pid=4242 comm=\"qemu-system-x86\" "
                    f"capability=21  scontext={WEB_CTX} tcontext={WEB_CTX} "
                    "tclass=capability permissive=0", serial=458)
    f1, f2 = host.explain([one, cap])
    assert f1.rule == "allow svirt_t null_device_t:chr_file getattr;"
    assert "a shared or system" in f1.summary
    assert f2.rule == "allow svirt_t self:capability sys_admin;"
    assert f2.object == "capability sys_admin"


def test_mislabelled_object_of_the_guest(host: Host) -> None:
    line = journal(avc("append", "web1.log", host.ino("web1.log"), WEB_CTX, IMG))
    [f] = host.explain([line])
    assert f.classification == MISLABELLED
    assert f.guest == "web1"
    assert f.label == IMG
    assert f.wanted == "system_u:object_r:svirt_image_t:s0:c10,c20"
    assert "svirt gives web1's rw objects" in f.summary


def test_mislabelled_stale_level_and_invalid_context(host: Host) -> None:
    stale = audit_log(avc("read", "other.img", 999999, WEB_CTX, f"{IMG}:c1,c2"))
    bogus = audit_log(avc("read", "x.img", 999998, WEB_CTX, "system_u:object_r:unlabeled_t:s0",
                          extra='trawcon="system_u:object_r:no_such_t:s0" '), serial=470)
    f1, f2 = host.explain([stale, bogus])
    assert f1.classification == MISLABELLED and "no guest svirt knows" in f1.summary
    assert f2.classification == MISLABELLED and f2.label == "system_u:object_r:no_such_t:s0"


def test_read_only_object_has_the_content_label(host: Host) -> None:
    ok = audit_log(avc("execute", "vmlinuz", host.ino("vmlinuz"), DB_CTX, CONTENT))
    [f] = host.explain([ok])
    assert f.classification == POLICY_GAP  # the right label: the policy lacks the rule
    assert f.guest == "db1" and "its own" in f.summary


def test_launcher_denial_is_no_guest(host: Host) -> None:
    line = audit_log(avc("read", "shadow", 77, "system_u:system_r:svirtd_t:s0-s0:c0.c1023",
                         "system_u:object_r:shadow_t:s0"))
    [f] = host.explain([line])
    assert f.guest is None and f.classification == POLICY_GAP
    assert f.summary.startswith("no guest was denied")
    assert f.rule == "allow svirtd_t shadow_t:file read;"


def test_unknown_guest_on_a_known_guests_disk_is_cross_guest(host: Host) -> None:
    line = audit_log(avc("read", "db1.img", host.ino("db1.img"),
                         "system_u:system_r:svirt_t:s0:c5,c6", f"{IMG}:c30,c40"))
    [f] = host.explain([line])
    assert f.classification == CROSS_GUEST and f.guest is None and f.target_guest == "db1"
    assert "an unknown guest" in f.summary


def test_path_record_of_the_same_event_gives_the_full_path(host: Host) -> None:
    ino = 123456789
    path = audit_log(f'item=0 name="/srv/vm/web1-extra.img" inode={ino} dev=fd:00 '
                     'mode=0100600 ouid=1760003', kind="PATH")
    line = audit_log(avc("write", "web1-extra.img", ino, WEB_CTX, "system_u:object_r:etc_t:s0"))
    [f] = host.explain([line, path])
    assert f.denial.path == "/srv/vm/web1-extra.img" and f.denial.dev == "fd:00"
    assert f.object == "/srv/vm/web1-extra.img"
    assert f.rule == "allow svirt_t etc_t:file write;"


def test_same_event_in_kmsg_and_audit_log_is_one_denial() -> None:
    body = avc("read", "a", 1, WEB_CTX, f"{IMG}:c30,c40")
    both = [("kmsg", kmsg(body)),
            ("audit.log", f"type=AVC msg=audit({T0:.3f}:456): {body}")]
    assert len(parse_lines(both)) == 1


# ---------------------------------------------------- AppArmor and SMACK
def apparmor(profile: str, name: str, mask: str = "r", ouid: int = 0, serial: int = 461,
             op: str = "open") -> str:
    return journal(f'apparmor="DENIED" operation="{op}" class="file" profile="{profile}" '
                   f'name={name} pid=4242 comm="qemu-system-x86" requested_mask="{mask}" '
                   f'denied_mask="{mask}" fsuid=1760003 ouid={ouid}', serial)


def test_apparmor_gap_and_cross_guest(host: Host) -> None:
    gap = apparmor(f"svirt-{WEB_UUID}", '"/var/lib/x.img"')
    cross = apparmor(f"svirt-{WEB_UUID}", f'"{host.files["db1.img"]}"', "rw", 1760004, 462)
    hexed = apparmor(f"svirt-{WEB_UUID}", "2F7661722F6C69622F7820792E696D67", "wc", 0, 463)
    f1, f2, f3 = host.explain([gap, cross, hexed])
    assert f1.guest == "web1" and f1.guest_by == f"profile svirt-{WEB_UUID}"
    assert f1.classification == POLICY_GAP and f1.rule == "/var/lib/x.img r,"
    assert f2.classification == CROSS_GUEST and f2.target_guest == "db1"
    assert f3.denial.name == "/var/lib/x y.img" and f3.rule == '"/var/lib/x y.img" w,'


def test_apparmor_capability_and_network_rules(host: Host) -> None:
    cap = journal(f'apparmor="DENIED" operation="capable" class="cap" profile="svirt-{WEB_UUID}"'
                  ' pid=4242 comm="qemu-system-x86" capability=12  capname="net_admin"')
    net = journal(f'apparmor="DENIED" operation="create" class="net" profile="svirt-{DB_UUID}" '
                  'pid=4243 comm="linux" family="inet6" sock_type="raw" protocol=0 '
                  'requested_mask="create" denied_mask="create"', 465)
    f1, f2 = host.explain([cap, net])
    assert f1.rule == "capability net_admin," and f1.guest == "web1"
    assert f2.rule == "network inet6 raw," and f2.guest == "db1"


def smack(subject: str, obj: str, requested: str, rest: str, serial: int = 480) -> str:
    # the format of security/smack/smack_access.c smack_log_callback, then
    # lsm_audit.c dump_common_audit_data (pid, comm, then the object)
    return kmsg(f'lsm=SMACK fn=smack_inode_permission action=denied subject="{subject}" '
                f'object="{obj}" requested={requested} pid=4242 comm="linux" {rest}', serial)


def test_smack_cross_guest_gap_and_mislabel(host: Host) -> None:
    cross = smack("svirt-3", "svirt-4", "rw",
                  f'name="db1.img" dev="vda" ino={host.ino("db1.img")}')
    gap = smack("svirt-3", "_", "w", f'path="{host.files["vmlinuz"]}" dev="vda" ino=1', 481)
    wrong = smack("svirt-3", "svirt-shared", "rw",
                  f'name="web1.img" dev="vda" ino={host.ino("web1.img")}', 482)
    differ = kmsg('lsm=SMACK fn=smack_task_kill action=denied subject="svirt-3" '
                  'object="svirt-9" labels_differ pid=4242 comm="linux" opid=1 ocomm="init"',
                  483)
    f1, f2, f3, f4 = host.explain([cross, gap, wrong, differ])
    assert (f1.classification, f1.guest, f1.target_guest) == (CROSS_GUEST, "web1", "db1")
    assert f1.guest_by == "SMACK label svirt-3"
    assert f2.classification == POLICY_GAP and f2.rule == "svirt-3 _ w"
    assert f3.classification == MISLABELLED and f3.wanted == "svirt-3"
    assert f4.classification == POLICY_GAP and f4.rule is None and "labels_differ" in f4.summary


# ------------------------------------------------------------ pid, uid
class FakeProcesses:
    def __init__(self, uids: dict[int, int]) -> None:
        self.uids = uids

    def uid(self, pid: int) -> int | None:
        return self.uids.get(pid)

    def start(self, pid: int) -> int | None:
        return None


def test_pid_maps_by_hypervisor_pid_and_start_time(host: Host) -> None:
    me = os.getpid()
    host.db.hypervisor = ProcessId(me, start_time(me) or 0)
    host.registry.save(host.db)
    line = audit_log(f'apparmor="DENIED" operation="open" profile="unconfined-helper" '
                     f'name="/etc/shadow" pid={me} comm="linux" requested_mask="r" '
                     'denied_mask="r" fsuid=0 ouid=0')
    [f] = host.explain([line])
    assert f.guest == "db1" and f.guest_by == f"hypervisor pid {me}"


def test_pid_maps_by_the_dac_uid_that_owns_it(host: Host) -> None:
    line = audit_log(avc("read", "x", 1, "system_u:system_r:svirt_t:s0:c7,c9",
                         "system_u:object_r:etc_t:s0", pid=777))
    tables, _ = load_tables(host.registry.objects)
    [f] = explain([("t", line)], host.registry.records(), tables,
                  processes=FakeProcesses({777: 1760004}))
    assert f.guest == "db1" and f.guest_by == "pid 777 runs as uid 1760004"


def test_uid_from_the_syscall_record(host: Host) -> None:
    line = audit_log(avc("read", "x", 1, "system_u:system_r:svirt_t:s0:c7,c9",
                         "system_u:object_r:etc_t:s0", pid=778))
    sys_rec = audit_log("arch=c000003e syscall=257 success=no exit=-13 pid=778 uid=1760003 "
                        'euid=1760003 fsuid=1760003 comm="qemu" exe="/usr/bin/qemu"',
                        kind="SYSCALL")
    tables, _ = load_tables(host.registry.objects)
    [f] = explain([("t", sys_rec), ("t", line)], host.registry.records(), tables,
                  processes=FakeProcesses({}))
    assert f.guest == "web1" and f.guest_by == "uid 1760003"


def test_guest_known_only_to_an_object_table(host: Host) -> None:
    host.registry.record_path("db1").unlink()  # released record; its table remembers
    line = audit_log(avc("read", "a", 1, DB_CTX, "system_u:object_r:etc_t:s0"))
    [f] = host.explain([line])
    assert f.guest == "db1"


# ------------------------------------------------------- filters, JSON
def test_since_and_guest_filters(host: Host) -> None:
    old = kmsg(avc("read", "db1.img", host.ino("db1.img"), WEB_CTX, f"{IMG}:c30,c40"))
    new = journal(avc("read", "vmlinuz", host.ino("vmlinuz"), DB_CTX, CONTENT))
    assert len(host.explain([old, new])) == 2
    [f] = host.explain([old, new], since=T0 + 150)
    assert f.guest == "db1"
    assert [x.guest for x in host.explain([old, new], guest="web1")] == ["web1"]
    # db1 is the target of web1's attempt: it concerns db1 too
    assert len(host.explain([old, new], guest="db1")) == 2
    assert host.explain([old, new], guest="nobody") == []


def test_kmsg_record_without_the_audit_head_is_not_a_record() -> None:
    """The kernel prints every audit record as ``audit: type=N audit(STAMP): ``."""
    line = ("5,99,2500000,-;audit: avc:  denied  { read } for  pid=1 comm=\"x\" "
            f"scontext={WEB_CTX} tcontext={IMG} tclass=file permissive=0")
    assert parse_line(line, "kmsg", boot=1000.0) is None


def test_parse_since() -> None:
    now = 10_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("10 minutes ago", now) == now - 600
    assert parse_since("90s", now) == now - 90
    assert parse_since("1d", now) == now - 86400
    assert parse_since("@1700000000", now) == T0
    assert parse_since("2023-11-14T22:13:20+00:00", now) == T0
    assert parse_since("2023-11-14T22:13:20Z", now) == T0
    for bad in ("yesterday-ish", "10 parsecs", "", "12:00:00:00", "x" * 50):
        with pytest.raises(ExplainError):
            parse_since(bad, now)


def test_cli_json_one_object_per_denial(host: Host, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("SVIRT_RUN_DIR", str(host.registry.root))
    monkeypatch.setenv("SVIRT_STATE_DIR", str(host.registry.state))
    log = tmp_path / "audit.log"
    log.write_text("\n".join([
        audit_log(avc("read write", "db1.img", host.ino("db1.img"), WEB_CTX,
                      f"{IMG}:c30,c40")),
        "garbage",
        audit_log(avc("write", "web1.img", host.ino("web1.img"), WEB_CTX, f"{IMG}:c10,c20"),
                  serial=999),
    ]) + "\n")
    assert cli.main(["explain", str(log), "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["classification"] for o in out] == [CROSS_GUEST, POLICY_GAP]
    assert out[0]["guest"] == "web1" and out[0]["target_guest"] == "db1"
    assert out[0]["object"] == str(host.files["db1.img"])
    assert out[1]["rule"] == "allow svirt_t svirt_image_t:file write;"
    assert out[0]["permissions"] == ["read", "write"] and out[0]["permissive"] is False
    # text
    assert cli.main(["explain", str(log), "--guest", "db1"]) == 0
    text = capsys.readouterr().out
    assert "guest web1 (MCS pair c10,c20; pid 4242 qemu-system-x86)" in text
    assert "cross-guest: sVirt stopped guest web1 from reaching guest db1's file" in text
    assert "allow" not in text
    # nothing found
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert cli.main(["explain", str(empty)]) == 0
    assert capsys.readouterr().out == "no denials found\n"
    assert cli.main(["explain", str(empty), "--since", "soon"]) == 1
    assert "--since 'soon': not a time" in capsys.readouterr().err


# ----------------------------------------------------- hostile input
GARBAGE = [
    "",
    "\x00\x01\x02 binary",
    "avc:  denied  { read",
    "avc:  denied  { read } for pid=1",  # no contexts
    'apparmor="DENIED" operation="open" name="/x"',  # no profile
    'lsm=SMACK fn=x action=granted subject="a" object="b" requested=r',
    "type=AVC msg=audit(99999999999999999999999:1): avc: denied",
    "5,1,notanumber,-;audit: nothing",
    "avc:  denied  { " + "read " * 2000 + "} for scontext=a:b:c tcontext=a:b:c tclass=file",
    "audit(1.1:1): avc:  denied  { x } for  pid=99999999999999999999999 ino=-1 "
    "scontext=: tcontext=: tclass=",
    "name=ZZZZ " * 500,
]


def test_garbage_is_ignored_and_the_real_line_found(host: Host) -> None:
    real = kmsg(avc("read", "db1.img", host.ino("db1.img"), WEB_CTX, f"{IMG}:c30,c40"))
    found = host.explain([*GARBAGE, real])
    assert [f.classification for f in found if f.guest == "web1"] == [CROSS_GUEST]
    for f in found:
        json.dumps(f.to_json())


def test_huge_line_is_skipped_without_being_held(tmp_path: Path) -> None:
    real = kmsg(avc("read", "a", 1, WEB_CTX, IMG))
    data = ("x" * 5_000_000 + real + "\n" + real.replace(":456)", ":457)") + "\n"
            + "y" * 100_000).encode()
    lines = list(read_lines(io.BytesIO(data)))
    assert len(lines) == 1  # the huge line (with a denial at its end) and the tail dropped
    assert parse_line("x" * 100_000 + real) is None
    assert len(parse_lines([("f", x) for x in lines])) == 1


def test_gather_reads_the_audit_log_and_reports_kmsg(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text(audit_log(avc("read", "a", 1, WEB_CTX, IMG)) + "\n")
    lines, problems = gather(None, kmsg=tmp_path / "no-kmsg", audit_log=log)
    assert [s for s, _ in lines] == [str(log)]
    assert len(problems) == 1 and "cannot read the kernel log" in problems[0]
    with pytest.raises(ExplainError):
        gather(None, kmsg=tmp_path / "no-kmsg", audit_log=tmp_path / "none")
    with pytest.raises(ExplainError):
        gather(str(tmp_path / "missing.log"))
    lines, _ = gather("-", stdin=io.BytesIO(b"a\nb\n"))
    assert lines == [("stdin", "a"), ("stdin", "b")]


def test_kmsg_is_read_without_blocking() -> None:
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg is not readable here")
    records = list(read_kmsg())
    assert all(";" in r for r in records[:10])


def test_unreadable_object_table_is_named(tmp_path: Path) -> None:
    (tmp_path / "1-2.json").write_text("{not json")
    (tmp_path / "3-4.json").write_text(json.dumps({"path": "/x", "holders": {"a": {}}}))
    tables, problems = load_tables(tmp_path)
    assert tables == [ObjectEntry(3, 4, "/x", {"a": {}})]
    assert len(problems) == 1 and "1-2.json" in problems[0]


def test_apparmor_spec_profile_maps_when_one_guest_runs_in_it(host: Host) -> None:
    """A spec's own profile (security.label) names its guest when that guest
    alone runs in it; a profile two guests share says nothing, and the denial
    falls back to the fsuid (web1's here)."""
    me = ProcessId.of(os.getpid())
    for name, slot, profile in (("st1", 5, "lab-web"), ("sh1", 6, "lab-shared"),
                                ("sh2", 7, "lab-shared")):
        uid = 1760000 + slot
        host.registry.save(Record(name, str(uuid.UUID(int=slot)), "qemu", slot, me, {
            "apparmor": Label("apparmor", profile, profile, profile, profile),
            "dac": Label("dac", f"{uid}:{uid}", f"{uid}:{uid}", "", "")}, created=T0 - 60))
    own, shared = host.explain([apparmor("lab-web", '"/etc/shadow"'),
                                apparmor("lab-shared", '"/etc/shadow"', serial=470)])
    assert (own.guest, own.guest_by) == ("st1", "profile lab-web")
    assert (shared.guest, shared.guest_by) == ("web1", "uid 1760003")


# ------------------------------------------------------ forged records
def _forged_bodies(host: Host) -> dict[str, str]:
    """A record blaming guest web1 for db1's disk, in each LSM's words."""
    return {
        "selinux": avc("read write", "db1.img", host.ino("db1.img"), WEB_CTX, f"{IMG}:c30,c40"),
        "apparmor": (f'apparmor="DENIED" operation="open" class="file" profile="svirt-{WEB_UUID}"'
                     f' name="{host.files["db1.img"]}" pid=4242 comm="qemu-system-x86" '
                     'requested_mask="rw" denied_mask="rw" fsuid=1760003 ouid=1760004'),
        "smack": ('lsm=SMACK fn=smack_inode_permission action=denied subject="svirt-3" '
                  f'object="svirt-4" requested=rw pid=4242 comm="linux" name="db1.img" '
                  f'dev="vda" ino={host.ino("db1.img")}'),
    }


def _segfault(comm: str, name: str) -> str:
    # arch/x86/mm/fault.c show_signal_msg + print_vma_addr: the file's name last
    return (f"{comm}[4242]: segfault at 0 ip 000055d0c0de1139 sp 00007ffd4c1ec0a0 "
            f"error 6 in {name}[55d0c0de1000+1000] likely on CPU 1 (core 1, socket 0)")


@pytest.mark.parametrize("lsm", ["selinux", "apparmor", "smack"])
def test_a_record_quoted_inside_another_message_is_not_a_denial(host: Host, lsm: str) -> None:
    """Whatever a process names a file, comm or message, its text lands after
    a head the kernel, auditd or the journal wrote: never at the start of an
    audit record.  Each line below would have blamed web1 (cross-guest, on
    db1's disk) when a match anywhere counted."""
    body = _forged_bodies(host)[lsm]
    record = f"audit({T0:.3f}:999): {body}"
    forged = [
        # kmsg: a segfault in a file named after a record, with and without its head
        f"6,2001,9000000,-;{_segfault('x', 'audit: type=1400 ' + record)}",
        f"6,2002,9000000,-;{_segfault('x', record)}",
        # kmsg: a /dev/kmsg write asking for the kernel's facility gets LOG_USER
        f"13,2003,9000000,-;audit: type=1400 {record}",
        f"12,2004,9000000,-;audit: type=1400 {record}",
        # dmesg text (plain, -T, -r of a user record) of the same
        f"[ 9000.000000] {_segfault('x', 'audit: type=1400 ' + record)}",
        f"[Mon Nov 14 22:15:00 2023] {_segfault('x', 'audit: type=1400 ' + record)}",
        f"<13>[ 9000.000000] audit: type=1400 {record}",
        # audit.log: another record type that quotes it (a userspace USER_AVC's
        # msg='...', an ANOM_ABEND's trailing text), and the record mid-line
        f"type=USER_AVC msg=audit({T0:.3f}:998): pid=1 uid=0 auid=4294967295 "
        f"ses=4294967295 msg='{body}'",
        f'type=ANOM_ABEND msg=audit({T0:.3f}:997): auid=0 uid=0 pid=4242 comm="x" sig=11 '
        f"res=1 {body}",
        f"garbage type=AVC msg={record}",
        # a PATH-like record type carrying the body
        f"type=PATH msg={record}",
        # journal / syslog text: a kernel line that is a segfault, a program
        # that is not the kernel, a message that only mentions the transport
        f"Nov 14 22:15:00 host kernel: {_segfault('x', 'audit: type=1400 ' + record)}",
        f"Nov 14 22:15:00 host myapp[12]: audit: type=1400 {record}",
        f"Nov 14 22:15:00 host myapp[12]: host kernel: audit: type=1400 {record}",
        f"Nov 14 22:15:00 host kernel: x[1]: audit[4242]: AVC {body}",
    ]
    assert parse_lines([("forged", line) for line in forged]) == []
    assert host.explain(forged) == []
    # the same record, written by the kernel, auditd or journald, is one
    real = [f"5,2010,9000000,-;audit: type=1400 {record}",
            f"type=AVC msg={record}",
            f"[ 9000.000000] audit: type=1400 {record}",
            f"<5>[ 9000.000000] audit: type=1400 {record}",
            f"Nov 14 22:15:00 host kernel: audit: type=1400 {record}",
            f"2023-11-14T22:15:00+0000 host kernel: [ 9000.000000] audit: type=1400 {record}",
            f"Nov 14 22:15:00 host audit[4242]: AVC {body}"]
    for line in real:
        found = host.explain([line])
        assert [(f.guest, f.denial.lsm) for f in found] == [("web1", lsm)], line
