"""The svirt checks under SMACK, run inside the lab booted under
User-Mode-Linux with ``security=smack`` (Debian's UML kernel has SMACK; its
x86 kernels do not), in one boot.

Run as root with the floor label ``_`` (the way a host daemon launching
guests runs), with the lab's system python3 and ``PYTHONPATH=/lab``::

    python3 -m tests.lab.inside.smack_main

Security model "auto": the product's probe must pick SMACK + DAC.  Guests
are QEMU (TCG) guests: UML cannot run inside this UML lab.  Each check
prints one ``SVIRT-LAB-CHECK {json}`` line and writes a phase marker to the
kernel log first, so the host attributes every SMACK denial
(``lsm=SMACK ... action=denied``) to the check and probe that caused it.
The host side is ``tests/lab/test_lab_smack.py``.

The isolation probe (``probe.py``) runs with a guest's SMACK label, taken the
product's way (written to ``/proc/self/attr/smack/current`` while still root,
then the guest's uid and gid), with no rule added for it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from svirt.errors import SecurityError
from svirt.host import probe_host
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.security import smack
from svirt.spec import Disk, Nic, Security, SecurityModel
from tests.hostile.jail_attack import jail_problems, plant_bait, run_attack, table
from tests.hostile.standin_spec import install_standin
from tests.lab.inside import common
from tests.lab.inside.apparmor_main import (
    hypervisor_pid,
    install_probe,
    probe_as,
    probe_matrix,
    tree,
)
from tests.lab.inside.common import W, phase
from tests.lab.inside.main import (
    BRIDGE,
    IMAGES,
    LOGS,
    MARKER_TIMEOUT,
    MB_KERNEL,
    NETNS,
    RO_DISK,
    SHARED_DISK,
    check_plan,
    dac_ids,
    fd_targets,
    guest_files,
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
    svirt_cli,
    wait_marker,
)
from tests.lab.inside.protocol import PHASE_PREFIX
from tests.lab.tiny_guest import MARKER, multiboot_kernel

MATRIX = ("s1", "s2", "s3")
PROBE = Path("/usr/lib/svirt-lab-probe")
SMACK_DENIED = "lsm=SMACK"


def smack_label(path: Path) -> str | None:
    try:
        return os.getxattr(path, smack.XATTR, follow_symlinks=False).rstrip(b"\0").decode()
    except OSError:
        return None


def file_state(path: Path) -> dict[str, Any]:
    """What svirt may change on a file under SMACK + DAC: label, owner, mode, ACL."""
    st = os.stat(path, follow_symlinks=False)
    try:
        acl = os.getxattr(path, common.ACL_XATTR, follow_symlinks=False).hex()
    except OSError:
        acl = None
    return {"smack": smack_label(path), "uid": st.st_uid, "gid": st.st_gid,
            "mode": oct(st.st_mode), "acl": acl}


def states(paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {str(p): file_state(p) for p in paths}


def rules() -> list[str]:
    """The loaded rules that concern svirt's labels (``load2`` read back)."""
    text = Path(smack.SMACKFS, "load2").read_text()
    return [r for r in text.splitlines() if "svirt" in r]


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
        if inside and SMACK_DENIED in line and "action=denied" in line:
            out.append(line)
    return out


def run_probe(label: str, uid: int, gid: int, args: dict[str, Any]) -> dict[str, Any]:
    """probe.py with SMACK label ``label`` and ``uid``/``gid``."""
    path = smack.attr_path()

    def enter() -> None:
        with open(path, "w") as f:
            f.write(label)

    return probe_as(enter, uid, gid, {**args, "read_context": False}, label_first=True)


def labels_of(guest: Guest) -> str:
    return guest.record.labels["smack"].process


