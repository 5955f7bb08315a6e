"""Section "memory": what the svirt supervisor costs per guest, against libvirt's daemons.

Each round starts one QEMU-TCG guest (mode stay) and samples, then N-1 more
and samples again: for svirt the ``svirt run`` supervisor processes (one per
guest), for libvirt libvirtd + virtlogd (shared by all guests).  RSS and PSS
come from /proc/PID/smaps_rollup, peak RSS from VmHWM.  PSS splits shared
pages (libpython, the .pyc-backed code) between the processes mapping them,
so N supervisors cost less than N times one.
"""

from __future__ import annotations

import time
from typing import Any

from bench import libvirt as lv
from bench.guests import QEMU_TCG, Images, Workspace
from bench.procs import Watched, Watcher, stop_gently
from bench.util import SVIRT, SectionResult, Target, now, proc_mem, summarize
from svirt.images import build

MARKER = "SVIRT-BENCH-MEM"
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
        # ---------------------------------------------------------- svirt
        watcher = Watcher()
        try:
            procs: list[Watched] = []
            procs.append(watcher.start([SVIRT, "run", specs[0], "--console", "stdio"],
                                       marker=MARKER, env=ws.env(),
                                       stderr_path=ws.log_path("mem"), stop=stop_gently))
            if not watcher.wait_markers(procs, 300) or procs[0].marker_at is None:
                raise RuntimeError(f"memory: first guest did not come up:\n{procs[0].tail()}")
            one = proc_mem(procs[0].pid)
            for spec in specs[1:]:
                procs.append(watcher.start([SVIRT, "run", spec, "--console", "stdio"],
                                           marker=MARKER, env=ws.env(),
                                           stderr_path=ws.log_path("mem"), stop=stop_gently))
            if not watcher.wait_markers(procs, 600) or any(p.marker_at is None for p in procs):
                bad = next(p for p in procs if p.marker_at is None)
                raise RuntimeError(f"memory: a guest did not come up:\n{bad.tail()}")
            many = [proc_mem(p.pid) for p in procs]
            qemu = _qemu_rss_of_registry(ws)
            for p in procs:
                watcher.signal(p)
            watcher.wait_finished(procs, 120)
        finally:
            watcher.close()
        if one is not None and all(m is not None for m in many):
            samples = [m for m in many if m is not None]
            s_pss1.add(one.pss_kb / KB_PER_MB)
            s_rss1.add(one.rss_kb / KB_PER_MB)
            s_pssn.add(sum(m.pss_kb for m in samples) / len(samples) / KB_PER_MB)
            s_rssn.add(sum(m.rss_kb for m in samples) / len(samples) / KB_PER_MB)
            s_hwm.add(max(m.hwm_kb for m in samples) / KB_PER_MB)
            s_totn.add(sum(m.pss_kb for m in samples) / KB_PER_MB)
            if qemu:
                s_qemu_sv.add(sum(qemu) / len(qemu) / KB_PER_MB)
        rnd_raw: dict[str, Any] = {"svirt_one": one.to_json() if one else None,
                                   "svirt_many": [m.to_json() if m else None for m in many]}
        # -------------------------------------------------------- libvirt
        if libvirt is not None:
            rnd_raw["libvirt"] = _libvirt_round(libvirt, imgs, n, lv_series)
        raw.append(rnd_raw)
        print(f"bench: memory round {rnd + 1}/{runs} done", flush=True)
    res.extra["samples_kb"] = raw
    res.targets += _targets(res, n, libvirt is not None)
    return res


def _qemu_rss_of_registry(ws: Workspace) -> list[int]:
    from svirt.launcher.state import Registry

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
    names: list[tuple[str, Any]] = []
    try:
        def up(count: int) -> None:
            deadline = now() + 600
            while not all(lv.console_has(c, MARKER) for _, c in names[:count]):
                if now() > deadline:
                    raise RuntimeError("libvirt guests did not print the marker")
                time.sleep(0.05)

        names.append(libvirt.start_domain(imgs.qemu.kernel, imgs.qemu.initrd, cmdline,
                                          QEMU_TCG.memory))
        up(1)
        out["1"] = libvirt.memory()
        for _ in range(n - 1):
            names.append(libvirt.start_domain(imgs.qemu.kernel, imgs.qemu.initrd, cmdline,
                                              QEMU_TCG.memory))
        up(n)
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
