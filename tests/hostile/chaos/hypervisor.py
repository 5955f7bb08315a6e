#!/usr/bin/python3 -I
"""The chaos stand-in hypervisor: one script, both backend shapes.

Installed as a UML "kernel" (the spec's ``kernel``) it is run as
``linux mem=... umid=N uml_dir=D con0=fd:I,fd:O ... WORDS``; installed as
``qemu-system-x86_64`` (see :mod:`tests.hostile.chaos.world`: an overlay over
/usr in the chaos run's own mount namespace) it is run with QEMU's argv,
``-append "console=ttyS0 WORDS"``, the serial console on stdin/stdout and
QMP on fd 4 (connected, or listening for a detached guest).  Either way it
is exec'd by the real launch path: as the guest's uid, jailed, under its
cgroup and seccomp filter.

It speaks enough of its control protocol to be stopped (mconsole ``cad``/
``halt``; QMP ``qmp_capabilities``, ``system_powerdown``, ``quit``), answers
svirt's console shell framing (``svirt run -- CMD``, ``--wait-for``), prints
``SVIRT-READY`` and then attacks, as the words of its command line say::

    chaos=NAME,NAME...   the attack primitives to perform (catalogue.py)
    seed=N               their random draws (when, which flavour)
    poweroff=MS          power off by itself after MS ms
    targets=P:P:...      canaries the symlink primitives point at
    helper=PATH          the compiled syscall helper (the guest's initrd)

Whatever an attack achieved that it must not (a 32-bit syscall that got
through...) is printed on the console as ``BREACH {json}``: the chaos driver
reads the console logs for it.

Stdlib only, run by the system python with -I: it runs as a uid that owns
nothing but its own files, inside a jail that holds only /usr.  Every
primitive is a function ``prim_NAME(ctx)``; :data:`PRIMITIVES` maps names
to them, and the catalogue (catalogue.py) describes each.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

MAGIC = 0xCAFEBABE
MC_REPLY = struct.Struct("=III512s")
MC_REQUEST = struct.Struct("=III512s")
READY = b"SVIRT-READY\n"
#: at most this much goes to a disk or a filesystem by the fill primitives
FILL_MAX = int(os.environ.get("SVIRT_CHAOS_FILL_MAX", str(64 << 20)))
FORGED_TAG = "chaos-forged"


class Ctx:
    """What a primitive needs: the stand-in's view of itself."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.shape = "qemu" if ("-append" in argv or "qemu" in os.path.basename(argv[0])) \
            else "uml"
        words: list[str] = []
        self.disks: list[str] = []
        self.nvram = ""  # a UEFI guest's variables store (QEMU's fw-vars-file node)
        self.helper = ""
        self.qmp_fd = -1
        self.qmp_listening = False
        self.agent_fd = -1  # the agent port's listener (agent = true)
        if self.shape == "qemu":
            self.in_fd, self.out_fd = 0, 1
            for i, a in enumerate(argv):
                nxt = argv[i + 1] if i + 1 < len(argv) else ""
                if a == "-append":
                    words = nxt.split()
                elif a == "-initrd":
                    self.helper = nxt
                elif a == "-drive":
                    for part in _split_qemu(nxt):
                        if part.startswith("file="):
                            self.disks.append(part[5:])
                elif a == "-blockdev" and "node-name=fw-vars-file" in nxt:
                    for part in _split_qemu(nxt):
                        if part.startswith("filename="):
                            self.nvram = part[9:]
                elif a == "-chardev" and "id=qmp" in nxt:
                    for part in nxt.split(","):
                        if part.startswith("fd="):
                            self.qmp_fd = int(part[3:])
                    self.qmp_listening = "server=on" in nxt
                elif a == "-chardev" and "id=qga0" in nxt:
                    self.agent_fd = int(nxt.split("fd=", 1)[1].split(",", 1)[0])
            self.home = "/tmp"  # noqa: S108 - the jail's private tmpfs
        else:
            words = argv[1:]
            opts = _words(words)
            ins, _, outs = opts.get("con0", "fd:3,fd:3").partition(",")
            self.in_fd = int(ins[3:]) if ins.startswith("fd:") else 3
            self.out_fd = int(outs[3:]) if outs.startswith("fd:") else self.in_fd
            self.home = opts.get("uml_dir", os.getcwd()).rstrip("/") or "/"
            self.umid = opts.get("umid", "standin")
            self.helper = opts.get("initrd", "")
            for k, v in opts.items():
                if k.startswith("ubd"):
                    self.disks.append(v.split(",")[0])  # COW,BASE: the COW is ours
        self.opts = _words(words)
        self.chaos = [n for n in self.opts.get("chaos", "").split(",") if n]
        self.rnd = random.Random(int(self.opts.get("seed", "0") or 0) ^ os.getpid())  # noqa: S311
        self.targets = [t for t in self.opts.get("targets", "").split(":") if t]
        self.out_lock = threading.Lock()
        self.control_mode = "normal"  # set by the control primitives
        self.agent_mode = "normal"  # set by the agent primitives
        self.deaf = False  # ignore stop requests
        self.forge_frames = False  # forged_markers: frames with the real token
        self.lines: list[bytes] = []

    def say(self, data: bytes) -> None:
        with self.out_lock, contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                view = view[os.write(self.out_fd, view):]

    def breach(self, what: str, detail: Any) -> None:
        self.say(b"BREACH " + json.dumps({"what": what, "detail": detail}).encode() + b"\n")


