"""Section "launch": command start to the guest's marker and to process exit.

Per round and per guest kind, in rotating order: ``svirt run SPEC --console
stdio`` (the installed console script, private registry), the same argv run
raw (console on stdout, root, no uid switch), for QEMU the raw argv with
``-serial file:`` (libvirt's console path, polled) and, for QEMU-TCG,
``virsh create`` of an equivalent transient domain (to the marker and until
the domain is gone).  Guests run /init mode poweroff, so each ends by itself.
"""

from __future__ import annotations

from typing import Any

from bench import libvirt as lv
from bench.guests import QEMU_KVM, QEMU_TCG, UML, Flavor, Images, Workspace, raw_command, raw_setup
from bench.procs import Watched, run_file_console, run_once, stop_gently
from bench.util import SVIRT, SectionResult, Target, differences, ratios, summarize
from svirt.host import probe_host

MARKER = "SVIRT-BENCH-READY"
OVERHEAD_LIMIT_S = 0.050
UML_RATIO_LIMIT = 1.05


def _svirt(ws: Workspace, spec: str, label: str) -> Watched:
    return run_once([SVIRT, "run", spec, "--console", "stdio"], marker=MARKER, env=ws.env(),
                    stderr_path=ws.log_path(label), stop=stop_gently)


def _raw(ws: Workspace, plan: dict[str, Any], label: str) -> Watched:
    raw_dir = ws.raw_dir()
    argv, env = raw_command(plan, raw_dir)
    return run_once(argv, marker=MARKER, env=env, cwd=str(raw_dir),
                    stderr_path=ws.log_path(label), preexec=raw_setup(plan))


def _raw_file(ws: Workspace, plan: dict[str, Any], label: str) -> Watched:
    """QEMU raw with its serial console to a file, polled (libvirt's console path)."""
    raw_dir = ws.raw_dir()
    argv, env = raw_command(plan, raw_dir)
    console = raw_dir / "console"
    argv[argv.index("-serial") + 1] = f"file:{console}"
    return run_file_console(argv, console=console, marker=MARKER, env=env, cwd=str(raw_dir))


def _ok(w: Watched) -> bool:
    return w.marker_s is not None and w.exit_s is not None and w.returncode == 0


def run(imgs: Images, runs: int, libvirt: lv.Libvirt | None) -> SectionResult:
    res = SectionResult("launch")
    host = probe_host()
    flavors: list[Flavor] = [UML, QEMU_TCG]
    if host.kvm.usable:
        flavors.append(QEMU_KVM)
    else:
        res.notes.append(f"QEMU-KVM not measured: {host.kvm.reason}")
    res.notes.append("libvirt has no UML driver any more (dropped in libvirt 5.0.0, 2019): "
                     f"uml:///system -> {lv.uml_driver_status()}")
    ws = Workspace("launch")
    plans: dict[str, tuple[str, dict[str, Any]]] = {}
    for fl in flavors:
        spec_path = ws.write_spec(f"bench-{fl.key}", fl, imgs, "poweroff", MARKER)
        plans[fl.key] = (str(spec_path), ws.check(spec_path))
    res.extra["argv"] = {k: {"svirt": p["argv"], "raw": raw_command(p, ws.raw / "RAW")[0]}
                         for k, (_, p) in plans.items()}

    series: dict[str, Any] = {}
    for fl in flavors:
        variants = _variants(fl, libvirt)
        for v in variants:
            for what in ("marker", "exit"):
                key = f"{fl.key}.{v}.{what}"
                end = "domain gone" if v == "libvirt" and what == "exit" else what
                label = {"svirt": "svirt run", "raw": "raw argv",
                         "libvirt": "virsh create",
                         "rawfile": "raw argv, -serial file (polled)"}[v]
                series[key] = res.new(key, f"{fl.key} {label}: start -> {end}", "s",
                                      baseline=None if v == "raw" else f"{fl.key}.raw.{what}")
        if "libvirt" in variants:
            series[f"{fl.key}.libvirt.create"] = res.new(
                f"{fl.key}.libvirt.create", f"{fl.key} virsh create returns", "s")

    # warm-up: the first svirt command in a fresh registry probes the host
    # binaries (qemu --version/-help) and fills the registry's host cache
    warm: dict[str, Any] = {}
    for fl in flavors:
        spec, plan = plans[fl.key]
        w = _svirt(ws, spec, f"warm-{fl.key}")
        r = _raw(ws, plan, f"warm-raw-{fl.key}")
        warm[fl.key] = {"svirt_marker_s": w.marker_s, "svirt_exit_s": w.exit_s,
                        "raw_marker_s": r.marker_s, "raw_exit_s": r.exit_s}
        for what, run_ in (("svirt run", w), ("raw", r)):
            if not _ok(run_):
                res.notes.append(f"warm-up {what} of {fl.key} failed (rc {run_.returncode})")
                warm[fl.key][f"{what} failure"] = run_.tail()
    if libvirt is not None:
        d = libvirt.run_timed(imgs.qemu.kernel, imgs.qemu.initrd, _qemu_cmdline(plans),
                              QEMU_TCG.memory, MARKER)
        warm["libvirt"] = {"create_s": d.create_s, "marker_s": d.marker_s, "gone_s": d.gone_s,
                           "error": d.error}
    res.extra["warmup_first_runs"] = warm

    failures: list[dict[str, Any]] = []
    for rnd in range(runs):
        for fl in flavors:
            spec, plan = plans[fl.key]
            variants = _variants(fl, libvirt)
            k = rnd % len(variants)
            order = variants[k:] + variants[:k]
            got: dict[str, tuple[float, float, float | None]] = {}
            for v in order:
                if v == "svirt":
                    w = _svirt(ws, spec, f"{fl.key}-{rnd}")
                elif v == "raw":
                    w = _raw(ws, plan, f"raw-{fl.key}-{rnd}")
                elif v == "rawfile":
                    w = _raw_file(ws, plan, f"rawfile-{fl.key}-{rnd}")
                else:
                    assert libvirt is not None
                    d = libvirt.run_timed(imgs.qemu.kernel, imgs.qemu.initrd,
                                          _qemu_cmdline(plans), QEMU_TCG.memory, MARKER)
                    if d.marker_s is None or d.gone_s is None or d.error:
                        failures.append({"round": rnd, "flavor": fl.key, "variant": v,
                                         "error": d.error, "tail": d.console_tail})
                    else:
                        got[v] = (d.marker_s, d.gone_s, d.create_s)
                    continue
                if _ok(w):
                    assert w.marker_s is not None and w.exit_s is not None
                    got[v] = (w.marker_s, w.exit_s, None)
                else:
                    failures.append({"round": rnd, "flavor": fl.key, "variant": v,
                                     "returncode": w.returncode, "tail": w.tail()})
            if all(v in got for v in variants):  # keep every series paired by round
                for v, (m, e, c) in got.items():
                    series[f"{fl.key}.{v}.marker"].add(m)
                    series[f"{fl.key}.{v}.exit"].add(e)
                    if c is not None:
                        series[f"{fl.key}.libvirt.create"].add(c)
            else:
                res.notes.append(f"round {rnd} of {fl.key} excluded: a run failed (see failures)")
        print(f"bench: launch round {rnd + 1}/{runs} done", flush=True)
    res.extra["failures"] = failures
    res.targets += _targets(res, flavors, libvirt is not None)
    return res


