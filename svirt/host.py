"""Host probes: hypervisor binaries, whether KVM really boots a standard guest,
and which Linux Security Module is in force.

The probes are cheap (a few stat/read calls); the slow ones (running a binary
to ask its version or features) are cached per binary path, size and mtime in
the registry directory, so every svirt command does not pay for them again.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

QEMU_BINARY = "qemu-system-x86_64"
UML_BINARY = "linux"
LGUEST_BINARY = "lguest"
#: the only PATH a hypervisor, its helpers and the tools svirt runs are looked up in
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SELinuxMode(enum.StrEnum):
    DISABLED = "disabled"
    PERMISSIVE = "permissive"
    ENFORCING = "enforcing"


@dataclass(frozen=True)
class Binary:
    path: str
    version: str
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


@dataclass(frozen=True)
class HostInfo:
    binaries: dict[str, Binary | None]
    kvm: KvmStatus
    selinux: SELinuxMode
    selinux_mls: bool
    selinux_policy: str | None
    smack: bool
    lsms: tuple[str, ...]
    lguest_device: bool
    cpus: int
    # the CPU's xstate (AMX) is larger than Debian 12's UML can save over ptrace
    uml_xstate_fallback: bool = False
    #: AppArmor is enabled and its policy interface is there (probe_apparmor)
    apparmor: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def binary(self, name: str) -> Binary | None:
        return self.binaries.get(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def host_memory_mib() -> int:
    """The host's RAM in MiB (``MemTotal``)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0  # pragma: no cover - every Linux has MemTotal


def probe_kvm(sys_root: Path = Path("/sys"), dev: Path = Path("/dev/kvm")) -> KvmStatus:
    """Can KVM boot a standard (non-paravirtualised) x86 guest here?

    ``/dev/kvm`` alone is not enough: under PVM (module ``kvm_pvm``, a nested
    KVM) only kernels built as PVM guests boot, and a Debian kernel dies with
    "KVM internal error ... emulation failure".
    """
    if not dev.exists():
        return KvmStatus(False, f"{dev} does not exist (no KVM module loaded)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(False, f"cannot open {dev} for reading and writing")
    modules = sys_root / "module"
    if (modules / "kvm_pvm").exists():
        return KvmStatus(
            False,
            f"{dev} is PVM (module kvm_pvm): only kernels built as PVM guests boot, "
            "a standard kernel dies with an emulation failure",
        )
    for vendor in ("kvm_intel", "kvm_amd"):
        if (modules / vendor).exists():
            return KvmStatus(True, f"{dev} backed by {vendor}")
    return KvmStatus(False, f"{dev} exists but neither kvm_intel nor kvm_amd is loaded")


def probe_selinux(selinuxfs: Path = Path("/sys/fs/selinux")) -> tuple[SELinuxMode, bool]:
    enforce = selinuxfs / "enforce"
    try:
        value = enforce.read_text().strip()
    except OSError:
        return SELinuxMode.DISABLED, False
    try:
        mls = (selinuxfs / "mls").read_text().strip() == "1"
    except OSError:
        mls = False
    return (SELinuxMode.ENFORCING if value == "1" else SELinuxMode.PERMISSIVE), mls


def probe_smack() -> bool:
    return Path("/sys/fs/smackfs").is_dir() and Path("/proc/self/attr/smack/current").exists()


def probe_apparmor(sys_root: Path = Path("/sys"), lsms: tuple[str, ...] | None = None) -> bool:
    """AppArmor can confine a guest here: the module is enabled, it is one of
    the active LSMs and its policy interface (securityfs) is mounted, which
    apparmor_parser loads profiles through."""
    try:
        enabled = (sys_root / "module/apparmor/parameters/enabled").read_text().strip()
    except OSError:
        return False
    if enabled != "Y":
        return False
    active = probe_lsms(sys_root / "kernel/security/lsm") if lsms is None else lsms
    return "apparmor" in active and (sys_root / "kernel/security/apparmor/profiles").exists()


def probe_uml_xstate_fallback(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when UML must fall back to FXSAVE (see svirt.launcher.seccomp):
    the host has AMX, whose xstate no UML up to 6.1 sizes its buffer for."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def probe_lsms(path: Path = Path("/sys/kernel/security/lsm")) -> tuple[str, ...]:
    try:
        return tuple(path.read_text().strip().split(","))
    except OSError:
        return ()


def _selinux_policy() -> str | None:
    try:
        config = Path("/etc/selinux/config").read_text()
    except OSError:
        return None
    m = re.search(r"^SELINUXTYPE=(\S+)", config, re.MULTILINE)
    return m.group(1) if m else None


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr


def _probe_binary(name: str, cache: dict[str, Any]) -> Binary | None:
    path = shutil.which(name)
    if path is None:
        return None
    st = os.stat(path)
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    if key in cache:
        c = cache[key]
        return Binary(c["path"], c["version"], tuple(c["features"]))
    features: list[str] = []
    version = "unknown"
    if name == QEMU_BINARY:
        out = _run([path, "--version"])
        m = re.search(r"version (\S+)", out)
        version = m.group(1) if m else "unknown"
        help_text = _run([path, "-help"])
        if "-sandbox" in help_text:
            features.append("sandbox")
    elif name == UML_BINARY:
        version = _uml_version(path)
    binary = Binary(path, version, tuple(features))
    cache[key] = asdict(binary)
    return binary


def _uml_version(path: str) -> str:
    """The UML kernel's version, read from the binary: running it would make
    the launcher execute UML code (under SELinux: an execmem denial)."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(b"Linux version ")
            chunk = data[at : at + 80] if at >= 0 else b""
    except (OSError, ValueError):
        return "unknown"
    m = re.match(rb"Linux version (\d+\.\d+\S*)", chunk)
    return m.group(1).decode(errors="replace") if m else "unknown"


def _cache_file() -> Path:
    # beside the image cache, not in the registry: one cache for every registry
    return Path(os.environ.get("SVIRT_CACHE", "/var/cache/svirt")) / "host-cache.json"


def write_cache(path: Path, data: Any) -> None:
    """Replace a cache file whole; a cache that cannot be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def probe_host() -> HostInfo:
    """Probe the host (cheap; binary versions are cached)."""
    cache_path = _cache_file()
    try:
        cache: dict[str, Any] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    before = len(cache)
    binaries = {n: _probe_binary(n, cache) for n in (QEMU_BINARY, UML_BINARY, LGUEST_BINARY)}
    if len(cache) != before:
        write_cache(cache_path, cache)
    mode, mls = probe_selinux()
    lsms = probe_lsms()
    return HostInfo(
        binaries=binaries,
        kvm=probe_kvm(),
        selinux=mode,
        selinux_mls=mls,
        selinux_policy=_selinux_policy() if mode is not SELinuxMode.DISABLED else None,
        smack=probe_smack(),
        lsms=lsms,
        lguest_device=Path("/dev/lguest").exists(),
        cpus=os.cpu_count() or 1,
        uml_xstate_fallback=probe_uml_xstate_fallback(),
        apparmor=probe_apparmor(lsms=lsms),
    )
