"""Section "scale": N UML guests at once through svirt against N raw UML launches.

svirt: N separate ``svirt run`` processes (what users do), started back to
back, guests in mode stay (so all are up together), 128 MiB each (bench.guests.UML_MEMORY).  Timed
from the first start until every marker has arrived.  While all run the
registry must hold N records with N distinct slots and the hypervisors N
distinct uids.  Then every ``svirt run`` gets SIGTERM (shutdown ladder:
mconsole cad) and, once all have exited, nothing may be left: no process of
a guest uid, no record, no held object, no run directory, no new tap.

raw: the same N argv (console on stdout, root), same timing; stopped with
SIGKILL of each process group.

Also: slot allocation with 10,000 live records in the registry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.fake import add_fake_records, fake_registry
from bench.guests import UML, Images, Workspace, raw_command, raw_setup
from bench.procs import Watched, Watcher, stop_gently
from bench.util import (
    SVIRT,
    SectionResult,
    Sleepers,
    Target,
    make_temp_dir,
    now,
    proc_mem,
    proc_uid,
    ratios,
    run_dir_base,
    summarize,
)
from svirt.claims.host import HostClaims
from svirt.launcher.registry import Registry
from svirt.procfs import is_zombie
from svirt.security.dac import DEFAULT_UID_BASE, DEFAULT_UID_COUNT, DacDriver
from svirt.spec import load_spec

MARKER = "SVIRT-BENCH-SCALE"
RATIO_LIMIT = 1.05
BIG_REGISTRY = 10_000
KB_PER_MB = 1024.0


def _uid_range() -> range:
    base = int(os.environ.get("SVIRT_UID_BASE") or DEFAULT_UID_BASE)
    return range(base, base + DEFAULT_UID_COUNT)


def taps() -> set[str]:
    """Tap devices owned by a uid of the bench's DAC range (svirt sets the owner)."""
    out = set()
    uids = _uid_range()
    for flags in Path("/sys/class/net").glob("*/tun_flags"):
        try:
            owner = int((flags.parent / "owner").read_text().strip())
        except (OSError, ValueError):
            continue
        if owner in uids:
            out.add(flags.parent.name)
    return out


def guest_uid_processes() -> list[int]:
    """Live processes running as a uid of the bench's DAC range."""
    uids = _uid_range()
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            uid = proc_uid(int(entry.name))
            if uid is not None and uid in uids and not is_zombie(entry.name):
                out.append(int(entry.name))
    return out


def run(imgs: Images, runs: int, sizes: list[int], sleepers: Sleepers) -> SectionResult:
    res = SectionResult("scale")
    ws = Workspace("scale")
    top = max(sizes)
    specs = [str(ws.write_spec(f"bench-s{i:02d}", UML, imgs, "stay", MARKER))
             for i in range(top)]
    plan = ws.check(Path(specs[0]))
    series: dict[str, Any] = {}
    for n in sizes:
        series[f"svirt{n}"] = res.new(f"svirt{n}.all_markers",
                                      f"{n} x svirt run (UML): start -> all markers", "s",
                                      baseline=f"raw{n}.all_markers")
        series[f"raw{n}"] = res.new(f"raw{n}.all_markers",
                                    f"{n} x raw UML: start -> all markers", "s")
        series[f"stop{n}"] = res.new(f"svirt{n}.stop_all",
                                     f"{n} x svirt: SIGTERM -> all exited and released", "s")
        series[f"pss{n}"] = res.new(f"svirt{n}.pss", f"{n} x svirt: supervisor PSS per guest",
                                    "MB")
    checks: list[dict[str, Any]] = []
    raw_checks: list[dict[str, Any]] = []
    taps_before = taps()
    for rnd in range(runs):
        for n in sizes:
            order = ["svirt", "raw"] if rnd % 2 == 0 else ["raw", "svirt"]
            got: dict[str, float] = {}
            for variant in order:
                if variant == "svirt":
                    t, check = _svirt_round(ws, specs[:n], series[f"stop{n}"],
                                            series[f"pss{n}"], taps_before)
                    check.update(round=rnd, n=n)
                    checks.append(check)
                    if t is not None:
                        got["svirt"] = t
                else:
                    t, raw_failed = _raw_round(ws, plan, n)
                    if t is not None:
                        got["raw"] = t
                    else:
                        raw_checks.append({"round": rnd, "n": n, "failed": raw_failed})
            if "svirt" in got and "raw" in got:
                series[f"svirt{n}"].add(got["svirt"])
                series[f"raw{n}"].add(got["raw"])
            else:
                res.notes.append(f"round {rnd}, {n} guests: a variant failed, excluded")
            print(f"bench: scale round {rnd + 1}/{runs}, {n} guests done", flush=True)
    res.extra["checks"] = checks
    res.extra["raw_failures"] = raw_checks
    _big_registry(res, runs, sleepers, load_spec(specs[0]))
    res.targets += _targets(res, sizes, checks)
    return res


