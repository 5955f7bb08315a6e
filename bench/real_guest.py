"""A real guest: the built Debian image through UEFI, cloud-init and the agent, svirt vs virsh.

    python -m bench.real_guest [--rounds 3] [--install-libvirt] [--no-libvirt]

As root, from the checkout (after ``./run tests`` made .venv).  The image is
``svirt image build debian``'s default (built once into /var/cache/svirt, as
the ``debian_image`` test fixture does).  Each round boots it twice, the
order alternating between rounds, both under TCG on the same firmware:

- svirt: ``svirt start SPEC`` (a private registry: SVIRT_RUN_DIR) with
  ``firmware = "uefi"``, ``agent = true``, ``[cloud_init]`` and the image as
  an ephemeral disk (svirt's copy-on-write layer, its NVRAM copy of
  OVMF_VARS_4M, its seed: all made inside the timed launch);
- libvirt: ``virsh create`` of a transient ``<domain type='qemu'>`` of the
  same machine (q35, the same vcpus and memory, OVMF_CODE_4M read-only and
  an ``<nvram template=...>`` copy of OVMF_VARS_4M that libvirt makes, a
  qcow2 overlay made by ``qemu-img create`` over a private copy of the
  image, the seed ISO built by svirt.images.seed attached as svirt attaches
  it (a read-only virtio disk), a virtio-serial ``org.qemu.guest_agent.0``
  channel, no NIC, serial to a file); seed, overlay and create are timed.

Timed from the launch command's start, the same events on both sides:

- the first ``exec`` that answers: ``true`` run through the agent
  (svirt: :func:`svirt.launcher.channels.run_in_guest`, what ``svirt exec``
  and ``Guest.exec`` use, each try bounded to :data:`TRY_SECONDS`; virsh:
  ``virsh qemu-agent-command`` guest-exec, then guest-exec-status every
  :data:`STATUS_POLL` s until it exited), retried until it does;
- cloud-init done: ``cloud-init status --wait`` run the same way returns
  (then ``hostname`` must be the name cloud-init set from the seed).

Ratios are per round, svirt / virsh, then summarised (median [min-max]).
Peak RSS (VmHWM) when cloud-init is done: svirt's supervisor against
libvirtd + virtlogd (cumulative over the daemons' lives), and each QEMU.

libvirt is no dependency of svirt: ``--install-libvirt`` installs Debian's
libvirt-daemon-system (its sysv flavour, so nothing of systemd changes),
libvirt-clients and the QEMU driver with apt-get from the archive; the bench
starts libvirtd and virtlogd itself (bench/libvirt.py: PID 1 is no init
system here; Debian 12 ships the monolithic libvirtd, no virtqemud) and
stops them at the end.  Without libvirt it says so and measures svirt only.
A benchmark: it asserts nothing (a wrong hostname is reported, not raised).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from bench import libvirt as lv
from bench.guests import Workspace
from bench.report import render
from bench.services import _svirt_pids
from bench.util import CLEANUP, SVIRT, SectionResult, loadavg, now, pids_named, proc_mem
from svirt.images.firmware import OVMF_CODE, OVMF_VARS

RESULTS = Path(__file__).resolve().parent / "results" / "real_guest.json"
#: the bench's own DAC range (bench.main uses 3,000,000)
UID_BASE = "3000000"
MEMORY_MIB, VCPUS = 1024, 2
USER_DATA = "#cloud-config\nwrite_files:\n- path: /run/bench-real-guest\n  content: seeded\n"
BOOT_SECONDS = 900.0
#: one try of svirt's exec while the agent is not up yet (the client writes
#: its sync and waits); virsh fails at once ("not connected": libvirt tracks
#: the port's state) and is retried after STATUS_POLL
TRY_SECONDS = 0.5
STATUS_POLL = 0.1
KB_PER_MB = 1024.0
LIBVIRT_PACKAGES = ("libvirt-daemon-system", "libvirt-daemon-system-sysv",
                    "libvirt-daemon-driver-qemu", "libvirt-clients")


@dataclass
class Boot:
    """One boot's events, seconds from the launch command's start."""

    who: str
    name: str
    launched_s: float | None = None  # svirt start / virsh create returned
    agent_s: float | None = None
    cloud_init_s: float | None = None
    hostname: str = ""
    cloud_init_status: str = ""
    mem: dict[str, Any] = field(default_factory=dict)
    qemu_argv: list[str] = field(default_factory=list)  # what each side ran, for the JSON
    error: str = ""


def _until(deadline: float, attempt: Callable[[], Any], pause: float) -> Any:
    """attempt() until it returns something other than None (RuntimeError at the deadline)."""
    last = ""
    while now() < deadline:
        try:
            got = attempt()
        except Exception as err:  # noqa: BLE001 - not up yet: the guest's or the agent's word
            last = f"{type(err).__name__}: {err}"
            got = None
        if got is not None:
            return got
        time.sleep(pause)
    raise RuntimeError(f"timed out; last error: {last[:300]}")


# ---------------------------------------------------------------- svirt
def _spec(path: Path, name: str, image: Path) -> None:
    path.write_text(
        f'name = "{name}"\naccel = "tcg"\nmemory = {MEMORY_MIB}\nvcpus = {VCPUS}\n'
        f'firmware = "uefi"\nagent = true\nshutdown_timeout = 5\n'
        f'[[disk]]\npath = "{image}"\nformat = "qcow2"\nephemeral = true\n'
        f"[cloud_init]\nuser_data = {json.dumps(USER_DATA)}\n")


def _svirt_exec(ws: Workspace, name: str, argv: list[str], timeout: float
                ) -> tuple[int, str]:
    from svirt.launcher.channels import AGENT_SOCKET, run_in_guest
    from svirt.launcher.registry import Registry

    sock = Registry(ws.registry).run_dir(name) / AGENT_SOCKET
    out = run_in_guest(sock, name, argv, timeout=timeout)
    return out.returncode, out.stdout.decode(errors="replace").strip()


def _qemu_of(name: str) -> int | None:
    want = f"guest={name},".encode()
    for pid in pids_named("qemu-system-x86") + pids_named("qemu-system-x86_64"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if want in f.read():
                    return pid
        except OSError:
            continue
    return None


def _argv(pid: int | None) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def _hwm_mb(pids: Sequence[int | None]) -> float:
    total = 0
    for pid in pids:
        sample = proc_mem(pid) if pid is not None else None
        total += sample.hwm_kb if sample else 0
    return total / KB_PER_MB


def svirt_boot(ws: Workspace, image: Path, name: str) -> Boot:
    boot = Boot("svirt", name)
    spec = ws.specs / f"{name}.toml"
    _spec(spec, name, image)
    t0 = now()
    out = subprocess.run([SVIRT, "start", str(spec)], capture_output=True, text=True,
                         env=ws.env(), timeout=300, stdin=subprocess.DEVNULL)
    boot.launched_s = now() - t0
    if out.returncode != 0:
        boot.error = f"svirt start: exit {out.returncode}: {out.stderr.strip()[-500:]}"
        return boot
    try:
        deadline = t0 + BOOT_SECONDS
        _until(deadline, lambda: _svirt_exec(ws, name, ["true"], TRY_SECONDS), STATUS_POLL)
        boot.agent_s = now() - t0
        _, boot.cloud_init_status = _until(deadline, lambda: _svirt_exec(
            ws, name, ["cloud-init", "status", "--wait"], BOOT_SECONDS), STATUS_POLL)
        boot.cloud_init_s = now() - t0
        qemu = _qemu_of(name)
        boot.mem = {"svirt_mb": _hwm_mb(_svirt_pids(ws.registry)), "qemu_mb": _hwm_mb([qemu])}
        boot.qemu_argv = _argv(qemu)
        boot.hostname = _svirt_exec(ws, name, ["hostname"], 60)[1]
    except RuntimeError as err:
        boot.error = str(err)
    finally:
        subprocess.run([SVIRT, "stop", "--timeout", "5", name], capture_output=True,
                       env=ws.env(), timeout=120, stdin=subprocess.DEVNULL)
        idle = now() + 30  # the supervisor's idle exit: every round starts it cold
        while _svirt_pids(ws.registry) and now() < idle:
            time.sleep(0.05)
    return boot


# ---------------------------------------------------------------- libvirt
def domain_xml(name: str, overlay: Path, seed: Path, nvram: Path, console: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu>{VCPUS}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
    <nvram template='{OVMF_VARS}'>{escape(str(nvram))}</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{escape(str(overlay))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='{escape(str(seed))}'/>
      <target dev='vdb' bus='virtio'/><readonly/>
    </disk>
    <serial type='file'><source path='{escape(str(console))}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _agent(name: str, command: dict[str, Any]) -> Any:
    out = lv.virsh("qemu-agent-command", name, json.dumps(command), "--timeout", "10",
                   timeout=60)
    if out.returncode != 0:
        raise RuntimeError(" ".join(out.stderr.split()))
    return json.loads(out.stdout)["return"]


def virsh_exec(name: str, argv: list[str], timeout: float) -> tuple[int, str]:
    """guest-exec through ``virsh qemu-agent-command``, then its status until it exited."""
    import base64

    pid = _agent(name, {"execute": "guest-exec", "arguments": {
        "path": argv[0], "arg": argv[1:], "capture-output": True}})["pid"]
    deadline = now() + timeout
    while now() < deadline:
        status = _agent(name, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status.get("exited"):
            text = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            return int(status.get("exitcode", -1)), text.strip()
        time.sleep(STATUS_POLL)
    raise RuntimeError(f"{argv[0]} did not exit within {timeout:g} s")


def virsh_boot(libvirt: lv.Libvirt, base: Path, n: int) -> Boot:
    from svirt.images.seed import CloudInit, build_iso, seed_files

    assert libvirt.work is not None
    name = f"{lv.PREFIX}rg{n}"
    boot = Boot("virsh", name)
    files = {k: libvirt.work / f"{name}.{k}" for k in ("qcow2", "iso", "vars", "log", "xml")}
    for path in files.values():
        path.unlink(missing_ok=True)
    t0 = now()
    try:
        files["iso"].write_bytes(build_iso(seed_files(CloudInit(user_data=USER_DATA),
                                                      uuid=str(uuid.uuid4()), name=name)))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(base), str(files["qcow2"])], check=True, timeout=60)
        files["xml"].write_text(domain_xml(name, files["qcow2"], files["iso"], files["vars"],
                                           files["log"]))
        out = lv.virsh("create", str(files["xml"]), timeout=300)
        boot.launched_s = now() - t0
        if out.returncode != 0:
            boot.error = f"virsh create: {out.stderr.strip()[-500:]}"
            return boot
        deadline = t0 + BOOT_SECONDS
        _until(deadline, lambda: virsh_exec(name, ["true"], 60), STATUS_POLL)
        boot.agent_s = now() - t0
        _, boot.cloud_init_status = _until(deadline, lambda: virsh_exec(
            name, ["cloud-init", "status", "--wait"], BOOT_SECONDS), STATUS_POLL)
        boot.cloud_init_s = now() - t0
        daemons = libvirt.memory()
        qemu = libvirt.qemu_pid(name)
        boot.mem = {"svirt_mb": daemons["total"]["hwm_kb"] / KB_PER_MB, "qemu_mb": _hwm_mb([qemu])}
        boot.qemu_argv = _argv(qemu)
        boot.hostname = virsh_exec(name, ["hostname"], 60)[1]
    except (RuntimeError, subprocess.SubprocessError, OSError) as err:
        boot.error = str(err)
    finally:
        if libvirt.domain_exists(name):
            libvirt.destroy(name)
        for path in files.values():
            path.unlink(missing_ok=True)
    return boot


# ---------------------------------------------------------------- setup
def install_libvirt() -> str:
    """apt-get install Debian's libvirt (the archive only); what it did."""
    todo = [p for p in LIBVIRT_PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True,
        check=False).stdout != "install ok installed"]
    if not todo:
        return "libvirt already installed"
    print(f"bench: apt-get install {' '.join(todo)}", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *todo],
                   check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                   stdout=subprocess.DEVNULL, timeout=1800)
    return f"installed {' '.join(todo)}"


