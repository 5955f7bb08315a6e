"""``svirt run``: a guest in the foreground, supervised by this command
(Ctrl-C or SIGTERM stops it through its shutdown ladder), or booted to run
one shell command on its console."""

from __future__ import annotations

import sys

from svirt.cli.common import EPHEMERAL_HELP, EXIT_FOR_OUTCOME, one_line, seconds

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from svirt.launcher.supervisor import Outcome


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(func=cmd_run, needs_root=True)


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
    print(f"svirt: guest {spec.name}: {one_line(outcome)}", file=sys.stderr)
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
        print(f"svirt: guest {spec.name}: {one_line(outcome)}", file=sys.stderr)
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
