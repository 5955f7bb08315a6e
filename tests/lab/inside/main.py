"""The svirt checks, run inside the enforcing SELinux lab in one boot.

Run as the launcher domain (unconfined_t, root) with the lab's system python3
and ``PYTHONPATH=/lab`` (the payload holds a copy of ``svirt/`` and of
``tests/lab``)::

    python3 -m tests.lab.inside.main

Each check prints one ``SVIRT-LAB-CHECK {json}`` line as soon as it is done
(a hang later still leaves the earlier results) and writes a phase marker to
the kernel log before it starts, so that the host can attach the AVC denials
of each check (and of each probe) to its assertions.  The host side is
``tests/lab/test_lab_svirt.py``.

Where the product falls short under enforcing SELinux, the checks run with a
WORKAROUND (marked as such below) so that the rest can proceed, and the
product's own path runs once in a phase of its own ("product:*",
"custom:*:product") whose denials are the evidence for the product change.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol

from svirt.errors import SvirtError
from svirt.host import probe_host
from svirt.images import build
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry, default_root
from svirt.security.base import ConfinementWarning, Driver
from svirt.security.dac import DacDriver
from svirt.security.selinux import SELinuxDriver
from svirt.spec import Accel, Backend, Console, Disk, GuestSpec, Nic, Security
from tests.hostile.jail_attack import (
    CANARY_PREFIX,
    Attack,
    Bait,
    children,
    hostfs_attack,
    hostfs_problems,
    jail_problems,
    plant_bait,
    run_attack,
    table,
)
from tests.hostile.standin_spec import install_standin
from tests.lab.inside import common
from tests.lab.inside.common import W, emit, phase
from tests.lab.tiny_guest import MARKER, multiboot_kernel

IMAGES = W / "images"
LOGS = W / "logs"
CACHE = W / "cache"
MB_KERNEL = IMAGES / "multiboot-stay.bin"
SHARED_DISK = IMAGES / "shared.img"
RO_DISK = IMAGES / "readonly.img"
UML_KERNEL = Path("/usr/bin/linux")
MATRIX_GUESTS = (("g1", Backend.QEMU), ("g2", Backend.UML), ("g3", Backend.UML))
NETNS, PEERNS, BRIDGE = "svlab", "svpeer", "br0"
ENDPOINT, UML_ADDR = "10.0.0.1", "10.0.0.2"
WEB_LABEL = "system_u:system_r:svirt_web_t:s0:c10,c20"
WEB_IMAGE = "system_u:object_r:svirt_web_image_t:s0"
MARKER_TIMEOUT = 120.0
GUEST_RE = re.compile(r"system_u:system_r:svirt_t:s0:c\d+,c\d+")
#: TEST-ONLY: the hostile stand-in (tests/hostile/standin.py) replaces UML's
#: linux binary, so it carries the type policy/svirt.fc gives that binary.  No
#: transition happens at its exec (tini, svirt_init_exec_t, is the domain's
#: entrypoint), so no entrypoint check either: svirt_t needs execute_no_trans
#: on the script's own type (the kernel computes the exec once, on the file
#: given to execve) and only execute on its interpreter, python3 (bin_t),
#: which refpolicy already grants; the victim's phase shows no denial.
STANDIN_CONTEXT = "system_u:object_r:svirt_uml_exec_t:s0"
#: the jail_attack check's phases ("jail_attack:STAGE"); denials are the point
#: only while attacking
JAIL_STAGES = ("victim", "attack", "stop", "hostfs-start", "hostfs", "hostfs-stop")
JAIL_ATTACKS = ("attack", "hostfs")
HERE = Path(__file__).resolve().parent
#: the explain check's mislabel: a category pair no guest of the lab gets
STALE_LEVEL = "s0:c1000,c1001"


# ---------------------------------------------------------------- plumbing
class Failed(Exception):
    """A check found something wrong (the message says what)."""


def hypervisor_pid(guest: Guest) -> int:
    """The hypervisor: ``guest.pid`` itself, or in a jail its init's one child."""
    if not guest.spec.jail:
        return guest.pid
    for task in Path(f"/proc/{guest.pid}/task").iterdir():
        children = (task / "children").read_text().split()
        if children:
            return int(children[0])
    return guest.pid