def start_libvirt(args: argparse.Namespace, notes: list[str]) -> lv.Libvirt | None:
    if args.no_libvirt:
        notes.append("libvirt not compared: --no-libvirt")
        return None
    if args.install_libvirt:
        notes.append(install_libvirt())
    reason = lv.missing()
    if reason is not None:
        notes.append(f"LIBVIRT MISSING, not compared: {reason} (or run with --install-libvirt)")
        print(f"bench: {notes[-1]}", file=sys.stderr, flush=True)
        return None
    from svirt.host import probe_host

    libvirt = lv.Libvirt()
    try:
        print("bench: starting libvirtd and virtlogd", flush=True)
        libvirt.start(mask_kvm=not probe_host().kvm.usable)
    except Exception as err:  # noqa: BLE001 - report why and measure svirt alone
        libvirt.stop()
        notes.append(f"libvirt not compared: libvirtd did not start: {err}")
        return None
    notes += libvirt.notes
    notes.append(f"libvirt: {libvirt.setup.get('version', '')}")
    return libvirt


def private_base(libvirt: lv.Libvirt, image: Path) -> Path:
    """A copy of the image for libvirt's overlays: its DAC driver chowns the
    whole backing chain to libvirt-qemu and restores only the top, and the
    cached image is shared with svirt's tests."""
    assert libvirt.work is not None
    base = libvirt.work / "base.qcow2"
    shutil.copyfile(image, base)
    base.chmod(0o644)
    return base


