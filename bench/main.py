"""``bench/run``: run the benchmark sections, print a markdown table, write JSON.

Sections: launch (svirt vs raw vs libvirt, to marker and exit), costs
(svirt's own pieces), memory (supervisor vs libvirtd + virtlogd), scale (N
concurrent UML guests; 10,000-record registry), floor (svirt's overhead
against the floor: launch to marker jailed and not, CLI start, slots with
10,000 guests, import times), services (detached guests under the one
supervisor: its PSS with 1/10/50 UML and 1/10 QEMU guests vs libvirt,
``svirt start`` vs ``virsh start``, idle exit).  Every sample and the host
description go to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import costs, floor, launch, memory, scale, services
from bench import libvirt as lv
from bench.guests import images
from bench.report import render
from bench.util import (
    CLEANUP,
    SectionResult,
    Sleepers,
    busy_processes,
    host_description,
    make_temp_dir,
)
from bench.util import loadavg as load_now
from svirt.host import probe_host

SECTIONS = ("launch", "costs", "memory", "scale", "floor", "services")
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
# Guest uids of the bench: a DAC range of its own, so that guests other people
# run meanwhile (default range from 1,500,000) neither collide with the
# bench's guests nor count as its leaks.
BENCH_UID_BASE = "3000000"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="rounds per measurement (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="3 rounds, scale only at 10 guests")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--scale-runs", type=int, default=None,
                   help="rounds of the scale section (default: --runs)")
    p.add_argument("--scale-sizes", default=None,
                   help="comma-separated guest counts (default 10,20,50; --quick: 10)")
    p.add_argument("--mem-guests", type=int, default=5,
                   help="guests running at once in the memory section (default 5)")
    p.add_argument("--no-libvirt", action="store_true", help="skip the libvirt comparison")
    p.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                   help="floor: also time the CLI and reserve + release with the svirt "
                        "package in DIR (an older tree), interleaved")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (guests run under their own uids)", file=sys.stderr)
        return 2
    os.environ.setdefault("SVIRT_UID_BASE", BENCH_UID_BASE)  # read by every DacDriver()
    # svirt as installed, with bytecode caches: under PYTHONDONTWRITEBYTECODE
    # (set in some shells and CI) every svirt command compiles each module it
    # imports again (about 60 ms for svirt run); the caches go to a private dir
    bytecode = "cached"
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        bytecode = "PYTHONDONTWRITEBYTECODE unset for the bench; caches in a private dir"
        os.environ["PYTHONPYCACHEPREFIX"] = str(make_temp_dir("bench-pycache-", None))
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    sections = list(args.only or SECTIONS)
    sizes = ([int(x) for x in args.scale_sizes.split(",")] if args.scale_sizes
             else [10] if args.quick else [10, 20, 50])
    scale_runs = args.scale_runs or args.runs
    started = time.time()
    results: list[SectionResult] = []
    errors: dict[str, str] = {}
    out: dict[str, Any] = {
        "options": {"runs": args.runs, "quick": args.quick, "sections": sections,
                    "scale_runs": scale_runs, "scale_sizes": sizes,
                    "mem_guests": args.mem_guests, "libvirt": not args.no_libvirt,
                    "svirt_uid_base": os.environ["SVIRT_UID_BASE"], "bytecode": bytecode},
    }
    interrupted = False
    try:
        print("bench: describing the host and building the tiny guests", flush=True)
        out["host"] = host_description()
        imgs = images()
        out["images"] = {"uml": {"kernel": str(imgs.uml.kernel), "initrd": str(imgs.uml.initrd)},
                         "qemu": {"kernel": str(imgs.qemu.kernel),
                                  "initrd": str(imgs.qemu.initrd)}}
        sleepers = Sleepers()
        libvirt: lv.Libvirt | None = None
        lv_info: dict[str, Any] = {}
        if not args.no_libvirt and {"launch", "memory", "services"} & set(sections):
            reason = lv.missing()
            if reason is None:
                libvirt = lv.Libvirt()
                try:
                    print("bench: starting libvirtd and virtlogd", flush=True)
                    libvirt.start(mask_kvm=not probe_host().kvm.usable)
                except Exception as err:  # noqa: BLE001 - report why and go on without it
                    reason = f"libvirtd did not start: {err}"
                    libvirt.stop()
                    libvirt = None
            lv_info["unavailable"] = reason
            # asked while libvirtd runs: the answer is about the driver, not the socket
            lv_info["uml_driver"] = lv.uml_driver_status()
        out["libvirt"] = lv_info

        runners: dict[str, Callable[[], SectionResult]] = {
            "launch": lambda: launch.run(imgs, args.runs, libvirt),
            "costs": lambda: costs.run(imgs, args.runs, sleepers),
            "memory": lambda: memory.run(imgs, args.runs, libvirt, args.mem_guests),
            "scale": lambda: scale.run(imgs, scale_runs, sizes, sleepers),
            "floor": lambda: floor.run(imgs, args.runs, sleepers, args.baseline_tree),
            "services": lambda: services.run(imgs, args.runs, libvirt),
        }
        for name in sections:
            print(f"bench: section {name}", flush=True)
            t0 = time.monotonic()
            try:
                res = runners[name]()
                res.seconds = time.monotonic() - t0
                results.append(res)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - one broken section must not hide the rest
                errors[name] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
        if libvirt is not None:
            lv_info["setup"] = libvirt.setup
            lv_info["notes"] = libvirt.notes
            libvirt.stop()
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted, cleaning up", file=sys.stderr)
    finally:
        CLEANUP.run_all()

    out.setdefault("host", {})
    out["host"]["loadavg_end"] = load_now()
    out["host"]["busy_processes_end"] = busy_processes()
    out["duration_s"] = time.time() - started
    out["interrupted"] = interrupted
    out["errors"] = errors
    out["sections"] = {r.name: r.to_json() for r in results}
    host = out.get("host", {})
    header = [
        "## svirt benchmark",
        "",
        f"host: {host.get('cpu_model')} x{host.get('cpus')}, kernel {host.get('kernel')}, "
        f"{host.get('memory_mib')} MiB; load avg start {host.get('loadavg_start')} "
        f"end {host.get('loadavg_end')}; runs {args.runs} (scale {scale_runs}); "
        f"{out['duration_s']:.0f} s"
        + ("; INTERRUPTED" if interrupted else ""),
    ]
    git = host.get("svirt_git") or {}
    if git:
        header.append(f"svirt at {git.get('head', '')[:12]} ({git.get('subject', '')})"
                      + ("; uncommitted changes in svirt/" if git.get("dirty_svirt_files")
                         else ""))
    lv_out = out.get("libvirt", {})
    if lv_out.get("unavailable"):
        header.append(f"libvirt: not compared: {lv_out['unavailable']}")
    elif lv_out.get("setup"):
        header.append(f"libvirt: {lv_out['setup'].get('version', '')}")
        header += [f"libvirt: {n}" for n in lv_out.get("notes", [])]
    table = render(results, header, errors)
    out["table"] = table
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1, default=str))
    print(f"bench: results written to {args.output}")
    return 130 if interrupted else (1 if errors else 0)


if __name__ == "__main__":
    raise SystemExit(main())