@contextmanager
def check(name: str, results: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Run one check: phase marker, timing, errors recorded, result emitted."""
    phase(name)
    result: dict[str, Any] = {"ok": False}
    t0 = time.monotonic()
    try:
        yield result
        result["ok"] = True
    except Exception as err:  # noqa: BLE001 - every failure is reported to the host
        result["error"] = f"{type(err).__name__}: {err}"
        if not isinstance(err, Failed):
            result["traceback"] = traceback.format_exc()
    finally:
        result["seconds"] = round(time.monotonic() - t0, 2)
        results[name] = result
        emit(name, result)
        phase("idle")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


Step = tuple[str, Callable[[dict[str, Any]], None]]


class Pass(Protocol):
    """What run_checks needs of a pass's Lab."""

    results: dict[str, dict[str, Any]]

    def setup(self, r: dict[str, Any]) -> None: ...
    def boot(self, stack: ExitStack, r: dict[str, Any]) -> None: ...
    def stop(self, stack: ExitStack, r: dict[str, Any]) -> None: ...


def run_checks(lab: Pass, running: list[Step], after: list[Step]) -> None:
    """One pass: setup; boot, the checks that need the booted guests
    (``running``), stop; then the rest (``after``); a summary line last."""
    t_start = time.monotonic()
    results = lab.results
    with check("setup", results) as r:
        lab.setup(r)
    if results["setup"]["ok"]:
        with ExitStack() as stack:
            with check("boot", results) as r:
                lab.boot(stack, r)
            for name, step in running:
                with check(name, results) as r:
                    step(r)
            with check("stop", results) as r:
                lab.stop(stack, r)
        for name, step in after:
            with check(name, results) as r:
                step(r)
    emit("summary", {"ok": all(v["ok"] for v in results.values()),
                     "seconds": round(time.monotonic() - t_start, 2)})


def make_file(path: Path, size: int = 1 << 20, mode: int = 0o600) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    path.chmod(mode)
    return path


def qemu_spec(name: str, **kw: Any) -> GuestSpec:
    kw.setdefault("disks", (Disk(IMAGES / f"{name}.img"),))
    kw.setdefault("kernel", MB_KERNEL)
    kw.setdefault("memory", 32)
    return GuestSpec(name=name, backend=Backend.QEMU, accel=Accel.TCG,
                     console=Console(log=LOGS / f"{name}.log"), shutdown_timeout=1.0, **kw)


def uml_spec(name: str, initrd: Path, extra: str = "", mode: str = "stay", **kw: Any
             ) -> GuestSpec:
    kw.setdefault("disks", (Disk(IMAGES / f"{name}.img"),))
    # UML needs mem=128M or more in the lab
    return GuestSpec(name=name, backend=Backend.UML, kernel=UML_KERNEL, initrd=initrd,
                     memory=128, cmdline=build.guest_cmdline(mode, MARKER, extra),
                     console=Console(log=LOGS / f"{name}.log"), shutdown_timeout=20.0, **kw)


def qemu_toml(name: str, top: str = "", tables: str = "") -> Path:
    """The TOML file of ``qemu_spec(name)`` (``top``: more top-level keys,
    ``tables``: more tables), for the CLI (``svirt check``)."""
    path = W / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n{top}backend = "qemu"\naccel = "tcg"\nkernel = "{MB_KERNEL}"\n'
        f'memory = 32\nshutdown_timeout = 1\n[console]\nlog = "{LOGS / f"{name}.log"}"\n'
        f'[[disk]]\npath = "{IMAGES / f"{name}.img"}"\n{tables}')
    return path


