"""Section "services": detached guests (``svirt start``) under the one supervisor.

Issue 11's benchmark.  In one private registry (SVIRT_RUN_DIR):

* memory: the PSS (/proc/PID/smaps_rollup) of every svirt process of the
  registry (the supervisor ``python -m svirt.service.daemon``; any other is
  counted and reported) with 1, 10 and 50 tiny UML guests (mode stay,
  128 MiB; ``svirt start --wait-for`` in concurrent batches), then with 1 and
  10 QEMU-TCG guests (256 MiB, smaller batches: TCG boots at once on a
  busy host can fail the IO-APIC timer check), against libvirtd + virtlogd
  with the same QEMU guests (transient domains, as in the memory section);
  the supervisor's PSS per extra guest (slope);
* idle exit: after ``svirt stop --all`` no svirt process of the registry
  (and no process of a guest uid) may remain, and how long it took;
* start latency, QEMU-TCG, rounds interleaved, one UML guest kept running
  so the supervisor is warm: ``svirt start`` to its return and (polling the
  console log every 2 ms) to the marker; ``svirt start --wait-for`` to its
  return; ``virsh start`` of a domain defined once (start / destroy in
  rounds) to its return and to the marker in its console file (polled every
  2 ms).  The first ``svirt start`` of the UML part is the cold start (it
  starts the supervisor).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import libvirt as lv
from bench.guests import QEMU_TCG, UML, Flavor, Images, Workspace
from bench.memory import GuestFailed
from bench.procs import marker_regex
from bench.util import SVIRT, SectionResult, Target, now, proc_mem, summarize
from svirt.images import build

MARKER = "SVIRT-BENCH-SVC"
WAIT_FOR = f"(?m)^{MARKER}\\r?$"
UML_SIZES = (1, 10, 50)
QEMU_SIZES = (1, 10)
UML_BATCH = 10
QEMU_BATCH = 3
TARGET_MB = 30.0
KB_PER_MB = 1024.0
START_TIMEOUT = 180.0
IDLE_TIMEOUT = 30.0
POLL = 0.002


def run(imgs: Images, runs: int, libvirt: lv.Libvirt | None) -> SectionResult:
    res = SectionResult("services")
    ws = Workspace("svc")
    raw: dict[str, Any] = {}
    res.extra["raw"] = raw
    mb = "MB"

    # ------------------------------------------------------------ UML memory
    uml = _Fleet(ws, imgs, UML, "svc-u")
    try:
        for size in UML_SIZES:
            took = uml.grow(size, UML_BATCH)
            sample = _svirt_memory(ws)
            raw[f"uml{size}"] = {"start_s": took, **sample}
            res.new(f"uml.pss{size}", f"svirt processes PSS, {size} UML guests", mb).add(
                sample["pss_kb"] / KB_PER_MB)
            print(f"bench: services: {size} UML guests up, svirt PSS "
                  f"{sample['pss_kb'] / KB_PER_MB:.1f} MB ({sample['count']} processes)",
                  flush=True)
        res.new("uml.cold", "cold svirt start --wait-for (starts the supervisor), UML",
                "s").add(uml.first_start_s)
    finally:
        raw["uml_stop"] = _stop_all(ws, res, "uml")
    for lo, hi in ((1, 10), (10, 50), (1, 50)):
        a, b = res.get(f"uml.pss{lo}"), res.get(f"uml.pss{hi}")
        if a and b and a.samples and b.samples:
            res.new(f"uml.slope{lo}-{hi}", f"supervisor PSS per extra UML guest, {lo}->{hi}",
                    "KB").add((b.samples[0] - a.samples[0]) * KB_PER_MB / (hi - lo))

    # ------------------------------------------------------------ QEMU memory
    need_mib = max(QEMU_SIZES) * QEMU_TCG.memory * 2 + 2048  # svirt's and libvirt's at once
    avail = _mem_available_mib()
    raw["mem_available_mib"] = avail
    if avail < need_mib:
        res.notes.append(f"QEMU memory part skipped: {avail} MiB available, {need_mib} wanted")
    else:
        qemu = _Fleet(ws, imgs, QEMU_TCG, "svc-q")
        try:
            for size in QEMU_SIZES:
                took = qemu.grow(size, QEMU_BATCH)
                sample = _svirt_memory(ws)
                raw[f"qemu{size}"] = {"start_s": took, **sample}
                res.new(f"qemu.pss{size}", f"svirt processes PSS, {size} QEMU-TCG guests",
                        mb).add(sample["pss_kb"] / KB_PER_MB)
        finally:
            raw["qemu_stop"] = _stop_all(ws, res, "qemu")
        if libvirt is not None:
            try:
                raw["libvirt"] = _libvirt_memory(libvirt, imgs, res)
            except (GuestFailed, RuntimeError) as err:
                res.notes.append(f"libvirt memory: {err}")
        else:
            res.notes.append("libvirt not available: no daemon comparison")

    # ------------------------------------------------------------ latency
    raw["latency"] = _latency(ws, imgs, runs, libvirt, res)
    res.targets += _targets(res)
    return res


# --------------------------------------------------------------------- fleet
class _Fleet:
    """Detached guests of one flavor in the workspace's registry."""

    def __init__(self, ws: Workspace, imgs: Images, flavor: Flavor, prefix: str) -> None:
        self.ws, self.imgs, self.flavor, self.prefix = ws, imgs, flavor, prefix
        self.names: list[str] = []
        self.first_start_s = 0.0

    def grow(self, size: int, batch: int) -> float:
        """Start guests until ``size`` run (``batch`` at a time); seconds taken."""
        t0 = now()
        while len(self.names) < size:
            count = min(batch, size - len(self.names))
            new = [f"{self.prefix}{len(self.names) + i}" for i in range(count)]
            specs = [self.ws.write_spec(n, self.flavor, self.imgs, "stay", MARKER) for n in new]
            with ThreadPoolExecutor(max_workers=count) as pool:
                outs = list(pool.map(lambda s: _svirt_start(self.ws, s, wait=True), specs))
            self.names += new  # stop --all stops whatever did start
            for name, (took, out) in zip(new, outs, strict=True):
                if out.returncode != 0:
                    raise GuestFailed(f"svirt start {name}: exit {out.returncode}",
                                      out.stderr[-1500:])
                if name == f"{self.prefix}0":
                    self.first_start_s = took
        return now() - t0


