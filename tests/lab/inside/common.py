"""Helpers for the in-lab checks (lab system python3, svirt from /lab).

Phases: every check writes ``svirt-lab-phase: NAME`` to the kernel log before
it starts, so that the AVC denials the host gets back with the kernel log can
be attributed to the check (and the probe) that caused them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import selinux

from tests.lab.inside.protocol import PHASE_PREFIX, RESULT_PREFIX

W = Path("/var/lib/svirt-lab")
PROBE_DIR = W / "probe"
PROBE_EXE = PROBE_DIR / "python3"
PROBE_SCRIPT = PROBE_DIR / "probe.py"
#: the probe's interpreter: an entrypoint of svirt_t and svirt_web_t (see probe.py)
PROBE_EXE_CONTEXT = "system_u:object_r:qemu_exec_t:s0"
PROBE_SCRIPT_CONTEXT = "system_u:object_r:usr_t:s0"

SELINUX_XATTR = "security.selinux"
ACL_XATTR = "system.posix_acl_access"


def kmsg(text: str) -> None:
    with open("/dev/kmsg", "w") as f:
        f.write(text + "\n")


_flushes = 0


def audit_flush(timeout: float = 5.0) -> bool:
    """Wait until every audit record (AVC) queued so far is in the kernel log.

    With no audit daemon, kauditd prints AVC records asynchronously, so one
    could land after the marker of the next phase.  The audit queue is FIFO:
    a USER_AVC message of our own, once printed, comes after all of them.
    """
    global _flushes
    _flushes += 1
    token = f"svirt-lab-flush {os.getpid()}.{_flushes}"
    text = token.encode() + b"\0"
    audit_user_avc, nlm_f_request = 1107, 1
    header = struct.pack("=IHHII", 16 + len(text), audit_user_avc, nlm_f_request, _flushes, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9) as sock:  # NETLINK_AUDIT
        sock.sendto(header + text, (0, 0))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(token in line for line in kernel_log()[-200:]):
            return True
        time.sleep(0.005)
    return False


def phase(name: str) -> None:
    """Start a phase: earlier denials flushed to the log, then the marker."""
    audit_flush()
    kmsg(PHASE_PREFIX + name)


def kmsg_records() -> list[str]:
    """Every record of the kernel log, oldest first, as /dev/kmsg gives it
    (``PRI,SEQ,USEC,FLAGS;text``; its first line: no ``KEY=value`` lines)."""
    records: list[str] = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten record: skip it
                continue
            records.append(rec.decode(errors="replace").split("\n", 1)[0])
    finally:
        os.close(fd)
    return records


def kernel_log() -> list[str]:
    """Every record of the kernel log, oldest first: its text."""
    return [r.split(";", 1)[1] if ";" in r else r for r in kmsg_records()]


def raw_records(lines: list[str]) -> list[str]:
    """The /dev/kmsg records of these lines of :func:`kernel_log`."""
    wanted = set(lines)
    return [r for r in kmsg_records() if r.split(";", 1)[-1] in wanted]


def denials_in_phase(name: str) -> list[str]:
    """AVC denials logged since the last ``phase(name)``, up to the next phase."""
    audit_flush()
    out: list[str] = []
    inside = False
    for line in kernel_log():
        if line.startswith(PHASE_PREFIX):
            inside = line[len(PHASE_PREFIX):] == name
            if inside:
                out = []
            continue
        if inside and "avc:  denied" in line:
            out.append(line)
    return out


def emit(name: str, result: dict[str, Any]) -> None:
    """One check's result, as a line the host picks out of the output."""
    print(RESULT_PREFIX + json.dumps({"name": name, **result}, default=str), flush=True)


def file_state(path: Path) -> dict[str, Any]:
    """What svirt may change on a file: SELinux label, owner, mode, ACL."""
    st = os.stat(path, follow_symlinks=False)
    state: dict[str, Any] = {"uid": st.st_uid, "gid": st.st_gid, "mode": oct(st.st_mode)}
    for name in (SELINUX_XATTR, ACL_XATTR):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            state[name] = None
        else:
            state[name] = value.rstrip(b"\0").decode() if name == SELINUX_XATTR else value.hex()
    return state


def states(paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {str(p): file_state(p) for p in paths}


def state_diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
               ) -> list[str]:
    diffs = []
    for path, old in before.items():
        new = after.get(path)
        if new != old:
            diffs.append(f"{path}: before {old} after {new}")
    return diffs


def getfilecon(path: Path) -> str:
    return str(selinux.getfilecon_raw(str(path))[1])


def setfilecon(path: Path, context: str) -> None:
    selinux.setfilecon_raw(str(path), context)


def proc_context(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            return f.read().rstrip(b"\0\n").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def install_probe(source: Path) -> None:
    """The probe's interpreter and script, where a guest uid can read them."""
    PROBE_DIR.mkdir(parents=True, exist_ok=True)
    PROBE_DIR.chmod(0o755)
    shutil.copy(os.path.realpath(sys.executable), PROBE_EXE)
    PROBE_EXE.chmod(0o755)
    shutil.copy(source, PROBE_SCRIPT)
    PROBE_SCRIPT.chmod(0o644)
    setfilecon(PROBE_DIR, PROBE_SCRIPT_CONTEXT)
    setfilecon(PROBE_EXE, PROBE_EXE_CONTEXT)
    setfilecon(PROBE_SCRIPT, PROBE_SCRIPT_CONTEXT)


@contextlib.contextmanager
def sockcreate(context: str | None) -> Iterator[None]:
    selinux.setsockcreatecon_raw(context)
    try:
        yield
    finally:
        selinux.setsockcreatecon_raw(None)


def run_probe(context: str, uid: int, gid: int, args: dict[str, Any], *,
              tun_netns: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Run probe.py as ``context`` with ``uid``/``gid``; its JSON answer.

    Its stdout is a socketpair created with the probe's own context: a pipe
    from this (launcher) level would be denied and replaced by /dev/null at
    exec.  With ``tun_netns``, the probe gets /dev/net/tun opened in that
    network namespace by this (privileged) process, as the launcher does for
    QEMU.
    """
    with sockcreate(context):
        mine, theirs = socket.socketpair()
    pass_fds: tuple[int, ...] = ()
    tun = -1
    if tun_netns is not None:
        tun = _open_tun_in(tun_netns)
        pass_fds = (tun,)
        args = {**args, "tun_fd": tun}

    def preexec() -> None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        selinux.setexeccon_raw(context)

    argv = [str(PROBE_EXE), "-I", "-S", str(PROBE_SCRIPT), json.dumps(args)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=theirs.fileno(),
                                stderr=theirs.fileno(), pass_fds=pass_fds, preexec_fn=preexec,
                                cwd="/")
    finally:
        theirs.close()
        if tun >= 0:
            os.close(tun)
    mine.settimeout(timeout)
    data = b""
    try:
        while chunk := mine.recv(65536):
            data += chunk
    except TimeoutError:
        proc.kill()
    finally:
        mine.close()
    rc = proc.wait()
    text = data.decode(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            answer: dict[str, Any] = json.loads(line)
            answer["rc"] = rc
            return answer
    return {"rc": rc, "error": text[-2000:] or "no output"}


def _open_tun_in(netns: str) -> int:
    """Open /dev/net/tun from inside ``netns`` (taps are looked up there)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            return os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        finally:
            libc.setns(home, clone_newnet)
    finally:
        os.close(home)
        os.close(target)
