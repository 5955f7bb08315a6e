"""The lab's three passes of svirt's checks, run side by side.

Each pass boots the lab image once and runs one ``tests/lab/inside`` script:
the SELinux pass (``main``, enforcing SELinux, QEMU-TCG), the AppArmor pass
(``apparmor_main``, the same kernel with ``security=apparmor``) and the SMACK
pass (``smack_main``, the image under User-Mode-Linux with
``security=smack``).  A pass keeps about one core busy (the host's load stays
near 1), so the passes a session selects are started together, in threads,
when the first of their modules asks for its result: the lab then takes about
as long as its longest pass instead of their sum.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from .image import COMMAND_MARKER, LabResult, ensure_image, run_lab, skip_reason
from .inside.protocol import PHASE_PREFIX, RESULT_PREFIX

REPO = Path(__file__).resolve().parents[2]
#: a pass takes 1-1.5 minutes here; the rest is room for a slow CI host
LAB_TIMEOUT = 600.0
MEMORY_MIB = 1536
#: besides tests/lab/inside: the hostile stand-in and the jail attack it shares
#: with tests/hostile/test_jail.py
PAYLOAD_FILES = ("tests/__init__.py", "tests/lab/__init__.py", "tests/lab/tiny_guest.py",
                 "tests/hostile/__init__.py", "tests/hostile/standin.py",
                 "tests/hostile/standin_spec.py", "tests/hostile/jail_attack.py")


@dataclass(frozen=True)
class Pass:
    module: str  # the script under tests/lab/inside
    lsm: str  # run_lab's lsm=
    test_module: str  # the test file that reads its result

    @property
    def command(self) -> list[str]:
        return ["env", "PYTHONPATH=/lab", "PYTHONDONTWRITEBYTECODE=1",
                "SVIRT_CONFIG=/lab/tests/lab/inside/svirt.toml", "python3", "-m",
                f"tests.lab.inside.{self.module}"]


PASSES = {
    "selinux": Pass("main", "selinux", "test_lab_svirt"),
    "apparmor": Pass("apparmor_main", "apparmor", "test_lab_apparmor"),
    "smack": Pass("smack_main", "smack", "test_lab_smack"),
}


def build_payload(dest: Path) -> Path:
    """/lab: a copy of svirt/, of tests/lab (tiny_guest.py and inside/) and of
    the hostile stand-in with its jail attack."""
    keep = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "svirt", dest / "svirt", ignore=keep)
    shutil.copytree(REPO / "tests/lab/inside", dest / "tests/lab/inside", ignore=keep)
    for f in PAYLOAD_FILES:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    # svirt's seed builder needs pycdlib >= 1.14 (PyPI; Debian 12 has 1.12):
    # the host's copy, pure python, next to svirt/
    shutil.copytree(Path(pycdlib.__file__).parent, dest / "pycdlib", ignore=keep)
    # readable by the guests' uids (the probe runs as one)
    for d in [dest, *dest.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    return dest


class Passes:
    """The passes a session selected, started together on the first ``result``."""

    def __init__(self, names: list[str], workdir: Path) -> None:
        self.names = names
        self.workdir = workdir
        self.image_seconds = 0.0
        self._futures: dict[str, Future[LabResult]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _start(self) -> None:
        t0 = time.monotonic()
        ensure_image()  # built once, before any pass boots it
        self.image_seconds = time.monotonic() - t0
        payload = build_payload(self.workdir / "payload")
        runnable = [n for n in self.names if skip_reason(lsm=PASSES[n].lsm) is None]
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(runnable)),
                                        thread_name_prefix="lab-pass")
        for name in runnable:
            p = PASSES[name]
            self._futures[name] = self._pool.submit(
                run_lab, p.command, payload, LAB_TIMEOUT, memory_mib=MEMORY_MIB, lsm=p.lsm)
        self._pool.shutdown(wait=False)

    def result(self, name: str) -> LabResult:
        with self._lock:
            if not self._futures:
                self._start()
        if name not in self._futures:
            raise KeyError(f"lab pass {name} was not selected or cannot run here")
        return self._futures[name].result()


def parse_checks(output: str) -> dict[str, dict[str, Any]]:
    """The ``SVIRT-LAB-CHECK {json}`` results of a pass's output, by check name."""
    checks: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX):])
            checks[data["name"]] = data
    return checks


def timings(label: str, res: LabResult, checks: dict[str, dict[str, Any]],
            image_seconds: float) -> str:
    parts = [f"image ready {image_seconds:.1f}s", f"lab pass {res.seconds:.1f}s wall",
             f"boot to command {res.boot_seconds:.1f}s"]
    parts += [f"{n} {c.get('seconds', 0):.1f}s" for n, c in checks.items()]
    return f"{label} lab timings: " + ", ".join(parts)


#: how each pass's denials look in the kernel log
DENIAL_MARKERS = {"selinux": "avc:  denied", "apparmor": 'apparmor="DENIED"',
                  "smack": "lsm=SMACK"}


def split_phases(dmesg: str, marker: str) -> dict[str, list[str]]:
    """The denials (lines holding ``marker``) of the command, by the phase
    marker that precedes them."""
    start = dmesg.find(COMMAND_MARKER)
    current = "before-checks"
    phases: dict[str, list[str]] = {}
    for line in dmesg[max(start, 0):].splitlines():
        if PHASE_PREFIX in line:
            current = line.split(PHASE_PREFIX, 1)[1].strip()
            phases.setdefault(current, [])
        elif marker in line:
            phases.setdefault(current, []).append(line)
    return phases


@dataclass
class PassRun:
    """A pass's result: its checks by name and its denials by phase."""

    result: LabResult
    checks: dict[str, dict[str, Any]]
    phase_denials: dict[str, list[str]] = field(default_factory=dict)
    image_seconds: float = 0.0

    @classmethod
    def of(cls, name: str, passes: Passes) -> PassRun:
        """The pass ``name``'s run (started with the others), its timings printed."""
        res = passes.result(name)
        checks = parse_checks(res.output)
        print(timings(name, res, checks, passes.image_seconds))
        return cls(res, checks, split_phases(res.dmesg, DENIAL_MARKERS[name]),
                   passes.image_seconds)

    def check(self, name: str) -> dict[str, Any]:
        if name not in self.checks:
            pytest.fail(f"check {name} did not report (lab exit {self.result.exit_code}):\n"
                        f"{self.result.output[-3000:]}\n{self.result.console[-2000:]}")
        return self.checks[name]

    def denials(self, *phases: str) -> list[str]:
        out: list[str] = []
        for p in phases:
            out += self.phase_denials.get(p, [])
        return out

    def explain(self, name: str, *phases: str) -> str:
        """A failing check's error and traceback, with its phases' denials."""
        c = self.checks.get(name, {})
        own = [p for p in self.phase_denials if p == name or p.startswith(name + ":")]
        lines = [f"check {name}: {c.get('error', 'no error recorded')}"]
        if c.get("traceback"):
            lines.append(c["traceback"])
        denials = self.denials(*own, *phases)
        lines.append(f"denials in phases {[*own, *phases]}:" if denials else
                     "no denial in its phases")
        lines += [f"  {d}" for d in denials]
        return "\n".join(lines)
