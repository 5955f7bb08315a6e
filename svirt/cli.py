"""The command line: the only place that prints for humans or exits.

Verbs: run, start, stop, kill, restart, status, console, logs, enable, disable,
unit, check, host, list, gc, demo.  An expected failure (any
SvirtError) is one line plus a hint, never a traceback.
"""

from __future__ import annotations

import math
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



MAX_SECONDS = 86400.0


def seconds(text: str) -> float:
    """A ``--timeout``: a finite number of seconds from 0 to a day (a huge or
    non-finite one would overflow the waits it reaches)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text} seconds: a timeout is from 0 to {MAX_SECONDS:g} seconds")
    return value

def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------- verbs
def cmd_host(args: argparse.Namespace) -> int:
    from svirt.host import probe_host

    host = probe_host()
    cluster = _cluster_status()
    if args.json:
        _print_json({**host.to_dict(), **({"cluster": cluster} if cluster else {})})
        return 0
    for name, binary in host.binaries.items():
        print(f"{name:20} {binary.version + '  ' + binary.path if binary else 'not installed'}")
    print(f"{'kvm':20} {'usable' if host.kvm.usable else 'unusable'}: {host.kvm.reason}")
    mls = " (MLS/MCS)" if host.selinux_mls else ""
    print(f"{'selinux':20} {host.selinux}{mls}"
          f"{' policy ' + host.selinux_policy if host.selinux_policy else ''}")
    print(f"{'smack':20} {'active' if host.smack else 'not active'}")
    print(f"{'apparmor':20} {'active' if host.apparmor else 'not active'}")
    print(f"{'lguest':20} {'/dev/lguest present' if host.lguest_device else '/dev/lguest absent'}")
    if host.uml_xstate_fallback:
        print(f"{'uml fpu':20} AMX host: UML falls back to FXSAVE (seccomp), guests without AVX")
    print(f"{'lsm':20} {','.join(host.lsms) or 'unknown'}")
    if cluster:
        _print_cluster(cluster)
    return 0


def _cluster_status() -> dict[str, Any] | None:
    """The [cluster] state for svirt host (None: this host alone)."""
    from svirt import config
    from svirt.errors import ConfigError

    try:
        conf = config.load().cluster
    except ConfigError:
        if os.geteuid() == 0:
            raise
        return None  # a user who may not read the host config: the host alone
    if conf is None:
        return None
    from svirt.cluster.claims import ClusterClaims
    from svirt.launcher.claims import default_claims_dir

    return ClusterClaims(conf).status(default_claims_dir())


def _print_cluster(c: dict[str, Any]) -> None:
    print(f"{'cluster':20} {c['name']} (this host: {c['host']}, lease TTL {c['ttl']}s)")
    for h in c["health"]:
        print(f"{'  member':20} {h['endpoint']}: {h['state']}")
    names = ", ".join(m["name"] or m["id"] for m in c["members"])
    print(f"{'  members':20} {names or 'unknown: ' + c.get('error', '')}")
    lease = c["lease"]
    if lease is None:
        print(f"{'  lease':20} none (no guest of this host holds one)")
    elif "error" in lease:
        print(f"{'  lease':20} {lease['id']}: {lease['error']}")
    else:
        print(f"{'  lease':20} {lease['id']}: {lease['ttl_left']}s left, {lease['keys']} keys")


def _list_cluster(as_json: bool) -> int:
    from svirt import config
    from svirt.errors import ConfigError

    conf = config.load().cluster
    if conf is None:
        raise ConfigError("no [cluster] table", source=str(config.config_path()),
                          hint="svirt list --cluster needs [cluster] etcd = [...]")
    from svirt.cluster.claims import ClusterClaims
    from svirt.termsafe import escape_text as esc

    guests = ClusterClaims(conf).guests()
    if as_json:
        _print_json(guests)  # json escapes every control character itself
        return 0
    # every value comes from etcd, which any host of the cluster writes: escaped
    print(f"{'HOST':16} {'NAME':20} {'UID':>8} {'MCS':12} {'LEASE':17} IMAGES")
    for g in guests:
        uid = next((str(c)[4:] for c in g["claims"] if str(c).startswith("uid-")), "-")
        mcs = next((str(c)[4:] for c in g["claims"] if str(c).startswith("mcs-")), "-")
        print(f"{esc(str(g['host'])):16} {esc(str(g['name'] or '(no guest)')):20} "
              f"{esc(uid):>8} {esc(mcs):12} {esc(str(g['lease'] or '-')):17} "
              f"{esc(' '.join(map(str, g['images'])) or '-')}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import shlex

    from svirt.launcher.launch import describe
    from svirt.spec import load_spec

    spec = load_spec(args.spec)
    if args.ephemeral:
        spec = spec.with_ephemeral_disks()
    plan = describe(spec)
    for problem in plan["warnings"]:
        print(f"svirt: warning: {_one_line(problem)}", file=sys.stderr)
    if args.json:
        _print_json(plan)
        return 0
    print(f"guest {plan['name']}: backend {plan['backend']}, accel {plan['accel']}, "
          f"security {' + '.join(plan['security']) or 'none'}, "
          f"jail {'on' if plan['jail'] else 'OFF'}")
    print("argv:")
    print("  " + " ".join(shlex.quote(a) for a in plan["argv"]))
    if plan["env"]:
        print("env: " + " ".join(f"{k}={v}" for k, v in plan["env"].items()))
    if plan["slot"] is None:
        print("process: unconfined (security model none)")
    else:
        print(f"process (slot {plan['slot']} if launched now):")
        for drv, proc in plan["process"].items():
            print(f"  {drv}: {proc['identity']}" + (f"  ({proc['note']})" if proc["note"] else ""))
    print("label plan:")
    for r in plan["resources"]:
        made = "  (made by the launch)" if r["made_by_launch"] else ""
        print(f"  {r['kind']:12} {r['access']:7} {_one_line(r['path'])}{made}")
        if r["refused"]:
            print(f"      refused: {_one_line(r['refused'])}")
        for drv, obj in r["plan"].items():
            first, *more = obj["setting"].splitlines() or [""]
            note = f"  ({obj['note']})" if obj["note"] else ""
            print(f"      {drv}: {_one_line(first)}{note}")
            for line in more:  # an AppArmor directory: two rules
                print(f"      {' ' * len(drv)}  {_one_line(line)}")
    return 0


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
    print(f"svirt: guest {spec.name}: {_one_line(outcome)}", file=sys.stderr)
    return EXIT_FOR_OUTCOME[outcome.kind]


class _Interrupted(BaseException):
    pass


def _run_command(spec: Any, command: str, timeout: float) -> int:
    """Boot, run ``command`` in the shell on the guest's console, print its
    output, stop the guest; the command's exit status is svirt's."""
    from svirt.launcher.launch import launch

    with launch(spec) as guest:
        status, output = guest.shell(command, timeout)
        if sys.stdout.isatty():  # the guest's bytes: on a terminal, as svirt console shows them
            from svirt.termsafe import ConsoleFilter

            screen = ConsoleFilter()
            output = (screen.feed(output.encode()) + screen.reset()).decode()
        sys.stdout.write(output)
        sys.stdout.flush()
        outcome = guest.stop()
    if not outcome.ok:
        print(f"svirt: guest {spec.name}: {_one_line(outcome)}", file=sys.stderr)
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
        if sys.stdout.isatty():  # the console was on it: undo the attributes it left
            from svirt.termsafe import ConsoleFilter

            sys.stdout.buffer.write(ConsoleFilter().reset())
            sys.stdout.flush()


# ------------------------------------------------------ detached guests
def cmd_start(args: argparse.Namespace) -> int:
    from svirt.launcher.state import Registry
    from svirt.service.client import ask
    from svirt.spec import load_spec, read_spec_data

    spec = load_spec(args.spec)  # the errors of a bad spec, here and now
    data, base, _shown = read_spec_data(args.spec)
    if args.ephemeral:
        spec = spec.with_ephemeral_disks()
        data = {**data, "disk": [{**d, "ephemeral": True} if not d.get("readonly") else d
                                 for d in data.get("disk", [])]}
    answer = ask(Registry(), {"op": "start", "spec": data, "base": str(base),
                              "wait_for": args.wait_for, "timeout": args.timeout})
    for warning in answer.pop("warnings", []):
        print(f"svirt: warning: {warning}", file=sys.stderr)
    if args.json:
        _print_json(answer)
    else:
        labels = ", ".join(answer["labels"].values()) or "unconfined"
        print(f"svirt: guest {spec.name} started: pid {answer['pid']} ({labels}); "
              f"console log {answer['log']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from svirt.launcher.state import Registry
    from svirt.service.client import ask

    op = "kill" if args.verb == "kill" else "stop"
    answer = ask(Registry(), {"op": op, "name": args.name,
                              "timeout": getattr(args, "timeout", None),
                              "force": getattr(args, "force", False)}, start=_adoptable())
    if args.json:
        _print_json(answer)
    else:
        print(f"svirt: guest {args.name}: {_one_line(answer['outcome'])}", file=sys.stderr)
    return EXIT_FOR_OUTCOME[answer["kind"]]


def cmd_restart(args: argparse.Namespace) -> int:
    from svirt.launcher.state import Registry
    from svirt.service.client import ask

    answer = ask(Registry(), {"op": "restart", "name": args.name, "timeout": args.timeout},
                 start=_adoptable())
    if args.json:
        _print_json(answer)
    else:
        labels = ", ".join(answer["labels"].values()) or "unconfined"
        print(f"svirt: guest {args.name} restarted: pid {answer['pid']} ({labels})")
    return 0


def _adoptable() -> bool:
    """Start a supervisor for this request only if a detached guest needs one."""
    from svirt.launcher.state import Registry
    from svirt.service.client import orphaned

    return bool(orphaned(Registry()))


def cmd_status(args: argparse.Namespace) -> int:
    from svirt.launcher.state import Registry
    from svirt.service.client import ask, running

    registry = Registry()
    adoptable = _adoptable()
    if args.name is None and not adoptable and not running(registry):
        answer: dict[str, Any] = {"ok": True, "guests": []}
    else:
        answer = ask(registry, {"op": "status", "name": args.name}, start=adoptable)
    if args.json:
        _print_json(answer)
        return 0
    for g in answer.get("guests", [answer]):
        if g.get("state") != "running":
            why = g.get("reason") or g.get("last_outcome") or ""
            print(f"{g['name']}: {g.get('state')}  restarts {g.get('restarts', 0)}"
                  f"{'  ' + why if why else ''}")
            continue
        usage = g.get("usage") or {}
        mem = f"  mem {usage['memory'] // (1 << 20)}M" if "memory" in usage else ""
        proc = g.get("process") or {}
        if "pss" in proc:
            mem += f"  pss {proc['pss'] // (1 << 20)}M  cpu {proc['cpu_seconds']:.1f}s"
        print(f"{g['name']}: running  pid {g['pid']}  up {g['uptime']:.0f}s  "
              f"{g['backend']}  {', '.join(g['labels'].values()) or 'unconfined'}{mem}"
              f"  restarts {g.get('restarts', 0)}{'  (adopted)' if g.get('adopted') else ''}"
              f"{'  ' + g['reason'] if g.get('reason') else ''}")
    return 0


DETACH = b"\x1d"  # Ctrl-]


def cmd_console(args: argparse.Namespace) -> int:
    import select
    import termios
    import tty

    from svirt.launcher.state import Registry
    from svirt.service.client import open_console
    from svirt.termsafe import ConsoleFilter

    sock = open_console(Registry(), args.name, args.read_only)
    screen = None if args.raw else ConsoleFilter()
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    how = "read-only; " if args.read_only else ""
    print(f"svirt: attached to {args.name} ({how}Ctrl-] detaches)", file=sys.stderr)
    out = sys.stdout.buffer
    ended = False
    try:
        if saved is not None:
            tty.setraw(stdin)
        while True:
            ready, _, _ = select.select([sock, stdin], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    ended = True
                    break
                out.write(data if screen is None else screen.feed(data))
                out.flush()
            if stdin in ready:
                keys = os.read(stdin, 4096)
                if not keys:
                    break
                typed, detach, _ = keys.partition(DETACH)
                if typed and not args.read_only:
                    sock.sendall(typed)
                if detach:
                    break
    finally:
        if screen is not None:  # undo what the guest set: concealed text, line drawing...
            try:
                out.write(screen.reset())
                out.flush()
            except OSError:
                pass
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
    print(f"\r\nsvirt: {'the guest ended' if ended else 'detached'}", file=sys.stderr)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from svirt.errors import StateError
    from svirt.launcher.state import Registry
    from svirt.service import logs
    from svirt.spec import NAME_RE

    if not NAME_RE.fullmatch(args.name):
        raise StateError(f"{args.name!r} is not a guest name")
    registry = Registry()
    path = logs.log_path(registry.state, args.name)
    if not path.exists():
        raise StateError(f"no console log for a detached guest named {args.name}",
                         hint="svirt status lists the detached guests")
    from svirt.termsafe import Escaper

    out = sys.stdout.buffer
    escaper = None if args.raw else Escaper()
    data = logs.tail(registry.state, args.name, args.n)
    out.write(data if escaper is None else escaper.feed(data))
    out.flush()
    if args.follow:
        for chunk in logs.follow(registry.state, args.name):
            out.write(chunk if escaper is None else escaper.feed(chunk))
            out.flush()
    if escaper is not None:
        out.write(escaper.flush())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from svirt.errors import SvirtError
    from svirt.launcher.cgroups import record_usage
    from svirt.launcher.state import Registry

    if args.cluster:
        return _list_cluster(args.json)
    registry = Registry()
    records = registry.reconcile_records() if os.geteuid() == 0 else registry.records()
    if os.geteuid() == 0:
        from svirt.service.client import bring_back

        try:
            bring_back(registry)  # detached guests whose supervisor died: adopted again
        except SvirtError as err:  # the list of every guest still comes
            registry.problems.append(f"detached guests not adopted: {err.message}")
    orphans = registry.orphans(records=records)
    usage = {r.name: record_usage(r.journal) for r in records} if args.usage else {}
    # a record that cannot be read is kept for a person: shown, never dropped
    unreadable = {name: f"restore-failed: unreadable record ({why})"
                  for name, why in registry.unreadable.items()}
    if args.json:
        _print_json([{**r.to_json(), **({"usage": usage[r.name]} if args.usage else {})}
                     for r in records]
                    + [{"name": name, "status": status} for name, status in unreadable.items()]
                    + [{"name": None, "status": "orphan", "pid": pid, "uid": uid}
                       for pid, uid in orphans])
        return 0
    for problem in registry.problems:
        print(f"svirt: warning: {_one_line(problem)}", file=sys.stderr)
    header = f"{'NAME':20} {'BACKEND':7} {'SLOT':>5} {'PID':>8} {'STATUS':9}"
    if args.usage:
        header += f" {'MEM':>9} {'CPU':>9}"
    if args.Z:
        header += f" {'PROCESS LABEL':45} {'IMAGE LABEL':45} UID:GID"
    print(header)
    for r in records:
        pid = r.hypervisor.pid if r.hypervisor else "-"
        # a restore-failed status quotes what failed (names from the guest's home)
        line = f"{r.name:20} {r.backend:7} {r.slot:>5} {pid!s:>8} {_one_line(r.status):9}"
        if args.usage:
            u = usage[r.name]
            mem = f"{u['memory'] / 2**20:.1f}M" if "memory" in u else "-"
            cpu = f"{u['cpu_ns'] / 1e9:.1f}s" if "cpu_ns" in u else "-"
            line += f" {mem:>9} {cpu:>9}"
        if args.Z:
            se = (r.labels.get("selinux") or r.labels.get("apparmor")
                  or r.labels.get("smack"))
            dac = r.labels.get("dac")
            line += (f" {se.process if se else '-':45} {se.image if se else '-':45}"
                     f" {dac.process if dac else '-'}")
        print(line)
    for name, status in unreadable.items():
        print(f"{name:20} {'-':7} {'-':>5} {'-':>8} {_one_line(status)}")
    for pid, uid in orphans:
        line = f"{'(orphan)':20} {'-':7} {'-':>5} {pid:>8} {'orphan':9}"
        line += f" {'-':>9} {'-':>9}" if args.usage else ""
        print(line + (f" {'-':45} {'-':45} {uid}:-" if args.Z else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from svirt.errors import SvirtError
    from svirt.launcher.state import Registry

    registry = Registry()
    killed = registry.kill_orphans()
    done = registry.reconcile()
    from svirt.service.client import bring_back

    try:
        adopted = bring_back(registry)
    except SvirtError as err:  # gc of every other guest still goes on
        adopted = []
        registry.problems.append(f"detached guests not adopted: {err.message}")
    if adopted:
        print(f"svirt gc: detached guests supervised again: {', '.join(adopted)}")
    swept = registry.sweep_claims() + registry.sweep_control()
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
        print(f"svirt: warning: {_one_line(problem)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from svirt.demo import run_demo

    return run_demo()


# -------------------------------------------------------------------- main
def cmd_explain(args: argparse.Namespace) -> int:
    """Kernel denials (SELinux, AppArmor, SMACK) explained guest by guest."""
    import json
    import time

    from svirt.explain import explain_host

    findings, problems = explain_host(args.file, since=args.since, guest=args.guest,
                                      stdin=sys.stdin.buffer if args.file == "-" else None)
    for problem in problems:
        print(f"svirt: warning: {_one_line(problem)}", file=sys.stderr)
    if args.json:
        for f in findings:
            print(json.dumps(f.to_json(), sort_keys=True))
        if not findings:
            print("no denials found", file=sys.stderr)
        return 0
    if not findings:
        print("no denials found")
        return 0
    for f in findings:
        d = f.denial
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.time))
                if d.time is not None else "(time unknown)")
        who = f"guest {f.guest}" if f.guest else "no guest"
        proc = " ".join(x for x in (f"pid {d.pid}" if d.pid else "", d.comm or "") if x)
        print(_one_line(f"{when}  {d.lsm}  {who} ({f.guest_by}{'; ' + proc if proc else ''})"))
        print(_one_line(f"  {f.classification}: {f.summary}"))
        if f.rule:
            print(_one_line(f"    {f.rule}"))
        if d.fields.get("permissive") == "1":
            print("  (permissive: the access was logged, not stopped)")
    return 0


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
    p.add_argument("--timeout", type=seconds, default=300.0,
                   help="with a COMMAND: seconds for the guest's shell to answer "
                        "and the command to end (default 300)")
    p.add_argument("command", nargs="*", metavar="-- COMMAND",
                   help="boot, run COMMAND in the shell on the guest's console, print "
                        "its output, stop the guest and exit with its status")
    p.add_argument("--ephemeral", action="store_true", help=EPHEMERAL_HELP)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("start", help="start a detached guest (supervised in the background)")
    p.add_argument("spec", nargs="?", help="the guest spec (TOML)")
    p.add_argument("--enabled", action="store_true",
                   help="start every guest enabled with svirt enable (one line each; "
                        "exit 1 if any failed, the others still start)")
    p.add_argument("--wait-for", metavar="REGEX",
                   help="return once this appears on the console (else once it runs)")
    p.add_argument("--timeout", type=seconds, default=60.0,
                   help="seconds to wait for --wait-for (default 60)")
    p.add_argument("--ephemeral", action="store_true", help=EPHEMERAL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_start_or_enabled)
    p = sub.add_parser("stop", help="stop a detached guest (the shutdown ladder)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="stop every detached guest of the registry, in parallel")
    p.add_argument("--timeout", type=seconds, default=None,
                   help="seconds for a graceful shutdown (default: the spec's)")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stop_or_all)
    p = sub.add_parser("kill", help="SIGKILL a detached guest's hypervisor")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("restart", help="stop a detached guest and start it again (new labels)")
    p.add_argument("name")
    p.add_argument("--timeout", type=seconds, default=None,
                   help="seconds for the graceful shutdown (default: the spec's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser("status", help="detached guests: state, pid, uptime, labels, usage")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("console", help="attach to a detached guest's console (Ctrl-] detaches)")
    p.add_argument("name")
    p.add_argument("--read-only", action="store_true",
                   help="watch only (any number may; one console at a time may type)")
    p.add_argument("--raw", action="store_true",
                   help="pass the guest's bytes as they are: it may then set your clipboard "
                        "(OSC 52) and type into your terminal's answers (queries)")
    p.set_defaults(func=cmd_console)
    p = sub.add_parser("logs", help="a detached guest's console log")
    p.add_argument("name")
    p.add_argument("-n", type=int, default=50, help="lines (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="then follow it")
    p.add_argument("--raw", action="store_true",
                   help="the guest's bytes as they are (default: control characters and "
                        "escape sequences shown escaped, e.g. \\x1b)")
    p.set_defaults(func=cmd_logs)
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
    p.add_argument("--cluster", action="store_true",
                   help="every host's guests, from the cluster's etcd ([cluster] in the config)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("gc", help="release the records of guests that are gone")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("demo", help="build tiny guests and boot a UML and a QEMU guest")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("explain", help="explain SELinux/AppArmor/SMACK denials guest by guest")
    p.add_argument("file", nargs="?",
                   help="a log to read ('-': stdin); default: /dev/kmsg and the audit log")
    p.add_argument("--since", metavar="TIME",
                   help="only newer denials: ISO-8601, or a span back (10m, 2h, 1d)")
    p.add_argument("--guest", metavar="NAME",
                   help="only denials of this guest, or of another guest on its objects")
    p.add_argument("--json", action="store_true", help="one JSON object per line and denial")
    p.set_defaults(func=cmd_explain)
    _add_boot_verbs(sub)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: object = None, line: str | None = None) -> None:
    print(f"svirt: warning: {message}", file=sys.stderr)


def _warn_insecure_cluster() -> None:
    """Every command says so while ``[cluster] insecure = true`` is set."""
    from svirt import config
    from svirt.errors import SvirtError

    try:
        cluster = config.load().cluster
    except (SvirtError, OSError):
        return  # the verbs that need the config report it themselves
    if cluster is not None and cluster.insecure:
        why = "; ".join(cluster.transport_problems()) or "insecure = true"
        print("svirt: warning: [cluster] insecure = true: etcd is not authenticated "
              f"({why}); anyone who reaches it can fence this host's guests or free its "
              "image locks", file=sys.stderr)


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
    #: verbs that give guests uids, labels and devices (enable/disable check for themselves)
    root_verbs = (cmd_run, cmd_start_or_enabled, cmd_stop_or_all, cmd_stop, cmd_restart)
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"svirt {VERSION}")  # what argparse's version action prints, without argparse
        return 0
    args = build_parser().parse_args(argv)
    import warnings

    warnings.showwarning = _show_warning
    from svirt.errors import SpecError, SvirtError

    _warn_insecure_cluster()

    if args.func in root_verbs and os.geteuid() != 0:
        _error(f"svirt {args.verb} must be root: each guest gets a uid, labels and devices "
               "of its own",
               f"run it as root (sudo svirt {args.verb} ...); svirt check works as any user")
        return 1
    try:
        rc = int(args.func(args))
        return rc
    except SvirtError as err:
        if isinstance(err, SpecError) and err.source is None and getattr(args, "spec", None):
            from svirt.spec import in_file

            err = in_file(err, args.spec)  # found by preflight: name the file too
        _error(err.message, err.hint)
        tail = getattr(err, "log_tail", "")
        if tail and type(err).__name__ == "LaunchError":
            lines = tail.strip().splitlines()[-10:]
            print("svirt: its console said:\n" + "\n".join(f"  {_one_line(x)}" for x in lines),
                  file=sys.stderr)
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


# ------------------------------------------------ guests at boot (issue 11)
# enable / disable / unit; start --enabled and stop --all dispatch from here.
def _add_boot_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enable", help="start a guest at boot: copy its spec to "
                                      "/etc/svirt/guests (svirt start --enabled)")
    p.add_argument("spec", nargs="?", help="the guest spec (TOML)")
    p.add_argument("--list", action="store_true", help="list the enabled guests")
    p.add_argument("--json", action="store_true", help="with --list")
    p.set_defaults(func=cmd_enable)
    p = sub.add_parser("disable", help="no longer start a guest at boot")
    p.add_argument("name")
    p.set_defaults(func=cmd_disable)
    p = sub.add_parser("unit", help="print a systemd unit (or init script) for guests")
    p.add_argument("name", nargs="?",
                   help="an enabled guest: a unit that runs it with svirt run")
    p.add_argument("--boot", action="store_true",
                   help="svirt-guests.service: svirt start --enabled at boot, "
                        "svirt stop --all at shutdown")
    p.add_argument("--sysv", action="store_true",
                   help="with --boot: an LSB init script (/etc/init.d/svirt-guests)")
    p.set_defaults(func=cmd_unit)


def _require_root(verb: str) -> None:
    from svirt.errors import HostError

    if os.geteuid() != 0:
        raise HostError(f"svirt {verb} must be root: each guest gets a uid, labels and "
                        "devices of its own", hint=f"run it as root (sudo svirt {verb} ...)")


def _usage_error(message: str) -> int:
    _error(message, "svirt --help")
    return 2


def _one_line_error(name: str, err: Exception) -> None:
    """A guest's failure on one line (its hint in parentheses)."""
    from svirt.errors import SvirtError

    if isinstance(err, SvirtError):
        text = err.message + (f" (hint: {err.hint})" if err.hint else "")
    elif isinstance(err, OSError):
        text = _os_error(err)[0]
    else:
        text = f"{type(err).__name__}: {err}"
    _error(f"guest {name}: {text}")


