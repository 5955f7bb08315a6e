"""``svirt exec NAME -- CMD ARGS...`` and ``svirt cp [NAME:]SRC [NAME:]DST``:
commands and files through a guest's agent (qemu-ga; ``agent = true``),
for foreground and detached guests alike (the agent socket is in the
guest's run directory, root's: :mod:`svirt.launcher.channels`).

``exec`` passes argv as argv (never joined into a shell string), forwards
stdin when it is not a terminal (``-n``: never), and keeps the command's
stdout and stderr apart: written as they are to a pipe or a file, through
:class:`svirt.termsafe.ConsoleFilter` to a terminal.  Exit statuses are
podman's: the command's own (128+N for signal N), 125 when svirt or the
agent failed, 126 when the command could not run, 127 when it was not found.

``cp`` opens the host side itself: the last component never followed
(``O_NOFOLLOW``), a new file ``O_EXCL`` unless ``--force``, nothing below a
directory a guest uid owns, a source that is a regular file; the guest's
side goes through the agent's file calls, bounded in time and size.
"""

from __future__ import annotations

import os
import sys

from svirt.cli.common import error, seconds

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator
    from contextlib import AbstractContextManager
    from typing import BinaryIO

    from svirt.agent import AgentClient

#: a failure of svirt itself (podman's 125)
SVIRT_FAILED = 125


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import argparse

    p = sub.add_parser("exec", help="run a command in a guest through its agent (agent = true)")
    p.add_argument("name")
    p.add_argument("-n", "--no-stdin", action="store_true",
                   help="do not forward stdin (else it is, unless it is a terminal)")
    p.add_argument("--timeout", type=seconds, default=300.0,
                   help="seconds for the whole exchange, the command included (default 300)")
    # REMAINDER: argparse would drop a "--" among the command's own arguments
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the command and its arguments, passed as they are")
    p.set_defaults(func=cmd_exec, needs_root=True)
    p = sub.add_parser("cp", help="copy a file between the host and a guest through its agent")
    p.add_argument("src", metavar="[NAME:]SRC")
    p.add_argument("dst", metavar="[NAME:]DST")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing host file (else refused)")
    p.add_argument("--timeout", type=seconds, default=600.0,
                   help="seconds for the whole copy (default 600)")
    p.set_defaults(func=cmd_cp, needs_root=True)


def _failed(err: BaseException) -> int:
    """svirt's own failure: one line (and a hint), podman's exit status."""
    from svirt.agent import exit_status
    from svirt.errors import SvirtError

    if isinstance(err, SvirtError):
        error(err.message, err.hint)
    else:
        error(str(err))
    return exit_status(err)


def _session(name: str, timeout: float) -> AbstractContextManager[AgentClient]:
    """The guest's agent, alone, within ``timeout`` (from its run directory)."""
    from svirt.deadline import Deadline
    from svirt.errors import AgentError
    from svirt.launcher.channels import AGENT_SOCKET, agent_session
    from svirt.launcher.registry import Registry
    from svirt.spec import NAME_RE

    if not NAME_RE.fullmatch(name) or name.startswith((".", "-")):
        raise AgentError(f"{name!r} is not a guest name")
    registry = Registry()
    if not registry.record_path(name).exists():
        raise AgentError(f"no guest {name} in this registry", hint="svirt list")
    return agent_session(registry.run_dir(name) / AGENT_SOCKET, name,
                         Deadline(timeout, f"guest {name}: agent"))


def _write_out(stream: BinaryIO, data: bytes, tty: bool) -> None:
    if tty:  # the guest's bytes: on a terminal, as svirt console shows them
        from svirt.termsafe import ConsoleFilter

        screen = ConsoleFilter()
        data = screen.feed(data) + screen.reset()
    stream.write(data)
    stream.flush()


def _stdin(skip: bool, timeout: float) -> bytes | None:
    """stdin's bytes (at most the agent's bound) read within ``timeout`` (a
    pipe nobody closes is not a wait without end), unless skipped or a terminal."""
    import select
    import time

    from svirt.agent import MAX_INPUT
    from svirt.errors import AgentError

    try:
        if skip or os.isatty(0):
            return None
        end, data = time.monotonic() + timeout, bytearray()
        while len(data) <= MAX_INPUT:
            left = end - time.monotonic()
            if left <= 0 or not select.select([0], [], [], left)[0]:
                raise AgentError(f"stdin did not end within {timeout:g} s",
                                 hint="close it, or svirt exec -n (no stdin)")
            chunk = os.read(0, min(1 << 20, MAX_INPUT + 1 - len(data)))
            if not chunk:
                return bytes(data)
            data += chunk
    except (OSError, ValueError):  # stdin closed
        return None
    raise AgentError(f"stdin is over {MAX_INPUT} bytes",
                     hint="copy the data into the guest first (svirt cp)")