def _split_qemu(value: str) -> list[str]:
    """QEMU's comma-separated options (",," is a comma)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    return parts


def _words(words: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for w in words:
        k, sep, v = w.partition("=")
        out.setdefault(k, v if sep else "")
    return out


def _later(ctx: Ctx, fn: Callable[[], None], low: float = 0.0, high: float = 1.5) -> None:
    """Run ``fn`` in a thread after a random delay (a random point in the run)."""
    delay = ctx.rnd.uniform(low, high)

    def run() -> None:
        time.sleep(delay)
        with contextlib.suppress(Exception):
            fn()

    threading.Thread(target=run, daemon=True).start()


# ================================================================ control
def mconsole_serve(ctx: Ctx) -> None:
    umid_dir = os.path.join(ctx.home, ctx.umid)
    os.makedirs(umid_dir, mode=0o755, exist_ok=True)
    path = os.path.join(umid_dir, "mconsole")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    with open(os.path.join(umid_dir, "pid"), "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")

    def serve() -> None:
        while True:
            try:
                data, addr = sock.recvfrom(4096)
            except OSError:
                return
            if len(data) < 12:
                continue
            _m, _v, length, payload = MC_REQUEST.unpack(data.ljust(MC_REQUEST.size, b"\0")[
                :MC_REQUEST.size])
            command = payload[:min(length, 512)].decode(errors="replace").strip()
            mode = ctx.control_mode
            if mode == "silent":
                continue
            if mode == "garbage":
                _mc_garbage(sock, addr, ctx.rnd)
                continue
            if mode == "trickle":
                # a reply every 1.9 s (under the client's per-read timeout),
                # each saying "more to come", as long as the client listens
                threading.Thread(target=_mc_trickle, args=(sock, addr), daemon=True).start()
                continue
            _send(sock, addr, MC_REPLY.pack(0, 0, 2, b"OK"))
            if command in ("cad", "halt") and not ctx.deaf:
                os._exit(0)

    threading.Thread(target=serve, daemon=True).start()


def _send(sock: socket.socket, addr: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(data, addr)


def _mc_trickle(sock: socket.socket, addr: Any) -> None:
    for _ in range(10_000):
        try:
            sock.sendto(MC_REPLY.pack(0, 1, 1, b"."), addr)
        except OSError:
            return
        time.sleep(1.9)


def _mc_garbage(sock: socket.socket, addr: Any, rnd: random.Random) -> None:
    kind = rnd.randrange(6)
    if kind == 0:
        _send(sock, addr, rnd.randbytes(rnd.randrange(0, 1100)))
    elif kind == 1:
        for n in range(12):
            _send(sock, addr, rnd.randbytes(n))
    elif kind == 2:
        _send(sock, addr, struct.pack("=III", 0, 0, 0xFFFFFFFF) + b"A" * 512)
    elif kind == 3:
        _send(sock, addr, struct.pack("=III", 0xFFFFFFFF, 0, 4096) + b"\xff\xfe" * 256)
    elif kind == 4:
        _send(sock, addr, struct.pack("=III", 0, 0, 512) + rnd.randbytes(60000))
    else:
        _send(sock, addr, struct.pack("=III", 0, 0xFFFFFFFF, 0x80000000) + b"\0" * 512)


QMP_GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                b'"package": "chaos"}, "capabilities": []}}\r\n')


def qmp_serve(ctx: Ctx) -> None:
    if ctx.qmp_fd < 0:
        return
    try:
        sock = socket.socket(fileno=ctx.qmp_fd)
    except OSError:
        return
    if ctx.qmp_listening:
        def accept() -> None:
            while True:
                if ctx.control_mode == "noaccept":
                    time.sleep(3600)  # never accept: connect() waits in the backlog
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=_qmp_conn, args=(ctx, conn), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
    else:
        threading.Thread(target=_qmp_conn, args=(ctx, sock), daemon=True).start()


def _qmp_conn(ctx: Ctx, conn: socket.socket) -> None:
    def send(data: bytes) -> bool:
        mode = ctx.control_mode
        try:
            if mode == "trickle":  # one byte every 2 s: never a read timeout
                for b in data:
                    conn.sendall(bytes([b]))
                    time.sleep(2.0)
            else:
                conn.sendall(data)
        except OSError:
            return False
        return True

    if ctx.control_mode == "silent":
        time.sleep(3600)
    if ctx.control_mode == "garbage":
        _qmp_garbage(conn, ctx.rnd)
    if not send(QMP_GREETING):
        return
    buf = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
                name = msg.get("execute")
            except (ValueError, AttributeError):
                name = None
            if ctx.control_mode == "silent":
                continue
            if ctx.control_mode == "garbage":
                _qmp_garbage(conn, ctx.rnd)
                continue
            send(b'{"event": "RESUME", "timestamp": {"seconds": 0, "microseconds": 0}}\r\n')
            if not send(b'{"return": {}}\r\n'):
                return
            if name in ("system_powerdown", "quit") and not ctx.deaf:
                time.sleep(0.05)
                os._exit(0)


def _qmp_garbage(conn: socket.socket, rnd: random.Random) -> None:
    kind = rnd.randrange(6)
    with contextlib.suppress(OSError):
        if kind == 0:
            conn.sendall(rnd.randbytes(rnd.randrange(1, 5000)) + b"\n")
        elif kind == 1:  # deeply nested JSON
            conn.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        elif kind == 2:  # a line that never ends (up to 2 MiB)
            conn.sendall(b"x" * (2 << 20))
        elif kind == 3:  # valid JSON, not an object
            conn.sendall(b'"return"\n[1,2,3]\nnull\n')
        elif kind == 4:  # an error with a huge description
            conn.sendall(json.dumps({"error": {"desc": "\x1b]52;c;AAAA\x07" * 1000}}).encode()
                         + b"\n")
        else:  # events without end
            for _ in range(5000):
                conn.sendall(b'{"event": "STOP"}\n')


# ================================================================ the agent
AGENT_ESCAPES = b"\x1b]52;c;cm0gLXJmIH4=\x07\x1b[6n\x1b[c\x1bP$q\x1b\\\x9b0c chaos\n"


def agent_serve(ctx: Ctx) -> None:
    """The agent port (the launcher's listening socket): a qemu-ga of sorts,
    as hostile as ``ctx.agent_mode`` says."""
    if ctx.agent_fd < 0:
        return
    try:
        sock = socket.socket(fileno=ctx.agent_fd)
    except OSError:
        return

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=_agent_conn, args=(ctx, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def _agent_conn(ctx: Ctx, conn: socket.socket) -> None:
    buf = b""
    with contextlib.suppress(OSError):
        while chunk := conn.recv(65536):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line.lstrip(b"\xff"))
                    name, args = req["execute"], req.get("arguments") or {}
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                _agent_answer(ctx, conn, req, name, args)
    conn.close()


def _agent_answer(ctx: Ctx, conn: socket.socket, req: dict[str, Any], name: str,
                  args: dict[str, Any]) -> None:
    import base64

    mode = ctx.agent_mode
    if mode == "stall":
        time.sleep(3600)
    if mode == "flood":  # no newline, no sentinel, up to FILL_MAX, then silence
        block = b"a" * (1 << 20)
        for _ in range(FILL_MAX >> 20):
            conn.sendall(block)
        time.sleep(3600)
    if mode == "garbage":
        conn.sendall(ctx.rnd.randbytes(ctx.rnd.randrange(1, 8192)) + b"\n"
                     + b'\xff{"return": 1}\n{"return": {"exited": "yes"}, "id": 0}\n'
                     + b"[" * 50_000 + b"\n")
        return
    out = AGENT_ESCAPES if mode == "escapes" else b"chaos ok\n"
    answers: dict[str, Any] = {
        "guest-exec": {"pid": 7},
        "guest-exec-status": {"exited": True, "exitcode": 0,
                              "out-data": base64.b64encode(out).decode()},
        "guest-file-open": 1000,
        "guest-file-read": {"count": len(out), "buf-b64": base64.b64encode(out).decode(),
                            "eof": True},
    }
    if name == "guest-sync-delimited":
        conn.sendall(b"\xff" + json.dumps({"return": args.get("id")}).encode() + b"\n")
        return
    if name == "guest-file-write":
        answers[name] = {"count": len(base64.b64decode(args.get("buf-b64", ""))), "eof": False}
    conn.sendall(json.dumps({"return": answers.get(name, {}), "id": req.get("id")}).encode()
                 + b"\n")


# ================================================================ console
def console_serve(ctx: Ctx) -> None:
    """Answer svirt's shell framing on the console (console.Console.shell)."""
    def run() -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(ctx.in_fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                _shell_line(ctx, line.decode(errors="replace").strip())

    threading.Thread(target=run, daemon=True).start()


def _shell_line(ctx: Ctx, line: str) -> None:
    words = line.split()
    if line.startswith("printf") and len(words) >= 4:
        marker, token = words[2], words[3]
        if marker.startswith("SVIRT-SH-READY-"):
            ctx.say(f"{marker}{token}\n".encode())
        elif marker.startswith("SVIRT-SH-BEGIN-"):
            if ctx.forge_frames:  # the token was typed on its console: it knows it
                ctx.say(f"{marker}{token}\n".encode() * ctx.rnd.randrange(1000, 4000))
            ctx.say(f"\n{marker}{token}\n".encode())
        elif marker.startswith("SVIRT-SH-END-"):
            status = "0"
            if ctx.forge_frames and ctx.rnd.random() < 0.5:
                status = "7" * ctx.rnd.randrange(4300, 6000)  # past int()'s digit limit
            ctx.say(f"\n{marker}{token}:{status}\n".encode())
        return
    if line in ("(", ") </dev/null", ""):
        return
    if line.startswith("echo "):
        ctx.say(line[5:].encode() + b"\n")
    else:
        ctx.say(f"chaos-sh: {line[:80]}\n".encode())


# ============================================================= primitives
# Each prim_NAME(ctx) starts its attack and returns (threads for the rest).
def prim_symlink_swap(ctx: Ctx) -> None:
    """Rename symlinks to canaries over every name in its own directories."""
    targets = ctx.targets or ["/etc/shadow"]

    def attack() -> None:
        end = time.monotonic() + 30
        tmp = f".t{os.getpid()}"
        while time.monotonic() < end:
            for base, dirs, files in os.walk(ctx.home):
                for name in dirs + files:
                    if name in ("mconsole", ctx.__dict__.get("umid", "")) or name.startswith(".t"):
                        continue
                    link = os.path.join(base, tmp)
                    with contextlib.suppress(OSError):
                        os.symlink(ctx.rnd.choice(targets), link)
                        os.rename(link, os.path.join(base, name))
                for name in ("pid", "notify", "svirt-mc.1"):
                    link = os.path.join(base, tmp)
                    with contextlib.suppress(OSError):
                        os.symlink(ctx.rnd.choice(targets), link)
                        os.rename(link, os.path.join(base, name))
            time.sleep(0.01)

    _later(ctx, attack, 0, 0.5)


def prim_ctl_garbage(ctx: Ctx) -> None:
    ctx.control_mode = "garbage"


def prim_ctl_trickle(ctx: Ctx) -> None:
    ctx.control_mode = "trickle"


def prim_ctl_silent(ctx: Ctx) -> None:
    ctx.control_mode = "silent"


def prim_qmp_noaccept(ctx: Ctx) -> None:
    ctx.control_mode = "noaccept"


def prim_deaf(ctx: Ctx) -> None:
    """Ignore SIGTERM and every stop request: only SIGKILL ends it."""
    ctx.deaf = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def prim_backing_rewrite(ctx: Ctx) -> None:
    """Rewrite the backing file name in its own qcow2 header."""
    def attack() -> None:
        for disk in ctx.disks:
            names = [t.encode() for t in ctx.targets]
            if not ctx.opts.get("fifo") or ctx.targets != [ctx.opts["fifo"]]:
                names += [b"/etc/shadow", b"/dev/zero", b"//etc/../etc/passwd"]
            with contextlib.suppress(OSError), open(disk, "r+b") as f:
                head = f.read(104)
                if head[:4] != b"QFI\xfb":
                    continue
                name = ctx.rnd.choice(names)
                f.seek(4096 - 512)
                f.write(name)
                f.seek(8)
                f.write(struct.pack(">QI", 4096 - 512, len(name)))

    _later(ctx, attack, 0, 0.5)


def prim_backing_fifo(ctx: Ctx) -> None:
    """Name a FIFO (one in an image root) as its qcow2 header's backing file:
    whoever opens the chain by path before checking it waits forever."""
    fifo = ctx.opts.get("fifo", "")
    if fifo:
        ctx.targets = [fifo]
        prim_backing_rewrite(ctx)


def prim_nvram_resize(ctx: Ctx) -> None:
    """Truncate its NVRAM store to 4 KiB, or extend it to a sparse GiB (its
    own file while it runs): the next start must refuse it, never hand it on."""
    def attack() -> None:
        if ctx.nvram:
            with contextlib.suppress(OSError):
                os.truncate(ctx.nvram, ctx.rnd.choice([0, 4096, 1 << 30]))

    _later(ctx, attack, 0, 0.5)


def prim_nvram_chmod(ctx: Ctx) -> None:
    """chmod its NVRAM store setuid and world-writable (04777): a release
    that gave root the file back without its mode would leave a setuid-root
    file that every uid can write."""
    def attack() -> None:
        if ctx.nvram:
            with contextlib.suppress(OSError):
                os.chmod(ctx.nvram, 0o4777)  # noqa: S103 - the attack

    _later(ctx, attack, 0, 0.5)


def prim_nvram_link(ctx: Ctx) -> None:
    """Hard-link its NVRAM store into every directory it can write (its home,
    /tmp, /var/tmp; across a bind mount the kernel says EXDEV): a second
    name the next start must not accept as the store."""
    def attack() -> None:
        if not ctx.nvram:
            return
        for d in (ctx.home, "/tmp", "/var/tmp", os.path.dirname(ctx.nvram)):  # noqa: S108
            with contextlib.suppress(OSError):
                os.link(ctx.nvram, os.path.join(d, f"stolen-nvram-{os.getpid()}"))

    _later(ctx, attack, 0, 0.5)


def _lying_gpt(rnd: random.Random) -> bytes:
    """A protective MBR and a GPT header (CRC right) claiming what cannot be:
    2^32 entries, entries of 2^31 bytes, or an array past any disk."""
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"", 0xEE, b"", 1, 0xFFFFFFFF)
    mbr[510:512] = b"\x55\xaa"
    count, size, at = rnd.choice([(0xFFFFFFFF, 128, 2), (128, 1 << 31, 2),
                                  (128, 128, 1 << 60)])
    fields = [b"EFI PART", 0x10000, 92, 0, 0, 1, 1 << 40, 34, 1 << 40, bytes(16), at, count,
              size, 0]
    raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
    fields[3] = zlib.crc32(raw)
    return bytes(mbr) + struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(512, b"\0")


def _looping_mbr() -> bytes:
    """An MBR with an extended partition at sector 2048 (its EBRs: the caller's)."""
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"", 0x05, b"", 2048, 4096)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def prim_table_lies(ctx: Ctx) -> None:
    """Make its own disk lie to whoever inspects it (``svirt image info``):
    a GPT claiming 2^32 entries or a huge entry size, an MBR extended chain
    that loops, or a qcow2 header with a huge virtual size / L1 table or
    naming itself as its backing file."""
    def attack() -> None:
        for disk in ctx.disks:
            with contextlib.suppress(OSError), open(disk, "r+b") as f:
                qcow2 = f.read(4) == b"QFI\xfb"
                choice = ctx.rnd.randrange(3)
                if qcow2 and choice == 0:
                    f.seek(24)
                    f.write(struct.pack(">Q", 1 << 62))  # virtual size
                elif qcow2 and choice == 1:
                    f.seek(36)
                    f.write(struct.pack(">I", 0xFFFFFFFF))  # L1 entries
                elif qcow2:
                    name = os.path.basename(disk).encode()
                    f.seek(4096 - 512)
                    f.write(name)
                    f.seek(8)
                    f.write(struct.pack(">QI", 4096 - 512, len(name)))
                elif choice < 2:
                    f.seek(0)
                    f.write(_lying_gpt(ctx.rnd))
                else:
                    f.seek(0)
                    f.write(_looping_mbr())
                    ebr = bytearray(512)  # EBR 0 -> EBR 100 -> EBR 100 -> ...
                    ebr[462:478] = struct.pack("<B3sB3sII", 0, b"", 0x05, b"", 100, 1)
                    ebr[510:512] = b"\x55\xaa"
                    for at in (2048, 2148):
                        f.seek(at * 512)
                        f.write(ebr)

    _later(ctx, attack, 0, 0.5)


