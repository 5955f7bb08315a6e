"""What every verb module of the command line shares: messages on one line
(escaped: names and paths may hold control characters), JSON output, the
exit status of an outcome, and the ``--timeout`` argument type."""

from __future__ import annotations

import math
import os
import sys

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


def print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def one_line(text: object) -> str:
    """``text`` on one line: control characters (a newline in a path) escaped."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def error(message: object, hint: object = None) -> None:
    print(f"svirt: error: {one_line(message)}", file=sys.stderr)
    if hint:
        print(f"svirt: hint: {one_line(hint)}", file=sys.stderr)


def os_error(err: OSError) -> tuple[str, str | None]:
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


def usage_error(message: str) -> int:
    error(message, "svirt --help")
    return 2


def guest_error(name: str, err: Exception) -> None:
    """A guest's failure on one line (its hint in parentheses)."""
    from svirt.errors import SvirtError

    if isinstance(err, SvirtError):
        text = err.message + (f" (hint: {err.hint})" if err.hint else "")
    elif isinstance(err, OSError):
        text = os_error(err)[0]
    else:
        text = f"{type(err).__name__}: {err}"
    error(f"guest {name}: {text}")
