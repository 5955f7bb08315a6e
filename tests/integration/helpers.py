"""Shared helpers for the integration tests."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from svirt.images.build import TinyGuest
from svirt.procfs import is_zombie

PYTHON = sys.executable
SVIRT = str(Path(PYTHON).with_name("svirt"))


def as_uid(uid: int, action: Callable[[], None], gid: int | None = None) -> int:
    """``action`` in a child running as ``uid``/``gid`` (no groups): 0, else
    its OSError's errno (EIO when the child said nothing)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 255
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(*[uid if gid is None else gid] * 3)
            os.setresuid(uid, uid, uid)
            action()
            code = 0
        except OSError as err:
            code = err.errno or 254
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    data = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    return data[0] if data else errno.EIO


def open_as(uid: int, gid: int, path: Path, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` in a child running as uid/gid; 0 on success, else the errno."""
    return as_uid(uid, lambda: os.close(os.open(path, flags)), gid)


def status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def write_spec(path: Path, name: str, backend: str, guest: TinyGuest, mode: str = "stay",
               extra: str = "") -> Path:
    from svirt.images.build import guest_cmdline

    memory = 128 if backend == "uml" else 256
    path.write_text(
        f'name = "{name}"\nbackend = "{backend}"\nkernel = "{guest.kernel}"\n'
        f'initrd = "{guest.initrd}"\nmemory = {memory}\n'
        f'cmdline = "{guest_cmdline(mode)}"\nshutdown_timeout = 20\n{extra}'
    )
    return path


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.05)
    return False


def pids_of_uid(uid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and not is_zombie(entry.name):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def svirt_cli(*args: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVIRT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
