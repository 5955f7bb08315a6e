"""The AppArmor driver without AppArmor: profile generation, path quoting, the
host probe, the model choice and the driver's plumbing.

This host's kernel has no AppArmor, so ``apparmor_parser`` and
``/proc/self/attr/apparmor/exec`` cannot be used here: loading and removing
go through a fake runner and a fake securityfs directory, and
``change_onexec`` through a fake ``/proc/self/attr``.  The real thing (the
parser accepting these profiles, guests confined by them, the profiles
removed by release and by ``svirt gc``) is ``tests/lab/test_lab_apparmor.py``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from svirt.errors import SecurityError, SpecError, StateError
from svirt.host import Binary, HostInfo, KvmStatus, SELinuxMode, probe_apparmor
from svirt.launcher.registry import Registry
from svirt.resources import Access, ResourceKind
from svirt.security import apparmor
from svirt.security.apparmor import (
    AppArmorDriver,
    base_rules,
    change_onexec,
    plan_profile,
    quote_path,
    render_profile,
    unload_profile,
)
from svirt.security.stack import choose_models
from svirt.spec import Backend, Disk, GuestSpec, Nic, Security, SecurityModel

UUID = uuidlib.UUID("3c9a7e52-8d41-4f06-b2e7-5a1d0c6f9b38")
NAME = f"svirt-{UUID}"
IMG = Path("/var/lib/svirt/images")
BASE = "# a comment line of the abstraction\n  /usr/share/qemu/** r,\n"


def qemu_spec(**kw: object) -> GuestSpec:
    return GuestSpec(name="web", backend=Backend.QEMU, kernel=IMG / "vmlinuz",
                     initrd=IMG / "initrd.img", uuid=UUID, **kw)  # type: ignore[arg-type]


def uml_spec(**kw: object) -> GuestSpec:
    return GuestSpec(name="u1", backend=Backend.UML, kernel=Path("/usr/bin/linux"),
                     memory=128, uuid=UUID, **kw)  # type: ignore[arg-type]


QEMU_OBJECTS = [
    (IMG / "vmlinuz", Access.RO, ResourceKind.KERNEL, False),
    (IMG / "initrd.img", Access.RO, ResourceKind.INITRD, False),
    (IMG / "web.qcow2", Access.RW, ResourceKind.DISK, False),
    (IMG / "base.qcow2", Access.RO, ResourceKind.BACKING, False),
    (IMG / "data.img", Access.SHARED, ResourceKind.DISK, False),
    (Path("/var/log/svirt/web.log"), Access.RW, ResourceKind.CONSOLE_LOG, False),
]


def section(text: str, title: str) -> list[str]:
    """The rule lines of one "# ---- title" section of a rendered profile."""
    part = text.split(f"# ---- {title}", 1)[1]
    lines = []
    for line in part.splitlines()[1:]:
        if line.startswith("  # ----") or line == "}":
            break
        if line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    return lines


# ---------------------------------------------------------------- generator
def test_qemu_profile_holds_exactly_its_objects() -> None:
    plan = plan_profile(qemu_spec(), QEMU_OBJECTS, hypervisor="/usr/bin/qemu-system-x86_64",
                        init="/usr/bin/tini", kvm=False)
    text = render_profile(plan, BASE)
    assert section(text, "this guest's objects") == [
        f'"{IMG}/vmlinuz" rk,  # kernel (ro)',
        f'"{IMG}/initrd.img" rk,  # initrd (ro)',
        f'"{IMG}/web.qcow2" rwk,  # disk (rw)',
        f'"{IMG}/base.qcow2" rk,  # backing (ro)',
        f'"{IMG}/data.img" rwk,  # disk (shared)',
    ]  # and no console log: the launcher writes it, the guest never opens it
    assert section(text, "the hypervisor and its init") == [
        '"/usr/bin/tini" mr,', '"/usr/bin/qemu-system-x86_64" mrix,']
    assert section(text, "this guest's processes") == [
        f"signal (send, receive) peer={NAME},", "signal (receive) peer=unconfined,"]
    assert f"profile {NAME} {{" in text and "flags=" not in text
    assert text.startswith("# AppArmor profile of svirt guest 'web' (qemu)")
    assert "abi <abi/3.0>," in text.splitlines()
    assert "/var/log" not in text and "ptrace" not in text and "/dev/kvm" not in text


def test_kvm_adds_dev_kvm_and_complain_sets_the_flag() -> None:
    plan = plan_profile(qemu_spec(), QEMU_OBJECTS[:1], hypervisor="/usr/bin/qemu-system-x86_64",
                        init=None, kvm=True, complain=True)
    text = render_profile(plan, BASE)
    assert section(text, "this guest's objects")[-1] == '"/dev/kvm" rw,  # KVM'
    assert section(text, "the hypervisor and its init") == [
        '"/usr/bin/qemu-system-x86_64" mrix,']  # unjailed: no tini
    assert f"profile {NAME} flags=(complain) {{" in text


def test_uml_profile_home_shm_mconsole_tun_and_ptrace() -> None:
    home = Path("/run/svirt/guests/u1.d/home")
    spec = uml_spec(disks=(Disk(IMG / "u1.img"),), nics=(Nic(bridge="br0"),))
    objects = [(home, Access.RW, ResourceKind.RUN_DIR, True),
               (IMG / "u1.img", Access.RW, ResourceKind.DISK, False)]
    plan = plan_profile(spec, objects, hypervisor="/usr/bin/linux.uml", init="/usr/bin/tini",
                        kvm=False, control_dir=Path("/run/svirt/ctl"))
    text = render_profile(plan, BASE)
    assert section(text, "this guest's objects") == [
        f'"{home}/" r,  # run-dir (rw)',
        f'"{home}/**" rwk,  # run-dir (rw)',
        f'"{IMG}/u1.img" rwk,  # disk (rw)',
        '"/dev/net/tun" rw,  # UML opens its taps by name',
        '"/dev/shm/" r,  # UML\'s memory file',
        'owner "/dev/shm/**" rwmk,  # UML\'s memory file',
        '"/run/svirt/ctl/mc.*" w,  # mconsole replies',
        # found by the lab's unjailed UML guest: refused quietly (the jail has no ptmx)
        'deny "/dev/ptmx" rw,  # UML\'s pty probe: not needed',
    ]
    assert f"ptrace (trace, tracedby, read, readby) peer={NAME}," in text


def test_shipped_base_is_inlined_whole_and_self_contained() -> None:
    base = base_rules()
    plan = plan_profile(qemu_spec(), [], hypervisor="/usr/bin/qemu-system-x86_64",
                        init=None, kvm=False)
    text = render_profile(plan)
    rules = [line for line in base.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(rules) > 20
    for rule in rules:
        assert rule in text.splitlines(), rule
    # nothing from outside the profile: no include, no capability, no write to /usr
    assert "include" not in text and "#include" not in text
    assert not any(line.strip().startswith("capability") for line in text.splitlines())
    assert not any(line.strip().startswith("/usr") and "w" in line.split()[-1]
                   for line in rules)
    assert (Path(__file__).parents[2] / "policy/apparmor/svirt-base").read_text() == base


# ------------------------------------------------------------------ quoting
@pytest.mark.parametrize(("path", "quoted"), [
    ("/srv/vm/a b.img", '"/srv/vm/a b.img"'),
    ('/srv/vm/say "hi".img', r'"/srv/vm/say \"hi\".img"'),
    ("/srv/vm/*.img", r'"/srv/vm/\*.img"'),
    ("/srv/vm/{a,b}[0-9]?^.img", r'"/srv/vm/\{a,b\}\[0-9\]\?\^.img"'),
    ("/srv/vm/back\\slash", r'"/srv/vm/back\\slash"'),
    ("/srv/vm/comma,hash#.img", '"/srv/vm/comma,hash#.img"'),
    ("/srv/vm/ünïcode.img", '"/srv/vm/ünïcode.img"'),
])
def test_paths_are_quoted_and_escaped(path: str, quoted: str) -> None:
    assert quote_path(path) == quoted


@pytest.mark.parametrize("path", ["relative.img", "/srv/vm/new\nline", "/srv/vm/tab\t",
                                  "/srv/vm/@{HOME}", "/srv/vm/del\x7f"])
def test_paths_apparmor_cannot_name_are_refused(path: str) -> None:
    with pytest.raises(SecurityError):
        quote_path(path)


def test_a_special_path_gives_one_literal_rule() -> None:
    disk = Path('/srv/vm/web "prod" *.img')
    plan = plan_profile(qemu_spec(), [(disk, Access.RW, ResourceKind.DISK, False)],
                        hypervisor="/usr/bin/qemu-system-x86_64", init=None, kvm=False)
    assert section(render_profile(plan, BASE), "this guest's objects") == [
        r'"/srv/vm/web \"prod\" \*.img" rwk,  # disk (rw)']


def test_a_newline_in_a_disk_path_is_refused_not_rendered() -> None:
    plan = plan_profile(qemu_spec(), [(Path("/srv/x\n/etc/shadow r"), Access.RW,
                                       ResourceKind.DISK, False)],
                        hypervisor="/usr/bin/qemu-system-x86_64", init=None, kvm=False)
    with pytest.raises(SecurityError):
        render_profile(plan, BASE)


# -------------------------------------------------------------------- probe
def fake_sys(tmp: Path, enabled: str = "Y", lsm: str = "lockdown,capability,apparmor",
             profiles: bool = True) -> Path:
    (tmp / "module/apparmor/parameters").mkdir(parents=True)
    (tmp / "module/apparmor/parameters/enabled").write_text(enabled + "\n")
    (tmp / "kernel/security/apparmor").mkdir(parents=True)
    (tmp / "kernel/security/lsm").write_text(lsm)
    if profiles:
        (tmp / "kernel/security/apparmor/profiles").write_text("")
    return tmp


def test_probe_sees_apparmor_only_when_enabled_active_and_mounted(tmp_path: Path) -> None:
    assert probe_apparmor(fake_sys(tmp_path / "on")) is True
    assert probe_apparmor(fake_sys(tmp_path / "off", enabled="N")) is False
    # built in and enabled, but SELinux is the active LSM
    assert probe_apparmor(fake_sys(tmp_path / "se", lsm="capability,selinux")) is False
    # securityfs not mounted: apparmor_parser could not load anything
    assert probe_apparmor(fake_sys(tmp_path / "nofs", profiles=False)) is False
    assert probe_apparmor(tmp_path / "nothing") is False


def host(**kw: object) -> HostInfo:
    base: dict[str, object] = dict(
        binaries={"qemu-system-x86_64": Binary("/usr/bin/qemu-system-x86_64", "7.2")},
        kvm=KvmStatus(False, "none"), selinux=SELinuxMode.DISABLED, selinux_mls=False,
        selinux_policy=None, smack=False, lsms=(), lguest_device=False, cpus=2)
    return HostInfo(**{**base, **kw})  # type: ignore[arg-type]


def test_auto_picks_apparmor_with_dac_where_apparmor_is_active() -> None:
    spec = qemu_spec()
    assert choose_models(spec, host(apparmor=True)) == [SecurityModel.APPARMOR,
                                                        SecurityModel.DAC]
    assert choose_models(spec, host()) == [SecurityModel.DAC]
    assert choose_models(spec, host(apparmor=True, selinux=SELinuxMode.ENFORCING)) == [
        SecurityModel.SELINUX, SecurityModel.DAC]
    explicit = GuestSpec(name="web", backend=Backend.QEMU, kernel=IMG / "vmlinuz",
                         security=Security(model=SecurityModel.APPARMOR))
    assert choose_models(explicit, host()) == [SecurityModel.APPARMOR, SecurityModel.DAC]
    with pytest.raises(SecurityError, match="AppArmor is not active"):
        AppArmorDriver().check_available(host())


# ----------------------------------------------------------------- plumbing
class FakeRunner:
    def __init__(self, rc: int = 0, stderr: str = "") -> None:
        self.calls: list[list[str]] = []
        self.rc, self.stderr = rc, stderr

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), self.rc, "", self.stderr)


@pytest.fixture
def parser(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(apparmor, "parser_path", lambda: "/sbin/apparmor_parser")
    return "/sbin/apparmor_parser"


def test_load_writes_a_root_only_file_then_replaces_the_profile(
        tmp_path: Path, parser: str) -> None:
    runner = FakeRunner()
    driver = AppArmorDriver(runner=runner)
    plan = plan_profile(qemu_spec(), QEMU_OBJECTS, hypervisor="/usr/bin/qemu-system-x86_64",
                        init=None, kvm=False)
    target = tmp_path / "apparmor.profile"
    target.symlink_to("/etc/passwd")  # replaced, never followed
    text = driver.load(plan, target)
    assert not target.is_symlink() and target.read_text() == text
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert runner.calls == [[parser, "--replace", "--skip-cache", str(target)]]
    assert [p.name for p in tmp_path.iterdir()] == ["apparmor.profile"]  # no temp file left


def test_a_profile_the_parser_refuses_is_a_security_error(tmp_path: Path, parser: str) -> None:
    driver = AppArmorDriver(runner=FakeRunner(1, "syntax error at line 7"))
    plan = plan_profile(qemu_spec(), [], hypervisor="/usr/bin/qemu-system-x86_64", init=None,
                        kvm=False)
    with pytest.raises(SecurityError, match="syntax error at line 7") as err:
        driver.load(plan, tmp_path / "apparmor.profile")
    assert err.value.label == NAME


def securityfs(tmp: Path, *loaded: str) -> Path:
    fs = tmp / "securityfs"
    fs.mkdir()
    (fs / "profiles").write_text("".join(f"{n} (enforce)\n" for n in loaded)
                                 + "/usr/sbin/ntpd (enforce)\n")
    return fs


def test_unload_removes_a_loaded_profile_with_the_parser(tmp_path: Path, parser: str) -> None:
    fs = securityfs(tmp_path, NAME)
    profile = tmp_path / "apparmor.profile"
    profile.write_text("profile ...")
    runner = FakeRunner()
    assert unload_profile(NAME, profile, runner=runner, securityfs=fs) is True
    assert runner.calls == [[parser, "--remove", "--skip-cache", str(profile)]]


def test_unload_of_a_profile_not_loaded_is_no_error(tmp_path: Path, parser: str) -> None:
    runner = FakeRunner()
    assert unload_profile(NAME, tmp_path / "gone", runner=runner,
                          securityfs=securityfs(tmp_path)) is False
    assert runner.calls == []  # a reboot took it: nothing to do


def test_unload_without_its_file_writes_the_name_to_remove(tmp_path: Path, parser: str) -> None:
    fs = securityfs(tmp_path, NAME)
    runner = FakeRunner()
    assert unload_profile(NAME, tmp_path / "gone", runner=runner, securityfs=fs) is True
    assert runner.calls == [] and (fs / ".remove").read_text() == NAME


def test_unload_refuses_a_profile_that_is_not_svirts(tmp_path: Path) -> None:
    with pytest.raises(SecurityError):
        unload_profile("/usr/sbin/ntpd", tmp_path / "x", runner=FakeRunner(),
                       securityfs=securityfs(tmp_path, "/usr/sbin/ntpd"))


def test_release_and_gc_unload_the_journalled_profile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(tmp_path / "run", tmp_path / "state")
    calls: list[tuple[str, Path]] = []

    def fake_unload(name: str, path: Path) -> bool:
        calls.append((name, path))
        return True

    monkeypatch.setattr(apparmor, "unload_profile", fake_unload)
    path = registry.run_dir("web") / "apparmor.profile"
    report: list[str] = []
    registry._undo(None, {"op": "apparmor", "profile": NAME, "path": str(path)},  # type: ignore[arg-type]
                   report)
    assert calls == [(NAME, path)] and report == [f"AppArmor profile {NAME}: removed"]
    with pytest.raises(StateError):  # a journal entry naming a file elsewhere
        registry._undo(None, {"op": "apparmor", "profile": NAME,  # type: ignore[arg-type]
                              "path": "/etc/apparmor.d/usr.sbin.ntpd"}, report)


def test_label_is_the_profile_and_objects_are_left_alone() -> None:
    driver = AppArmorDriver()
    label = driver.label_for(qemu_spec(), 3, [], None)  # type: ignore[arg-type]
    assert label.process == NAME
    assert driver.label_claim(qemu_spec(), label) == f"apparmor-{NAME}"
    assert driver.wants_change(-1, 0o100600, Access.RW, label) is False


def test_change_onexec_prefers_apparmors_own_attribute(tmp_path: Path) -> None:
    (tmp_path / "apparmor").mkdir()
    (tmp_path / "apparmor/exec").write_text("")
    (tmp_path / "exec").write_text("")
    change_onexec(f"exec {NAME}".encode(), str(tmp_path))
    assert (tmp_path / "apparmor/exec").read_text() == f"exec {NAME}"
    assert (tmp_path / "exec").read_text() == ""


def test_change_onexec_falls_back_then_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "exec").write_text("")
    change_onexec(b"exec svirt-x", str(tmp_path))
    assert (tmp_path / "exec").read_text() == "exec svirt-x"
    os.unlink(tmp_path / "exec")
    with pytest.raises(SecurityError, match="no AppArmor exec attribute"):
        change_onexec(b"exec svirt-x", str(tmp_path))


# ------------------------------------------------ a spec's own profile (static)
def static_spec(profile: str = "lab-web") -> GuestSpec:
    return qemu_spec(security=Security(model=SecurityModel.APPARMOR, label=profile))


@pytest.mark.parametrize("profile", ["lab-web", "/usr/bin/qemu-web", "web_guest.v2"])
def test_a_spec_may_name_its_own_profile(profile: str) -> None:
    assert static_spec(profile).security.label == profile


@pytest.mark.parametrize(("profile", "why"), [
    ("unconfined", "no confinement"), ("svirt-x", "svirt's generated"),
    (f"svirt-{UUID}", "svirt's generated"), ("a b", "not an AppArmor profile name"),
    ("", "not an AppArmor profile name"), (":ns:web", "not an AppArmor profile name"),
    ("web//hat", "not an AppArmor profile name"), ("-web", "not an AppArmor profile name"),
    ('we"b', "not an AppArmor profile name"), ("x" * 256, "not an AppArmor profile name"),
    ("w\u00e9b", "not an AppArmor profile name"), ("web\n", "not an AppArmor profile name"),
    # the kernel reads a leading & as a stacking request, not a name
    ("&web", "not an AppArmor profile name"), ("web//&x", "not an AppArmor profile name"),
])
def test_bad_own_profiles_are_refused_with_the_field(profile: str, why: str) -> None:
    with pytest.raises(SpecError, match=why) as err:
        static_spec(profile)
    assert err.value.key == "security.label"


def test_an_apparmor_name_under_auto_asks_for_the_model() -> None:
    with pytest.raises(SpecError, match="user:role:type:level") as err:
        qemu_spec(security=Security(label="lab-web"))
    assert "apparmor" in (err.value.hint or "")


def test_own_profile_is_entered_not_generated_claimed_or_planned(tmp_path: Path) -> None:
    fs = securityfs(tmp_path, NAME)
    driver = AppArmorDriver(securityfs=fs)
    spec = static_spec()
    label = driver.label_for(spec, 3, [], None)  # type: ignore[arg-type]
    assert label.process == "lab-web" and apparmor.profile_name(spec) == "lab-web"
    assert not apparmor.generated(spec) and apparmor.generated(qemu_spec())
    assert driver.label_claim(spec, label) is None  # the user's choice: may be shared
    plan = driver.plan(spec, label, [])
    assert plan.process == "lab-web" and "not loaded" in plan.process_note
    assert plan.warnings == ("AppArmor profile lab-web of guest web is not loaded: "
                             "a launch is refused until it is",)
    with pytest.raises(SecurityError, match="lab-web .* is not loaded") as err:
        driver.check_loaded("lab-web")
    assert "apparmor_parser --replace" in (err.value.hint or "")


def test_own_profile_loaded_in_enforce_or_complain_mode(tmp_path: Path) -> None:
    fs = securityfs(tmp_path)
    (fs / "profiles").write_text("lab-web (enforce)\nlab-soft (complain)\nlab-kill (kill)\n"
                                 "lab-none (unconfined)\n")
    driver = AppArmorDriver(securityfs=fs)
    assert driver.check_loaded("lab-web") == "enforce"
    assert driver.check_loaded("lab-soft") == "complain"
    enforce = driver.plan(static_spec(), driver.label_for(static_spec(), 1, [], None), [])  # type: ignore[arg-type]
    assert enforce.warnings == () and "loaded, enforce mode" in enforce.process_note
    soft = static_spec("lab-soft")
    complain = driver.plan(soft, driver.label_for(soft, 1, [], None), [])  # type: ignore[arg-type]
    assert complain.warnings == ("AppArmor profile lab-soft of guest web is in complain mode: "
                                 "it logs what it would refuse and refuses nothing",)


@pytest.mark.parametrize("model", [SecurityModel.APPARMOR, SecurityModel.SMACK, SecurityModel.DAC])
def test_an_selinux_type_under_another_model_is_refused(model: SecurityModel) -> None:
    with pytest.raises(SpecError, match="means nothing to model") as err:
        qemu_spec(security=Security(model=model, type="svirt_web_t"))
    assert err.value.key == "security.type"


def test_own_profile_modes_that_refuse_nothing_warn(tmp_path: Path) -> None:
    fs = securityfs(tmp_path)
    (fs / "profiles").write_text("lab-kill (kill)\nlab-none (unconfined)\nlab-new (mystery)\n")
    driver = AppArmorDriver(securityfs=fs)

    def warnings_of(profile: str) -> tuple[str, ...]:
        spec = static_spec(profile)
        return driver.plan(spec, driver.label_for(spec, 1, [], None), []).warnings  # type: ignore[arg-type]

    assert warnings_of("lab-kill") == ()
    assert warnings_of("lab-none") == ("AppArmor profile lab-none of guest web is in "
                                       "unconfined mode: it refuses nothing",)
    assert "svirt does not know what it refuses" in warnings_of("lab-new")[0]



def test_a_label_under_auto_is_no_profile_of_its_own() -> None:
    """Under model auto a label is an SELinux context: on an AppArmor host the
    guest gets its generated profile, not a profile named like the context."""
    spec = qemu_spec(security=Security(label="system_u:system_r:svirt_t:s0:c1,c2"))
    assert apparmor.generated(spec) and apparmor.profile_name(spec) == NAME
    label = AppArmorDriver().label_for(spec, 1, [], None)  # type: ignore[arg-type]
    assert label.process == NAME


def test_a_profile_loaded_unconfined_is_refused(tmp_path: Path) -> None:
    fs = securityfs(tmp_path)
    (fs / "profiles").write_text("lab-none (unconfined)\n")
    with pytest.raises(SecurityError, match="flags=\\(unconfined\\): no confinement"):
        AppArmorDriver(securityfs=fs).check_loaded("lab-none")


def fake_proc(tmp: Path, pid: int, current: str | None, own_dir: bool = True) -> str:
    attr = tmp / "proc" / str(pid) / "attr"
    (attr / "apparmor").mkdir(parents=True)
    if current is not None:
        (attr / "apparmor" / "current" if own_dir else attr / "current").write_text(
            current + "\n")
    return str(tmp / "proc")


@pytest.mark.parametrize(("current", "own_dir", "refused"), [
    ("lab-web (enforce)", True, False), ("lab-web (complain)", False, False),
    ("unconfined", True, True), ("svirt-other (enforce)", True, True),
    ("lab-web-2 (enforce)", True, True), (None, True, False),  # gone: nothing to read
])
def test_a_guest_not_in_its_profile_after_exec_is_refused(
        tmp_path: Path, current: str | None, own_dir: bool, refused: bool) -> None:
    """The kernel runs a task unconfined when its profile was removed before
    the exec: the launch sees it and refuses the guest."""
    spec = static_spec()
    label = AppArmorDriver().label_for(spec, 1, [], None)  # type: ignore[arg-type]
    proc = fake_proc(tmp_path, 4242, current, own_dir)
    why = apparmor.profile_not_taken(spec, label, 4242, proc)
    assert (why is not None) == refused, why
    if refused:
        assert why == f"guest web runs as {current!r}, not in its AppArmor profile lab-web"
