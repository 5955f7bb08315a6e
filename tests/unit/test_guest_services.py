"""The seed and the agent port as data: spec keys, argv, resources, and the
private read-only access every driver gives the seed (this guest alone).

The golden argv of a spec with both is ``golden/qemu_agent_seed.json``; the
golden files of the older specs do not change (tests/unit/test_argv.py).
"""

from __future__ import annotations

import os
import stat
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.backends.base import AGENT_FD, FIRST_EXTRA_FD, Prepared
from svirt.backends.qemu import QemuBackend
from svirt.cli.exec import guest_side
from svirt.cli.parser import build_parser
from svirt.errors import SecurityError, SpecError
from svirt.launcher.objects import _conflicts
from svirt.procfs import LiveProcesses
from svirt.resources import Access, Resource, ResourceKind, seed_path
from svirt.security.apparmor_profile import object_rules
from svirt.security.base import Label, PlannedObject
from svirt.security.dac import ACL_XATTR, DacDriver, parse_acl
from svirt.security.selinux import SELinuxDriver
from svirt.security.smack import SmackDriver
from svirt.spec import Accel, Backend, CloudInit, GuestSpec, load_spec, spec_to_mapping
from svirt.spec.values import MAX_NICS

from .test_argv import check_golden, run_dir

UUID = uuidlib.UUID("3c9a7e52-8d41-4f06-b2e7-5a1d0c6f9b38")
UID = 4_300_007


class NoProcesses(LiveProcesses):
    @property
    def uids(self) -> set[int]:
        return set()

    @property
    def contexts(self) -> set[str]:
        return set()


def spec_with(tmp_path: Path, **more: object) -> GuestSpec:
    (tmp_path / "img").mkdir(exist_ok=True)
    return GuestSpec(name="svc", kernel=tmp_path / "img" / "vmlinuz", uuid=UUID,
                     accel=Accel.TCG, memory=128, **more)  # type: ignore[arg-type]


# ------------------------------------------------------------------ spec

def test_spec_keys_from_toml(tmp_path: Path) -> None:
    (tmp_path / "ud").write_text("#cloud-config\n")
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\nkernel = "k"\nagent = true\n[cloud_init]\n'
                    'user_data_file = "ud"\nmeta_data = {role = "web", n = 2}\n'
                    'ssh_authorized_keys = ["ssh-ed25519 AAAA x"]\n')
    spec = load_spec(path)
    assert spec.agent and spec.cloud_init is not None
    assert spec.cloud_init.user_data_file == tmp_path / "ud"
    assert spec.cloud_init.meta_data == {"role": "web", "n": 2}
    assert spec_to_mapping(spec)["cloud_init"]["user_data_file"] == str(tmp_path / "ud")
    assert not GuestSpec(name="x", kernel=Path("/k")).agent  # off unless asked for


@pytest.mark.parametrize(("more", "key", "words"), [
    (lambda: {"backend": Backend.UML, "agent": True}, "agent", "no guest agent port"),
    (lambda: {"backend": Backend.LGUEST, "cloud_init": CloudInit()}, "cloud_init",
     "no CD-ROM"),
    (lambda: {"cloud_init": CloudInit(user_data="x", user_data_file=Path("/f"))},
     "cloud_init.user_data", "not both"),
    (lambda: {"cloud_init": CloudInit(meta_data={"Bad Key": "x"})}, "cloud_init.meta_data",
     "keys"),
    (lambda: {"cloud_init": CloudInit(meta_data={"k": 1.5})},  # type: ignore[dict-item]
     "cloud_init.meta_data", "values"),
    (lambda: {"agent": "yes"}, "agent", "true/false"),
])
def test_spec_refusals(tmp_path: Path, more: Callable[[], dict[str, object]], key: str,
                       words: str) -> None:
    with pytest.raises(SpecError) as err:
        spec_with(tmp_path, **more())
    assert err.value.key == key and words in err.value.message