def _svirt_round(ws: Workspace, specs: list[str], stop_series: Any, pss_series: Any,
                 taps_before: set[str]) -> tuple[float | None, dict[str, Any]]:
    check: dict[str, Any] = {}
    watcher = Watcher()
    t_all: float | None = None
    try:
        t0 = now()
        procs = [watcher.start([SVIRT, "run", spec, "--console", "stdio"], marker=MARKER,
                               env=ws.env(), stderr_path=ws.log_path("scale"),
                               stop=stop_gently) for spec in specs]
        check["start_loop_s"] = now() - t0
        up = watcher.wait_markers(procs, 900)
        failed = [p for p in procs if p.marker_at is None]
        if up and not failed:
            t_all = max(p.marker_at for p in procs if p.marker_at is not None) - t0
        else:
            check["failed"] = [p.tail() for p in failed[:3]]
            check["failed_count"] = len(failed)
        records = Registry(ws.registry).records()
        slots = [r.slot for r in records]
        uids = []
        for r in records:
            if r.hypervisor is not None:
                uids.append(proc_uid(r.hypervisor.pid))
        check["records"] = len(records)
        check["all_up"] = len(records) == len(specs) and not failed
        # distinct among the guests that are up (a guest that died is no longer registered)
        check["slots_distinct"] = len(set(slots)) == len(slots)
        live_uids = [u for u in uids if u is not None]
        check["uids_distinct"] = len(set(live_uids)) == len(live_uids)
        check["slots"] = sorted(slots)
        mems = [proc_mem(p.pid) for p in procs]
        pss = [m.pss_kb for m in mems if m is not None]
        if pss and t_all is not None:
            pss_series.add(sum(pss) / len(pss) / KB_PER_MB)
        t_stop = now()
        for p in procs:
            watcher.signal(p)
        watcher.wait_finished(procs, 300)
        if all(p.exit_at is not None for p in procs):
            stop_series.add(max(p.exit_at for p in procs if p.exit_at is not None) - t_stop)
        check["exit_codes"] = sorted({p.returncode for p in procs}, key=str)
        bad = [p for p in procs if p.returncode != 0]
        if bad:
            check["bad_exits"] = [{"returncode": p.returncode, "tail": p.tail()} for p in bad[:3]]
    finally:
        watcher.close()
    check.update(_leaks(ws, taps_before))
    return t_all, check


def _leaks(ws: Workspace, taps_before: set[str]) -> dict[str, Any]:
    reg = Registry(ws.registry)
    leftover_dirs = [p.name for p in reg.guests.iterdir()] if reg.guests.is_dir() else []
    objects = [p.name for p in reg.objects.iterdir()] if reg.objects.is_dir() else []
    procs = guest_uid_processes()
    new_taps = sorted(taps() - taps_before)
    leaks = {"guest_uid_processes": procs, "registry_entries": leftover_dirs,
             "held_objects": objects, "new_taps": new_taps}
    return {"leaks": leaks, "leak_free": not any(leaks.values())}


