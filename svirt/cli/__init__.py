"""The command line: the only place that prints for humans or exits.

Verbs: run, start, stop, kill, restart, status, console, logs, exec, cp, enable, disable,
unit, check, host, list, gc, demo, explain, image, schema.  An expected failure (any
SvirtError) is one line plus a hint, never a traceback, and its exit status
comes from the error tree (:attr:`svirt.errors.SvirtError.exit_code`).

- :mod:`svirt.cli.parser`: the grammar, built from each verb module's own.
- :mod:`svirt.cli.run`: ``svirt run``, a guest in the foreground.
- :mod:`svirt.cli.detached`: detached guests, through the supervisor.
- :mod:`svirt.cli.exec`: exec and cp, through a guest's agent.
- :mod:`svirt.cli.host`: check, host, list, gc, demo, explain.
- :mod:`svirt.cli.boot`: guests at boot (enable, disable, unit).
- :mod:`svirt.cli.image`: ``image build`` and ``image info``.
- :mod:`svirt.cli.common`: one-line messages, JSON, exit statuses of outcomes.
"""

from __future__ import annotations

import os
import sys

from svirt.cli.common import VERSION, error, one_line, os_error

# each verb imports what it needs (argparse too): `svirt --version` and `svirt
# list` stay near the interpreter's own start-up; typing is not imported at run
# time (mypy and ruff read this name as typing.TYPE_CHECKING)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from svirt.errors import SvirtError


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: object = None, line: str | None = None) -> None:
    print(f"svirt: warning: {message}", file=sys.stderr)


def _warn_insecure_cluster() -> None:
    """Every command says so while ``[cluster] insecure = true`` is set."""
    import svirt.config as config
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


def _failed(err: SvirtError, args: argparse.Namespace) -> int:
    """An expected failure: its message and hint (and a launch's last console
    lines); the exit status is the error's own."""
    from svirt.errors import LaunchError, SpecError

    if isinstance(err, SpecError) and err.source is None and getattr(args, "spec", None):
        from svirt.spec import in_file

        err = in_file(err, args.spec)  # found by preflight: name the file too
    error(err.message, err.hint)
    if isinstance(err, LaunchError) and err.log_tail:
        lines = err.log_tail.strip().splitlines()[-10:]
        print("svirt: its console said:\n" + "\n".join(f"  {one_line(x)}" for x in lines),
              file=sys.stderr)
    return err.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"svirt {VERSION}")  # what argparse's version action prints, without argparse
        return 0
    from svirt.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    import warnings

    warnings.showwarning = _show_warning
    from svirt.errors import SvirtError

    _warn_insecure_cluster()

    if getattr(args, "needs_root", False) and os.geteuid() != 0:
        error(f"svirt {args.verb} must be root: each guest gets a uid, labels and devices "
              "of its own",
              f"run it as root (sudo svirt {args.verb} ...); svirt check works as any user")
        return 1
    try:
        rc = int(args.func(args))
        return rc
    except SvirtError as err:
        return _failed(err, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(1)
    except OSError as err:
        error(*os_error(err))
        return 1
    except Exception as err:  # a bug: one line, the traceback only when asked for
        if os.environ.get("SVIRT_DEBUG"):
            raise
        error(f"internal error: {type(err).__name__}: {str(err)[:500]}",
              "this is a bug in svirt; SVIRT_DEBUG=1 shows the traceback")
        return 1