def cmd_exec(args: argparse.Namespace) -> int:
    from svirt.agent import exit_status

    argv = args.command  # argparse took the "--" that ends svirt's own options
    if not argv:
        error("svirt exec NAME -- COMMAND [ARGS...]: no command", "svirt exec --help")
        return SVIRT_FAILED
    try:
        data = _stdin(args.no_stdin, args.timeout)
        with _session(args.name, args.timeout) as client:
            result = client.exec(argv, input=data, timeout=args.timeout)
    except Exception as err:  # noqa: BLE001 - every failure of svirt's is 125
        return _failed(err)
    _write_out(sys.stdout.buffer, result.stdout, sys.stdout.isatty())
    _write_out(sys.stderr.buffer, result.stderr, sys.stderr.isatty())
    for what, cut in (("stdout", result.stdout_truncated), ("stderr", result.stderr_truncated)):
        if cut:
            print(f"svirt: warning: the agent cut the command's {what} (it keeps 16 MiB)",
                  file=sys.stderr)
    return exit_status(result)


# ------------------------------------------------------------------ cp

def guest_side(text: str) -> tuple[str | None, str]:
    """``NAME:PATH`` -> (NAME, PATH); a host path (no guest name before a
    colon, or a ``/`` before it: ``./a:b``) -> (None, text)."""
    from svirt.spec import NAME_RE

    name, colon, path = text.partition(":")
    if colon and path and NAME_RE.fullmatch(name) and not name.startswith((".", "-")):
        return name, path
    return None, text


def cmd_cp(args: argparse.Namespace) -> int:
    from svirt.errors import AgentError

    try:
        src, dst = guest_side(args.src), guest_side(args.dst)
        if (src[0] is None) == (dst[0] is None):
            raise AgentError("svirt cp copies between the host and one guest: say the guest "
                             "on exactly one side (NAME:PATH)")
        if src[0] is not None:
            size = _from_guest(src[0], src[1], dst[1], args.force, args.timeout)
        else:
            assert dst[0] is not None  # noqa: S101 - one side is the guest's
            size = _to_guest(src[1], dst[0], dst[1], args.timeout)
    except Exception as err:  # noqa: BLE001 - every failure of svirt's is 125
        return _failed(err)
    print(f"svirt: {size} bytes copied", file=sys.stderr)
    return 0


def _guest_uids() -> range:
    from svirt.security.dac import DacDriver

    dac = DacDriver()
    return range(dac.uid_base, dac.uid_base + dac.uid_count)


def _host_dir(path: str) -> tuple[int, str]:
    """An fd of ``path``'s directory and its last component, walked from ``/``
    one component at a time (``O_NOFOLLOW``): refused at a symbolic link
    (whoever owns the directory holding it, a guest or a local user, could
    point root's write or read anywhere) and at a directory a guest uid owns
    (it could swap what root writes or reads there)."""
    from svirt.errors import AgentError

    parent, base = os.path.split(os.path.abspath(path))
    if not base or base in (".", ".."):
        raise AgentError(f"{path}: not a file name")
    dfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in parent.split("/") if p]:
            try:
                fd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dfd)
            except OSError as err:
                raise AgentError(f"{parent}: {part}: {err.strerror}", hint=(
                    "svirt cp follows no symbolic link on the host: give the real path")) from None
            os.close(dfd)
            dfd = fd
            _refuse_guest_dir(dfd, parent)
        _refuse_guest_dir(dfd, parent)
    except BaseException:
        os.close(dfd)
        raise
    return dfd, base


def _refuse_guest_dir(dfd: int, parent: str) -> None:
    from svirt.errors import AgentError

    owner = os.fstat(dfd).st_uid
    if owner in _guest_uids():
        raise AgentError(f"{parent} belongs to a guest's uid ({owner}): svirt cp does "
                         "not act as root in it", hint="copy through a directory of root's")


def _to_guest(src: str, name: str, path: str, timeout: float) -> int:
    import stat

    from svirt.agent import MAX_COPY
    from svirt.errors import AgentError

    dfd, base = _host_dir(src)
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
    except OSError as err:
        raise AgentError(f"{src}: {err.strerror}") from err
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AgentError(f"{src}: not a regular file")
        if st.st_size > MAX_COPY:
            raise AgentError(f"{src}: over {MAX_COPY} bytes")
        with _session(name, timeout) as client:
            return client.copy_to_guest(f, path, timeout=timeout)


def _from_guest(name: str, path: str, dst: str, force: bool, timeout: float) -> int:
    import stat

    from svirt.errors import AgentError

    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(path.rstrip("/")) or "file")
    dfd, base = _host_dir(dst)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(base, flags | (os.O_TRUNC if force else os.O_EXCL), 0o644, dir_fd=dfd)
        except FileExistsError:
            raise AgentError(f"{dst} exists", hint="svirt cp --force overwrites it") from None
        except OSError as err:
            raise AgentError(f"{dst}: {err.strerror}") from err
        with _undo_new(dfd, base, fd, made=not force), os.fdopen(fd, "wb") as out:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AgentError(f"{dst}: not a regular file")
            with _session(name, timeout) as client:
                return client.copy_from_guest(path, out, timeout=timeout)
    finally:
        os.close(dfd)


def _undo_new(dfd: int, base: str, fd: int, *, made: bool) -> AbstractContextManager[None]:
    """On a failure, remove the file this copy made (the same inode only)."""
    import contextlib

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        st = os.fstat(fd)
        try:
            yield
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.stat(base, dir_fd=dfd, follow_symlinks=False), st):
                        os.unlink(base, dir_fd=dfd)
            raise

    return guard()