def _raw_round(ws: Workspace, plan: dict[str, Any], n: int) -> tuple[float | None, list[str]]:
    watcher = Watcher()
    dirs = []
    try:
        cmds = []
        for i in range(n):
            d = ws.raw_dir()
            dirs.append(d)
            argv, env = raw_command(plan, d)
            argv = [f"umid=raw{i}" if a.startswith("umid=") else a for a in argv]
            cmds.append((argv, env, d))
        t0 = now()
        setup = raw_setup(plan)
        procs: list[Watched] = [watcher.start(argv, marker=MARKER, env=env, cwd=str(d),
                                              preexec=setup)
                                for argv, env, d in cmds]
        up = watcher.wait_markers(procs, 900)
        ok = up and all(p.marker_at is not None for p in procs)
        t = max(p.marker_at for p in procs if p.marker_at is not None) - t0 if ok else None
        failed = [p.tail() for p in procs if p.marker_at is None][:3]
    finally:
        watcher.close()  # SIGKILL to each process group
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return t, failed


def _big_registry(res: SectionResult, runs: int, sleepers: Sleepers, spec: Any) -> None:
    root = fake_registry("big")
    t0 = now()
    add_fake_records(root, BIG_REGISTRY, sleepers.start(100))
    res.extra["big_registry_fill_s"] = now() - t0
    claims = make_temp_dir("bench-claims-", run_dir_base(), 0o700)  # not the host's
    reg = Registry(root, claims=HostClaims(claims))
    drivers = [DacDriver()]
    s_res = res.new("slot.reserve10k", f"Registry.reserve with {BIG_REGISTRY:,} live records",
                    "s")
    s_rel = res.new("slot.release10k", f"Registry.release with {BIG_REGISTRY:,} live records",
                    "s")
    s_list = res.new("cli.list10k", f"svirt list with {BIG_REGISTRY:,} live records", "s")
    slots = []
    env = dict(os.environ, SVIRT_RUN_DIR=str(root), SVIRT_CLAIMS_DIR=str(claims))
    for _ in range(runs):
        t0 = now()
        rec = reg.reserve(spec, drivers)
        t1 = now()
        reg.release(rec)
        t2 = now()
        s_res.add(t1 - t0)
        s_rel.add(t2 - t1)
        slots.append(rec.slot)
        t0 = now()
        subprocess.run([SVIRT, "list"], stdout=subprocess.DEVNULL, env=env, timeout=300,
                       check=True)
        s_list.add(now() - t0)
    res.extra["big_registry_slots"] = sorted(set(slots))
    shutil.rmtree(root, ignore_errors=True)  # fake records: no reconcile, see bench.fake


def _targets(res: SectionResult, sizes: list[int], checks: list[dict[str, Any]]) -> list[Target]:
    out: list[Target] = []
    for n in sizes:
        sv = res.get(f"svirt{n}.all_markers")
        rw = res.get(f"raw{n}.all_markers")
        r = summarize(ratios(sv.samples, rw.samples)) if sv and rw else None
        out.append(Target(f"{n} concurrent UML guests: svirt/raw time to all markers",
                          "n/a" if r is None else f"{r['median']:.3f}x",
                          f"<= {RATIO_LIMIT}x", None if r is None else r["median"] <= RATIO_LIMIT))
        mine = [c for c in checks if c.get("n") == n]
        distinct = bool(mine) and all(c.get("slots_distinct") and c.get("uids_distinct")
                                      for c in mine)
        up = sum(1 for c in mine if c.get("all_up"))
        out.append(Target(f"{n} concurrent guests: slots and uids all distinct",
                          f"{sum(1 for c in mine if c.get('slots_distinct'))}/{len(mine)} rounds"
                          f" (all {n} up in {up}/{len(mine)})",
                          "all rounds", distinct if mine else None,
                          "" if up == len(mine) else "a round where a guest failed to boot "
                          "is excluded from the timing; see checks in the JSON"))
        clean = bool(mine) and all(c.get("leak_free") for c in mine)
        out.append(Target(f"{n} concurrent guests: zero leaks after",
                          f"{sum(1 for c in mine if c.get('leak_free'))}/{len(mine)} rounds clean",
                          "all rounds", clean if mine else None))
    return out
