"""Detached guests, through svirt's supervisor (:mod:`svirt.service`):
``start`` (and ``start --enabled``), ``stop`` (and ``stop --all``), ``kill``,
``restart``, ``status``, ``console`` and ``logs``."""

from __future__ import annotations

import os
import sys

from svirt.cli.common import (
    EPHEMERAL_HELP,
    EXIT_FOR_OUTCOME,
    error,
    guest_error,
    one_line,
    print_json,
    seconds,
    usage_error,
)

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(func=cmd_start_or_enabled, needs_root=True)
    p = sub.add_parser("stop", help="stop a detached guest (the shutdown ladder)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="stop every detached guest of the registry, in parallel")
    p.add_argument("--timeout", type=seconds, default=None,
                   help="seconds for a graceful shutdown (default: the spec's)")
    p.add_argument("--force", action="store_true", help="SIGKILL at once")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stop_or_all, needs_root=True)
    p = sub.add_parser("kill", help="SIGKILL a detached guest's hypervisor")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stop, needs_root=True)
    p = sub.add_parser("restart", help="stop a detached guest and start it again (new labels)")
    p.add_argument("name")
    p.add_argument("--timeout", type=seconds, default=None,
                   help="seconds for the graceful shutdown (default: the spec's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restart, needs_root=True)
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


def _parse(argv: list[str]) -> argparse.Namespace:
    """One verb of this module as the command line would give it (the verbs
    that act on many guests hand each guest to the one-guest verb)."""
    import argparse

    parser = argparse.ArgumentParser(prog="svirt")
    add_verbs(parser.add_subparsers(dest="verb", required=True))
    return parser.parse_args(argv)


def cmd_start(args: argparse.Namespace) -> int:
    from svirt.launcher.registry import Registry
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
        print_json(answer)
    else:
        labels = ", ".join(answer["labels"].values()) or "unconfined"
        print(f"svirt: guest {spec.name} started: pid {answer['pid']} ({labels}); "
              f"console log {answer['log']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from svirt.launcher.registry import Registry
    from svirt.service.client import ask

    op = "kill" if args.verb == "kill" else "stop"
    answer = ask(Registry(), {"op": op, "name": args.name,
                              "timeout": getattr(args, "timeout", None),
                              "force": getattr(args, "force", False)}, start=_adoptable())
    if args.json:
        print_json(answer)
    else:
        print(f"svirt: guest {args.name}: {one_line(answer['outcome'])}", file=sys.stderr)
    return EXIT_FOR_OUTCOME[answer["kind"]]


def cmd_restart(args: argparse.Namespace) -> int:
    from svirt.launcher.registry import Registry
    from svirt.service.client import ask

    answer = ask(Registry(), {"op": "restart", "name": args.name, "timeout": args.timeout},
                 start=_adoptable())
    if args.json:
        print_json(answer)
    else:
        labels = ", ".join(answer["labels"].values()) or "unconfined"
        print(f"svirt: guest {args.name} restarted: pid {answer['pid']} ({labels})")
    return 0


def _adoptable() -> bool:
    """Start a supervisor for this request only if a detached guest needs one."""
    from svirt.launcher.registry import Registry
    from svirt.service.client import orphaned

    return bool(orphaned(Registry()))


def cmd_status(args: argparse.Namespace) -> int:
    from svirt.launcher.registry import Registry
    from svirt.service.client import ask, running

    registry = Registry()
    adoptable = _adoptable()
    if args.name is None and not adoptable and not running(registry):
        answer: dict[str, Any] = {"ok": True, "guests": []}
    else:
        answer = ask(registry, {"op": "status", "name": args.name}, start=adoptable)
    if args.json:
        print_json(answer)
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

    from svirt.launcher.registry import Registry
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
    from svirt.launcher.registry import Registry
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


def cmd_start_or_enabled(args: argparse.Namespace) -> int:
    if args.enabled:
        if args.spec is not None:
            return usage_error("svirt start --enabled takes no spec")
        return cmd_start_enabled(args)
    if args.spec is None:
        return usage_error("svirt start needs a spec file (or --enabled)")
    return cmd_start(args)


def cmd_start_enabled(args: argparse.Namespace) -> int:
    """Start every enabled guest through the supervisor, as svirt start does."""
    from svirt.errors import SpecError
    from svirt.launcher.registry import Registry
    from svirt.service.enabled import enabled_guests
    from svirt.spec import load_spec

    guests, problems = enabled_guests()
    for problem in problems:
        error(problem)
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
            cmd_start(_parse(["start", str(guest.path), *extra]))
        except Exception as err:  # noqa: BLE001 - one line per guest, the others go on
            failed += 1
            guest_error(guest.name, err)
    return 1 if failed else 0


def cmd_stop_or_all(args: argparse.Namespace) -> int:
    if args.all:
        if args.name is not None:
            return usage_error("svirt stop --all takes no name")
        return cmd_stop_all(args)
    if args.name is None:
        return usage_error("svirt stop needs a guest name (or --all)")
    return cmd_stop(args)


def cmd_stop_all(args: argparse.Namespace) -> int:
    """Stop every detached guest (each through its ladder, all at once)."""
    import threading

    from svirt.launcher.registry import Registry
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
            codes[name] = cmd_stop(_parse(["stop", name, *extra]))
        except BaseException as err:  # noqa: BLE001 - one line per guest, the others go on
            codes[name] = 1
            if isinstance(err, Exception):
                guest_error(name, err)
            else:  # SystemExit, KeyboardInterrupt: a thread must not end without a word
                error(f"guest {name}: {type(err).__name__}: {err}")

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
        error(f"stop --all: {len(unclean)} of {len(names)} guests did not power off "
              f"cleanly: {', '.join(unclean)}")
        return 1
    return 0