def _svirt(ws: Workspace, *args: str, timeout: float = START_TIMEOUT
           ) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = now()
    out = subprocess.run([SVIRT, *args], capture_output=True, text=True, env=ws.env(),
                         timeout=timeout, stdin=subprocess.DEVNULL)
    return now() - t0, out


def _svirt_start(ws: Workspace, spec: Path, wait: bool
                 ) -> tuple[float, subprocess.CompletedProcess[str]]:
    extra = ["--wait-for", WAIT_FOR, "--timeout", str(int(START_TIMEOUT - 10))] if wait else []
    return _svirt(ws, "start", str(spec), *extra)


def _stop_all(ws: Workspace, res: SectionResult, tag: str) -> dict[str, Any]:
    """svirt stop --all, then wait for the supervisor's idle exit; what was left."""
    took, out = _svirt(ws, "stop", "--all", timeout=300)
    t0 = now()
    left = _svirt_pids(ws.registry)
    while left and now() - t0 < IDLE_TIMEOUT:
        time.sleep(0.05)
        left = _svirt_pids(ws.registry)
    idle_s = now() - t0
    guests = _guest_uid_pids()
    problems = [line for line in out.stderr.splitlines()
                if not line.startswith("svirt: guest ") or ": error" in line or "failed" in line]
    info = {"stop_all_s": took, "stop_rc": out.returncode, "idle_exit_s": idle_s,
            "svirt_left": left, "guest_uid_processes_left": guests,
            "stop_problems": problems}
    res.new(f"{tag}.stopall", f"svirt stop --all ({tag} guests)", "s").add(took)
    if not left:
        res.new(f"{tag}.idle", f"supervisor gone after stop --all ({tag})", "s").add(idle_s)
    res.notes.append(
        f"{tag}: after svirt stop --all (exit {out.returncode}, {took:.2f} s"
        + (f"; {'; '.join(problems)[:300]}" if out.returncode else "") + "): "
        + ("no svirt process left" if not left else f"svirt processes LEFT: {left}")
        + f" after {idle_s:.2f} s; "
        + ("no process of a guest uid left" if not guests else f"guest-uid processes LEFT: "
           f"{guests}"))
    return info


# ------------------------------------------------------------------ memory
def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _svirt_pids(registry: Path) -> list[int]:
    """Python processes of this registry: its supervisor (the registry is in
    its argv) and svirt commands (SVIRT_RUN_DIR in their environment)."""
    me = os.getpid()
    want_arg = os.fsencode(registry)
    want_env = b"SVIRT_RUN_DIR=" + want_arg
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        argv = _cmdline(int(entry.name)).split(b"\0")
        if not argv or b"python" not in os.path.basename(argv[0]):
            continue
        if want_arg in argv:
            out.append(int(entry.name))
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if want_env in env:
            out.append(int(entry.name))
    return sorted(out)


