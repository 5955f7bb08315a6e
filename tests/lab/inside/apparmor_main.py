"""The svirt checks under AppArmor, run inside the lab booted with
``security=apparmor`` (no SELinux), in one boot.

Run as root, unconfined (the way a host daemon launching guests runs), with
the lab's system python3 and ``PYTHONPATH=/lab``::

    python3 -m tests.lab.inside.apparmor_main

Security model "auto": the product's probe must pick AppArmor + DAC.  Each
check prints one ``SVIRT-LAB-CHECK {json}`` line and writes a phase marker
to the kernel log first, so the host attributes every ``apparmor="DENIED"``
record to the check (and probe) that caused it.  The host side is
``tests/lab/test_lab_apparmor.py``.

The isolation probe (``probe.py``) runs in a guest's own profile, entered
the product's way (``change_onexec`` before exec, then the guest's uid and
gid), with no rule added for it: its interpreter and script are copied to
``/usr/lib/svirt-lab-probe/``, which every guest profile may read and map
(the libraries rule of ``policy/apparmor/svirt-base``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from svirt.errors import SecurityError, SvirtError
from svirt.host import probe_host
from svirt.images import build
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind
from svirt.resources import Access, ResourceKind
from svirt.security.apparmor import (
    PROFILE_FILE,
    PROFILE_PREFIX,
    AppArmorDriver,
    change_onexec,
    loaded_profiles,
    parser_path,
    plan_profile,
    unload_profile,
)
from svirt.security.base import ConfinementWarning, Driver
from svirt.security.stack import build_stack
from svirt.spec import Backend, Disk, GuestSpec, Nic, Security, SecurityModel
from tests.lab.inside import common
from tests.lab.inside.common import W, phase
from tests.lab.inside.firmware_guest import apparmor_firmware
from tests.lab.inside.main import (
    BRIDGE,
    ENDPOINT,
    IMAGES,
    LOGS,
    MATRIX_GUESTS,
    MB_KERNEL,
    NETNS,
    RO_DISK,
    SHARED_DISK,
    UML_ADDR,
    attack_from_jail,
    check_plan,
    dac_ids,
    explained_problems,
    fd_targets,
    guest_files,
    intruder_launches,
    kill_launcher_then_gc,
    log_has,
    make_file,
    prepare_guest_files,
    qemu_spec,
    registry_leftovers,
    require,
    run_checks,
    setup_netns,
    stop_all,
    svirt_explain,
    uml_spec,
    wait_marker,
)
from tests.lab.inside.protocol import PHASE_PREFIX
from tests.lab.tiny_guest import MARKER, multiboot_kernel

PROBE_DIR = Path("/usr/lib/svirt-lab-probe")
#: bring-up (SVIRT_LAB_COMPLAIN=1): the profiles in complain mode, so that one
#: pass logs every access they lack (apparmor="ALLOWED") instead of failing
COMPLAIN = os.environ.get("SVIRT_LAB_COMPLAIN") == "1"
HERE = Path(__file__).resolve().parent
#: what the jail_attack check's stand-ins (python3, not a hypervisor) do on
#: their way up, victim or attacker, that a guest's profile refuses: python's
#: fstat of its stdin, /dev/null the launcher opened outside the jail (a
#: disconnected path to AppArmor); site.py listing /usr/local/lib/python3.X/
#: dist-packages; the stand-in's survey of the registry's tree for writable
#: directories (standin.py writable_dirs, in its HOSTILE report)
STANDIN_NOISE = (
    re.compile(r'operation="getattr" info="Failed name lookup - disconnected path" .* '
               r'name="dev/null" '),
    re.compile(r'operation="open" .* name="/usr/local/lib/python3\.\d+/dist-packages/" '),
    re.compile(r'operation="open" .* name="/run/svirt/" '),
)


def enforced(profile: str) -> str:
    return f"{profile} ({'complain' if COMPLAIN else 'enforce'})"


def lab_drivers(spec: GuestSpec) -> list[Driver] | None:
    """The product's stack, its generated profiles in complain mode under
    SVIRT_LAB_COMPLAIN=1 (else None: the launch picks it)."""
    if not COMPLAIN:
        return None
    return list(build_stack(spec, probe_host(), apparmor={"complain": True}))


def svirt_profiles() -> dict[str, str]:
    return {n: m for n, m in loaded_profiles().items() if n.startswith(PROFILE_PREFIX)}


def file_state(path: Path) -> dict[str, Any]:
    """What svirt may change on a file under AppArmor + DAC: owner, mode, ACL."""
    st = os.stat(path, follow_symlinks=False)
    try:
        acl = os.getxattr(path, common.ACL_XATTR, follow_symlinks=False).hex()
    except OSError:
        acl = None
    return {"uid": st.st_uid, "gid": st.st_gid, "mode": oct(st.st_mode), "acl": acl}


def states(paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {str(p): file_state(p) for p in paths}


def install_probe() -> None:
    PROBE_DIR.mkdir(mode=0o755, exist_ok=True)
    shutil.copy(os.path.realpath(sys.executable), PROBE_DIR / "python3")
    (PROBE_DIR / "python3").chmod(0o755)
    shutil.copy(HERE / "probe.py", PROBE_DIR / "probe.py")
    (PROBE_DIR / "probe.py").chmod(0o644)


def run_probe(profile: str, uid: int, gid: int, args: dict[str, Any],
              timeout: float = 60.0) -> dict[str, Any]:
    """probe.py in ``profile`` (entered at exec, as the launcher does) with
    ``uid``/``gid``; its JSON answer."""
    request = f"exec {profile}".encode()
    return probe_as(lambda: change_onexec(request), uid, gid, args, timeout, label_first=False)


def probe_as(enter: Callable[[], None], uid: int, gid: int, args: dict[str, Any],
             timeout: float = 60.0, *, label_first: bool) -> dict[str, Any]:
    """probe.py with ``uid``/``gid`` after ``enter()`` (which gives it a
    guest's label: before the uid switch when it needs root's CAP_MAC_ADMIN,
    ``label_first``); its JSON answer."""
    mine, theirs = socket.socketpair()

    def preexec() -> None:
        if label_first:
            enter()
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if not label_first:
            enter()

    argv = [str(PROBE_DIR / "python3"), "-I", "-S", str(PROBE_DIR / "probe.py"),
            json.dumps({**args, "read_context": False})]
    try:
        # TZ: python's time module would read /etc/localtime's zone file,
        # which no guest profile allows (and no hypervisor reads)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=theirs.fileno(),
                                stderr=theirs.fileno(), preexec_fn=preexec, cwd="/",
                                env={"TZ": "UTC0"})
    finally:
        theirs.close()
    mine.settimeout(timeout)
    data = b""
    try:
        while chunk := mine.recv(65536):
            data += chunk
    except TimeoutError:
        proc.kill()
    finally:
        mine.close()
    rc = proc.wait()
    text = data.decode(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            answer: dict[str, Any] = json.loads(line)
            answer["rc"] = rc
            return answer
    return {"rc": rc, "error": text[-2000:] or "no output"}


def probe_matrix(guests: dict[str, Guest], target: Callable[[Guest], dict[str, Any]],
                 mac_only: str, label_of: Callable[[Guest], str],
                 probe: Callable[[str, int, int, dict[str, Any]], dict[str, Any]],
                 denials: Callable[[str], list[str]]) -> list[dict[str, Any]]:
    """The N×N matrix: a probe with each guest's MAC label against every guest,
    as the guest itself (its uid) and, across guests, with the *other* guest's
    uid (mode ``mac_only``), where only the MAC stands in the way.  One cell
    per probe, with the denials logged in its phase."""
    targets = {name: target(g) for name, g in guests.items()}
    cells: list[dict[str, Any]] = []
    for a_name, a in guests.items():
        for b_name, b in guests.items():
            for mode in (["guest"] if a is b else ["guest", mac_only]):
                uid, gid = dac_ids(a if mode == "guest" else b)
                name = f"matrix:{a_name}->{b_name}:{mode}"
                phase(name)
                t0 = time.monotonic()
                answer = probe(label_of(a), uid, gid, {"targets": [targets[b_name]]})
                cells.append({"phase": name, "from": a_name, "to": b_name, "mode": mode,
                              "label": label_of(a), "uid": answer.get("uid"),
                              "results": answer.get(b_name), "rc": answer.get("rc"),
                              "error": answer.get("error"),
                              "seconds": round(time.monotonic() - t0, 2),
                              "denials": denials(name)})
    phase("matrix")
    bad = [c["phase"] for c in cells if c["results"] is None]
    require(not bad, f"probes gave no answer: {bad} {[c['error'] for c in cells]}")
    return cells


def denials_in_phase(name: str) -> list[str]:
    common.audit_flush()
    out: list[str] = []
    inside = False
    for line in common.kernel_log():
        if line.startswith(PHASE_PREFIX):
            inside = line[len(PHASE_PREFIX):] == name
            if inside:
                out = []
            continue
        if inside and 'apparmor="DENIED"' in line:
            out.append(line)
    return out


class Lab:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.registry = Registry()
        self.guests: dict[str, Guest] = {}
        self.initrd = Path()
        self.files: list[Path] = []
        self.before: dict[str, dict[str, Any]] = {}

    def setup(self, r: dict[str, Any]) -> None:
        shutil.rmtree(W, ignore_errors=True)
        for d in (W, IMAGES, LOGS):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        MB_KERNEL.write_bytes(multiboot_kernel(stay=True))
        MB_KERNEL.chmod(0o644)
        t0 = time.monotonic()
        self.initrd = build.build_initramfs(W / "cache", qemu_modules=False)
        r["initramfs_seconds"] = round(time.monotonic() - t0, 2)
        install_probe()
        prepare_guest_files(*(n for n, _ in MATRIX_GUESTS), "intruder", "foreign")
        make_file(SHARED_DISK)
        make_file(RO_DISK, mode=0o640)
        self.files = [MB_KERNEL, self.initrd, SHARED_DISK, RO_DISK,
                      *(p for n, _ in MATRIX_GUESTS for p in guest_files(n)),
                      *guest_files("intruder"), IMAGES / "foreign.img"]
        self.before = states(self.files)
        host = probe_host()
        r["apparmor"] = host.apparmor
        r["selinux"] = str(host.selinux)
        r["lsms"] = list(host.lsms)
        r["profiles_before"] = svirt_profiles()
        require(host.apparmor, f"the product's probe does not see AppArmor: {host.lsms}")

    def boot(self, stack: ExitStack, r: dict[str, Any]) -> None:
        extra = {"g1": Disk(SHARED_DISK, shared=True), "g2": Disk(SHARED_DISK, shared=True),
                 "g3": Disk(RO_DISK, readonly=True)}
        started: dict[str, float] = {}
        for name, backend in MATRIX_GUESTS:
            disks = (Disk(IMAGES / f"{name}.img"), extra[name])
            spec = (qemu_spec(name, disks=disks) if backend is Backend.QEMU
                    else uml_spec(name, self.initrd, disks=disks))
            started[name] = time.monotonic()
            self.guests[name] = stack.enter_context(launch(spec, registry=self.registry,
                                                           drivers=lab_drivers(spec)))
        guests: dict[str, Any] = {}
        problems = []
        for name, guest in self.guests.items():
            info: dict[str, Any] = {"backend": str(guest.spec.backend), "pid": guest.pid,
                                    "drivers": [d.name for d in guest.drivers]}
            try:
                info["marker_seconds"] = wait_marker(guest, started[name])
                info["marker"] = True
            except Exception as err:  # noqa: BLE001 - reported
                info["marker"] = False
                info["marker_error"] = str(err)
            profile = guest.record.labels["apparmor"].process
            info["profile"] = profile
            # every process of the guest: tini (PID 1 of its jail) and the hypervisor
            # (a process that ended between the listing and the read, UML's own
            # helpers, is not one that ran unconfined: "" and gone)
            info["contexts"] = {str(p): c for p in tree(guest.pid)
                                if (c := common.proc_context(p)) or common.alive(p)}
            info["uid"] = os.stat(f"/proc/{guest.pid}").st_uid
            info["log_has_marker"] = log_has(LOGS / f"{name}.log", MARKER)
            info["profile_file"] = (self.registry.run_dir(name) / PROFILE_FILE).read_text()
            info["console_tail"] = guest.console.tail(600)
            guests[name] = info
            if info["drivers"] != ["apparmor", "dac"]:
                problems.append(f"{name}: security stack {info['drivers']}")
            bad = {p: c for p, c in info["contexts"].items() if c != enforced(profile)}
            if bad or not info["contexts"]:
                problems.append(f"{name}: processes not in {enforced(profile)}: {bad}")
            if not info["marker"] or not info["log_has_marker"]:
                problems.append(f"{name}: no marker")
        r["guests"] = guests
        r["loaded"] = svirt_profiles()
        want = {g["profile"] for g in guests.values()}
        if set(r["loaded"]) != want:
            problems.append(f"loaded svirt profiles {r['loaded']}, want {want}")
        if len(want) != len(guests):
            problems.append("profiles are not distinct")
        require(not problems, "; ".join(problems))

    def matrix(self, r: dict[str, Any]) -> None:
        require(len(self.guests) == len(MATRIX_GUESTS) and all(
            g.running for g in self.guests.values()), "the matrix guests are not all running")
        r["cells"] = probe_matrix(self.guests, self._target, "apparmor-only",
                                  lambda g: g.record.labels["apparmor"].process, run_probe,
                                  denials_in_phase)

    def _target(self, guest: Guest) -> dict[str, Any]:
        t: dict[str, Any] = {"name": guest.name, "backend": str(guest.spec.backend),
                             "pid": hypervisor_pid(guest.pid),
                             "disk": str(guest.spec.disks[0].path),
                             "log": str(guest.spec.console.log)}
        if guest.spec.backend is Backend.UML:
            t["mconsole"] = str(guest.run_dir / guest.name / "mconsole")
            # UML answers its own probe at once; a request from another guest's
            # profile is answered to an address UML cannot reach (ETIMEDOUT)
            t["mconsole_timeout"] = 1.0
        return t

    def firmware(self, r: dict[str, Any]) -> None:
        """The SELinux pass's firmware check under AppArmor + DAC
        (tests/lab/inside/firmware_guest.py), g1 the other guest."""
        require("g1" in self.guests and self.guests["g1"].running, "g1 is not running")
        apparmor_firmware(self.registry, self.guests["g1"], r, run_probe, denials_in_phase,
                          states, lab_drivers)

    def conflict(self, r: dict[str, Any]) -> None:
        """A disk owned by a running guest's uid (DAC's mark; AppArmor leaves
        files as they are), and another running guest's registered disk:
        both refused, nothing changed."""
        require("g1" in self.guests and self.guests["g1"].running, "g1 is not running")
        victim = self.guests["g1"]
        foreign = IMAGES / "foreign.img"
        uid, gid = dac_ids(victim)
        os.chown(foreign, uid, gid)
        cases = {
            # a file of g1's uid that the registry does not know (a copy, or
            # the disk of a guest some other tool started)
            "foreign": qemu_spec("intruder", disks=(Disk(foreign),)),
            # g2's own disk, registered
            "registered": qemu_spec("intruder", disks=(Disk(IMAGES / "g2.img"),)),
        }
        try:
            out, problems = intruder_launches(self.registry, cases, states)
        finally:
            # the test gave it to g1's uid, not svirt: back for restore_stop
            before = self.before[str(foreign)]
            os.chown(foreign, before["uid"], before["gid"])
        if f"uid {uid}" not in out["foreign"].get("message", ""):
            problems.append(f"foreign: the error does not name g1's uid {uid}: {out['foreign']}")
        if "g2" not in out["registered"].get("message", ""):
            problems.append("registered: the error does not name g2")
        r["cases"] = out
        r["victim_uid"] = uid
        require(not problems, "; ".join(problems))

    def explain(self, r: dict[str, Any]) -> None:
        """Real AppArmor denials through ``svirt explain --since @T --json``
        (the CLI, on /dev/kmsg): g1's profile reading g2's disk with g2's uid
        (so that only AppArmor refuses) is cross-guest; g1 itself reading a
        world-readable host file outside its profile is a policy gap."""
        require(all(n in self.guests and self.guests[n].running for n in ("g1", "g2")),
                "g1 and g2 are not running")
        a, b = self.guests["g1"], self.guests["g2"]
        b_disk = b.spec.disks[0].path
        secret = W / "host-secret"
        secret.write_text("a host file no guest profile grants\n")
        secret.chmod(0o644)  # DAC lets every uid read it: only AppArmor refuses
        profile = a.record.labels["apparmor"].process
        r["since"] = since = time.time()
        answers: dict[str, Any] = {}
        phase("explain:cross-guest")
        answers["cross-guest"] = run_probe(profile, *dac_ids(b), {"reads": [str(b_disk)]})
        phase("explain:policy-gap")
        answers["policy-gap"] = run_probe(profile, *dac_ids(a), {"reads": [str(secret)]})
        phase("explain")
        secret.unlink()
        r["probes"] = answers
        r["denials"] = {c: denials_in_phase(f"explain:{c}") for c in answers}
        # as explain reads them, for tests/unit/test_explain_lab.py
        r["kmsg"] = common.raw_records([d for ds in r["denials"].values() for d in ds])
        t0 = time.monotonic()
        findings, run = svirt_explain(since)
        r["explain_seconds"] = round(time.monotonic() - t0, 2)
        r["findings"], r["explain_rc"], r["explain_stderr"] = findings, run["rc"], run["stderr"]
        want: dict[str, dict[str, Any]] = {
            "cross-guest": {"lsm": "apparmor", "classification": "cross-guest", "guest": "g1",
                            "target_guest": "g2", "object": str(b_disk),
                            "subject": profile},
            "policy-gap": {"lsm": "apparmor", "classification": "policy gap", "guest": "g1",
                           "target_guest": None, "object": str(secret), "subject": profile,
                           "rule": f"{secret} r,"},
        }
        r["want"] = want
        problems = explained_problems(answers, r["denials"], findings, run, want)
        require(not problems, "; ".join(problems))

    def stop(self, stack: ExitStack, r: dict[str, Any]) -> None:
        pids = {n: g.pid for n, g in self.guests.items()}
        r["outcomes"] = stop_all(list(self.guests.values()))
        stack.close()
        r["alive"] = [n for n, pid in pids.items() if common.alive(pid)]
        require(not r["alive"], f"hypervisors survived: {r['alive']}")

    def restore_after_stop(self, r: dict[str, Any]) -> None:
        r["diff"] = common.state_diff(self.before, states(self.files))
        r["leftovers"] = registry_leftovers()
        r["profiles"] = svirt_profiles()
        require(not r["diff"], f"owners/modes/ACLs not restored: {r['diff']}")
        require(not r["leftovers"], f"registry not empty: {r['leftovers']}")
        require(not r["profiles"], f"svirt profiles still loaded: {r['profiles']}")

    def network(self, r: dict[str, Any]) -> None:
        """QEMU with its tap fd, UML opening its tap by name and pinging a veth
        endpoint through the bridge: both confined, nothing refused."""
        setup_netns()
        prepare_guest_files("qn", "un")
        nic = (Nic(bridge=BRIDGE),)
        extra = f"svirt.net={UML_ADDR}/24 svirt.ping={ENDPOINT} svirt.pingtries=15"
        specs = [qemu_spec("qn", nics=nic, netns=NETNS),
                 uml_spec("un", self.initrd, extra, nics=nic, netns=NETNS)]
        info: dict[str, Any] = {}
        with ExitStack() as stack:
            t0 = time.monotonic()
            guests = {s.name: stack.enter_context(launch(s, registry=self.registry))
                      for s in specs}
            for name, guest in guests.items():
                hv = hypervisor_pid(guest.pid)
                info[name] = {"marker_seconds": wait_marker(guest, t0),
                              "context": common.proc_context(hv), "fds": fd_targets(hv)}
            try:
                info["un"]["ping"] = guests["un"].console.expect(
                    re.compile(rb"SVIRT-PING \S+ (ok|fail)"), timeout=60).decode()
            except SvirtError as err:
                info["un"]["ping"] = f"no ping result: {err}"
        r["guests"] = info
        problems = []
        if "ok" not in info["un"]["ping"]:
            problems.append(f"UML could not ping through its tap: {info['un']['ping']}")
        if info["qn"]["fds"].get("5") != "/dev/net/tun":
            problems.append(f"QEMU's tap fd 5 is {info['qn']['fds'].get('5')!r} after exec")
        for name, gi in info.items():
            if not gi["context"].endswith("(enforce)"):
                problems.append(f"{name} runs as {gi['context']!r}")
        require(not problems, "; ".join(problems))

    def unjailed(self, r: dict[str, Any]) -> None:
        """``jail = false``: a UML guest on the host's own paths (its memory
        file in the host's /dev/shm: the profile's "owner" rule, its mconsole
        in its home) is confined by the same generated profile, boots and
        stops over mconsole with no denial."""
        prepare_guest_files("nj")
        spec = uml_spec("nj", self.initrd, jail=False)
        t0 = time.monotonic()
        with launch(spec, registry=self.registry, drivers=lab_drivers(spec)) as guest:
            profile = guest.record.labels["apparmor"].process
            r["marker_seconds"] = wait_marker(guest, t0)
            # a process that ended between the listing and the read is not one
            # that ran unconfined ("" and gone)
            r["contexts"] = {str(p): c for p in tree(guest.pid)
                             if (c := common.proc_context(p)) or common.alive(p)}
            outcome = guest.stop()
            r["outcome"] = str(outcome)
        r["profiles_after"] = svirt_profiles()
        require(set(r["contexts"].values()) == {enforced(profile)},
                f"processes not in {enforced(profile)}: {r['contexts']}")
        require(outcome.kind is OutcomeKind.POWEROFF, f"the stop ended as {outcome}")
        require(not r["profiles_after"], f"profiles left: {r['profiles_after']}")

    def detached(self, r: dict[str, Any]) -> None:
        """svirt start's way: console on FIFOs in the run directory and QMP on a
        listening socket, inherited by the confined hypervisor."""
        prepare_guest_files("dq")
        t0 = time.monotonic()
        with launch(qemu_spec("dq"), registry=self.registry, detached={"lab": True}) as guest:
            hv = hypervisor_pid(guest.pid)
            r["context"] = common.proc_context(hv)
            r["fds"] = fd_targets(hv)
            r["marker_seconds"] = wait_marker(guest, t0, timeout=60)
            r["outcome"] = str(guest.stop())

    def quoting(self, r: dict[str, Any]) -> None:
        """Paths with spaces, quotes and pattern characters, through the real
        apparmor_parser: each rule grants its one file, not a pattern."""
        granted = ['odd "q" *.img', "br{a,b}ce[1]?.img"]
        refused = ['odd "q" x.img', "brace1x.img", "brbce1x.img"]
        for n in granted + refused:
            make_file(IMAGES / n, size=4096, mode=0o644)
        spec = qemu_spec("quoting")
        objects = [(IMAGES / n, Access.RO, ResourceKind.DISK, False) for n in granted]
        plan = plan_profile(spec, objects, hypervisor=str(PROBE_DIR / "python3"), init=None,
                            kvm=False)
        path = W / "quoting.profile"
        r["profile"] = AppArmorDriver().load(plan, path)
        code = ("import json, sys\nout = {}\nfor p in sys.argv[1:]:\n    try:\n"
                "        open(p, 'rb').close(); out[p] = 'ok'\n"
                "    except OSError as e:\n        out[p] = e.strerror\nprint(json.dumps(out))")
        request = f"exec {plan.name}".encode()

        def preexec() -> None:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            change_onexec(request)

        try:
            proc = subprocess.run(
                [str(PROBE_DIR / "python3"), "-I", "-S", "-c", code,
                 *(str(IMAGES / n) for n in granted + refused)],
                capture_output=True, text=True, preexec_fn=preexec, env={"TZ": "UTC0"},
                timeout=60, check=False)
        finally:
            unload_profile(plan.name, path)
        require(proc.returncode == 0, f"the reader failed: {proc.stderr[-2000:]}")
        got = json.loads(proc.stdout)
        r["results"] = got
        want = {str(IMAGES / n): "ok" for n in granted}
        want |= {str(IMAGES / n): "Permission denied" for n in refused}
        require(got == want, f"quoted rules matched {got}, want {want}")
        r["denials"] = denials_in_phase("quoting")

    def static(self, r: dict[str, Any]) -> None:
        """A custom profile: the spec's own (``security.label``), which the
        administrator made from the one svirt generated for the guest (renamed)
        and loaded.  svirt enters it at exec and loads, changes and removes
        nothing; DAC still gives the guest its own uid.  In complain mode every
        launch warns; not loaded, the launch is refused and nothing is left."""
        prepare_guest_files("st")
        files = [MB_KERNEL, *guest_files("st")]
        before = states(files)
        custom = "lab-custom-st"
        with launch(qemu_spec("st"), registry=self.registry) as guest:
            generated = guest.record.labels["apparmor"].process
            text = (self.registry.run_dir("st") / PROFILE_FILE).read_text()
            guest.stop()
        path = W / f"{custom}.profile"
        text = text.replace(generated, custom)
        require(f"profile {custom} {{" in text, "no profile line in the generated profile")
        spec = qemu_spec("st", security=Security(model=SecurityModel.APPARMOR, label=custom))
        runs: dict[str, dict[str, Any]] = {}

        def run(case: str, *parser_args: str) -> None:
            flags = " flags=(complain)" if case == "complain" else ""
            path.write_text(text.replace(f"profile {custom} {{", f"profile {custom}{flags} {{"))
            if parser_args:
                subprocess.run([parser_path(), *parser_args, "--skip-cache", str(path)],
                               check=True, capture_output=True, timeout=60)
            info: dict[str, Any] = runs.setdefault(case, {"mode": loaded_profiles().get(custom)})
            t0 = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with launch(spec, registry=self.registry) as guest:
                        info["marker_seconds"] = wait_marker(guest, t0)
                        info["contexts"] = {str(p): common.proc_context(p)
                                            for p in tree(guest.pid)}
                        info["uid"] = os.stat(f"/proc/{guest.pid}").st_uid
                        info["svirt_profiles"] = svirt_profiles()
                        info["warnings"] = list(guest.warnings)
                        info["outcome"] = str(guest.stop())
                except SecurityError as err:
                    info["refused"] = err.message
            info["issued"] = [str(w.message) for w in caught
                              if issubclass(w.category, ConfinementWarning)]
            info["loaded_after"] = loaded_profiles().get(custom)
            plan, disk = check_plan("st", tables=f'[security]\nmodel = "apparmor"\n'
                                                 f'label = "{custom}"\n')
            info["check"] = {"process": plan["process"]["apparmor"], "disk": disk["apparmor"],
                             "warnings": plan["warnings"]}

        try:
            run("enforce", "--replace")
            run("complain", "--replace")
            run("not-loaded", "--remove")
        finally:
            if custom in loaded_profiles():
                unload = [parser_path(), "--remove", "--skip-cache", str(path)]
                subprocess.run(unload, check=False, capture_output=True, timeout=60)
        r["runs"] = runs
        r["diff"] = common.state_diff(before, states(files))
        r["leftovers"] = registry_leftovers()
        problems = []
        for case, mode in (("enforce", "enforce"), ("complain", "complain")):
            info = runs[case]
            if set(info.get("contexts", {}).values()) != {f"{custom} ({mode})"}:
                problems.append(f"{case}: processes in {info.get('contexts')}, "
                                f"{info.get('refused', '')}")
            if info.get("svirt_profiles") != {}:
                problems.append(f"{case}: svirt loaded {info.get('svirt_profiles')}")
            if info["loaded_after"] != mode:
                problems.append(f"{case}: after the stop the profile is {info['loaded_after']}")
            if info.get("uid", 0) < 1_000_000:
                problems.append(f"{case}: runs as uid {info.get('uid')}")
        if runs["enforce"].get("warnings") != []:
            problems.append(f"enforce: warned {runs['enforce'].get('warnings')}")
        soft = runs["complain"]
        if not any("complain mode" in w for w in soft.get("warnings", [])) or (
                soft["issued"] != soft.get("warnings")):
            problems.append(f"complain: warnings {soft.get('warnings')}, issued {soft['issued']}")
        for case, info in runs.items():  # svirt check says what the launch did
            check = info["check"]
            said = [w for w in check["warnings"] if custom in w]
            want = {"enforce": [], "complain": info.get("warnings"),
                    "not-loaded": [f"AppArmor profile {custom} of guest st is not loaded: "
                                   "a launch is refused until it is"]}[case]
            if check["process"]["identity"] != custom or said != want:
                problems.append(f"{case}: svirt check planned {check}")
            if check["disk"]["change"]:
                problems.append(f"{case}: svirt check plans a rule for the disk: {check}")
        gone = runs["not-loaded"]
        if f"{custom} (security.label) is not loaded" not in gone.get("refused", ""):
            problems.append(f"not loaded: launched anyway {gone}")
        if r["diff"] or r["leftovers"]:
            problems.append(f"left behind: {r['diff']} {r['leftovers']}")
        require(not problems, "; ".join(problems))

    def plan(self, r: dict[str, Any]) -> None:
        """``svirt check --json`` computes the plan with the drivers: the
        profile, the uid and the disk's rule it shows are the ones the launch
        then gives (a spec with a uuid: the profile's name comes from it)."""
        prepare_guest_files("pl")
        spec = qemu_spec("pl", uuid=uuid.UUID(int=0x5eed))
        plan, r["disk_plan"] = check_plan("pl", f'uuid = "{spec.uuid}"\n')
        r["process"], r["warnings"] = plan["process"], plan["warnings"]
        t0 = time.monotonic()
        with launch(spec, registry=self.registry) as guest:
            r["marker_seconds"] = wait_marker(guest, t0)
            r["context"] = common.proc_context(hypervisor_pid(guest.pid))
            r["uid"] = os.stat(f"/proc/{guest.pid}").st_uid
            profile = (self.registry.run_dir("pl") / PROFILE_FILE).read_text()
            guest.stop()
        problems = []
        if f"{r['process']['apparmor']['identity']} (enforce)" != r["context"]:
            problems.append(f"planned profile {r['process']['apparmor']}, got {r['context']}")
        if f"uid {r['uid']} " not in r["process"]["dac"]["identity"]:
            problems.append(f"planned {r['process']['dac']}, got uid {r['uid']}")
        rules = r["disk_plan"]["apparmor"]["setting"].splitlines()
        lines = {line.strip() for line in profile.splitlines()}
        r["disk_rules"] = rules
        if not rules or not all(rule in lines for rule in rules):
            problems.append(f"planned disk rules {rules} are not in the loaded profile")
        if r["warnings"]:
            problems.append(f"svirt check warned {r['warnings']}")
        require(not problems, "; ".join(problems))

    def kill_gc(self, r: dict[str, Any]) -> None:
        prepare_guest_files("kq", "ku")
        files = [MB_KERNEL, self.initrd, *guest_files("kq"), *guest_files("ku")]
        before = states(files)

        def during() -> None:
            r["profiles_during"] = svirt_profiles()

        def after_kill() -> None:
            r["profiles_after_kill"] = svirt_profiles()  # gc's to remove

        guests = kill_launcher_then_gc([str(self.initrd)], r, during, after_kill)
        r["profiles_after_gc"] = svirt_profiles()
        r["diff"] = common.state_diff(before, states(files))
        r["leftovers"] = registry_leftovers()
        problems = []
        for n, g in guests.items():
            if not g["context"].startswith(PROFILE_PREFIX) or not g["context"].endswith(
                    " (enforce)"):
                problems.append(f"{n} ran as {g['context']!r}")
        if len(r["profiles_during"]) != 2:
            problems.append(f"profiles while running: {r['profiles_during']}")
        if not r["profiles_after_kill"]:
            problems.append("the profiles went with the launcher: gc had nothing to remove")
        if any(r["alive_after_gc"].values()):
            problems.append(f"hypervisors survived gc: {r['alive_after_gc']}")
        if r["gc"]["rc"] != 0:
            problems.append(f"svirt gc failed: {r['gc']}")
        if r["profiles_after_gc"]:
            problems.append(f"profiles left after gc: {r['profiles_after_gc']}")
        if r["diff"]:
            problems.append(f"not restored: {r['diff']}")
        if r["leftovers"]:
            problems.append(f"registry not empty: {r['leftovers']}")
        require(not problems, "; ".join(problems))

    def jail_attack(self, r: dict[str, Any]) -> None:
        """The SELinux pass's jail_attack under AppArmor + DAC: the hostile
        stand-in, jailed in its own profile, next to a victim stand-in (the
        hostfs part, a real UML guest, is left to the SELinux pass: it costs
        half a minute of TCG time).  The profile refuses to list the jail's
        directories (no read rule for /, /dev, /run...): they show nothing."""
        a, problems = attack_from_jail(self.registry, self.initrd, r, denials_in_phase,
                                       hostfs=False, standin_noise=STANDIN_NOISE,
                                       mac_refuses_listings=True)
        profiles = {who: ctx.removesuffix(" (enforce)") for who, ctx in a.contexts.items()}
        r["profiles"] = profiles
        for who, ctx in a.contexts.items():
            if not (ctx.startswith(PROFILE_PREFIX) and ctx.endswith(" (enforce)")):
                problems.append(f"the {who} ran as {ctx!r}")
        if profiles["attacker"] == profiles["victim"]:
            problems.append(f"attacker and victim share a profile: {profiles['attacker']}")
        # the attack's denials are the attacker's own: nothing else got in the way
        others = [d for d in r["denials"]["attack"]
                  if f'profile="{profiles["attacker"]}"' not in d]
        if others:
            problems.append(f"denials of another profile in attack: {others}")
        r["problems"] = problems
        require(not problems, "; ".join(problems))


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out = [pid]
    for p in out:
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
    return out


def hypervisor_pid(pid: int) -> int:
    """tini's child (the hypervisor), else ``pid`` itself."""
    kids = tree(pid)
    return kids[1] if len(kids) > 1 else pid


def main() -> None:
    lab = Lab()
    run_checks(lab, [("matrix", lab.matrix), ("conflict", lab.conflict),
                     ("explain", lab.explain), ("firmware", lab.firmware)],
               [("restore_stop", lab.restore_after_stop), ("kill_gc", lab.kill_gc),
                ("quoting", lab.quoting), ("network", lab.network),
                ("detached", lab.detached), ("static", lab.static), ("plan", lab.plan),
                ("unjailed", lab.unjailed),
                ("jail_attack", lab.jail_attack)])


if __name__ == "__main__":
    main()
