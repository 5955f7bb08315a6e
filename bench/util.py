"""Shared pieces: sample series, cleanup on any exit, process memory, host facts."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
SVIRT = str(VENV_BIN / "svirt")
REPO = Path(__file__).resolve().parent.parent


def now() -> float:
    return time.perf_counter()


# --------------------------------------------------------------------- series
@dataclass
class Series:
    """One measured quantity: every sample, in ``unit``.

    ``baseline`` names another series of the same section measured in the
    same rounds: sample i of both comes from round i, so the ratio and the
    overhead are computed per round, then summarised.
    """

    key: str
    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str | None = None
    note: str = ""

    def add(self, value: float) -> None:
        self.samples.append(value)

    def summary(self) -> dict[str, float] | None:
        return summarize(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "unit": self.unit,
                "samples": self.samples, "baseline": self.baseline, "note": self.note,
                "summary": self.summary()}


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": float(len(values))}


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=False) if y > 0]


def differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=False)]


@dataclass
class Target:
    """A goal from the issue, printed as met / not met next to the number."""

    name: str
    value: str
    limit: str
    met: bool | None  # None: could not be measured here
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "met": self.met,
                "why": self.why}

    @property
    def verdict(self) -> str:
        return {True: "met", False: "NOT MET", None: "not measured"}[self.met]


@dataclass
class SectionResult:
    name: str
    series: list[Series] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def new(self, key: str, label: str, unit: str, baseline: str | None = None,
            note: str = "") -> Series:
        s = Series(key, label, unit, baseline=baseline, note=note)
        self.series.append(s)
        return s

    def get(self, key: str) -> Series | None:
        return next((s for s in self.series if s.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return {"series": [s.to_json() for s in self.series],
                "targets": [t.to_json() for t in self.targets],
                "notes": self.notes, "extra": self.extra, "seconds": self.seconds}


# -------------------------------------------------------------------- cleanup
class Cleanup:
    """LIFO cleanup actions, run on normal exit, exceptions and Ctrl-C."""

    def __init__(self) -> None:
        self._actions: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0

    def push(self, what: str, action: Callable[[], None]) -> int:
        self._next += 1
        self._actions[self._next] = (what, action)
        return self._next

    def done(self, handle: int) -> None:
        self._actions.pop(handle, None)

    def run(self, handle: int) -> None:
        entry = self._actions.pop(handle, None)
        if entry is not None:
            self._call(*entry)

    def run_all(self) -> None:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for handle in sorted(self._actions, reverse=True):
                self.run(handle)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)

    @staticmethod
    def _call(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - cleanup goes on with the rest
            print(f"bench: cleanup of {what} failed: {err}", file=sys.stderr)


CLEANUP = Cleanup()


@contextmanager
def cleaning(what: str, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` when the block ends (and on Ctrl-C, via CLEANUP)."""
    handle = CLEANUP.push(what, action)
    try:
        yield
    finally:
        CLEANUP.run(handle)


def make_temp_dir(prefix: str, base: str | None = None, mode: int = 0o755) -> Path:
    """A temporary directory others may traverse, removed at the latest on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    path.chmod(mode)
    CLEANUP.push(f"directory {path}", lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def run_dir_base() -> str | None:
    """Registries and UML dirs go to tmpfs /run like svirt's default /run/svirt."""
    return "/run" if os.access("/run", os.W_OK) else None


# ---------------------------------------------------------- live processes
class Sleepers:
    """Live processes of ours (``sleep``) to stand in for supervisors of fake records."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        CLEANUP.push("sleep processes", self.stop)

    def start(self, count: int) -> list[int]:
        new = [subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL,
                                start_new_session=True) for _ in range(count)]
        self.procs += new
        return [p.pid for p in new]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def kill_tree(proc: subprocess.Popen[bytes], grace: float = 0.0,
              sig: int = signal.SIGTERM) -> None:
    """Ask ``proc`` to stop (sig), wait ``grace``, then SIGKILL its process group."""
    if proc.poll() is None and grace > 0:
        try:
            os.kill(proc.pid, sig)
            proc.wait(grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            try:
                proc.kill()
            except OSError:
                pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass


# ------------------------------------------------------------------ memory
@dataclass(frozen=True)
class MemSample:
    pid: int
    rss_kb: int
    pss_kb: int
    hwm_kb: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "rss_kb": self.rss_kb, "pss_kb": self.pss_kb,
                "hwm_kb": self.hwm_kb}


def proc_mem(pid: int) -> MemSample | None:
    """RSS and PSS from /proc/PID/smaps_rollup, peak RSS (VmHWM) from status."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
                    values[parts[0]] = int(parts[1])
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    values["VmHWM:"] = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return MemSample(pid, values.get("Rss:", 0), values.get("Pss:", 0), values.get("VmHWM:", 0))


def proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def pids_named(name: str) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm", encoding="utf-8") as f:
                    if f.read().strip() == name:
                        out.append(int(entry.name))
            except OSError:
                continue
    return out


# --------------------------------------------------------------------- host
def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def busy_processes(limit: int = 8) -> list[str]:
    """The busiest other processes right now (a noisy host skews every number)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [" ".join(line.split()) for line in out.splitlines()[:limit]]


def host_description() -> dict[str, Any]:
    try:
        svirt_host: Any = json.loads(subprocess.run(
            [SVIRT, "host", "--json"], capture_output=True, text=True, timeout=60).stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        svirt_host = {"error": str(err)}
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "svirt_host": svirt_host,
        "svirt_git": _git_state(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": platform.machine(),
        "memory_mib": mem_kb // 1024,
        "python": sys.version.split()[0],
        "loadavg_start": loadavg(),
        "busy_processes_start": busy_processes(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_state() -> dict[str, str]:
    """The svirt commit measured (other people change svirt meanwhile)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"head": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "dirty_svirt_files": git("status", "--porcelain", "--", "svirt")}


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