def _guest_uid_pids() -> list[int]:
    base = int(os.environ.get("SVIRT_UID_BASE", "3000000"))
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                uid = os.stat(entry.path).st_uid
            except OSError:
                continue
            if base <= uid < base + 10_000_000:
                out.append(int(entry.name))
    return out


def _svirt_memory(ws: Workspace) -> dict[str, Any]:
    """PSS/RSS of every svirt process of the registry, summed; their argv."""
    time.sleep(0.5)  # the last svirt start has exited; the supervisor settles
    pids = _svirt_pids(ws.registry)
    procs = []
    pss = rss = 0
    for pid in pids:
        m = proc_mem(pid)
        if m is None:
            continue
        pss += m.pss_kb
        rss += m.rss_kb
        procs.append({**m.to_json(), "threads": _threads(pid),
                      "argv": _cmdline(pid).replace(b"\0", b" ").decode(errors="replace")})
    return {"pss_kb": pss, "rss_kb": rss, "count": len(procs), "processes": procs}


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _mem_available_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def _libvirt_memory(libvirt: lv.Libvirt, imgs: Images, res: SectionResult
                    ) -> dict[str, Any]:
    """libvirtd + virtlogd with 0, 1 and 10 transient QEMU-TCG domains, each
    with its own copy of kernel and initrd: libvirt 9.0's DAC driver refuses
    a second running domain on the same kernel file here ("Setting different
    DAC user or group on ... which is already in use")."""
    assert libvirt.work is not None
    cmdline = "console=ttyS0 " + build.guest_cmdline("stay", MARKER)
    n = max(QEMU_SIZES)
    out: dict[str, Any] = {"0": libvirt.memory()}
    names: list[str] = []
    try:
        for i in range(n):
            kernel = libvirt.work / f"svc-kernel-{i}"
            initrd = libvirt.work / f"svc-initrd-{i}"
            shutil.copyfile(imgs.qemu.kernel, kernel)
            shutil.copyfile(imgs.qemu.initrd, initrd)
            name, console = libvirt.start_domain(kernel, initrd, cmdline, QEMU_TCG.memory)
            names.append(name)
            _wait_marker(libvirt, name, console)
            if i + 1 in QEMU_SIZES:
                time.sleep(0.5)
                out[str(i + 1)] = libvirt.memory()
    finally:
        for name in names:
            libvirt.destroy(name)
    for k in ("0", *(str(x) for x in QEMU_SIZES)):
        if k in out:
            res.new(f"libvirt.pss{k}", f"libvirtd + virtlogd PSS, {k} QEMU-TCG guests",
                    "MB").add(out[k]["total"]["pss_kb"] / KB_PER_MB)
    return out


def _wait_marker(libvirt: lv.Libvirt, name: str, console: Path) -> None:
    deadline = now() + START_TIMEOUT
    while not lv.console_has(console, MARKER):
        if not libvirt.domain_exists(name) or now() > deadline:
            raise GuestFailed(f"libvirt domain {name}: no marker", "")
        time.sleep(0.02)


