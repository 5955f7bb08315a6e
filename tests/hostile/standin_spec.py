"""The stand-in hypervisor (standin.py) as a UML guest: its spec and its report.

Stdlib and svirt only: besides the hostile tests, the SELinux lab uses it
(its payload copies this file and standin.py; see tests/lab/test_lab_svirt.py).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from svirt.launcher.launch import Guest
from svirt.spec import Console, Disk, GuestSpec

STANDIN = Path(__file__).resolve().parent / "standin.py"
HOSTILE_LINE = re.compile(rb"HOSTILE (\{[^\n]*\})\r?\n")


def spec_dict(kernel: Path, name: str, attack: str = "none", variant: int = 0, *,
              targets: Path | None = None, crash_ms: int | None = None,
              crash_sig: int = signal.SIGKILL, disks: list[Path] = (),  # type: ignore[assignment]
              log: Path | None = None, initrd: Path | None = None,
              shutdown_timeout: float = 0.5, poweroff_ms: int | None = None
              ) -> dict[str, Any]:
    words = [f"attack={attack}", f"variant={variant}"]
    if poweroff_ms is not None:
        words.append(f"poweroff={poweroff_ms}")
    if targets is not None:
        words.append(f"targets={targets}")
    if crash_ms is not None:
        words += [f"crash={crash_ms}", f"crashsig={crash_sig}"]
    return {"name": name, "kernel": str(kernel), "cmdline": " ".join(words),
            "disks": [str(d) for d in disks], "log": str(log) if log else None,
            "initrd": str(initrd) if initrd else None, "shutdown_timeout": shutdown_timeout}


def build_spec(d: dict[str, Any]) -> GuestSpec:
    kwargs: dict[str, Any] = {}
    if d.get("log"):
        kwargs["console"] = Console(log=Path(d["log"]))
    if d.get("initrd"):
        kwargs["initrd"] = Path(d["initrd"])
    return GuestSpec(name=d["name"], backend="uml", kernel=Path(d["kernel"]),  # type: ignore[arg-type]
                     memory=32, cmdline=d["cmdline"],
                     disks=tuple(Disk(Path(p)) for p in d["disks"]),
                     shutdown_timeout=d["shutdown_timeout"], **kwargs)


def read_info(guest: Guest, timeout: float = 10.0) -> dict[str, Any]:
    """The stand-in's own view (uid, pid, uml_dir...) from its console."""
    line = guest.console.expect(HOSTILE_LINE, timeout)
    m = HOSTILE_LINE.search(line)
    assert m is not None
    info: dict[str, Any] = json.loads(m.group(1))
    return info


def install_standin(directory: Path) -> Path:
    """The stand-in as a kernel other uids can execute (a 0755 directory)."""
    kernel = directory / "linux-standin"
    shutil.copyfile(STANDIN, kernel)
    kernel.chmod(0o755)
    return kernel
