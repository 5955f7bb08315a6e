"""Section "memory": what the svirt supervisor costs per guest, against libvirt's daemons.

Each round starts one QEMU-TCG guest (mode stay) and samples, then N-1 more
(one after another, each up before the next) and samples again: for svirt
the ``svirt run`` supervisor processes (one per guest), for libvirt
libvirtd + virtlogd (shared by all guests).  RSS and PSS come from
/proc/PID/smaps_rollup, peak RSS from VmHWM.  PSS splits shared pages
(libpython, the .pyc-backed code) between the processes mapping them, so N
supervisors cost less than N times one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import libvirt as lv
from bench.guests import QEMU_TCG, Images, Workspace
from bench.procs import Watched, Watcher, stop_gently
from bench.util import SVIRT, MemSample, SectionResult, Target, now, proc_mem, summarize
from svirt.images import build

MARKER = "SVIRT-BENCH-MEM"
GUEST_TIMEOUT = 120.0
PSS_LIMIT_MB = 15.0
LIBVIRT_EXPECTED_MB = 35.0
KB_PER_MB = 1024.0


def run(imgs: Images, runs: int, libvirt: lv.Libvirt | None, n: int = 5) -> SectionResult:
    res = SectionResult("memory")
    ws = Workspace("mem")
    specs = [str(ws.write_spec(f"bench-m{i}", QEMU_TCG, imgs, "stay", MARKER))
             for i in range(n)]
    mb = "MB"
    s_pss1 = res.new("svirt.pss1", "svirt run supervisor PSS, 1 guest", mb)
    s_rss1 = res.new("svirt.rss1", "svirt run supervisor RSS, 1 guest", mb)
    s_pssn = res.new(f"svirt.pss{n}", f"svirt run supervisor PSS per guest, {n} guests", mb)
    s_rssn = res.new(f"svirt.rss{n}", f"svirt run supervisor RSS per guest, {n} guests", mb)
    s_hwm = res.new("svirt.hwm", "svirt run supervisor peak RSS (VmHWM, max)", mb)
    s_totn = res.new(f"svirt.total{n}", f"svirt: all {n} supervisors, PSS sum", mb)
    s_qemu_sv = res.new("qemu.svirt.rss", "QEMU RSS under svirt (context)", mb)
    lv_series: dict[str, Any] = {}
    if libvirt is not None:
        for k in (0, 1, n):
            lv_series[f"pss{k}"] = res.new(f"libvirt.pss{k}",
                                           f"libvirtd + virtlogd PSS, {k} guests", mb)
            lv_series[f"rss{k}"] = res.new(f"libvirt.rss{k}",
                                           f"libvirtd + virtlogd RSS, {k} guests", mb)
        lv_series["hwm"] = res.new("libvirt.hwm", "libvirtd + virtlogd peak RSS (VmHWM)", mb)
        lv_series["qemu"] = res.new("qemu.libvirt.rss", "QEMU RSS under libvirt (context)", mb)
    else:
        res.notes.append("libvirt not available: no daemon comparison")

    raw: list[dict[str, Any]] = []
    for rnd in range(runs):
        rnd_raw: dict[str, Any] = {}
        try:
            one, many, qemu = _svirt_round(ws, specs)
        except GuestFailed as err:
            res.notes.append(f"round {rnd}: svirt guest failed to come up, round skipped: {err}")
            rnd_raw["svirt_error"] = err.tail
            one, many, qemu = None, [], []
        if one is not None and many:
            s_pss1.add(one.pss_kb / KB_PER_MB)
            s_rss1.add(one.rss_kb / KB_PER_MB)
            s_pssn.add(sum(m.pss_kb for m in many) / len(many) / KB_PER_MB)
            s_rssn.add(sum(m.rss_kb for m in many) / len(many) / KB_PER_MB)
            s_hwm.add(max(m.hwm_kb for m in many) / KB_PER_MB)
            s_totn.add(sum(m.pss_kb for m in many) / KB_PER_MB)
            if qemu:
                s_qemu_sv.add(sum(qemu) / len(qemu) / KB_PER_MB)
            rnd_raw["svirt_one"] = one.to_json()
            rnd_raw["svirt_many"] = [m.to_json() for m in many]
        if libvirt is not None:
            try:
                rnd_raw["libvirt"] = _libvirt_round(libvirt, imgs, n, lv_series)
            except GuestFailed as err:
                res.notes.append(f"round {rnd}: libvirt guest failed to come up, round "
                                 f"skipped: {err}")
                rnd_raw["libvirt_error"] = err.tail
        raw.append(rnd_raw)
        print(f"bench: memory round {rnd + 1}/{runs} done", flush=True)
    res.extra["samples_kb"] = raw
    res.targets += _targets(res, n, libvirt is not None)
    return res


class GuestFailed(Exception):
    def __init__(self, message: str, tail: str) -> None:
        super().__init__(message)
        self.tail = tail


def _svirt_round(ws: Workspace, specs: list[str]
                 ) -> tuple[MemSample | None, list[MemSample], list[int]]:
    """Start the guests one after another (N TCG boots at once on a small, busy host
    can fail the kernel's IO-APIC timer check); sample after the first and after all."""
    watcher = Watcher()
    try:
        procs: list[Watched] = []
        one: MemSample | None = None
        for spec in specs:
            p = watcher.start([SVIRT, "run", spec, "--console", "stdio"], marker=MARKER,
                              env=ws.env(), stderr_path=ws.log_path("mem"), stop=stop_gently)
            procs.append(p)
            watcher.wait_markers([p], GUEST_TIMEOUT)
            if p.marker_at is None:
                raise GuestFailed(f"{spec}: no marker (exit code {p.returncode})", p.tail())
            if one is None:
                one = proc_mem(p.pid)
        many = [m for m in (proc_mem(p.pid) for p in procs) if m is not None]
        qemu = _qemu_rss_of_registry(ws)
        for p in procs:
            watcher.signal(p)
        watcher.wait_finished(procs, 120)
        return one, many, qemu
    finally:
        watcher.close()


def _qemu_rss_of_registry(ws: Workspace) -> list[int]:
    from svirt.launcher.registry import Registry

    out = []
    for rec in Registry(ws.registry).records():
        if rec.hypervisor is not None:
            m = proc_mem(rec.hypervisor.pid)
            if m is not None:
                out.append(m.rss_kb)
    return out


def _libvirt_round(libvirt: lv.Libvirt, imgs: Images, n: int,
                   series: dict[str, Any]) -> dict[str, Any]:
    cmdline = "console=ttyS0 " + build.guest_cmdline("stay", MARKER)
    out: dict[str, Any] = {"0": libvirt.memory()}
    names: list[tuple[str, Path]] = []
    try:
        for i in range(n):
            name, console = libvirt.start_domain(imgs.qemu.kernel, imgs.qemu.initrd, cmdline,
                                                 QEMU_TCG.memory)
            names.append((name, console))
            _wait_console(libvirt, name, console)
            if i == 0:
                out["1"] = libvirt.memory()
        out[str(n)] = libvirt.memory()
        qemu = [proc_mem(pid) for pid in (libvirt.qemu_pid(name) for name, _ in names) if pid]
        out["qemu"] = [m.to_json() for m in qemu if m is not None]
    finally:
        for name, _ in names:
            libvirt.destroy(name)
    for k in ("0", "1", str(n)):
        total = out[k]["total"]
        series[f"pss{k}"].add(total["pss_kb"] / KB_PER_MB)
        series[f"rss{k}"].add(total["rss_kb"] / KB_PER_MB)
    series["hwm"].add(out[str(n)]["total"]["hwm_kb"] / KB_PER_MB)
    if out["qemu"]:
        series["qemu"].add(sum(q["rss_kb"] for q in out["qemu"]) / len(out["qemu"]) / KB_PER_MB)
    return out


def _wait_console(libvirt: lv.Libvirt, name: str, console: Path) -> None:
    deadline = now() + GUEST_TIMEOUT
    while not lv.console_has(console, MARKER):
        try:
            text = console.read_bytes()[-3000:].decode(errors="replace")
        except OSError:
            text = ""
        if "Kernel panic" in text or not libvirt.domain_exists(name):
            raise GuestFailed(f"libvirt domain {name} panicked or ended before the marker", text)
        if now() > deadline:
            raise GuestFailed(f"libvirt domain {name}: no marker in {GUEST_TIMEOUT:g} s", text)
        time.sleep(0.02)


def _targets(res: SectionResult, n: int, have_libvirt: bool) -> list[Target]:
    out: list[Target] = []

    def med(key: str) -> float | None:
        s = res.get(key)
        summ = summarize(s.samples) if s else None
        return None if summ is None else summ["median"]

    for key, what in (("svirt.pss1", "1 guest"), (f"svirt.pss{n}", f"{n} guests")):
        v = med(key)
        out.append(Target(f"supervisor PSS per guest ({what})",
                          "n/a" if v is None else f"{v:.1f} MB", f"<= {PSS_LIMIT_MB:.0f} MB",
                          None if v is None else v <= PSS_LIMIT_MB))
    if have_libvirt:
        daemons = med(f"libvirt.pss{n}")
        per_guest = med(f"svirt.pss{n}")
        if daemons is not None and per_guest is not None and per_guest > 0:
            crossover = daemons / per_guest
            out.append(Target(
                "libvirtd + virtlogd PSS (fixed cost, any number of guests)",
                f"{daemons:.1f} MB with {n} guests (issue expects ~{LIBVIRT_EXPECTED_MB:.0f} MB)",
                f"svirt total < libvirt total up to N = {crossover:.1f} guests", None,
                f"svirt's supervisors cost more than libvirt's daemons from about "
                f"{int(crossover) + 1} guests on"))
    return out
