"""The command line: the only place that prints for humans or exits.

Verbs: run, check, host, list, gc, demo.  An expected failure (any
SvirtError) is one line plus a hint, never a traceback.
"""

from __future__ import annotations

import os
import sys

# each verb imports what it needs (argparse too): `svirt --version` and `svirt
# list` stay near the interpreter's own start-up; typing is not imported at run
# time (mypy and ruff read this name as typing.TYPE_CHECKING)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

    from svirt.launcher.supervisor import Outcome

VERSION = "0.1.0"
EXIT_FOR_OUTCOME = {"poweroff": 0, "panic": 3, "crash": 4, "killed": 5}
EPHEMERAL_HELP = ("every writable disk gets a copy-on-write layer that is deleted when the "
                  "guest ends (read-only disks stay as they are)")


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------- verbs
def cmd_host(args: argparse.Namespace) -> int:
    from svirt.host import probe_host

    host = probe_host()
    if args.json:
        _print_json(host.to_dict())
        return 0
    for name, binary in host.binaries.items():
        print(f"{name:20} {binary.version + '  ' + binary.path if binary else 'not installed'}")
    print(f"{'kvm':20} {'usable' if host.kvm.usable else 'unusable'}: {host.kvm.reason}")
    mls = " (MLS/MCS)" if host.selinux_mls else ""
    print(f"{'selinux':20} {host.selinux}{mls}"
          f"{' policy ' + host.selinux_policy if host.selinux_policy else ''}")
    print(f"{'smack':20} {'active' if host.smack else 'not active'}")
    print(f"{'lguest':20} {'/dev/lguest present' if host.lguest_device else '/dev/lguest absent'}")
    if host.uml_xstate_fallback:
        print(f"{'uml fpu':20} AMX host: UML falls back to FXSAVE (seccomp), guests without AVX")
    print(f"{'lsm':20} {','.join(host.lsms) or 'unknown'}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import shlex

    from svirt.launcher.launch import describe
    from svirt.spec import load_spec

    spec = load_spec(args.spec)
    if args.ephemeral:
        spec = spec.with_ephemeral_disks()
    plan = describe(spec)
    if args.json:
        _print_json(plan)
        return 0
    print(f"guest {plan['name']}: backend {plan['backend']}, accel {plan['accel']}, "
          f"security {' + '.join(plan['security']) or 'none'}, "
          f"jail {'on' if plan['jail'] else 'OFF'}")
    if not plan["jail"]:
        print("svirt: warning: jail = false: a breached hypervisor sees the whole host "
              "filesystem, every world-readable file and 0666 socket, and every process",
              file=sys.stderr)
    print("argv:")
    print("  " + " ".join(shlex.quote(a) for a in plan["argv"]))
    if plan["env"]:
        print("env: " + " ".join(f"{k}={v}" for k, v in plan["env"].items()))
    print("label plan:")
    for r in plan["resources"]:
        print(f"  {r['kind']:12} {r['access']:7} {r['path']}")
        for drv in plan["security"]:
            print(f"      {drv}: {_plan_line(drv, r)}")
    return 0


def _plan_line(driver: str, r: dict[str, Any]) -> str:
    if not r["relabel"]:
        return "left as it is (relabel = false)"
    access = r["access"]
    if driver == "selinux":
        return {"rw": "image context at the guest's pair (svirt_image_t:s0:cA,cB)",
                "ro": "content context, no categories (virt_content_t:s0)",
                "shared": "image context, no categories (svirt_image_t:s0)"}[access]
    if driver == "dac":
        return {"rw": "chown to the guest's uid/gid, mode 0600 (dirs 0700)",
                "ro": "readable by others: unchanged; else an ACL entry user:UID:r",
                "shared": "an ACL entry user:UID:rw"}[access]
    return f"the guest's {driver} label"


def cmd_run(args: argparse.Namespace) -> int:
    from svirt.spec import ConsoleMode, load_spec

    spec = load_spec(args.spec)
    if args.ephemeral:
        spec = spec.with_ephemeral_disks()
    console = "none" if args.command and args.console is None else args.console or "stdio"
    if spec.console.log is None:
        from svirt.spec import Console

        spec = spec.with_changes(console=Console(mode=ConsoleMode(console)))
    if args.command:
        return _run_command(spec, " ".join(args.command), args.timeout)
    outcome = _run_guest(spec)
    print(f"svirt: guest {spec.name}: {outcome}", file=sys.stderr)
    return EXIT_FOR_OUTCOME[outcome.kind]


class _Interrupted(BaseException):
    pass


def _run_command(spec: Any, command: str, timeout: float) -> int:
    """Boot, run ``command`` in the shell on the guest's console, print its
    output, stop the guest; the command's exit status is svirt's."""
    from svirt.launcher.launch import launch

    with launch(spec) as guest:
        status, output = guest.shell(command, timeout)
        sys.stdout.write(output)
        sys.stdout.flush()
        outcome = guest.stop()
    if not outcome.ok:
        print(f"svirt: guest {spec.name}: {outcome}", file=sys.stderr)
    return status


def _run_guest(spec: Any) -> Outcome:
    import signal

    from svirt.launcher.launch import launch

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Interrupted

    old_int = signal.signal(signal.SIGINT, interrupt)
    old_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        with launch(spec) as guest:
            print(f"svirt: guest {spec.name} running as pid {guest.pid} "
                  f"({', '.join(guest.labels.values()) or 'unconfined'})", file=sys.stderr)
            if guest.console_pty:
                print(f"svirt: console on {guest.console_pty}", file=sys.stderr)
            try:
                while guest.wait(0.5) is None:
                    pass
            except _Interrupted:
                print(f"svirt: stopping guest {spec.name}", file=sys.stderr)
                return guest.stop()
            outcome = guest.outcome
            assert outcome is not None  # noqa: S101 - wait() returned an outcome
            return outcome
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def cmd_list(args: argparse.Namespace) -> int:
    from svirt.launcher.state import Registry

    registry = Registry()
    records = registry.reconcile_records() if os.geteuid() == 0 else registry.records()
    orphans = registry.orphans(records=records)
    usage = {r.name: _usage(r) for r in records} if args.usage else {}  # cgroups
    if args.json:
        _print_json([{**r.to_json(), **({"usage": usage[r.name]} if args.usage else {})}
                     for r in records]
                    + [{"name": None, "status": "orphan", "pid": pid, "uid": uid}
                       for pid, uid in orphans])
        return 0
    for problem in registry.problems:
        print(f"svirt: warning: {problem}", file=sys.stderr)
    header = f"{'NAME':20} {'BACKEND':7} {'SLOT':>5} {'PID':>8} {'STATUS':9}"
    if args.usage:
        header += f" {'MEM':>9} {'CPU':>9}"
    if args.Z:
        header += f" {'PROCESS LABEL':45} {'IMAGE LABEL':45} UID:GID"
    print(header)
    for r in records:
        pid = r.hypervisor.pid if r.hypervisor else "-"
        line = f"{r.name:20} {r.backend:7} {r.slot:>5} {pid!s:>8} {r.status:9}"
        if args.usage:
            u = usage[r.name]
            mem = f"{u['memory'] / 2**20:.1f}M" if "memory" in u else "-"
            cpu = f"{u['cpu_ns'] / 1e9:.1f}s" if "cpu_ns" in u else "-"
            line += f" {mem:>9} {cpu:>9}"
        if args.Z:
            se = r.labels.get("selinux") or r.labels.get("smack")
            dac = r.labels.get("dac")
            line += (f" {se.process if se else '-':45} {se.image if se else '-':45}"
                     f" {dac.process if dac else '-'}")
        print(line)
    for pid, uid in orphans:
        line = f"{'(orphan)':20} {'-':7} {'-':>5} {pid:>8} {'orphan':9}"
        line += f" {'-':>9} {'-':>9}" if args.usage else ""
        print(line + (f" {'-':45} {'-':45} {uid}:-" if args.Z else ""))
    return 0


def _usage(record: Any) -> dict[str, int]:
    """The guest's cgroup usage (memory bytes, cpu ns), from its journal."""
    from pathlib import Path

    from svirt.launcher.cgroups import usage_of

    for entry in record.journal:
        if entry.get("op") == "cgroup" and isinstance(entry.get("dirs"), dict):
            return usage_of(int(entry.get("version", 1)),
                            {c: Path(d) for c, d in entry["dirs"].items()})
    return {}


def cmd_gc(args: argparse.Namespace) -> int:
    from svirt.launcher.state import Registry

    registry = Registry()
    killed = registry.kill_orphans()
    done = registry.reconcile()
    swept = registry.sweep_claims()
    for line in swept + killed:  # swept: stale claims of any registry on the host
        print(line)
    if not done and not killed:
        print("svirt gc: nothing to release")
    failed = False
    for name, report in done:
        if any(line.startswith("restore failed") for line in report):
            failed = True
            print(f"could not release guest {name} (kept; gc retries)")
        else:
            print(f"released guest {name}")
        for line in report:
            print(f"  {line}")
    for problem in registry.problems:
        failed = True
        print(f"svirt: warning: {problem}", file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from svirt.demo import run_demo

    return run_demo()


# -------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="svirt", description="Launch guests confined sVirt-style, without libvirt.")
    parser.add_argument("--version", action="version", version=f"svirt {VERSION}")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("run", help="launch a guest in the foreground, supervised")
    p.add_argument("spec", help="the guest spec (TOML)")
    p.add_argument("--console", choices=["stdio", "pty", "none"], default=None,
                   help="where the console goes when the spec has no log file "
                        "(default: stdio; none with a COMMAND)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="with a COMMAND: seconds for the guest's shell to answer "
                        "and the command to end (default 300)")
    p.add_argument("command", nargs="*", metavar="-- COMMAND",
                   help="boot, run COMMAND in the shell on the guest's console, print "
                        "its output, stop the guest and exit with its status")
    p.add_argument("--ephemeral", action="store_true", help=EPHEMERAL_HELP)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="validate a spec and show the argv and label plan")
    p.add_argument("spec")
    p.add_argument("--ephemeral", action="store_true", help=EPHEMERAL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("host", help="what this host can run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_host)
    p = sub.add_parser("list", help="running guests")
    p.add_argument("-Z", action="store_true", help="show security labels and uid:gid")
    p.add_argument("--usage", action="store_true",
                   help="show memory and cpu time from each guest's cgroup")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("gc", help="release the records of guests that are gone")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("demo", help="build tiny guests and boot a UML and a QEMU guest")
    p.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: object = None, line: str | None = None) -> None:
    print(f"svirt: warning: {message}", file=sys.stderr)


def _one_line(text: object) -> str:
    """``text`` on one line: control characters (a newline in a path) escaped."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _error(message: object, hint: object = None) -> None:
    print(f"svirt: error: {_one_line(message)}", file=sys.stderr)
    if hint:
        print(f"svirt: hint: {_one_line(hint)}", file=sys.stderr)


def _os_error(err: OSError) -> tuple[str, str | None]:
    """An OSError that escaped a verb (EACCES, ENOSPC, EROFS on the state dir...)."""
    import errno

    reason = err.strerror or str(err)
    names = [str(f) for f in (err.filename, err.filename2) if f is not None]
    message = f"{' -> '.join(names)}: {reason}" if names else reason
    hint = None
    if err.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        hint = "svirt needs root for this"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space on that file system and run the command again"
    elif err.errno == errno.EROFS:
        hint = "that file system is mounted read-only"
    return message, hint


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"svirt {VERSION}")  # what argparse's version action prints, without argparse
        return 0
    args = build_parser().parse_args(argv)
    import warnings

    warnings.showwarning = _show_warning
    from svirt.errors import SvirtError

    if args.func is cmd_run and os.geteuid() != 0:
        _error("svirt run must be root: each guest gets a uid, labels and devices of its own",
               "run it as root (sudo svirt run ...); svirt check works as any user")
        return 1
    try:
        rc = int(args.func(args))
        return rc
    except SvirtError as err:
        _error(err.message, err.hint)
        return 2 if type(err).__name__ == "SpecError" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(1)
    except OSError as err:
        _error(*_os_error(err))
        return 1
    except Exception as err:  # a bug: one line, the traceback only when asked for
        if os.environ.get("SVIRT_DEBUG"):
            raise
        _error(f"internal error: {type(err).__name__}: {str(err)[:500]}",
               "this is a bug in svirt; SVIRT_DEBUG=1 shows the traceback")
        return 1