def prim_mconsole_swap(ctx: Ctx) -> None:
    """Replace its own mconsole socket with a symlink to a canary, or with
    a socket of another uid's... (it can only make its own): a directory."""
    def attack() -> None:
        path = os.path.join(ctx.home, getattr(ctx, "umid", "x"), "mconsole")
        tmp = path + ".t"
        with contextlib.suppress(OSError):
            if ctx.rnd.random() < 0.5:
                os.symlink(ctx.rnd.choice(ctx.targets or ["/etc/shadow"]), tmp)
                os.rename(tmp, path)
            else:
                os.unlink(path)
                os.mkdir(path)

    _later(ctx, attack, 0, 1.0)


def prim_deep_tree(ctx: Ctx) -> None:
    """Thousands of nested directories in its own home."""
    def attack() -> None:
        fd = os.open(ctx.home, os.O_RDONLY | os.O_DIRECTORY)
        depth = ctx.rnd.randrange(1500, 4000)
        for _ in range(depth):
            try:
                os.mkdir("d", 0o700, dir_fd=fd)
                nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            except OSError:
                break
            os.close(fd)
            fd = nfd
        os.close(fd)

    _later(ctx, attack, 0, 0.3)


def prim_disk_fill(ctx: Ctx) -> None:
    """Write until ENOSPC (or FILL_MAX) where it may write: its home, its disks."""
    def attack() -> None:
        places = [os.path.join(ctx.home, f"fill.{os.getpid()}")] + ctx.disks
        block = b"\xa5" * (1 << 20)
        path = ctx.rnd.choice(places)
        written = 0
        with contextlib.suppress(OSError), open(path, "ab") as f:
            while written < FILL_MAX:
                f.write(block)
                written += len(block)
        ctx.say(f"chaos: filled {path} with {written >> 20} MiB\n".encode())

    _later(ctx, attack, 0, 0.5)