class Lab:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.registry = Registry()
        self.guests: dict[str, Guest] = {}
        self.files: list[Path] = []
        self.before: dict[str, dict[str, Any]] = {}

    def setup(self, r: dict[str, Any]) -> None:
        for d in (W, IMAGES, LOGS):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        MB_KERNEL.write_bytes(multiboot_kernel(stay=True))
        MB_KERNEL.chmod(0o644)
        install_probe()
        prepare_guest_files(*MATRIX)
        make_file(SHARED_DISK)
        make_file(RO_DISK, mode=0o640)
        self.files = [MB_KERNEL, SHARED_DISK, RO_DISK, *(p for n in MATRIX
                                                         for p in guest_files(n))]
        self.before = states(self.files)
        host = probe_host()
        r["smack"] = host.smack
        r["lsms"] = list(host.lsms)
        r["launcher_label"] = Path(smack.attr_path()).read_text()
        r["rules_before"] = rules()
        require(host.smack, f"the product's probe does not see SMACK: {host.lsms}")

    def boot(self, stack: ExitStack, r: dict[str, Any]) -> None:
        extra = {"s1": Disk(SHARED_DISK, shared=True), "s2": Disk(SHARED_DISK, shared=True),
                 "s3": Disk(RO_DISK, readonly=True)}
        t0 = time.monotonic()
        for name in MATRIX:
            spec = qemu_spec(name, disks=(Disk(IMAGES / f"{name}.img"), extra[name]))
            self.guests[name] = stack.enter_context(launch(spec, registry=self.registry))
        guests: dict[str, Any] = {}
        problems = []
        for name, guest in self.guests.items():
            info: dict[str, Any] = {"pid": guest.pid, "drivers": [d.name for d in guest.drivers]}
            try:
                info["marker_seconds"] = wait_marker(guest, t0)
            except Exception as err:  # noqa: BLE001 - reported
                info["marker_error"] = str(err)
            label = labels_of(guest)
            info["label"] = label
            info["labels"] = {str(p): common.proc_context(p) for p in tree(guest.pid)}
            info["uid"] = os.stat(f"/proc/{guest.pid}").st_uid
            info["files"] = {str(p): smack_label(p) for p in (*guest_files(name), SHARED_DISK,
                                                              RO_DISK)}
            info["log_has_marker"] = log_has(LOGS / f"{name}.log", MARKER)
            info["console_tail"] = guest.console.tail(600)
            guests[name] = info
            if info["drivers"] != ["smack", "dac"]:
                problems.append(f"{name}: security stack {info['drivers']}")
            bad = {p: c for p, c in info["labels"].items() if c != label}
            if bad or not info["labels"]:
                problems.append(f"{name}: processes not labelled {label}: {bad}")
            if "marker_seconds" not in info or not info["log_has_marker"]:
                problems.append(f"{name}: no marker")
            for path in guest_files(name):
                if info["files"][str(path)] != label:
                    problems.append(f"{name}: {path} labelled {info['files'][str(path)]}")
        r["guests"] = guests
        r["rules"] = rules()
        want = {f"{g['label']} {smack.SHARED} {smack.SHARED_ACCESS}"
                for n, g in guests.items() if n != "s3"}
        if not want <= set(r["rules"]) or any(guests["s3"]["label"] in x for x in r["rules"]):
            problems.append(f"rules {r['rules']}, want exactly {want} for the guests")
        if len({g["label"] for g in guests.values()}) != len(guests):
            problems.append("labels are not distinct")
        require(not problems, "; ".join(problems))

    def matrix(self, r: dict[str, Any]) -> None:
        require(len(self.guests) == len(MATRIX) and all(
            g.running for g in self.guests.values()), "the matrix guests are not all running")
        r["cells"] = probe_matrix(self.guests, self._target, "smack-only", labels_of,
                                  run_probe, denials_in_phase)

    def _target(self, guest: Guest) -> dict[str, Any]:
        return {"name": guest.name, "backend": str(guest.spec.backend),
                "pid": hypervisor_pid(guest.pid), "disk": str(guest.spec.disks[0].path),
                "log": str(guest.spec.console.log)}

    def explain(self, r: dict[str, Any]) -> None:
        """Real denials through ``svirt explain --since @T --json`` (the kernel
        log): s1's label with s2's uid going for s2's guest (cross-guest), and
        s1's own disk mislabelled with the floor label, which s1 may then only
        read (mislabelled: the label it has and the one svirt gives)."""
        s1, s2 = self.guests["s1"], self.guests["s2"]
        own = IMAGES / "s1.img"
        since = time.time() - 1
        run_probe(labels_of(s1), *dac_ids(s2), {"targets": [self._target(s2)]})
        os.setxattr(own, smack.XATTR, smack.FLOOR.encode())
        try:
            r["mislabelled_probe"] = run_probe(labels_of(s1), *dac_ids(s1),
                                               {"targets": [self._target(s1)]}).get("s1")
        finally:
            os.setxattr(own, smack.XATTR, labels_of(s1).encode())
        common.audit_flush()
        out = svirt_cli("explain", "--since", f"@{since:.3f}", "--json")
        r["explain_rc"], r["stderr"] = out["rc"], out["stderr"]
        r["findings"] = [json.loads(line) for line in out["stdout"].splitlines() if line]
        by_object: dict[str, list[dict[str, Any]]] = {}
        for f in r["findings"]:
            by_object.setdefault(f["object"], []).append(f)
        r["cross"] = by_object.get(str(IMAGES / "s2.img"), [])
        r["mislabelled"] = by_object.get(str(own), [])
        problems = []
        if out["rc"] != 0:
            problems.append(f"svirt explain failed: {out}")
        if not any(f["guest"] == "s1" and f["target_guest"] == "s2"
                   and f["classification"] == "cross-guest" for f in r["cross"]):
            problems.append(f"s2's disk: {r['cross']}")
        if not any(f["guest"] == "s1" and f["classification"] == "mislabelled"
                   and f["label"] == smack.FLOOR and f["wanted"] == labels_of(s1)
                   for f in r["mislabelled"]):
            problems.append(f"s1's mislabelled disk: {r['mislabelled']}")
        require(not problems, "; ".join(problems))

    def conflict(self, r: dict[str, Any]) -> None:
        """A disk carrying a running guest's label (not through svirt) is refused
        for another guest, and left as it is."""
        victim = labels_of(self.guests["s1"])
        disk = make_file(IMAGES / "taken.img")
        os.setxattr(disk, smack.XATTR, victim.encode())
        prepare_guest_files("sc")
        spec = qemu_spec("sc", disks=(Disk(IMAGES / "sc.img"), Disk(disk)))
        try:
            with launch(spec, registry=self.registry):
                r["error"] = None
        except SecurityError as err:
            r["error"] = str(err)
        r["label_after"] = smack_label(disk)
        require(r["error"] is not None and str(disk) in r["error"],
                f"the taken disk was not refused: {r['error']}")
        require(r["label_after"] == victim, f"the taken disk was relabelled {r['label_after']}")

    def stop(self, stack: ExitStack, r: dict[str, Any]) -> None:
        pids = {n: g.pid for n, g in self.guests.items()}
        r["outcomes"] = stop_all(list(self.guests.values()))
        stack.close()
        r["alive"] = [n for n, pid in pids.items() if common.alive(pid)]
        require(not r["alive"], f"hypervisors survived: {r['alive']}")

    def restore_after_stop(self, r: dict[str, Any]) -> None:
        r["diff"] = common.state_diff(self.before, states(self.files))
        r["leftovers"] = registry_leftovers()
        r["rules"] = rules()
        require(not r["diff"], f"labels/owners/modes/ACLs not restored: {r['diff']}")
        require(not r["leftovers"], f"registry not empty: {r['leftovers']}")
        require(not r["rules"], f"svirt rules still loaded: {r['rules']}")

    def static(self, r: dict[str, Any]) -> None:
        """A static label from the spec; an invalid one is refused."""
        prepare_guest_files("st")
        spec = qemu_spec("st", security=Security(model=SecurityModel.SMACK, label="webguest"))
        t0 = time.monotonic()
        with launch(spec, registry=self.registry) as guest:
            r["marker_seconds"] = wait_marker(guest, t0)
            r["labels"] = {str(p): common.proc_context(p) for p in tree(guest.pid)}
            r["disk"] = smack_label(IMAGES / "st.img")
            r["outcome"] = str(guest.stop())
        problems = []
        if set(r["labels"].values()) != {"webguest"}:
            problems.append(f"processes labelled {r['labels']}")
        if r["disk"] != "webguest":
            problems.append(f"disk labelled {r['disk']}")
        require(not problems, "; ".join(problems))

    def detached(self, r: dict[str, Any]) -> None:
        """svirt start's way: console FIFOs and a QMP listening socket made by
        the launcher, used by the labelled hypervisor."""
        prepare_guest_files("dq")
        t0 = time.monotonic()
        with launch(qemu_spec("dq"), registry=self.registry, detached={"lab": True}) as guest:
            hv = hypervisor_pid(guest.pid)
            r["label"] = common.proc_context(hv)
            r["fds"] = fd_targets(hv)
            r["marker_seconds"] = wait_marker(guest, t0, timeout=60)
            r["outcome"] = str(guest.stop())

    def jail_attack(self, r: dict[str, Any]) -> None:
        """The hostile suite's stand-in (``attack=jail``, in place of UML's
        binary) through the real launch path, with its own label and uid in its
        jail, next to a victim: every attempt on the host and on the victim
        fails as ``tests/hostile/test_jail.py`` requires."""
        standin = install_standin(IMAGES)
        problems: list[str] = []
        with plant_bait() as bait:
            try:
                a = run_attack(standin, IMAGES, self.registry, None, set(), bait, "ja",
                               timeout=MARKER_TIMEOUT,
                               stage=lambda what: phase(f"jail_attack:{what}"))
            finally:
                phase("jail_attack")
            problems += jail_problems(a, bait, standin)
        r["table"] = table(a.attempts)
        r["labels"] = a.contexts
        r["uid"] = a.info["uid"]
        r["denials"] = {w: denials_in_phase(f"jail_attack:{w}")
                        for w in ("victim", "attack", "stop")}
        r["leftovers"] = registry_leftovers()
        attacker, victim = a.contexts["attacker"], a.contexts["victim"]
        if not attacker.startswith(smack.PREFIX) or attacker == victim:
            problems.append(f"attacker labelled {attacker!r}, victim {victim!r}")
        others = [d for d in r["denials"]["attack"] if f'subject="{attacker}"' not in d]
        if others:
            problems.append(f"denials of another label while attacking: {others}")
        for stage in ("victim", "stop"):
            if r["denials"][stage]:
                problems.append(f"denials on the normal path ({stage}): {r['denials'][stage]}")
        if r["leftovers"]:
            problems.append(f"registry not empty: {r['leftovers']}")
        r["problems"] = problems
        require(not problems, "; ".join(problems))

    def network(self, r: dict[str, Any]) -> None:
        """A QEMU guest with a tap on a bridge (in a namespace of the lab's own):
        the tap fd the launcher opened works in the labelled hypervisor."""
        setup_netns()
        prepare_guest_files("qn")
        t0 = time.monotonic()
        with launch(qemu_spec("qn", nics=(Nic(bridge=BRIDGE),), netns=NETNS),
                    registry=self.registry) as guest:
            hv = hypervisor_pid(guest.pid)
            r["marker_seconds"] = wait_marker(guest, t0)
            r["label"] = common.proc_context(hv)
            r["fds"] = fd_targets(hv)
            r["outcome"] = str(guest.stop())
        require(r["fds"].get("5") == "/dev/net/tun",
                f"QEMU's tap fd 5 is {r['fds'].get('5')!r} after exec")
        require(r["label"].startswith(smack.PREFIX), f"QEMU runs as {r['label']!r}")

    def plan(self, r: dict[str, Any]) -> None:
        """``svirt check --json`` computes the plan with the drivers: the SMACK
        label and uid it shows are the ones the launch then gives."""
        prepare_guest_files("pl")
        plan, r["disk_plan"] = check_plan("pl")
        r["process"], r["slot"] = plan["process"], plan["slot"]
        t0 = time.monotonic()
        with launch(qemu_spec("pl"), registry=self.registry) as guest:
            r["marker_seconds"] = wait_marker(guest, t0)
            r["label"] = common.proc_context(hypervisor_pid(guest.pid))
            r["uid"] = os.stat(f"/proc/{guest.pid}").st_uid
            r["disk_label"] = smack_label(IMAGES / "pl.img")
            guest.stop()
        problems = []
        if r["process"]["smack"]["identity"] != r["label"]:
            problems.append(f"planned process label {r['process']['smack']}, got {r['label']}")
        if f"uid {r['uid']} " not in r["process"]["dac"]["identity"]:
            problems.append(f"planned {r['process']['dac']}, got uid {r['uid']}")
        if r["disk_plan"]["smack"]["setting"] != f"{smack.XATTR}={r['disk_label']}":
            problems.append(f"planned disk {r['disk_plan']['smack']}, got {r['disk_label']}")
        require(not problems, "; ".join(problems))

    def kill_gc(self, r: dict[str, Any]) -> None:
        prepare_guest_files("kq", "ku")
        make_file(SHARED_DISK)
        files = [MB_KERNEL, SHARED_DISK, *guest_files("kq")]
        before = states(files)

        def during() -> None:
            r["rules_during"] = rules()

        guests = kill_launcher_then_gc(["--qemu-only", str(SHARED_DISK)], r, during)
        r["rules_after_gc"] = rules()
        r["diff"] = common.state_diff(before, states(files))
        r["leftovers"] = registry_leftovers()
        problems = []
        for n, g in guests.items():
            if not g["context"].startswith(smack.PREFIX):
                problems.append(f"{n} ran as {g['context']!r}")
        if not r["rules_during"]:
            problems.append("no shared-disk rule while running")
        if any(r["alive_after_gc"].values()):
            problems.append(f"hypervisors survived gc: {r['alive_after_gc']}")
        if r["gc"]["rc"] != 0:
            problems.append(f"svirt gc failed: {r['gc']}")
        if r["rules_after_gc"]:
            problems.append(f"rules left after gc: {r['rules_after_gc']}")
        if r["diff"]:
            problems.append(f"not restored: {r['diff']}")
        if r["leftovers"]:
            problems.append(f"registry not empty: {r['leftovers']}")
        require(not problems, "; ".join(problems))


def main() -> None:
    lab = Lab()
    run_checks(lab, [("matrix", lab.matrix), ("explain", lab.explain),
                     ("conflict", lab.conflict)],
               [("restore_stop", lab.restore_after_stop), ("static", lab.static),
                ("detached", lab.detached), ("network", lab.network), ("plan", lab.plan),
                ("kill_gc", lab.kill_gc), ("jail_attack", lab.jail_attack)])


if __name__ == "__main__":
    main()
