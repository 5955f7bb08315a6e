"""What runs between fork and exec (stdlib and python-prctl only).

The child starts a new session, gets /dev/null as stdin and the console
socket as stdout/stderr, exactly the fds the hypervisor needs at fixed
numbers (3, 4, ...) and nothing else, runs the security drivers' setup
(setexeccon, SMACK label, then the DAC uid switch), asks to be killed when
its supervisor dies (PR_SET_PDEATHSIG, set after the uid switch because a
credential change clears it) and execs with a clean environment (PATH and
what the backend asks for; never a ``SVIRT_*`` variable).  A failure
before exec travels back over a close-on-exec pipe and becomes LaunchError.

Before any setup step the child joins a new, empty, anonymous session
keyring (``keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)``, as root): a session
keyring survives fork, exec and a uid switch, so the hypervisor would
otherwise possess its launcher's (an admin's login session: Kerberos
``KEYRING:`` caches, fscrypt v1 and NFS keys), list those keys in
``/proc/keys`` and have kernel-side key searches (fscrypt v1, NFS id
mapping, dns_resolver) find them.  A kernel without keys (ENOSYS) needs
nothing; any other failure refuses the launch.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import resource
import select
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence

from svirt.errors import LaunchError
from svirt.host import CLEAN_PATH as CLEAN_PATH  # the child's PATH, patched here by tests

_ERROR_FD_MIN = 1000


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: Mapping[int, int],
    *,
    stdout_fd: int,
    setups: Sequence[Callable[[], None]] = (),
    cwd: str = "/",
    pdeathsig: bool = True,
    name: str = "",
    pid_namespace: bool = False,
    init: str | None = None,
    stdin_fd: int | None = None,
    fsize_limit: int | None = None,
) -> int:
    """Fork and exec ``argv``; ``fds`` maps child fd number -> parent fd.
    With ``pid_namespace`` the child is PID 1 of a new PID namespace; with
    ``init`` (tini) that PID 1 is the init, which runs ``argv`` as its child.
    stdin is ``stdin_fd``, else /dev/null.  ``fsize_limit``: RLIMIT_FSIZE
    (soft and hard) in bytes, with SIGXFSZ ignored, so a write past it fails
    with EFBIG (see :mod:`svirt.launcher.bounds`)."""
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=CLEAN_PATH)
    if exe is None:
        raise LaunchError(f"{argv[0]}: command not found", guest=name, argv=argv)
    # the binary itself, not a link through /etc/alternatives (absent in a jail);
    # argv[0] too: UML re-executes argv[0]
    exe = os.path.realpath(exe)
    argv = [exe, *argv[1:]]
    if init is not None:
        argv = [init, "--", *argv]
        exe = init
    # nothing of svirt's: the hypervisor owns its environment, so nothing in it
    # can be trusted later, and nothing in it may tell it about the host
    full_env = {"PATH": CLEAN_PATH,
                **{k: v for k, v in env.items() if not k.startswith("SVIRT_")}}
    if pdeathsig:
        import prctl  # noqa: F401 - imported before fork, so the child need not load it
    _new_session_keyring()  # made once, before fork: the child only calls it
    r, w = os.pipe2(os.O_CLOEXEC)
    # the child's way to see that its launcher died before PDEATHSIG was set
    # (in a PID namespace getppid() is 0 whatever happens)
    parent_fd = os.pidfd_open(os.getpid())
    if pid_namespace:
        from svirt.launcher.jail import fork_in_new_pid_namespace

        pid = fork_in_new_pid_namespace()
    else:
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported over the pipe
        try:
            os.close(r)
            # park the error pipe above every fd the child keeps: _child's
            # closing sweep spares exactly this number
            w = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, _ERROR_FD_MIN)
            parent_fd = fcntl.fcntl(parent_fd, fcntl.F_DUPFD_CLOEXEC, _ERROR_FD_MIN + 1)
            _child(exe, argv, full_env, fds, stdout_fd, stdin_fd, setups, cwd, pdeathsig,
                   parent_fd, w, fsize_limit)
        except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
            try:
                os.write(w, f"{type(err).__name__}: {err}".encode()[:4000])
            finally:
                os._exit(127)
        os._exit(127)
    os.close(w)
    os.close(parent_fd)
    try:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
    if chunks:
        os.waitpid(pid, 0)
        raise LaunchError(
            f"could not start {argv[0]}: {b''.join(chunks).decode(errors='replace')}",
            guest=name,
            argv=argv,
        )
    return pid


def _child(
    exe: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    fds: Mapping[int, int],
    stdout_fd: int,
    stdin_fd: int | None,
    setups: Sequence[Callable[[], None]],
    cwd: str,
    pdeathsig: bool,
    parent_fd: int,
    err_fd: int,
    fsize_limit: int | None = None,
) -> None:
    os.setsid()
    _new_session_keyring()()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if fsize_limit is not None:
        # as root, before the uid switch: lowered hard, the guest cannot raise it;
        # SIGXFSZ stays ignored across exec, so a write past it is EFBIG, not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    # move every source out of the way first, so no dup2 clobbers another source
    wanted = dict(fds)
    wanted[1] = stdout_fd
    wanted[2] = stdout_fd
    if stdin_fd is not None:
        wanted[0] = stdin_fd
    moved = {target: fcntl.fcntl(src, fcntl.F_DUPFD, _ERROR_FD_MIN + 10)
             for target, src in wanted.items()}
    if stdin_fd is None:
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    for target, src in moved.items():
        os.dup2(src, target)  # dup2 clears close-on-exec on the target
    top = max(moved)
    for fd in range(3, top):
        if fd not in moved:
            try:
                os.close(fd)
            except OSError:
                pass
    os.closerange(top + 1, err_fd)
    os.closerange(err_fd + 1, parent_fd)  # err_fd and parent_fd stay
    os.closerange(parent_fd + 1, 65536)
    os.chdir(cwd)
    for setup in setups:
        setup()
    if pdeathsig:
        import prctl

        prctl.set_pdeathsig(signal.SIGKILL)
        if select.select([parent_fd], [], [], 0)[0]:
            os._exit(1)  # the supervisor died before we could ask
    os.execve(exe, list(argv), dict(env))  # noqa: S606 - argv list, never a shell


_SYS_KEYCTL = 250  # x86_64
_KEYCTL_JOIN_SESSION_KEYRING = 1
_join: Callable[[], None] | None = None


def _new_session_keyring() -> Callable[[], None]:
    """The child's step that leaves the launcher's session keyring for a new
    anonymous one (see the module's text); built in the parent."""
    global _join
    if _join is None:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        nr, op, anonymous = (ctypes.c_long(_SYS_KEYCTL),
                             ctypes.c_long(_KEYCTL_JOIN_SESSION_KEYRING), ctypes.c_void_p(None))

        def join() -> None:
            if syscall(nr, op, anonymous) < 0:
                err = ctypes.get_errno()
                if err != errno.ENOSYS:  # a kernel without keys: nothing to leave
                    raise LaunchError(f"cannot leave the launcher's session keyring: "
                                      f"{os.strerror(err)}")

        _join = join
    return _join
