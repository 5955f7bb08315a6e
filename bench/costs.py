"""Section "costs": where svirt's own time goes, piece by piece.

* CLI start: ``svirt --version``, ``svirt list`` with 0 and 50 registered
  guests (fake records whose supervisors are live ``sleep`` processes), next
  to the bare interpreter and the imports ``svirt run`` needs.
* Spec load + validation (``svirt.spec.load_spec``).
* Host probe (``probe_host``) with a warm and a cold host cache.
* Slot allocation (``Registry.reserve`` + ``release`` with the DAC driver),
  in an empty registry and next to 50 records.
* Labelling N files (``Registry.hold`` of N private writable files, then
  ``release``), N = 10 and 100.
* Fork-to-exec: ``svirt.launcher.child.spawn`` of /bin/true against
  ``subprocess.Popen``, in a fresh interpreter (see bench.forkexec).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from bench.fake import add_fake_records, fake_registry
from bench.guests import QEMU_TCG, UML, Images, Workspace
from bench.util import (
    PYTHON,
    SVIRT,
    SectionResult,
    Series,
    Sleepers,
    Target,
    make_temp_dir,
    now,
    summarize,
)
from svirt.host import probe_host
from svirt.launcher.registry import Registry
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.dac import DacDriver
from svirt.spec import GuestSpec, load_spec

VERSION_LIMIT_S = 0.080
LIST50_LIMIT_S = 0.150


def _wall(argv: list[str], env: dict[str, str]) -> float:
    t0 = now()
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, timeout=60)
    dt = now() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.stderr.decode(errors='replace')}")
    return dt


def run(imgs: Images, runs: int, sleepers: Sleepers) -> SectionResult:
    res = SectionResult("costs")
    micro = runs * 5
    ws = Workspace("costs")
    spec_path = ws.write_spec("bench-costs", UML, imgs, "poweroff", "SVIRT-BENCH-READY")

    # ---------------------------------------------------------------- CLI
    reg0 = fake_registry("list0")
    reg50 = fake_registry("list50")
    add_fake_records(reg50, 50, sleepers.start(50))
    env0 = dict(os.environ, SVIRT_RUN_DIR=str(reg0))
    env50 = dict(os.environ, SVIRT_RUN_DIR=str(reg50))
    cli: list[tuple[Series, list[str], dict[str, str]]] = [
        (res.new("cli.python", "python -c pass (interpreter alone)", "s"),
         [PYTHON, "-c", "pass"], env0),
        (res.new("cli.import_run", "python -c 'import svirt.launcher.launch' (what run imports)",
                 "s"), [PYTHON, "-c", "import svirt.cli, svirt.launcher.launch"], env0),
        (res.new("cli.version", "svirt --version", "s"), [SVIRT, "--version"], env0),
        (res.new("cli.list0", "svirt list, 0 guests", "s"), [SVIRT, "list"], env0),
        (res.new("cli.list50", "svirt list, 50 guests", "s"), [SVIRT, "list"], env50),
    ]
    for _, argv, env in cli:  # warm the page cache and .pyc files
        _wall(argv, env)
    for _ in range(runs):
        for series, argv, env in cli:
            series.add(_wall(argv, env))
    listed = subprocess.run([SVIRT, "list", "--json"], capture_output=True, text=True,
                            env=env50, timeout=60)
    res.extra["list50_records_listed"] = len(json.loads(listed.stdout))
    res.extra["importtime_top"] = _importtime(env0)

    # -------------------------------------------------------- in-process
    s = res.new("spec.load", "load_spec (TOML + validation)", "s")
    load_spec(spec_path)
    for _ in range(micro):
        t0 = now()
        load_spec(spec_path)
        s.add(now() - t0)

    s = res.new("probe.warm", "probe_host, host cache warm", "s")
    s_cold = res.new("probe.cold", "probe_host, no host cache (first command in a registry)",
                     "s")
    old = os.environ.get("SVIRT_RUN_DIR")
    try:
        os.environ["SVIRT_RUN_DIR"] = str(reg0)
        probe_host()
        for _ in range(runs):
            t0 = now()
            probe_host()
            s.add(now() - t0)
            (reg0 / "host-cache.json").unlink(missing_ok=True)
            t0 = now()
            probe_host()
            s_cold.add(now() - t0)
    finally:
        if old is None:
            os.environ.pop("SVIRT_RUN_DIR", None)
        else:
            os.environ["SVIRT_RUN_DIR"] = old

    spec = load_spec(spec_path)
    drivers = [DacDriver()]
    for label, root in (("0", make_temp_dir("bench-slot-reg-", None)), ("50", reg50)):
        s_res = res.new(f"slot.reserve{label}", f"Registry.reserve, {label} live guests", "s")
        s_rel = res.new(f"slot.release{label}", f"Registry.release, {label} live guests", "s")
        reg = Registry(root)
        reg.release(reg.reserve(spec, drivers))
        for _ in range(micro):
            t0 = now()
            rec = reg.reserve(spec, drivers)
            t1 = now()
            reg.release(rec)
            t2 = now()
            s_res.add(t1 - t0)
            s_rel.add(t2 - t1)

    res.extra["labelling_restored"] = {}
    for n in (10, 100):
        _labelling(res, spec, n, runs)

    # ----------------------------------------------------------- fork/exec
    out = subprocess.run([PYTHON, "-m", "bench.forkexec", str(micro)], capture_output=True,
                         text=True, timeout=600, cwd=str(Path(__file__).parent.parent))
    if out.returncode == 0:
        data: dict[str, Any] = json.loads(out.stdout)
        labels = {
            "popen": "subprocess.Popen(/bin/true)",
            "spawn_no_pdeathsig": "spawn(/bin/true), pdeathsig=False",
            "spawn_pdeathsig": "spawn(/bin/true) as svirt calls it (pdeathsig)",
            "spawn_pdeathsig_dac": "spawn + DAC child setup (svirt's real path)",
        }
        for key, label in labels.items():
            series = res.new(f"fork.{key}", f"fork-to-exec: {label}", "s",
                             baseline=None if key == "popen" else "fork.popen")
            series.samples = data["samples"][key]
        res.extra["fork_first_call_s"] = data["first_call"]
    else:
        res.notes.append(f"fork-to-exec benchmark failed: {out.stderr[-1500:]}")

    res.extra["console_hops"] = _console_hops(imgs, ws)
    res.targets += _targets(res)
    return res


def _console_hops(imgs: Images, ws: Workspace) -> dict[str, Any]:
    """How often the supervisor thread wakes to drain the console during one boot,
    and the CPU the launcher process spends meanwhile (in-process launch())."""
    import resource

    from svirt.launcher import supervisor as sup
    from svirt.launcher.launch import launch

    out: dict[str, Any] = {}
    reads = [0]
    orig = sup.Supervisor._drain

    def counting(self: sup.Supervisor) -> bool | None:
        got = orig(self)
        if got:
            reads[0] += 1
        return got

    setattr(sup.Supervisor, "_drain", counting)  # noqa: B010 - this process only
    try:
        for flavor in (UML, QEMU_TCG):
            path = ws.write_spec(f"bench-hops-{flavor.key}", flavor, imgs, "poweroff",
                                 "SVIRT-BENCH-READY")
            spec = load_spec(path)
            reads[0] = 0
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = now()
            with launch(spec, registry=Registry(ws.registry)) as guest:
                guest.wait(180)
                total = guest.console.total
            wall = now() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            out[flavor.key] = {
                "console_reads": reads[0], "console_bytes": total,
                "bytes_per_read": total / reads[0] if reads[0] else None,
                "launcher_cpu_s": (cpu1.ru_utime - cpu0.ru_utime)
                + (cpu1.ru_stime - cpu0.ru_stime),
                "wall_s": wall}
    finally:
        setattr(sup.Supervisor, "_drain", orig)  # noqa: B010
    return out


def _labelling(res: SectionResult, spec: GuestSpec, n: int, runs: int) -> None:
    files_dir = make_temp_dir(f"bench-label{n}-", "/var/tmp")
    files = []
    for i in range(n):
        p = files_dir / f"disk{i}.img"
        p.write_bytes(b"\0" * 4096)
        p.chmod(0o644)
        files.append(p)
    resources = [Resource(p, Access.RW, ResourceKind.DISK) for p in files]
    reg = Registry(make_temp_dir("bench-label-reg-", None))
    drivers = [DacDriver()]
    s_hold = res.new(f"label.hold{n}", f"Registry.hold of {n} files (chown+chmod, journalled)",
                     "s")
    s_rel = res.new(f"label.release{n}", f"release of {n} held files (restore)", "s")
    restored = True
    for i in range(runs + 1):
        rec = reg.reserve(spec, drivers)
        t0 = now()
        for r in resources:
            reg.hold(rec, r, drivers, ())
        t1 = now()
        reg.release(rec)
        t2 = now()
        if i:
            s_hold.add(t1 - t0)
            s_rel.add(t2 - t1)
        for p in files:
            st = p.stat()
            if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (0, 0, 0o644):
                restored = False
    res.extra["labelling_restored"][str(n)] = restored


def _importtime(env: dict[str, str]) -> list[str]:
    """The slowest imports of ``svirt run`` (python -X importtime), cumulative µs."""
    out = subprocess.run([PYTHON, "-X", "importtime", "-c",
                          "import svirt.cli, svirt.launcher.launch"],
                         capture_output=True, text=True, env=env, timeout=60)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    rows.sort(reverse=True)
    return [f"{us / 1000:7.1f} ms {name}" for us, name in rows[:25]]


def _targets(res: SectionResult) -> list[Target]:
    out = []
    for key, limit, name in (("cli.version", VERSION_LIMIT_S, "svirt --version"),
                             ("cli.list50", LIST50_LIMIT_S, "svirt list with 50 guests")):
        series = res.get(key)
        summ = summarize(series.samples) if series else None
        if summ is None:
            out.append(Target(name, "n/a", f"<= {limit * 1000:.0f} ms", None))
        else:
            out.append(Target(name, f"{summ['median'] * 1000:.0f} ms",
                              f"<= {limit * 1000:.0f} ms", summ["median"] <= limit))
    return out