def _variants(fl: Flavor, libvirt: lv.Libvirt | None) -> list[str]:
    """svirt and raw always; for QEMU also raw with a file console and, under TCG, libvirt."""
    out = ["svirt", "raw"]
    if fl.backend == "qemu":
        out.append("rawfile")
    if fl is QEMU_TCG and libvirt is not None:
        out.append("libvirt")
    return out


def _qemu_cmdline(plans: dict[str, tuple[str, dict[str, Any]]]) -> str:
    argv: list[str] = plans[QEMU_TCG.key][1]["argv"]
    return argv[argv.index("-append") + 1]


def _median(values: list[float]) -> float | None:
    s = summarize(values)
    return None if s is None else s["median"]


def _targets(res: SectionResult, flavors: list[Flavor], have_libvirt: bool) -> list[Target]:
    out: list[Target] = []

    def get(key: str) -> list[float]:
        s = res.get(key)
        return s.samples if s else []

    for fl in flavors:
        for what in ("marker", "exit"):
            over = _median(differences(get(f"{fl.key}.svirt.{what}"), get(f"{fl.key}.raw.{what}")))
            out.append(Target(
                f"svirt adds <= 50 ms ({fl.key}, start -> {what})",
                "n/a" if over is None else f"{over * 1000:+.0f} ms",
                "<= 50 ms", None if over is None else over <= OVERHEAD_LIMIT_S))
    ratio = _median(ratios(get("uml.svirt.exit"), get("uml.raw.exit")))
    out.append(Target("UML end-to-end svirt/raw", "n/a" if ratio is None else f"{ratio:.3f}x",
                      f"<= {UML_RATIO_LIMIT}x",
                      None if ratio is None else ratio <= UML_RATIO_LIMIT))
    if have_libvirt:
        sv = _median(get("qemu-tcg.svirt.marker"))
        lvm = _median(get("qemu-tcg.libvirt.marker"))
        met = None if sv is None or lvm is None else sv < lvm
        value = "n/a" if met is None else f"svirt {sv:.3f} s vs virsh create {lvm:.3f} s"
        out.append(Target("faster than virsh create to the marker (QEMU-TCG)", value,
                          "svirt < libvirt", met))
    else:
        out.append(Target("faster than virsh create to the marker", "n/a", "svirt < libvirt",
                          None, "libvirt not available"))
    out.append(Target("faster than libvirt for UML", "libvirt cannot run UML",
                      "svirt < libvirt", None, "libvirt dropped its UML driver in 5.0.0"))
    return out