# ----------------------------------------------------------------- latency
def _wait_file(path: Path, offset: int, timeout: float, t0: float) -> float | None:
    """Seconds from t0 until the marker line appears in ``path`` after ``offset``."""
    regex = marker_regex(MARKER)
    buf = b""
    fd = -1
    try:
        while now() - t0 < timeout:
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    if os.fstat(fd).st_size >= offset:  # else rotated or truncated
                        os.lseek(fd, offset, os.SEEK_SET)
                except FileNotFoundError:
                    pass
            if fd >= 0:
                start = buf.rfind(b"\n") + 1
                while chunk := os.read(fd, 65536):
                    buf += chunk
                if regex.search(buf, start):
                    return now() - t0
            time.sleep(POLL)
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _latency(ws: Workspace, imgs: Images, runs: int, libvirt: lv.Libvirt | None,
             res: SectionResult) -> list[dict[str, Any]]:
    from svirt.launcher.registry import Registry
    from svirt.service.logs import log_path

    s_ret = res.new("lat.start", "QEMU-TCG: svirt start, to return (warm supervisor)", "s")
    s_mark = res.new("lat.start.marker", "QEMU-TCG: svirt start, to marker in its log", "s")
    s_wait = res.new("lat.waitfor", "QEMU-TCG: svirt start --wait-for, to return", "s")
    v_ret = v_mark = None
    if libvirt is not None:
        v_ret = res.new("lat.virsh", "QEMU-TCG: virsh start (defined domain), to return", "s")
        v_mark = res.new("lat.virsh.marker", "QEMU-TCG: virsh start, to marker in its file",
                         "s")
        s_mark.baseline = "lat.virsh.marker"
        s_wait.baseline = "lat.virsh.marker"
        s_ret.baseline = "lat.virsh"
    u_ret = res.new("lat.uml.start", "UML: svirt start, to return (warm)", "s")
    u_wait = res.new("lat.uml.waitfor", "UML: svirt start --wait-for, to return (warm)", "s")
    state = Registry(ws.registry).state
    spec_q = ws.write_spec("svc-lat-q", QEMU_TCG, imgs, "stay", MARKER)
    spec_u = ws.write_spec("svc-lat-u", UML, imgs, "stay", MARKER)
    anchor = ws.write_spec("svc-anchor", UML, imgs, "stay", MARKER)
    domain: str | None = None
    console: Path | None = None
    raw: list[dict[str, Any]] = []
    try:
        _, out = _svirt_start(ws, anchor, wait=True)  # keeps the supervisor warm
        if out.returncode != 0:
            raise GuestFailed("svirt start of the anchor guest failed", out.stderr[-1500:])
        if libvirt is not None:
            cmdline = "console=ttyS0 " + build.guest_cmdline("stay", MARKER)
            domain, console = libvirt.define_domain(imgs.qemu.kernel, imgs.qemu.initrd,
                                                    cmdline, QEMU_TCG.memory)
            res.notes.append("libvirt latency: virsh define once, then virsh start / "
                             "virsh destroy in every round (persistent domain)")
        variants = ["svirt", "svirt-wait", "uml", "uml-wait"] + (["virsh"] if domain else [])
        for rnd in range(runs):
            row: dict[str, Any] = {}
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                if v in ("svirt", "uml"):
                    spec = spec_q if v == "svirt" else spec_u
                    logp = log_path(state, spec.stem)
                    offset = _size(logp)
                    t0 = now()
                    took, out = _svirt_start(ws, spec, wait=False)
                    mark = _wait_file(logp, offset, START_TIMEOUT, t0) if v == "svirt" else None
                    if out.returncode == 0:
                        (s_ret if v == "svirt" else u_ret).add(took)
                        if mark is not None:
                            s_mark.add(mark)
                    row[v] = {"return_s": took, "marker_s": mark, "rc": out.returncode,
                              "stderr": out.stderr[-500:]}
                    _svirt(ws, "stop", spec.stem)
                elif v in ("svirt-wait", "uml-wait"):
                    spec = spec_q if v == "svirt-wait" else spec_u
                    took, out = _svirt_start(ws, spec, wait=True)
                    if out.returncode == 0:
                        (s_wait if v == "svirt-wait" else u_wait).add(took)
                    row[v] = {"return_s": took, "rc": out.returncode,
                              "stderr": out.stderr[-500:]}
                    _svirt(ws, "stop", spec.stem)
                elif libvirt is not None and domain is not None and console is not None:
                    console.unlink(missing_ok=True)  # libvirt truncates it on start
                    t0 = now()
                    vout = lv.virsh("start", domain)
                    took = now() - t0
                    mark = _wait_file(console, 0, START_TIMEOUT, t0)
                    if vout.returncode == 0:
                        assert v_ret is not None and v_mark is not None
                        v_ret.add(took)
                        if mark is not None:
                            v_mark.add(mark)
                    row[v] = {"return_s": took, "marker_s": mark, "rc": vout.returncode,
                              "stderr": vout.stderr[-500:]}
                    libvirt.destroy(domain)
            raw.append(row)
            print(f"bench: services latency round {rnd + 1}/{runs} done", flush=True)
    finally:
        if libvirt is not None and domain is not None:
            libvirt.undefine(domain)
        raw.append({"stop": _stop_all(ws, res, "latency")})
    return raw


# ----------------------------------------------------------------- targets
def _median(res: SectionResult, key: str) -> float | None:
    s = res.get(key)
    summ = summarize(s.samples) if s else None
    return None if summ is None else summ["median"]


def _targets(res: SectionResult) -> list[Target]:
    out: list[Target] = []
    v = _median(res, "uml.pss50")
    out.append(Target("all svirt processes, 50 detached UML guests",
                      "n/a" if v is None else f"{v:.1f} MB PSS", f"<= {TARGET_MB:.0f} MB",
                      None if v is None else v <= TARGET_MB))
    left = [n for n in res.notes if "LEFT" in n]
    out.append(Target("idle exit: no svirt process after the last svirt stop",
                      "clean" if not left else "; ".join(left), "none left", not left))
    return out

