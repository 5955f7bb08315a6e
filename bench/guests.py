"""The tiny guests, their spec files, and the raw argv taken from ``svirt check``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.util import CLEANUP, SVIRT, make_temp_dir, run_dir_base
from svirt.host import CLEAN_PATH, probe_host
from svirt.images import build

# 128 MiB, not less (svirt.testing.tiny_spec: smaller UML guests fail at random
# under load, fork EAGAIN and OOM)
UML_MEMORY = 128
QEMU_MEMORY = 256


@dataclass(frozen=True)
class Images:
    uml: build.TinyGuest
    qemu: build.TinyGuest


def images() -> Images:
    return Images(uml=build.tiny_uml_guest(), qemu=build.tiny_qemu_guest())


@dataclass(frozen=True)
class Flavor:
    """A benchmarked guest kind: backend plus accel."""

    key: str  # "uml", "qemu-tcg", "qemu-kvm"
    backend: str
    accel: str | None
    memory: int

    def guest(self, imgs: Images) -> build.TinyGuest:
        return imgs.uml if self.backend == "uml" else imgs.qemu


UML = Flavor("uml", "uml", None, UML_MEMORY)
QEMU_TCG = Flavor("qemu-tcg", "qemu", "tcg", QEMU_MEMORY)
QEMU_KVM = Flavor("qemu-kvm", "qemu", "kvm", QEMU_MEMORY)


def spec_text(name: str, flavor: Flavor, guest: build.TinyGuest, mode: str, marker: str,
              shutdown_timeout: int = 20, jail: bool = True) -> str:
    lines = [
        f'name = "{name}"',
        f'backend = "{flavor.backend}"',
        f'kernel = "{guest.kernel}"',
        f'initrd = "{guest.initrd}"',
        f"memory = {flavor.memory}",
        f'cmdline = "{build.guest_cmdline(mode, marker)}"',
        f"shutdown_timeout = {shutdown_timeout}",
    ]
    if flavor.accel is not None:
        lines.append(f'accel = "{flavor.accel}"')
    if not jail:
        lines.append("jail = false")
    return "\n".join(lines) + "\n"


class Workspace:
    """A private svirt registry (SVIRT_RUN_DIR), spec files and raw-run directories.

    On exit (or Ctrl-C) whatever svirt left in the registry is reconciled
    (orphans killed, labels restored) before the directories go.
    """

    def __init__(self, tag: str) -> None:
        base = run_dir_base()
        self.registry = make_temp_dir(f"bench-{tag}-reg-", base)
        CLEANUP.push(f"registry {self.registry}", self.reconcile)
        self.specs = make_temp_dir(f"bench-{tag}-spec-", "/var/tmp")
        self.raw = make_temp_dir(f"bench-{tag}-raw-", base)
        self.logs = make_temp_dir(f"bench-{tag}-log-", "/var/tmp")
        self._n = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SVIRT_RUN_DIR"] = str(self.registry)
        return env

    def reconcile(self) -> None:
        from svirt.launcher.registry import Registry

        if self.registry.is_dir():
            Registry(self.registry).reconcile()

    def write_spec(self, name: str, flavor: Flavor, imgs: Images, mode: str,
                   marker: str, jail: bool = True) -> Path:
        path = self.specs / f"{name}.toml"
        path.write_text(spec_text(name, flavor, flavor.guest(imgs), mode, marker, jail=jail))
        return path

    def check(self, spec: Path) -> dict[str, Any]:
        """``svirt check --json``: the exact argv svirt would run."""
        out = subprocess.run([SVIRT, "check", str(spec), "--json"], capture_output=True,
                             text=True, env=self.env(), timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"svirt check {spec} failed: {out.stderr.strip()}")
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def raw_dir(self) -> Path:
        self._n += 1
        path = self.raw / f"r{self._n}"
        path.mkdir(mode=0o700)
        return path

    def log_path(self, label: str) -> Path:
        self._n += 1
        return self.logs / f"{label}-{self._n}.err"


def raw_setup(plan: dict[str, Any]) -> Callable[[], None] | None:
    """What the raw run needs in its child before exec: on an AMX host, UML's
    xstate seccomp filter (as svirt installs it), else UML's init dies with
    SIGSEGV ("ptrace set fp regs failed")."""
    if plan["backend"] != "uml" or not probe_host().uml_xstate_fallback:
        return None
    from svirt.launcher.seccomp import hide_xstate_in_child

    return hide_xstate_in_child()


def raw_command(plan: dict[str, Any], raw_dir: Path) -> tuple[list[str], dict[str, str]]:
    """svirt's argv with the fd-based console replaced by a plain stdout console.

    UML: ``con0=null,fd:1`` and a private uml_dir/TMPDIR (on tmpfs, like
    svirt's run directory).  QEMU: ``-serial stdio``, no QMP chardev/monitor.
    Runs as root without a uid switch; the environment is svirt's clean one.
    """
    argv: list[str] = list(plan["argv"])
    env = {"PATH": CLEAN_PATH, **{k: str(v) for k, v in plan["env"].items()}}
    out: list[str] = []
    if plan["backend"] == "uml":
        for a in argv:
            if a.startswith("con0="):
                out.append("con0=null,fd:1")
            elif a.startswith("uml_dir="):
                out.append(f"uml_dir={raw_dir}")
            else:
                out.append(a)
        if "TMPDIR" in env:
            env["TMPDIR"] = str(raw_dir)
        return out, env
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a == "-chardev" and "fd=" in nxt:
            i += 2
            continue
        if a == "-mon" and "chardev=qmp" in nxt:
            i += 2
            continue
        if a == "-serial":
            out += ["-serial", "stdio"]
            i += 2
            continue
        out.append(a)
        i += 1
    exe = shutil.which(out[0], path=CLEAN_PATH)
    if exe is not None:
        out[0] = exe
    return out, env
