"""A launcher in a process of its own, to be SIGKILLed.

    python -m tests.hostile.driver SPEC.json [--hold] [--kill-at N]

Launches the spec (see helpers.spec_dict) through the real launch path with
the registry of $SVIRT_RUN_DIR / $SVIRT_STATE_DIR, prints one JSON line when
the stand-in is up (its own view, the record's slot and labels), then either
waits to be killed (--hold) or stops the guest and prints ``{"done": ...}``.

--kill-at N is the one mock of these tests, the kill-injection hook: every
function through which the launcher changes the file system (os.replace,
os.rename, os.chown, os.chmod, os.setxattr, os.mkdir, os.unlink, os.open
with O_CREAT/O_WRONLY/O_RDWR, open() for writing, socket.bind...) is wrapped
so that right after the Nth such change in this process the launcher
SIGKILLs itself.  The change itself is real, and so is everything else.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MUTATORS = ("replace", "rename", "renames", "chown", "fchown", "lchown", "chmod", "fchmod",
            "lchmod", "setxattr", "removexattr", "mkdir", "makedirs", "unlink", "remove",
            "rmdir", "symlink", "link", "truncate", "ftruncate", "mknod", "mkfifo",
            "utime")
WRITE_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class KillSwitch:
    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.pid = os.getpid()
        self.log: list[str] = []

    def hit(self, what: str) -> None:
        if os.getpid() != self.pid:
            return  # the child between fork and exec is not the launcher
        self.count += 1
        if self.kill_at is not None and self.count >= self.kill_at:
            os.kill(self.pid, signal.SIGKILL)

    def wrap(self, name: str, fn: Callable[..., Any], test: Callable[..., bool] | None = None
             ) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if test is None or test(*args, **kwargs):
                self.hit(name)
            return result

        return wrapper

    def install(self) -> None:
        for name in MUTATORS:
            if hasattr(os, name):
                setattr(os, name, self.wrap(name, getattr(os, name)))

        def opens_for_writing(_path: Any, flags: int = 0, *args: Any, **kwargs: Any) -> bool:
            return bool(flags & WRITE_FLAGS)

        os.open = self.wrap("open", os.open, opens_for_writing)

        def file_mode_writes(_file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> bool:
            return isinstance(_file, str | bytes | os.PathLike) and any(
                c in mode for c in "wax+")

        builtins.open = self.wrap("builtins.open", builtins.open, file_mode_writes)
        io.open = builtins.open
        socket.socket.bind = self.wrap("bind", socket.socket.bind)  # type: ignore[method-assign]


def main() -> int:
    args = sys.argv[1:]
    spec_file = Path(args[0])
    hold = "--hold" in args
    kill_at = int(args[args.index("--kill-at") + 1]) if "--kill-at" in args else None
    switch = KillSwitch(kill_at)
    # product imports first: the hook counts the launcher's changes, not imports'
    from svirt.launcher.launch import launch
    from tests.hostile.helpers import build_spec, read_info

    spec = build_spec(json.loads(spec_file.read_text()))
    switch.install()
    with launch(spec) as guest:
        info = read_info(guest)
        print(json.dumps({"info": info, "slot": guest.record.slot, "labels": guest.labels,
                          "pid": guest.pid, "mutations": switch.count}), flush=True)
        if hold:
            while True:
                time.sleep(3600)
        if "poweroff=" in spec.cmdline:
            guest.wait()  # the guest powers off by itself
            outcome = guest.outcome
            assert outcome is not None
        else:
            outcome = guest.stop()
    print(json.dumps({"done": str(outcome.kind), "mutations": switch.count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