def prim_inode_fill(ctx: Ctx) -> None:
    """Many empty files in its home (inodes)."""
    def attack() -> None:
        d = os.path.join(ctx.home, "inodes")
        with contextlib.suppress(OSError):
            os.mkdir(d)
        for i in range(ctx.rnd.randrange(5000, 20000)):
            try:
                os.close(os.open(os.path.join(d, str(i)), os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError:
                break

    _later(ctx, attack, 0, 0.5)


def prim_close_console(ctx: Ctx) -> None:
    """Close its console fds (both directions) at a random point."""
    def attack() -> None:
        for fd in {ctx.in_fd, ctx.out_fd, 0, 1, 2}:
            with contextlib.suppress(OSError):
                os.close(fd)

    _later(ctx, attack, 0.1, 1.5)


def prim_forged_markers(ctx: Ctx) -> None:
    """Forged shell frames: the real token (typed on its console) in thousands
    of BEGIN lines, exit statuses thousands of digits long; and bursts of
    BEGIN/END lines with made-up tokens."""
    ctx.forge_frames = True

    def attack() -> None:
        lines = []
        for _ in range(ctx.rnd.randrange(500, 4000)):
            tok = ctx.rnd.randbytes(8).hex()
            lines.append(f"SVIRT-SH-BEGIN-{tok}\n")
            if ctx.rnd.random() < 0.2:
                lines.append(f"SVIRT-SH-END-{tok}:{'9' * ctx.rnd.randrange(1, 5000)}\n")
        ctx.say("".join(lines).encode())

    _later(ctx, attack, 0, 1.0)


ESCAPES = (b"\x1b]52;c;Y2hhb3M=\x07",  # OSC 52: write the admin's clipboard
           b"\x1bP+q544e\x1b\\",  # DCS: XTGETTCAP query
           b"\x1b[6n", b"\x1b[c", b"\x1b[>c", b"\x1b]4;1;?\x07",  # terminal queries
           b"\x1b]0;chaos title\x07", b"\x9b6n", b"\x1b[21t")


def prim_escapes(ctx: Ctx) -> None:
    """Terminal escape sequences on the console (OSC 52, DCS, queries)."""
    _later(ctx, lambda: ctx.say(b"chaos esc: " + b"".join(ESCAPES) + b"\n"), 0, 1.0)


def prim_forged_audit(ctx: Ctx) -> None:
    """Audit/AVC-looking lines on the console, and a segfault in a file
    named after an AVC record (the kernel logs its name in kmsg)."""
    def attack() -> None:
        ctx.say((f'audit: type=1400 audit(1.0:1): avc:  denied  {{ read }} for  pid=1 '
                 f'comm="{FORGED_TAG}" name="{FORGED_TAG}" '
                 f'scontext=system_u:system_r:svirt_t:s0:c1,c2 '
                 f'tcontext=system_u:object_r:svirt_image_t:s0:c3,c4 tclass=file\n').encode())
        if ctx.helper:
            _helper(ctx, "segv", ctx.home)

    _later(ctx, attack, 0, 1.0)


def prim_syscalls32(ctx: Ctx) -> None:
    """32-bit (int $0x80) and x32 forms of unshare/clone/ptrace/pidfd_open/
    process_vm_readv through the compiled helper; any that works is a breach."""
    def attack() -> None:
        if not ctx.helper:
            return
        out = _helper(ctx, "syscalls", ctx.home)
        refused = 0
        for line in out.splitlines():
            if line.startswith("OK "):
                ctx.breach("syscall", line[3:])
            refused += line.startswith("NO ")
        # on the console (and in its log): the attack ran, or why it did not
        ctx.say(f"chaos syscalls32: {refused} refused\n".encode() if refused
                else f"chaos syscalls32: the helper did not run: {out[:200]!r}\n".encode())

    _later(ctx, attack, 0, 1.0)


def _helper(ctx: Ctx, mode: str, workdir: str) -> str:
    try:
        proc = subprocess.run([ctx.helper, mode, workdir, FORGED_TAG],  # noqa: S603
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return f"helper failed: {err}"
    return proc.stdout.decode(errors="replace")


def prim_fork_chain(ctx: Ctx) -> None:
    """A chain of processes that each fork and exit: never one pid for long."""
    def chain() -> None:
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
                time.sleep(0.01)
            time.sleep(0.002)

    _later(ctx, chain, 0, 1.0)


def prim_env_forge(ctx: Ctx) -> None:
    """Children that carry svirt's variables (another registry's tag) and
    outlive the guest."""
    def attack() -> None:
        if os.fork():
            return
        os.setsid()
        env = {"SVIRT_STATE_DIR": "/var/lib/svirt-elsewhere", "SVIRT_RUN_DIR": "/run/elsewhere",
               "SVIRT_UID_BASE": "1", "PATH": "/usr/bin:/bin"}
        with contextlib.suppress(OSError):
            os.execve(sys.executable, [sys.executable, "-I", "-c",  # noqa: S606 - no shell
                                       "import signal,time\n"
                                       "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                       "time.sleep(100000)\n"], env)
        os._exit(0)

    _later(ctx, attack, 0, 1.0)


def prim_escape_session(ctx: Ctx) -> None:
    """A helper in a new session (double fork), deaf to SIGTERM."""
    def attack() -> None:
        if os.fork():
            return
        os.setsid()
        if os.fork():
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(100000)
        os._exit(0)

    _later(ctx, attack, 0, 1.0)


def prim_crash(ctx: Ctx) -> None:
    """Die at a random point: SIGKILL, SIGSEGV, SIGABRT or exit code 1."""
    how = ctx.rnd.choice(["kill", "segv", "abrt", "exit"])

    def die() -> None:
        if how == "exit":
            os._exit(1)
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "segv": signal.SIGSEGV,
                              "abrt": signal.SIGABRT}[how])

    _later(ctx, die, 0.05, 3.0)


def prim_early_exit(ctx: Ctx) -> None:
    """Exit before its first console output (a launch that never ran)."""
    os._exit(ctx.rnd.choice([0, 1, 127]))


def prim_agent_flood(ctx: Ctx) -> None:
    ctx.agent_mode = "flood"


def prim_agent_garbage(ctx: Ctx) -> None:
    ctx.agent_mode = "garbage"


def prim_agent_stall(ctx: Ctx) -> None:
    ctx.agent_mode = "stall"


def prim_agent_escapes(ctx: Ctx) -> None:
    ctx.agent_mode = "escapes"


def prim_flood(ctx: Ctx) -> None:
    """Many MiB on the console as fast as it can (buffers, log rotation)."""
    def attack() -> None:
        chunk = (b"chaos flood " * 80 + b"\n") * 64
        for _ in range(ctx.rnd.randrange(50, 400)):
            ctx.say(chunk)

    _later(ctx, attack, 0, 1.0)


PRIMITIVES: dict[str, Callable[[Ctx], None]] = {
    name[5:]: fn for name, fn in list(globals().items()) if name.startswith("prim_")}


# ================================================================== main
def version_probe(argv: list[str]) -> bool:
    """svirt's host probe runs ``--version`` and ``-help``."""
    if "--version" in argv:
        print("QEMU emulator version 7.2.0 (chaos stand-in)")
        return True
    if "-help" in argv:
        print("usage: qemu-system-x86_64 [options]\n-sandbox on[,obsolete=allow|deny]")
        return True
    return False


def main() -> int:
    if version_probe(sys.argv[1:]):
        return 0
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctx = Ctx(sys.argv)
    if "early_exit" in ctx.chaos:
        prim_early_exit(ctx)
    for name in ctx.chaos:  # first: the control modes hold from the first request
        fn = PRIMITIVES.get(name)
        if fn is not None:
            fn(ctx)
    if ctx.shape == "uml":
        mconsole_serve(ctx)
    else:
        qmp_serve(ctx)
        agent_serve(ctx)
    console_serve(ctx)
    ctx.say(b"HOSTILE " + json.dumps({"pid": os.getpid(), "uid": os.getuid(),
                                      "shape": ctx.shape, "chaos": ctx.chaos}).encode()
            + b"\n" + READY)
    if "poweroff" in ctx.opts:
        timer = threading.Timer(int(ctx.opts["poweroff"] or 0) / 1000, os._exit, (0,))
        timer.daemon = True
        timer.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