def cmd_start_or_enabled(args: argparse.Namespace) -> int:
    if args.enabled:
        if args.spec is not None:
            return _usage_error("svirt start --enabled takes no spec")
        return cmd_start_enabled(args)
    if args.spec is None:
        return _usage_error("svirt start needs a spec file (or --enabled)")
    return cmd_start(args)


def cmd_start_enabled(args: argparse.Namespace) -> int:
    """Start every enabled guest through the supervisor, as svirt start does."""
    from svirt.errors import SpecError
    from svirt.launcher.state import Registry
    from svirt.service.enabled import enabled_guests
    from svirt.spec import load_spec

    guests, problems = enabled_guests()
    for problem in problems:
        _error(problem)
    if not guests and not problems:
        print("svirt: no guest is enabled (svirt enable SPEC)")
        return 0
    registry = Registry()
    registry.reconcile()
    running = {r.name for r in registry.records()
               if r.hypervisor is not None and r.hypervisor.alive()}
    extra = ["--ephemeral"] if args.ephemeral else []
    if args.wait_for:
        extra += ["--wait-for", args.wait_for, "--timeout", str(args.timeout)]
    failed = len(problems)
    for guest in guests:
        try:
            spec = load_spec(guest.path)
            if spec.name != guest.name:
                raise SpecError(f"{guest.path}: names guest {spec.name}, not {guest.name}")
            if spec.name in running:
                print(f"svirt: guest {guest.name}: already running, skipped")
                continue
            cmd_start(build_parser().parse_args(["start", str(guest.path), *extra]))
        except Exception as err:  # noqa: BLE001 - one line per guest, the others go on
            failed += 1
            _one_line_error(guest.name, err)
    return 1 if failed else 0