def test_uml_agent_refusal_has_a_hint(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        spec_with(tmp_path, backend=Backend.UML, agent=True)
    assert err.value.hint and "console shell" in err.value.hint


# ------------------------------------------------------------------ argv, resources

def test_golden_qemu_agent_seed(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, agent=True, cloud_init=CloudInit(user_data="#cloud-config\n"))
    prepared = Prepared(run_dir=run_dir(tmp_path), accel=Accel.TCG)
    argv = check_golden("qemu_agent_seed", QemuBackend().command(spec, prepared).argv, tmp_path)
    assert "socket,id=qga0,fd=30,server=on,wait=off" in argv
    assert "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0" in argv
    assert "file=$TMP/run/seed.iso,format=raw,if=none,id=cidata,readonly=on" in argv
    assert AGENT_FD >= FIRST_EXTRA_FD + MAX_NICS  # never a tap's


def test_seed_resource_is_private_read_only(tmp_path: Path) -> None:
    home = run_dir(tmp_path)
    plain = QemuBackend().resources(spec_with(tmp_path), home)
    assert all(r.kind is not ResourceKind.SEED for r in plain)
    spec = spec_with(tmp_path, cloud_init=CloudInit())
    seeds = [r for r in QemuBackend().resources(spec, home) if r.kind is ResourceKind.SEED]
    assert seeds == [Resource(seed_path(home), Access.PRIVATE_RO, ResourceKind.SEED)]
    assert seed_path(home).parent == home.parent  # root's run dir, not the guest's home


def test_private_read_only_conflicts_with_every_other_holder() -> None:
    for other in Access:
        assert _conflicts(Access.PRIVATE_RO, other) and _conflicts(other, Access.PRIVATE_RO)
    assert not _conflicts(Access.RO, Access.RO)
    assert Access.PRIVATE_RO.read_only and Access.RO.read_only and not Access.RW.read_only


# ------------------------------------------------------------------ the drivers

def test_selinux_and_smack_give_it_the_guests_own_label(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    se = SELinuxDriver(launcher_context="system_u:system_r:unconfined_t:s0-s0:c0.c1023",
                       domain_context="system_u:system_r:svirt_t:s0",
                       image_context="system_u:object_r:svirt_image_t:s0",
                       content_context="system_u:object_r:virt_content_t:s0", enforcing=True)
    label = se.label_for(spec, 0, [], NoProcesses())
    seed = PlannedObject(Resource(tmp_path / "seed.iso", Access.PRIVATE_RO, ResourceKind.SEED))
    shared = PlannedObject(Resource(tmp_path / "k", Access.RO, ResourceKind.KERNEL))
    plan = se.plan(spec, label, [seed, shared])
    assert plan.objects[0].setting == label.image  # svirt_image_t:s0:cA,cB: MCS keeps others out
    assert label.image.endswith(label.process.split(":", 3)[3])
    assert plan.objects[1].setting == label.content  # unchanged for shared content
    smack = Label("smack", "svirt-3", "svirt-3", "_", "svirt-shared")
    assert smack.for_access(Access.PRIVATE_RO) == "svirt-3"
    assert SmackDriver().rules_for(smack, [Access.PRIVATE_RO]) == []


def test_apparmor_reads_it(tmp_path: Path) -> None:
    rules = object_rules(tmp_path / "seed.iso", Access.PRIVATE_RO, ResourceKind.SEED, False)
    assert [(r.path, r.perms) for r in rules] == [(str(tmp_path / "seed.iso"), "rk")]


def dac_label() -> Label:
    ids = f"{UID}:{UID}"
    return Label("dac", ids, ids, ids, ids)


@pytest.mark.skipif(os.geteuid() != 0, reason="ACLs on root's file need root")
def test_dac_acl_for_this_uid_alone(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"cidata")
    seed.chmod(0o400)
    dac = DacDriver(uid_base=4_300_000)
    fd = os.open(seed, os.O_PATH)
    try:
        st = os.fstat(fd)
        original = dac.snapshot(fd)
        assert dac.wants_change(fd, st.st_mode, Access.PRIVATE_RO, dac_label())
        dac.apply(fd, st.st_mode, Access.PRIVATE_RO, dac_label())
        entries = parse_acl(os.getxattr(seed, ACL_XATTR))
        assert (0x02, 4, UID) in entries and seed.stat().st_uid == 0
        dac.restore(fd, original, dac_label(), last=True)
        assert ACL_XATTR not in os.listxattr(seed)
        assert stat.S_IMODE(seed.stat().st_mode) == 0o400
    finally:
        os.close(fd)
    seed.chmod(0o444)  # readable by all: not private, refused
    fd = os.open(seed, os.O_PATH)
    try:
        with pytest.raises(SecurityError):
            dac.apply(fd, os.fstat(fd).st_mode, Access.PRIVATE_RO, dac_label())
    finally:
        os.close(fd)


def test_dac_plan_of_a_seed(tmp_path: Path) -> None:
    obj = PlannedObject(Resource(tmp_path / "seed.iso", Access.PRIVATE_RO, ResourceKind.SEED),
                        None, stat.S_IFREG | 0o400)
    plan = DacDriver(uid_base=4_300_000).plan(spec_with(tmp_path), dac_label(), [obj])
    assert plan.objects[0].change and plan.objects[0].setting == f"ACL user:{UID}:r--"


# ------------------------------------------------------------------ the CLI's grammar

def test_exec_keeps_argv_as_given() -> None:
    args = build_parser().parse_args(["exec", "g", "--", "sh", "-c", "echo -- x", "--", "-n"])
    assert args.command == ["sh", "-c", "echo -- x", "--", "-n"]  # only the first "--" goes
    assert build_parser().parse_args(["exec", "g", "ls", "-l"]).command == ["ls", "-l"]


@pytest.mark.parametrize(("text", "side"), [
    ("g:/etc/hosts", ("g", "/etc/hosts")),
    ("/tmp/a:b", (None, "/tmp/a:b")),
    ("./g:x", (None, "./g:x")),
    ("g:", (None, "g:")),
    ("-g:/x", (None, "-g:/x")),
    ("plain", (None, "plain")),
])
def test_cp_sides(text: str, side: tuple[str | None, str]) -> None:
    assert guest_side(text) == side