def check_plan(name: str, top: str = "", tables: str = ""
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``svirt check --json`` of ``qemu_toml(name, top, tables)``: the plan,
    and its disk's plan by driver."""
    out = svirt_cli("check", "--json", str(qemu_toml(name, top, tables)))
    require(out["rc"] == 0, f"svirt check failed: {out}")
    plan: dict[str, Any] = json.loads(out["stdout"])
    disk = next(x for x in plan["resources"] if x["path"] == str(IMAGES / f"{name}.img"))
    return plan, disk["plan"]


def guest_files(name: str) -> list[Path]:
    return [IMAGES / f"{name}.img", LOGS / f"{name}.log"]


def prepare_guest_files(*names: str) -> None:
    for name in names:
        make_file(IMAGES / f"{name}.img")
        make_file(LOGS / f"{name}.log", size=0, mode=0o644)


def dac_ids(guest: Guest) -> tuple[int, int]:
    uid, gid = guest.record.labels["dac"].process.split(":")
    return int(uid), int(gid)


def selinux_context(guest: Guest) -> str:
    return guest.record.labels["selinux"].process


def level_of(context: str) -> str:
    return context.split(":", 3)[3] if context.count(":") >= 3 else ""


def fd_targets(pid: int) -> dict[str, str]:
    out = {}
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError as err:
            out[fd] = f"? {err.strerror}"
    return out


def wait_marker(guest: Guest, t0: float, timeout: float = MARKER_TIMEOUT) -> float:
    guest.console.expect_line(MARKER, timeout=timeout)
    return round(time.monotonic() - t0, 2)


def log_has(path: Path, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if text in path.read_text(errors="replace"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def describe_guest(guest: Guest) -> dict[str, Any]:
    pid = guest.pid
    disk = guest.spec.disks[0].path if guest.spec.disks else None
    info: dict[str, Any] = {
        "backend": str(guest.spec.backend),
        "pid": pid,
        "context": common.proc_context(pid),
        "labels": {n: lab.to_dict() for n, lab in guest.record.labels.items()},
        "disk_label": common.getfilecon(disk) if disk else None,
    }
    try:
        info["uid"] = os.stat(f"/proc/{pid}").st_uid
        info["fds"] = fd_targets(pid)
        info["personality"] = Path(f"/proc/{pid}/personality").read_text().strip()
    except OSError as err:
        info["gone"] = f"the hypervisor is gone: {err.strerror}"
        info["fds"] = {}
    return info


def stop_guest(guest: Guest) -> dict[str, Any]:
    t0 = time.monotonic()
    outcome = guest.stop()
    return {"kind": str(outcome.kind), "step": str(outcome.step), "detail": outcome.detail,
            "seconds": round(time.monotonic() - t0, 2)}


def stop_all(guests: list[Guest]) -> dict[str, Any]:
    """Stop guests in parallel (each runs its own shutdown ladder)."""
    with ThreadPoolExecutor(max_workers=max(1, len(guests))) as pool:
        futures = {g.name: pool.submit(stop_guest, g) for g in guests}
        return {name: f.result() for name, f in futures.items()}


def registry_leftovers() -> list[str]:
    registry = Registry()
    left = []
    for d in (registry.guests, registry.objects, registry.run_dirs, registry.control_dir):
        if d.is_dir():
            left += [f"{d}/{e}" for e in os.listdir(d)]
    return left


# ------------------------------------------------------------------ checks
class Lab:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.registry = Registry()
        self.guests: dict[str, Guest] = {}
        self.initrd = Path()
        self.files: list[Path] = []
        self.before: dict[str, dict[str, Any]] = {}

    # -- setup
    def setup(self, r: dict[str, Any]) -> None:
        shutil.rmtree(W, ignore_errors=True)
        for d in (W, IMAGES, LOGS):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)  # guest uids walk to their files
        MB_KERNEL.write_bytes(multiboot_kernel(stay=True))
        MB_KERNEL.chmod(0o644)
        t0 = time.monotonic()
        self.initrd = build.build_initramfs(CACHE, qemu_modules=False)
        r["initramfs_seconds"] = round(time.monotonic() - t0, 2)
        common.install_probe(HERE / "probe.py")
        prepare_guest_files(*(n for n, _ in MATRIX_GUESTS), "intruder", "foreign")
        make_file(SHARED_DISK)
        make_file(RO_DISK, mode=0o640)  # not world-readable: the guest gets an ACL entry
        self.files = [MB_KERNEL, self.initrd, SHARED_DISK, RO_DISK,
                      *(p for n, _ in MATRIX_GUESTS for p in guest_files(n)),
                      *guest_files("intruder"), IMAGES / "foreign.img"]
        self.before = common.states(self.files)
        # The product's first host probe runs `linux --version` in the launcher's
        # own domain (svirt/host.py _probe_binary): UML needs execmem, which
        # unconfined_t lacks.  Its own phase, so that the denial is evidence.
        (default_root() / "host-cache.json").unlink(missing_ok=True)
        phase("product:host-probe")
        t0 = time.monotonic()
        host = probe_host()
        # ... and `linux --help` once, for the UML host options it refuses in
        # guest command lines (svirt/backends/uml_options.py): same denial
        from svirt.backends.uml_options import host_option_patterns
        from svirt.host import UML_BINARY

        uml = host.binary(UML_BINARY)
        host_option_patterns(uml.path if uml else None)
        r["host_probe_seconds"] = round(time.monotonic() - t0, 2)
        r["host_probe_denials"] = common.denials_in_phase("product:host-probe")
        phase("setup")
        r["selinux"] = str(host.selinux)
        r["binaries"] = {k: (f"{v.path} {v.version}" if v else None)
                         for k, v in host.binaries.items()}
        r["launcher_context"] = common.proc_context(os.getpid())
        r["before"] = self.before

    # -- 1. boot a QEMU and two UML guests
    def boot(self, stack: ExitStack, r: dict[str, Any]) -> None:
        started: dict[str, float] = {}
        launched: dict[str, float] = {}
        # besides its own disk: g1 and g2 share a writable disk, g3 has a read-only one
        extra = {"g1": Disk(SHARED_DISK, shared=True), "g2": Disk(SHARED_DISK, shared=True),
                 "g3": Disk(RO_DISK, readonly=True)}
        for name, backend in MATRIX_GUESTS:
            disks = (Disk(IMAGES / f"{name}.img"), extra[name])
            spec = (qemu_spec(name, disks=disks) if backend is Backend.QEMU
                    else uml_spec(name, self.initrd, disks=disks))
            started[name] = time.monotonic()
            self.guests[name] = stack.enter_context(launch(spec, registry=self.registry))
            launched[name] = round(time.monotonic() - started[name], 2)
        guests: dict[str, Any] = {}
        for name, guest in self.guests.items():
            info: dict[str, Any] = {"launch_seconds": launched[name]}
            try:
                info["marker_seconds"] = wait_marker(guest, started[name])
                info["marker"] = True
            except SvirtError as err:
                info["marker"] = False
                info["marker_error"] = str(err)
            info |= describe_guest(guest)
            info["extra_disk"] = common.file_state(extra[name].path)
            info["log_has_marker"] = log_has(LOGS / f"{name}.log", MARKER)
            info["console_tail"] = guest.console.tail(600)
            guests[name] = info
        r["guests"] = guests
        problems = []
        levels = set()
        for name, info in guests.items():
            ctx = info["context"]
            if not GUEST_RE.fullmatch(ctx):
                problems.append(f"{name} runs as {ctx!r}")
            if ctx != info["labels"]["selinux"]["process"]:
                problems.append(f"{name}: {ctx} is not its record's label")
            levels.add(level_of(ctx))
            if not info["marker"]:
                problems.append(f"{name}: no marker on the console socket")
            if not info["log_has_marker"]:
                problems.append(f"{name}: marker missing from the console log")
            se = info["labels"]["selinux"]
            want = se["content"] if name == "g3" else se["shared"]
            if info["extra_disk"][common.SELINUX_XATTR] != want:
                problems.append(f"{name}: extra disk labelled {info['extra_disk']}, not {want}")
            for fd in ("1", "3"):
                if not info["fds"].get(fd, "").startswith("socket:"):
                    problems.append(f"{name}: fd {fd} is {info['fds'].get(fd)}, not the socket")
        if len(levels) != len(guests):
            problems.append(f"category pairs are not distinct: {levels}")
        require(not problems, "; ".join(problems))

    # -- 2. the isolation matrix
    def matrix(self, r: dict[str, Any]) -> None:
        require(len(self.guests) == len(MATRIX_GUESTS) and all(
            g.running for g in self.guests.values()), "the matrix guests are not all running")
        targets = {name: self._target(g) for name, g in self.guests.items()}
        cells: list[dict[str, Any]] = []
        for a_name, a in self.guests.items():
            for b_name, b in self.guests.items():
                modes = ["guest"] if a is b else ["guest", "selinux-only"]
                for mode in modes:
                    # guest: all of A (context, uid, gid); selinux-only: A's context
                    # with B's own uid/gid, so that only SELinux stands in the way
                    uid, gid = dac_ids(a if mode == "guest" else b)
                    name = f"matrix:{a_name}->{b_name}:{mode}"
                    phase(name)
                    t0 = time.monotonic()
                    answer = common.run_probe(selinux_context(a), uid, gid,
                                              {"targets": [targets[b_name]]})
                    cells.append({"phase": name, "from": a_name, "to": b_name, "mode": mode,
                                  "context": answer.get("context"), "uid": answer.get("uid"),
                                  "results": answer.get(b_name), "rc": answer.get("rc"),
                                  "error": answer.get("error"),
                                  "seconds": round(time.monotonic() - t0, 2),
                                  "denials": common.denials_in_phase(name)})
        phase("matrix")
        r["cells"] = cells
        bad = [c["phase"] for c in cells if c["results"] is None]
        require(not bad, f"probes gave no answer: {bad}")

    def _target(self, guest: Guest) -> dict[str, Any]:
        """What a probe aims at: the guest's disk, log, control channel and its
        hypervisor process (in a jail, the child of the jail's init: the init
        itself is non-dumpable, out of reach of its own guest too)."""
        t: dict[str, Any] = {"name": guest.name, "backend": str(guest.spec.backend),
                             "pid": hypervisor_pid(guest), "disk": str(guest.spec.disks[0].path),
                             "log": str(guest.spec.console.log)}
        if guest.spec.backend is Backend.UML:
            t["mconsole"] = str(guest.run_dir / guest.name / "mconsole")
        return t

    # -- 3. a disk labelled for another running guest
    def conflict(self, r: dict[str, Any]) -> None:
        require("g1" in self.guests and self.guests["g1"].running, "g1 is not running")
        victim = self.guests["g1"]
        foreign = IMAGES / "foreign.img"
        victim_level = level_of(selinux_context(victim))
        common.setfilecon(foreign, f"system_u:object_r:svirt_image_t:{victim_level}")
        cases = {
            # a file at g1's level that the registry does not know (a copy, or
            # the disk of a guest some other tool started)
            "foreign": qemu_spec("intruder", disks=(Disk(foreign),)),
            # g2's own disk, registered
            "registered": qemu_spec("intruder", disks=(Disk(IMAGES / "g2.img"),)),
        }
        out, problems = intruder_launches(self.registry, cases, common.states)
        msg = out["foreign"].get("message", "")
        if victim_level not in msg or selinux_context(victim) not in msg:
            problems.append(f"foreign: the error does not name g1's level/process: {msg!r}")
        if "g2" not in out["registered"].get("message", ""):
            problems.append("registered: the error does not name g2")
        r["cases"] = out
        r["victim"] = selinux_context(victim)
        # the test labelled it, not svirt: put it back for restore_stop
        common.setfilecon(foreign, self.before[str(foreign)][common.SELINUX_XATTR])
        require(not problems, "; ".join(problems))

    # -- 3b. real denials, explained by `svirt explain` (the CLI, reading /dev/kmsg)
    def explain(self, r: dict[str, Any]) -> None:
        require(all(n in self.guests and self.guests[n].running for n in ("g1", "g2")),
                "g1 and g2 are not running")
        a, b = self.guests["g1"], self.guests["g2"]
        a_disk, b_disk = a.spec.disks[0].path, b.spec.disks[0].path
        a_label = common.getfilecon(a_disk)
        # A's disk at a level no running guest holds (left from an earlier
        # run, say); s0 would not do: every guest's level dominates it
        wrong = ":".join([*a_label.split(":", 3)[:3], STALE_LEVEL])
        held = [level_of(selinux_context(g)) for g in self.guests.values()]
        require(STALE_LEVEL not in held, f"{STALE_LEVEL} is a running guest's level: {held}")
        r["since"] = since = time.time()
        answers: dict[str, Any] = {}
        # 1. A's context reads B's disk, with B's uid: with A's own uid DAC
        # (B's disk is B's, 0600) refuses first, and a DAC refusal is not logged
        phase("explain:cross-guest")
        answers["cross-guest"] = common.run_probe(selinux_context(a), *dac_ids(b),
                                                  {"reads": [str(b_disk)]})
        # 2. A itself (context and uid) reads its own disk, mislabelled
        phase("explain:mislabelled")
        common.setfilecon(a_disk, wrong)
        try:
            answers["mislabelled"] = common.run_probe(selinux_context(a), *dac_ids(a),
                                                      {"reads": [str(a_disk)]})
        finally:
            common.setfilecon(a_disk, a_label)  # what svirt gave it, for its restore
        phase("explain")
        r["probes"] = answers
        r["denials"] = {c: common.denials_in_phase(f"explain:{c}") for c in answers}
        # as explain reads them, for tests/unit/test_explain_lab.py
        r["kmsg"] = common.raw_records([d for ds in r["denials"].values() for d in ds])
        t0 = time.monotonic()
        findings, run = svirt_explain(since)
        r["explain_seconds"] = round(time.monotonic() - t0, 2)
        r["findings"], r["explain_rc"], r["explain_stderr"] = findings, run["rc"], run["stderr"]
        want: dict[str, dict[str, Any]] = {
            "cross-guest": {"lsm": "selinux", "classification": "cross-guest", "guest": "g1",
                            "target_guest": "g2", "object": str(b_disk)},
            "mislabelled": {"lsm": "selinux", "classification": "mislabelled", "guest": "g1",
                            "target_guest": None, "object": str(a_disk), "label": wrong,
                            "wanted": a.record.labels["selinux"].image},
        }
        r["want"] = want
        problems = explained_problems(answers, r["denials"], findings, run, want)
        require(not problems, "; ".join(problems))

    # -- 3c. a guest booted through UEFI with a seed and an agent port, g1 the
    # other guest (tests/lab/inside/firmware_guest.py)
    def firmware(self, r: dict[str, Any]) -> None:
        from tests.lab.inside.firmware_guest import selinux_firmware

        require("g1" in self.guests and self.guests["g1"].running, "g1 is not running")
        selinux_firmware(self.registry, self.guests["g1"], r)

    # -- stop
    def stop(self, stack: ExitStack, r: dict[str, Any]) -> None:
        outcomes: dict[str, Any] = {}
        # g2 (UML) stops through the product's own mconsole client, first and
        # alone (its phase holds the evidence); the others with the workaround,
        # in parallel
        phase("product:uml-mconsole")
        outcomes["g2"] = stop_guest(self.guests["g2"]) | {"product_path": True}
        phase("stop")
        outcomes |= stop_all([g for n, g in self.guests.items() if n != "g2"])
        t0 = time.monotonic()
        stack.close()
        r["release_seconds"] = round(time.monotonic() - t0, 2)
        r["outcomes"] = outcomes
        pids = {n: g.pid for n, g in self.guests.items()}
        r["alive"] = [n for n, pid in pids.items() if common.alive(pid)]
        require(not r["alive"], f"hypervisors survived: {r['alive']}")

    # -- 4a. labels after a normal stop
    def restore_after_stop(self, r: dict[str, Any]) -> None:
        r["diff"] = common.state_diff(self.before, common.states(self.files))
        r["leftovers"] = registry_leftovers()
        r["files"] = [str(p) for p in self.files]
        require(not r["diff"], f"labels/owners not restored: {r['diff']}")
        require(not r["leftovers"], f"registry not empty: {r['leftovers']}")

    # -- 7. networking
    def network(self, r: dict[str, Any]) -> None:
        setup_netns()
        try:
            self._network(r)
        finally:
            for ns in (NETNS, PEERNS):
                subprocess.run(["ip", "netns", "del", ns], check=False)

    def _network(self, r: dict[str, Any]) -> None:
        prepare_guest_files("qn", "un")
        nic = (Nic(bridge=BRIDGE),)
        extra = f"svirt.net={UML_ADDR}/24 svirt.ping={ENDPOINT} svirt.pingtries=15"
        specs = [qemu_spec("qn", nics=nic, netns=NETNS),
                 uml_spec("un", self.initrd, extra, nics=nic, netns=NETNS)]
        with ExitStack() as stack:
            guests: dict[str, Guest] = {}
            t0 = time.monotonic()
            for spec in specs:
                guests[spec.name] = stack.enter_context(launch(spec, registry=self.registry))
            info: dict[str, Any] = {}
            for name, guest in guests.items():
                gi: dict[str, Any] = {"marker_seconds": wait_marker(guest, t0)}
                gi |= describe_guest(guest)
                gi["taps"] = [e["name"] for e in guest.record.journal if e.get("op") == "tap"]
                info[name] = gi
            qn, un = guests["qn"], guests["un"]
            try:
                ping = un.console.expect(re.compile(rb"SVIRT-PING \S+ (ok|fail)"),
                                         timeout=MARKER_TIMEOUT)
                info["un"]["ping"] = ping.decode()
            except SvirtError as err:
                info["un"]["ping"] = f"no ping result: {err}"
            info["un"]["console_tail"] = un.console.tail(800)
            with open(f"/proc/{qn.pid}/fdinfo/5") as f:
                info["qn"]["fdinfo5"] = f.read()
            r["guests"] = info
            qn_tap, un_tap = info["qn"]["taps"][0], info["un"]["taps"][0]
            probes = []
            # B's context (and uid) on A's tap; then SELinux alone (A's own uid),
            # the QEMU tap last: SELinux lets that one through (see the report)
            for attacker, victim, tap, mode in ((qn, un, un_tap, "guest"),
                                                (un, qn, qn_tap, "guest"),
                                                (qn, un, un_tap, "selinux-only"),
                                                (un, qn, qn_tap, "selinux-only")):
                uid, gid = dac_ids(attacker if mode == "guest" else victim)
                name = f"tap:{attacker.name}->{victim.name}:{mode}"
                phase(name)
                answer = common.run_probe(selinux_context(attacker), uid, gid, {"tap": tap},
                                          tun_netns=NETNS)
                probes.append({"phase": name, "from": attacker.name, "to": victim.name,
                               "tap": tap, "mode": mode, "result": answer.get("tap"),
                               "error": answer.get("error"),
                               "denials": common.denials_in_phase(name)})
            phase("network")
            r["tap_probes"] = probes
            r["outcomes"] = stop_all(list(guests.values()))
        r["taps_left"] = subprocess.run(["ip", "-n", NETNS, "-o", "link", "show", "type", "tun"],
                                        capture_output=True, text=True, check=False).stdout
        problems = []
        for name, gi in info.items():
            if not GUEST_RE.fullmatch(gi["context"]):
                problems.append(f"{name} runs as {gi['context']}")
        if level_of(info["qn"]["context"]) == level_of(info["un"]["context"]):
            problems.append("qn and un share a category pair")
        if info["qn"]["fds"].get("5") != "/dev/net/tun" or f"iff:\t{qn_tap}" not in info[
                "qn"]["fdinfo5"]:
            problems.append(f"qn does not hold its tap as fd 5: {info['qn']['fds']}")
        if info["un"].get("ping") != f"SVIRT-PING {ENDPOINT} ok":
            problems.append(f"un: {info['un'].get('ping')}")
        for p in probes[:2]:
            if p["result"] == "ok":
                problems.append(f"{p['phase']}: attached")
        if r["taps_left"].strip():
            problems.append(f"taps left: {r['taps_left']}")
        require(not problems, "; ".join(problems))

    # -- 6. custom types
    def custom(self, r: dict[str, Any]) -> None:
        prepare_guest_files("webs", "webd")
        host = probe_host()
        cases: list[tuple[str, Callable[[], GuestSpec], str]] = [
            ("static", lambda: qemu_spec("webs", security=Security(label=WEB_LABEL)),
             re.escape(WEB_LABEL)),
            ("dynamic", lambda: uml_spec("webd", self.initrd,
                                         security=Security(type="svirt_web_t")),
             r"system_u:system_r:svirt_web_t:s0:c\d+,c\d+"),
        ]
        problems = []
        for case, make, expected in cases:
            spec = make()
            files = [*(d.path for d in spec.disks), LOGS / f"{spec.name}.log"]
            before = common.states(files)
            default = self._run_custom(f"custom:{case}:product", spec, None, expected)
            entry: dict[str, Any] = {"product": default}
            chosen = default
            if not default["works"]:
                # WORKAROUND (product change needed, see the report): the image
                # context of a guest of type svirt_web_t must be svirt_web_image_t
                drivers: list[Driver] = [SELinuxDriver(image_context=WEB_IMAGE), DacDriver()]
                for d in drivers:
                    d.check_available(host)
                chosen = entry["workaround"] = self._run_custom(
                    f"custom:{case}:workaround", spec, drivers, expected)
            entry["restored_diff"] = common.state_diff(before, common.states(files))
            r[case] = entry
            if not chosen["works"]:
                problems.append(f"{case}: {chosen}")
            if entry["restored_diff"]:
                problems.append(f"{case}: not restored: {entry['restored_diff']}")
        require(not problems, "; ".join(problems))

    def _run_custom(self, name: str, spec: GuestSpec, drivers: list[Driver] | None,
                    expected: str) -> dict[str, Any]:
        phase(name)
        out: dict[str, Any] = {"phase": name}
        t0 = time.monotonic()
        try:
            with launch(spec, registry=self.registry, drivers=drivers) as guest:
                try:
                    out["marker_seconds"] = wait_marker(guest, t0)
                    out["marker"] = True
                except SvirtError as err:
                    out["marker"] = False
                    out["marker_error"] = str(err)
                out |= describe_guest(guest)
                out["console_tail"] = guest.console.tail(600)
                out["outcome"] = str(guest.stop().kind)
        except SvirtError as err:
            out["error"] = f"{type(err).__name__}: {err.message}"
        out["denials"] = common.denials_in_phase(name)
        # Not the outcome: UML now and then aborts while it powers off (its
        # address space randomised: SELinux clears ADDR_NO_RANDOMIZE on the
        # domain transition, so no launcher can turn that off for it).
        out["works"] = bool(out.get("marker") and re.fullmatch(expected, out.get("context", ""))
                            and not out["denials"])
        phase("custom")
        return out

    # -- SELinux permissive: the launch says the labels are not enforced
    def permissive(self, r: dict[str, Any]) -> None:
        """setenforce 0, then a launch and ``svirt check``: both say SELinux is
        permissive and the guest's labels are not enforced; enforcing again after."""
        prepare_guest_files("pm")
        enforce = Path("/sys/fs/selinux/enforce")
        spec_file = qemu_toml("pm")
        enforce.write_text("0")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with launch(qemu_spec("pm"), registry=self.registry) as guest:
                    r["guest_warnings"] = list(guest.warnings)
                    r["context"] = common.proc_context(guest.pid)
                    guest.stop()
            r["issued"] = [str(w.message) for w in caught
                           if issubclass(w.category, ConfinementWarning)]
            r["check"] = svirt_cli("check", str(spec_file))
        finally:
            enforce.write_text("1")
        r["enforcing_after"] = enforce.read_text().strip()
        problems = []
        if not any("permissive" in w for w in r["guest_warnings"]):
            problems.append(f"the guest carries no permissive warning: {r['guest_warnings']}")
        if r["issued"] != r["guest_warnings"]:
            problems.append(f"issued {r['issued']}, kept {r['guest_warnings']}")
        if "permissive" not in r["check"]["stderr"] + r["check"]["stdout"]:
            problems.append(f"svirt check does not say it: {r['check']}")
        if r["enforcing_after"] != "1":
            problems.append("the lab did not go back to enforcing")
        require(not problems, "; ".join(problems))

    # -- QEMU with a Linux kernel and an initrd (QEMU maps the initrd)
    def qemu_linux(self, r: dict[str, Any]) -> None:
        kernel = IMAGES / "vmlinuz"
        shutil.copy(sorted(Path("/boot").glob("vmlinuz-*"))[-1], kernel)
        kernel.chmod(0o644)
        prepare_guest_files("ql")
        files = [kernel, self.initrd, *guest_files("ql")]
        before = common.states(files)
        spec = qemu_spec("ql", kernel=kernel, initrd=self.initrd, memory=128,
                         cmdline="panic=-1")
        t0 = time.monotonic()
        with launch(spec, registry=self.registry) as guest:
            # SeaBIOS runs once QEMU has loaded the kernel and the initrd
            guest.console.expect("Booting from ROM", timeout=MARKER_TIMEOUT)
            r["seconds_to_bios_boot"] = round(time.monotonic() - t0, 2)
            r |= describe_guest(guest)
            r["outcome"] = str(guest.stop().kind)
        r["diff"] = common.state_diff(before, common.states(files))
        require(GUEST_RE.fullmatch(r["context"]) is not None, f"ql ran as {r['context']}")
        require(not r["diff"], f"not restored: {r['diff']}")

    # -- 4b. the launcher killed, then svirt gc
    def kill_gc(self, r: dict[str, Any]) -> None:
        prepare_guest_files("kq", "ku")
        files = [MB_KERNEL, self.initrd, *guest_files("kq"), *guest_files("ku")]
        before = common.states(files)
        def during() -> None:
            r["during"] = {str(p): common.file_state(p) for p in files}
            r["list"] = svirt_cli("list", "-Z")

        guests = kill_launcher_then_gc([str(self.initrd)], r, during)
        r["diff"] = common.state_diff(before, common.states(files))
        r["leftovers"] = registry_leftovers()
        problems = []
        for n, g in guests.items():
            if not GUEST_RE.fullmatch(g["context"]):
                problems.append(f"{n} ran as {g['context']}")
            if n not in r["list"]["stdout"] or g["context"] not in r["list"]["stdout"]:
                problems.append(f"svirt list -Z does not show {n} as {g['context']}")
        if not r["alive_after_kill"].get("kq"):
            problems.append("kq (no pdeathsig) died with the launcher: gc had nothing to kill")
        # ku asked for PR_SET_PDEATHSIG, which SELinux clears on the domain
        # transition at exec: whether it outlived the launcher is reported
        if any(r["alive_after_gc"].values()):
            problems.append(f"hypervisors survived gc: {r['alive_after_gc']}")
        if r["gc"]["rc"] != 0:
            problems.append(f"svirt gc failed: {r['gc']}")
        if r["diff"]:
            problems.append(f"not restored: {r['diff']}")
        if r["leftovers"]:
            problems.append(f"registry not empty: {r['leftovers']}")
        require(not problems, "; ".join(problems))


    # -- 8. the jail attacked from inside: the hostile suite's stand-in
    # (attack=jail) through the real launch path, as svirt_t:s0:cA,cB with its
    # own uid in its jail, next to a victim stand-in (tests/hostile/jail_attack.py)
    def jail_attack(self, r: dict[str, Any]) -> None:
        def label(standin: Path) -> None:
            r["standin_label"] = {"default": common.getfilecon(standin)}
            common.setfilecon(standin, STANDIN_CONTEXT)  # TEST-ONLY, see STANDIN_CONTEXT
            r["standin_label"]["used"] = common.getfilecon(standin)

        a, problems = attack_from_jail(self.registry, self.initrd, r, common.denials_in_phase,
                                       label)
        attacker, victim = a.contexts["attacker"], a.contexts["victim"]
        hostfs_context = r["hostfs"]["context"]
        for who, ctx in [*a.contexts.items(), ("hostfs UML guest", hostfs_context)]:
            if not GUEST_RE.fullmatch(ctx):
                problems.append(f"the {who} ran as {ctx!r}")
        if level_of(attacker) == level_of(victim):
            problems.append(f"attacker and victim share a level: {attacker}")
        # the attack's denials are the attacker's own: nothing else got in the way
        for stage, ctx in (("attack", attacker), ("hostfs", hostfs_context)):
            others = [d for d in r["denials"][stage] if f"scontext={ctx} " not in d]
            if others:
                problems.append(f"denials of another domain in {stage}: {others}")
        r["problems"] = problems
        require(not problems, "; ".join(problems))


# ------------------------------------------- shared with the AppArmor pass
def intruder_launches(registry: Registry, cases: dict[str, GuestSpec],
                      states: Callable[[list[Path]], dict[str, dict[str, Any]]]
                      ) -> tuple[dict[str, Any], list[str]]:
    """Launch each of ``cases`` (an intruder on a running guest's disk): each
    must be refused with a SecurityError, change nothing and leave no record."""
    out: dict[str, Any] = {}
    problems = []
    for case, spec in cases.items():
        watched = [*(p for p in (spec.kernel,) if p), *(d.path for d in spec.disks),
                   LOGS / f"{spec.name}.log"]
        before = states(watched)
        info: dict[str, Any] = {}
        try:
            with launch(spec, registry=registry):
                info["launched"] = True
        except SvirtError as err:
            info["error_type"] = type(err).__name__
            info["message"] = err.message
        info["changed"] = common.state_diff(before, states(watched))
        info["intruder_record_left"] = any(rec.name == spec.name for rec in registry.records())
        out[case] = info
        if info.get("error_type") != "SecurityError":
            problems.append(f"{case}: no SecurityError ({info})")
        if info["changed"]:
            problems.append(f"{case}: files changed: {info['changed']}")
        if info["intruder_record_left"]:
            problems.append(f"{case}: the intruder's record was left behind")
    return out, problems


def attack_from_jail(registry: Registry, initrd: Path, r: dict[str, Any],
                     denials: Callable[[str], list[str]],
                     label_standin: Callable[[Path], None] | None = None, *,
                     hostfs: bool = True, standin_noise: tuple[re.Pattern[str], ...] = (),
                     mac_refuses_listings: bool = False) -> tuple[Attack, list[str]]:
    """The jail attacked from inside (check ``jail_attack``): the hostile suite's
    stand-in (attack=jail) through the real launch path, confined, with its
    own uid in its jail, next to a victim stand-in (tests/hostile/jail_attack.py);
    then (``hostfs``) root in a real jailed UML guest through hostfs.  Fills
    ``r``; returns the attack and the problems found (the LSM's own checks are
    the caller's).  ``standin_noise``: denials the stand-in (python, not a
    hypervisor) causes on its way up, allowed outside the attack (``r["noise"]``);
    ``mac_refuses_listings``: see :func:`jail_problems`."""
    standin = install_standin(IMAGES)
    if label_standin is not None:
        label_standin(standin)
    uids: set[int] = set()
    problems: list[str] = []
    with plant_bait() as bait:
        t0 = time.monotonic()
        try:
            a = run_attack(standin, IMAGES, registry, None, uids, bait, "ja",
                           timeout=MARKER_TIMEOUT,
                           stage=lambda what: phase(f"jail_attack:{what}"))
        finally:
            phase("jail_attack")
        r["standin_seconds"] = round(time.monotonic() - t0, 2)
        problems += jail_problems(a, bait, standin, mac_refuses_listings=mac_refuses_listings)
        if hostfs:
            r["hostfs"] = jail_hostfs(registry, initrd, bait, problems)
    r["attempts"] = a.attempts
    r["table"] = table(a.attempts)
    r["contexts"] = a.contexts
    r["uid"] = a.info["uid"]
    r["report"] = {k: v for k, v in a.report.items() if k != "attempts"}
    stages = JAIL_STAGES if hostfs else JAIL_STAGES[:3]
    r["denials"] = {w: denials(f"jail_attack:{w}") for w in stages}
    r["leftovers"] = registry_leftovers()
    r["noise"] = {w: [d for d in r["denials"][w] if any(n.search(d) for n in standin_noise)]
                  for w in stages}
    for stage in stages:
        normal = [d for d in r["denials"][stage] if d not in r["noise"][stage]]
        if stage not in JAIL_ATTACKS and normal:
            problems.append(f"denials on the normal path ({stage}): {normal}")
    if r["leftovers"]:
        problems.append(f"registry not empty: {r['leftovers']}")
    return a, problems


def jail_hostfs(registry: Registry, initrd: Path, bait: Bait, problems: list[str]
                ) -> dict[str, Any]:
    """Root in a real jailed UML guest (svirt.mode=shell) mounts hostfs and
    goes for the lab's canaries and, by its path, a running guest's disk."""
    prepare_guest_files("jv", "jh")
    victim_disk = IMAGES / "jv.img"
    with open(victim_disk, "r+b") as f:
        f.write(f"{CANARY_PREFIX}victim disk\n".encode())
    files = [*guest_files("jv"), *guest_files("jh")]
    before = common.states(files)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    phase("jail_attack:hostfs-start")
    with ExitStack() as stack:
        stack.callback(phase, "jail_attack")
        victim = stack.enter_context(launch(qemu_spec("jv"), registry=registry))
        guest = stack.enter_context(launch(uml_spec("jh", initrd, mode="shell"),
                                           registry=registry))
        out["marker_seconds"] = wait_marker(guest, t0)
        out["context"] = common.proc_context(children(guest.pid)[0])
        out["victim_context"] = common.proc_context(children(victim.pid)[0])
        phase("jail_attack:hostfs")
        t1 = time.monotonic()
        h = hostfs_attack(guest, bait, other_disk=victim_disk, timeout=MARKER_TIMEOUT)
        out["attack_seconds"] = round(time.monotonic() - t1, 2)
        home = guest.run_dir
        phase("jail_attack:hostfs-stop")
        out["outcomes"] = stop_all([guest, victim])
    out["results"] = {k: list(v) for k, v in h.results.items()}
    out["table"] = h.table()
    out["mounted"], out["names"], out["own_tmp"] = h.mounted, sorted(h.names), h.own_tmp
    out["diff"] = common.state_diff(before, common.states(files))
    problems += [f"hostfs: {p}" for p in hostfs_problems(
        h, bait, [UML_KERNEL, initrd, IMAGES / "jh.img", home])]
    if out["diff"]:
        problems.append(f"hostfs: not restored: {out['diff']}")
    return out


def svirt_explain(since: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``svirt explain --since @SINCE --json`` on the kernel log (the CLI's
    default source): its findings, and the run (rc, stdout, stderr)."""
    stamp = math.floor(since * 1000) / 1000  # audit stamps are milliseconds
    run = svirt_cli("explain", "--since", f"@{stamp:.3f}", "--json")
    findings = [json.loads(line) for line in run["stdout"].splitlines()
                if line.startswith("{")]
    return findings, run


def finding(findings: list[dict[str, Any]], want: dict[str, Any]) -> dict[str, Any] | None:
    """The first finding with every field of ``want``."""
    return next((f for f in findings if all(f.get(k) == v for k, v in want.items())), None)


def explained_problems(answers: dict[str, Any], denials: dict[str, list[str]],
                       findings: list[dict[str, Any]], run: dict[str, Any],
                       want: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with ``svirt explain``'s answer on the explain check's
    cases (each a probe whose one read was refused, and logged)."""
    problems = []
    if run["rc"] != 0:
        problems.append(f"svirt explain failed: {run}")
    for case, answer in answers.items():
        reads = answer.get("reads") or {}
        if not reads or "ok" in reads.values():
            problems.append(f"{case}: the probe was not refused: {answer}")
        if not denials[case]:
            problems.append(f"{case}: no denial logged")
        if finding(findings, want[case]) is None:
            problems.append(f"{case}: no finding {want[case]}")
    logged = sum(len(d) for d in denials.values())
    if len(findings) != logged:
        problems.append(f"{len(findings)} findings for the {logged} denials since then")
    return problems


def kill_launcher_then_gc(args: list[str], r: dict[str, Any], during: Callable[[], None],
                          after_kill: Callable[[], None] | None = None) -> dict[str, Any]:
    """``launcher_proc`` with ``args`` until its guests showed their markers,
    ``during()``, SIGKILL of the launcher, ``after_kill()``, then ``svirt gc``: its guests as the
    launcher reported them (``r`` gets the launcher's output, gc's result and
    which hypervisors outlived the kill and gc)."""
    env = {**os.environ, "PYTHONPATH": "/lab"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.lab.inside.launcher_proc", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd="/")
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + 2 * MARKER_TIMEOUT
    while not line.startswith(b"READY ") and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        r.setdefault("launcher_output", []).append(line.decode(errors="replace").rstrip())
    if not line.startswith(b"READY "):
        proc.kill()
        proc.wait()
        raise Failed(f"the launcher did not start its guests: {r}")
    guests: dict[str, Any] = json.loads(line[len(b"READY "):])
    r["guests"] = guests
    during()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    time.sleep(1.0)
    r["alive_after_kill"] = {n: common.alive(g["pid"]) for n, g in guests.items()}
    if after_kill is not None:
        after_kill()
    t0 = time.monotonic()
    r["gc"] = svirt_cli("gc")
    r["gc_seconds"] = round(time.monotonic() - t0, 2)
    r["alive_after_gc"] = {n: not common.wait_gone(g["pid"], 5) for n, g in guests.items()}
    return guests


def svirt_cli(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": "/lab"}
    proc = subprocess.run([sys.executable, "-m", "svirt", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False, cwd="/")
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def setup_netns() -> None:
    """br0 in netns svlab, a veth from it to 10.0.0.1 in netns svpeer."""
    script = f"""
set -e
ip netns add {NETNS}
ip netns add {PEERNS}
ip -n {NETNS} link set lo up
ip -n {PEERNS} link set lo up
ip -n {NETNS} link add {BRIDGE} type bridge
ip -n {NETNS} link add vbr type veth peer name vend netns {PEERNS}
ip -n {NETNS} link set vbr master {BRIDGE}
ip -n {NETNS} link set vbr up
ip -n {NETNS} link set {BRIDGE} up
ip -n {PEERNS} addr add {ENDPOINT}/24 dev vend
ip -n {PEERNS} link set vend up
"""
    subprocess.run(["sh", "-c", script], check=True)


def main() -> None:
    lab = Lab()
    run_checks(lab, [("matrix", lab.matrix), ("conflict", lab.conflict),
                     ("explain", lab.explain), ("firmware", lab.firmware)],
               [("restore_stop", lab.restore_after_stop), ("network", lab.network),
                ("custom", lab.custom), ("qemu_linux", lab.qemu_linux),
                ("permissive", lab.permissive), ("kill_gc", lab.kill_gc),
                ("jail_attack", lab.jail_attack)])


if __name__ == "__main__":
    main()