def cmd_stop_or_all(args: argparse.Namespace) -> int:
    if args.all:
        if args.name is not None:
            return _usage_error("svirt stop --all takes no name")
        return cmd_stop_all(args)
    if args.name is None:
        return _usage_error("svirt stop needs a guest name (or --all)")
    return cmd_stop(args)


def cmd_stop_all(args: argparse.Namespace) -> int:
    """Stop every detached guest (each through its ladder, all at once)."""
    import threading

    from svirt.launcher.state import Registry
    from svirt.service.client import ask, running

    registry = Registry()
    adopt = _adoptable()
    names: list[str] = []
    if running(registry) or adopt:
        answer = ask(registry, {"op": "status", "name": None}, start=adopt)
        names = sorted(g["name"] for g in answer.get("guests", []))
    if not names:
        print("svirt: no detached guest is running", file=sys.stderr)
        return 0
    extra = ["--timeout", str(args.timeout)] if args.timeout is not None else []
    extra += ["--force"] if args.force else []
    codes: dict[str, int] = {}

    def stop_one(name: str) -> None:
        try:
            codes[name] = cmd_stop(build_parser().parse_args(["stop", name, *extra]))
        except BaseException as err:  # noqa: BLE001 - one line per guest, the others go on
            codes[name] = 1
            if isinstance(err, Exception):
                _one_line_error(name, err)
            else:  # SystemExit, KeyboardInterrupt: a thread must not end without a word
                _error(f"guest {name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=stop_one, args=(n,), name=f"stop-{n}") for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every guest that did not power off cleanly is named again on the last line
    # (its own line above says why): exit 1 never comes without a message
    unclean = [f"{n} (exit {codes[n]})" if n in codes else f"{n} (no answer)"
               for n in names if codes.get(n) != 0]
    if unclean:
        _error(f"stop --all: {len(unclean)} of {len(names)} guests did not power off "
               f"cleanly: {', '.join(unclean)}")
        return 1
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    from svirt.service.enabled import enable

    if args.list:
        if args.spec is not None:
            return _usage_error("svirt enable --list takes no spec")
        return _list_enabled(args.json)
    if args.spec is None:
        return _usage_error("svirt enable needs a spec file (or --list)")
    _require_root("enable")
    result = enable(args.spec)
    notes = ["replaced the earlier copy"] if result.replaced else []
    notes += ["relative paths made absolute"] if result.rewritten else []
    notes += [f"uuid {result.pinned_uuid} pinned"] if result.pinned_uuid else []
    print(f"svirt: guest {result.name} enabled: {result.path}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def _running_names() -> set[str]:
    from svirt.launcher.state import Registry

    return {r.name for r in Registry().records()
            if r.hypervisor is not None and r.hypervisor.alive()}


def _list_enabled(as_json: bool) -> int:
    from svirt.service.enabled import enabled_guests

    guests, problems = enabled_guests()
    running = _running_names()
    if as_json:
        _print_json([{"name": g.name, "path": str(g.path), "running": g.name in running}
                     for g in guests])
    else:
        for g in guests:
            print(f"{g.name:20} {'running' if g.name in running else 'stopped':8} {g.path}")
    for problem in problems:
        print(f"svirt: warning: {problem}", file=sys.stderr)
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    from svirt.service.enabled import disable

    _require_root("disable")
    path = disable(args.name)
    still = f" (it still runs: svirt stop {args.name})" if args.name in _running_names() else ""
    print(f"svirt: guest {args.name} disabled: removed {path}{still}")
    return 0


def cmd_unit(args: argparse.Namespace) -> int:
    from svirt.service import units

    if args.boot:
        if args.name is not None:
            return _usage_error("svirt unit --boot takes no guest name")
        text = units.boot_script() if args.sysv else units.boot_unit()
    elif args.sysv:
        return _usage_error("--sysv goes with --boot")
    elif args.name is None:
        return _usage_error("svirt unit needs a guest name (or --boot)")
    else:
        text = units.guest_unit(args.name)
    sys.stdout.write(text)
    return 0