# ---------------------------------------------------------------- results
def summarise(res: SectionResult, boots: list[tuple[Boot, Boot | None]]) -> None:
    pairs = [("launched", "launched_s", "svirt start returned", "virsh create returned (seed,"
              " overlay, create)", "s"),
             ("agent", "agent_s", "svirt: first exec answers", "virsh: first exec answers",
              "s"),
             ("cloudinit", "cloud_init_s", "svirt: cloud-init done",
              "virsh: cloud-init done", "s")]
    for key, attr, s_label, v_label, unit in pairs:
        has_v = any(v is not None for _, v in boots)
        if has_v:
            vs = res.new(f"virsh.{key}", v_label, unit)
        ss = res.new(f"svirt.{key}", s_label, unit, baseline=f"virsh.{key}" if has_v else None)
        for s, v in boots:
            sv, vv = getattr(s, attr), getattr(v, attr) if v is not None else None
            if sv is None or (has_v and vv is None):
                continue  # a round counts only when both sides got there
            ss.add(sv)
            if has_v and vv is not None:
                vs.add(vv)
    for key, s_label, v_label in (("svirt_mb", "svirt supervisor peak RSS",
                                   "libvirtd + virtlogd peak RSS"),
                                  ("qemu_mb", "QEMU peak RSS (svirt's)",
                                   "QEMU peak RSS (libvirt's)")):
        has_v = any(v is not None and v.mem for _, v in boots)
        if has_v:
            vs = res.new(f"virsh.{key}", v_label, "MB")
        ss = res.new(f"svirt.{key}", s_label, "MB", baseline=f"virsh.{key}" if has_v else None)
        for s, v in boots:
            if s.mem and (not has_v or (v is not None and v.mem)):
                ss.add(s.mem[key])
                if has_v and v is not None:
                    vs.add(v.mem[key])
    for s, v in boots:
        for b in (s, v):
            if b is None:
                continue
            if b.error:
                res.notes.append(f"{b.who} {b.name}: FAILED: {b.error}")
            elif b.hostname != b.name:
                res.notes.append(f"{b.who} {b.name}: hostname {b.hostname!r}, not the name")
    seen = {b.cloud_init_status for s, v in boots for b in (s, v) if b is not None}
    res.notes.append(f"cloud-init status --wait said: {sorted(seen)}; hostname = name: "
                     + str(all(b.hostname == b.name for s, v in boots for b in (s, v)
                               if b is not None and not b.error)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.real_guest",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="boots of each (default 3)")
    p.add_argument("--install-libvirt", action="store_true",
                   help="apt-get install Debian's libvirt first when it is missing")
    p.add_argument("--no-libvirt", action="store_true", help="measure svirt only")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def rounds(args: argparse.Namespace, image: Path, libvirt: lv.Libvirt | None
           ) -> list[tuple[Boot, Boot | None]]:
    ws = Workspace("real")
    base = private_base(libvirt, image) if libvirt is not None else None
    boots: list[tuple[Boot, Boot | None]] = []
    for n in range(args.rounds):
        got: dict[str, Boot] = {}
        order = ["svirt", "virsh"] if n % 2 == 0 else ["virsh", "svirt"]
        for who in order:
            if who == "svirt":
                got[who] = svirt_boot(ws, image, f"bench-rg{n}")
            elif libvirt is not None and base is not None:
                got[who] = virsh_boot(libvirt, base, n)
            else:
                continue
            b = got[who]
            print(f"bench: round {n + 1}/{args.rounds} {who}: returned {b.launched_s}, "
                  f"exec {b.agent_s}, cloud-init {b.cloud_init_s}, hostname {b.hostname!r}"
                  + (f", ERROR {b.error}" if b.error else "") + f"; load {loadavg()}",
                  flush=True)
        boots.append((got["svirt"], got.get("virsh")))
    return boots


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (guests run under their own uids)", file=sys.stderr)
        return 2
    os.environ.setdefault("SVIRT_UID_BASE", UID_BASE)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # svirt as installed, with caches
    from svirt.images.debian import DebianRecipe, ensure_debian

    res = SectionResult("real guest: Debian 12 image, UEFI, cloud-init, agent (TCG)")
    load_start = loadavg()
    started = time.time()
    boots: list[tuple[Boot, Boot | None]] = []
    try:
        print("bench: the Debian image (built once, then cached)", flush=True)
        image = ensure_debian(DebianRecipe())
        libvirt = start_libvirt(args, res.notes)
        boots = rounds(args, image, libvirt)
        if libvirt is not None:
            libvirt.stop()
    except KeyboardInterrupt:
        res.notes.append("INTERRUPTED")
    finally:
        CLEANUP.run_all()
    res.seconds = time.time() - started
    summarise(res, boots)
    header = [f"## svirt vs virsh: a real guest ({args.rounds} rounds, interleaved)", "",
              f"image {DebianRecipe().release}, {MEMORY_MIB} MiB, {VCPUS} vcpus, TCG, "
              f"OVMF {OVMF_CODE.name}; load average start {load_start} end {loadavg()}; "
              f"svirt uid base {os.environ['SVIRT_UID_BASE']}"]
    table = render([res], header, {})
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "table": table, "load_start": load_start, "load_end": loadavg(),
        "boots": [[vars(s), vars(v) if v is not None else None] for s, v in boots],
        "section": res.to_json()}, indent=1, default=str))
    print(f"bench: results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
