"""GuestSpec: what a guest is, as frozen data validated once.

A spec is built in Python (``GuestSpec(name=..., ...)``) or loaded from TOML
(:func:`load_spec`); both give the same object.  Every later step trusts it.
Errors name the source file (when there is one), the key and what is wrong.

Validation is pure: it looks at the values, never at the host (relative
paths are made absolute, nothing is opened or stat'ed), so a spec can be
built and checked for another host.  Whether the files it names exist and
the host has the memory it asks for is :mod:`svirt.preflight`'s job, done
by ``svirt check`` and before every launch.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import re
import reprlib
import stat
import tomllib
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from svirt.errors import SpecError

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
BRIDGE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
NETNS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_MEMORY_MIB = 16
MAX_SPEC_BYTES = 1024 * 1024  # a spec file larger than this is refused unread
CPUS_RE = re.compile(r"[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?){0,63}")
MAX_CPUS = 8192  # the kernel's NR_CPUS ceiling
MIN_PIDS, MAX_PIDS = 8, 4_194_304  # PID_MAX_LIMIT
E = TypeVar("E", bound=enum.StrEnum)


class Backend(enum.StrEnum):
    QEMU = "qemu"
    UML = "uml"
    LGUEST = "lguest"


class Restart(enum.StrEnum):
    """What a detached guest's supervisor does when it ends (``svirt start``)."""

    NO = "no"
    ON_FAILURE = "on-failure"  # not after a power-off, nor after svirt stop
    ALWAYS = "always"  # after anything but svirt stop


class Accel(enum.StrEnum):
    """QEMU acceleration: ``kvm`` is required, ``auto`` falls back to TCG."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class ConsoleMode(enum.StrEnum):
    LOG = "log"  # drained to a log file (and kept in memory for expect())
    STDIO = "stdio"  # copied to the launcher's stdout
    PTY = "pty"  # bridged to a pseudo-terminal the user can attach to
    NONE = "none"  # drained and kept in memory only


class SecurityModel(enum.StrEnum):
    AUTO = "auto"
    SELINUX = "selinux"
    SMACK = "smack"
    APPARMOR = "apparmor"
    DAC = "dac"
    NONE = "none"


def _fail(key: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(message, key=key, hint=hint)


_REPR = reprlib.Repr()
_REPR.maxstring = 70
_REPR.maxother = 70
_REPR.maxlong = 40
_REPR.maxlevel = 3


def show_value(value: object) -> str:
    """``repr(value)`` for an error message: short, one line, never raising."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'-' if value < 0 else ''}~10^{int(value.bit_length() * 0.30103)}"
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__, a huge int, a deep nest
        return f"a {type(value).__name__}"


_show = show_value  # the short name the many messages below use


def show_path(path: object) -> str:
    """A path for an error message: as it is when short and printable, else escaped."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)
    if len(text) > 256:
        text = f"{text[:120]}...{text[-120:]}"
    return text


def os_reason(err: OSError) -> str:
    return err.strerror or errno.errorcode.get(err.errno or 0, str(err))


def _path(key: str, value: object) -> Path:
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str) and value:
        path = Path(value)
    else:
        raise _fail(key, f"expected a path, got {_show(value)}")
    if "\0" in str(path):
        raise _fail(key, "path contains a NUL byte")
    try:
        str(path).encode(errors="surrogateescape")
        return Path(os.path.abspath(path))
    except UnicodeError:
        raise _fail(key, f"{show_path(path)} is not a valid file name") from None
    except OSError as err:  # a relative path and a working directory that is gone
        raise _fail(key, f"{show_path(path)}: {os_reason(err)}") from None


def _bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(key, f"expected true/false, got {_show(value)}")


def _iface_name(key: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    """Interface and namespace names: no leading '-' (an option to ip) and no '.'/'..'."""
    if (not isinstance(value, str) or not pattern.fullmatch(value)
            or value.startswith("-") or value in (".", "..")):
        raise _fail(key, f"{_show(value)} is not {what}",
                    hint="use A-Z a-z 0-9 _ . - and do not start with '-'")


def _enum(cls: type[E], key: str, value: object) -> E:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value))
    except (ValueError, TypeError, RecursionError):
        choices = ", ".join(m.value for m in cls)
        raise _fail(key, f"{_show(value)} is not one of: {choices}") from None


def parse_memory(value: object, key: str = "memory") -> int:
    """Memory in MiB from an int (MiB) or a string like ``256M`` / ``1G``."""
    if isinstance(value, bool):
        raise _fail(key, f"expected MiB or a size like '256M', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= 64:
        # one \s* between number and unit, stripped ends: linear, ASCII digits only
        m = re.fullmatch(r"([0-9]+)\s*(?:([KMGT])(?:i?B)?)?", value.strip(), re.IGNORECASE)
        if m:
            n, unit = int(m.group(1)), (m.group(2) or "").upper()
            if unit == "K":
                return n // 1024
            return n * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    raise _fail(key, f"expected MiB or a size like '256M', got {_show(value)}")


@dataclass(frozen=True)
class Backing:
    """One lower layer of a qcow2 disk, declared in the spec: the image header
    is guest-writable, so the chain comes from here and the header must match."""

    path: Path
    format: DiskFormat = DiskFormat.RAW

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("disk.backing.path", self.path))
        object.__setattr__(self, "format",
                           _enum(DiskFormat, "disk.backing.format", self.format))


@dataclass(frozen=True)
class Disk:
    path: Path
    format: DiskFormat = DiskFormat.RAW
    readonly: bool = False
    shared: bool = False
    relabel: bool = True
    backing: tuple[Backing, ...] = ()  # the chain below, top first
    #: the guest writes to a copy-on-write layer in its run directory, deleted
    #: when it ends; ``path`` is then the base, read-only and shared
    #: (svirt/images/layers.py)
    ephemeral: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("disk.path", self.path))
        object.__setattr__(self, "format", _enum(DiskFormat, "disk.format", self.format))
        for flag in ("readonly", "shared", "relabel", "ephemeral"):
            _bool(f"disk.{flag}", getattr(self, flag))
        if self.ephemeral:
            self._check_ephemeral()
        if isinstance(self.backing, list):
            object.__setattr__(self, "backing", tuple(self.backing))
        if not isinstance(self.backing, tuple) or not all(
                isinstance(b, Backing) for b in self.backing):
            raise _fail("disk.backing", "expected a list of backing files (path, format)")
        if len(self.backing) > 16:
            raise _fail("disk.backing", "at most 16 backing files")
        layers = [self.format, *(b.format for b in self.backing)]
        for i, upper in enumerate(layers[:-1]):
            if upper is not DiskFormat.QCOW2:
                raise _fail("disk.backing", f"layer {i} is {upper}: only a qcow2 image has a "
                            "backing file")
        paths = [self.path, *(b.path for b in self.backing)]
        if len(set(paths)) != len(paths):
            raise _fail("disk.backing", "a backing chain may not name a file twice")

    def _check_ephemeral(self) -> None:
        if self.readonly:
            raise _fail("disk.ephemeral", "a read-only disk has no writes to throw away",
                        hint="drop one of readonly and ephemeral")
        if self.shared:
            raise _fail("disk.ephemeral", "a shared disk is written for other guests to see; "
                        "an ephemeral one keeps its writes to itself",
                        hint="drop one of shared and ephemeral")

    def as_ephemeral(self) -> Disk:
        """This disk with a throw-away layer (``svirt run --ephemeral``): a
        read-only disk stays as it is, a shared one becomes private."""
        if self.readonly or self.ephemeral:
            return self
        return replace(self, ephemeral=True, shared=False)


@dataclass(frozen=True)
class Console:
    mode: ConsoleMode = ConsoleMode.NONE
    log: Path | None = None
    #: a detached guest's rotated console log (svirt start): bytes per file and
    #: files kept; None: the host config's (2 MiB x 3 by default)
    max_bytes: int | None = None
    keep: int | None = None

    def __post_init__(self) -> None:
        for key, low, high in (("max_bytes", 4096, 1 << 40), ("keep", 1, 100)):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not low <= v <= high):
                raise _fail(f"console.{key}", f"expected an integer {low}-{high}, got {_show(v)}")
        mode = _enum(ConsoleMode, "console.mode", self.mode)
        if self.log is not None:
            object.__setattr__(self, "log", _path("console.log", self.log))
            if mode is ConsoleMode.NONE:
                mode = ConsoleMode.LOG
        if mode is ConsoleMode.LOG and self.log is None:
            raise _fail("console.log", "mode 'log' needs a log file path")
        object.__setattr__(self, "mode", mode)


@dataclass(frozen=True)
class Nic:
    bridge: str | None = None
    mac: str | None = None
    isolated: bool = False
    model: str = "virtio"

    def __post_init__(self) -> None:
        if self.bridge is not None:
            _iface_name("nic.bridge", self.bridge, BRIDGE_RE, "a valid interface name")
        if self.mac is not None:
            if not isinstance(self.mac, str) or not MAC_RE.fullmatch(mac := self.mac.lower()):
                raise _fail("nic.mac",
                            f"{_show(self.mac)} is not a MAC address like 52:54:00:12:34:56")
            if int(mac[:2], 16) & 1:
                raise _fail("nic.mac", f"{self.mac!r} is a multicast address")
            object.__setattr__(self, "mac", mac)
        _bool("nic.isolated", self.isolated)
        if not isinstance(self.model, str) or self.model not in ("virtio", "e1000", "rtl8139"):
            raise _fail("nic.model", f"{_show(self.model)} is not one of: virtio, e1000, rtl8139")


_SMACK_BAD = re.compile(r"[\s/\"'\\]")


#: the names svirt gives its generated AppArmor profiles (svirt-<uuid>)
APPARMOR_GENERATED_PREFIX = "svirt-"
_APPARMOR_BAD = re.compile(r"[\s\"'\\&]|//")


def apparmor_profile_problem(name: str) -> str | None:
    """Why ``name`` cannot be a spec's own AppArmor profile, else None: 1-255
    printable ASCII characters, no white space, quote, backslash, hat
    (``//``) or stacking (``&``), not starting with ``-`` or a namespace
    (``:``); not ``unconfined`` (no confinement) nor one of svirt's
    generated names."""
    if not (0 < len(name) <= 255 and name.isprintable() and name.isascii()) \
            or _APPARMOR_BAD.search(name) or name.startswith(("-", ":")):
        return ("is not an AppArmor profile name (1-255 printable ASCII characters, no "
                "white space, quote, backslash, & or //, not starting with - or :)")
    if name == "unconfined":
        return "is no confinement: use security.model = \"dac\" to run without a profile"
    if name.startswith(APPARMOR_GENERATED_PREFIX):
        return (f"starts with {APPARMOR_GENERATED_PREFIX!r}, the names of svirt's "
                "generated profiles (loaded and removed by svirt)")
    return None


def smack_label_valid(label: str) -> bool:
    """A label SMACK accepts (security/smack/smack_access.c): 1-255 printable
    ASCII characters, no white space, slash or quote, not starting with ``-``."""
    return (0 < len(label) <= 255 and label.isprintable() and label.isascii()
            and not _SMACK_BAD.search(label) and not label.startswith("-"))


@dataclass(frozen=True)
class Security:
    model: SecurityModel = SecurityModel.AUTO
    type: str | None = None  # process type, e.g. a webserver guest type
    label: str | None = None  # static process label: no category pair is allocated
    relabel: bool = True  # False: leave resource labels alone (static labels)
    image_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _enum(SecurityModel, "security.model", self.model))
        if self.type is not None and (
            not isinstance(self.type, str) or len(self.type) > 255
            or not re.fullmatch(r"[a-z][a-z0-9_]*_t", self.type)
        ):
            raise _fail("security.type", f"{_show(self.type)} is not an SELinux type name (xxx_t)")
        if self.type is not None and self.model not in (SecurityModel.AUTO,
                                                         SecurityModel.SELINUX):
            raise _fail("security.type", f"an SELinux type means nothing to model {self.model}",
                        hint="label = \"...\" names an AppArmor profile or a SMACK label")
        if self.label is not None and self.model is SecurityModel.SMACK:
            if not isinstance(self.label, str) or not smack_label_valid(self.label):
                raise _fail("security.label", f"{_show(self.label)} is not a SMACK label "
                            "(1-255 characters, no white space, slash or quote)")
        elif self.label is not None and self.model is SecurityModel.APPARMOR:
            problem = (apparmor_profile_problem(self.label) if isinstance(self.label, str)
                       else "is not a string")
            if problem:
                raise _fail("security.label", f"{_show(self.label)} {problem}")
        elif self.label is not None and (
            not isinstance(self.label, str) or len(self.label) > 4096
            or self.label.count(":") < 3 or not self.label.isprintable()
            or re.search(r"\s", self.label)
        ):
            raise _fail("security.label", f"{_show(self.label)} is not user:role:type:level",
                        hint="an AppArmor profile or a SMACK label needs its security.model "
                             "(\"apparmor\", \"smack\")")
        _bool("security.relabel", self.relabel)
        if not isinstance(self.image_roots, tuple | list):
            raise _fail("security.image_roots",
                        f"expected a list of paths, got {_show(self.image_roots)}")
        roots = tuple(_path("security.image_roots", r) for r in self.image_roots)
        object.__setattr__(self, "image_roots", roots)


@dataclass(frozen=True)
class Limits:
    """``[limits]``: the guest's cgroup (svirt/launcher/cgroups.py).  ``pids``
    None is the backend's default; memory comes from ``memory``."""

    pids: int | None = None  # pids.max: host tasks (threads too) of the hypervisor
    cpu_weight: int | None = None  # cpu.weight 1..10000 (v1: cpu.shares = weight*1024/100)
    cpus: str | None = None  # cpuset.cpus, e.g. "0-1" or "0,2-3"

    def __post_init__(self) -> None:
        for key, low, high in (("pids", MIN_PIDS, MAX_PIDS), ("cpu_weight", 1, 10_000)):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(f"limits.{key}", f"expected an integer, got {_show(value)}")
            if not low <= value <= high:
                raise _fail(f"limits.{key}", f"{_show(value)} is not between {low} and {high}")
        if self.cpus is not None:
            object.__setattr__(self, "cpus", parse_cpus(self.cpus))


def parse_cpus(value: object, key: str = "limits.cpus") -> str:
    """A cpuset list (``0-1``, ``0,2-3``): ascending ranges of cpu numbers."""
    if not isinstance(value, str) or not CPUS_RE.fullmatch(value.strip()):
        raise _fail(key, f"{_show(value)} is not a cpu list like \"0-1\" or \"0,2-3\"")
    for part in value.strip().split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            raise _fail(key, f"{_show(value)}: the range {part} goes backwards")
        if int(high or low) >= MAX_CPUS:
            raise _fail(key, f"{_show(value)}: cpu numbers stop at {MAX_CPUS - 1}")
    return value.strip()


@dataclass(frozen=True)
class GuestSpec:
    name: str
    kernel: Path
    backend: Backend = Backend.QEMU
    uuid: uuidlib.UUID = field(default_factory=uuidlib.uuid4)
    accel: Accel = Accel.AUTO
    memory: int = 256  # MiB
    vcpus: int = 1
    initrd: Path | None = None
    cmdline: str = ""
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    netns: str | None = None
    console: Console = field(default_factory=Console)
    shutdown_timeout: float = 30.0
    security: Security = field(default_factory=Security)
    limits: Limits = field(default_factory=Limits)  # [limits]: the guest's cgroup
    jail: bool = True  # svirt/launcher/jail.py; false only when asked for
    #: detached guests (svirt start): restart policy; at most max_restarts
    #: restarts within restart_window seconds, then the guest is "failed"
    restart: Restart = Restart.NO
    max_restarts: int = 5
    restart_window: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise _fail(
                "name",
                f"{_show(self.name)} is not 1-64 characters of A-Z a-z 0-9 _ . -",
                hint="names may not contain '/', ',' or spaces",
            )
        if self.name.startswith("."):
            raise _fail("name", f"{self.name!r} may not start with a dot")
        if self.name.startswith("-"):
            raise _fail("name", f"{self.name!r} may not start with '-'",
                        hint="a leading '-' reads as an option to the tools svirt runs")
        backend = _enum(Backend, "backend", self.backend)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "accel", _enum(Accel, "accel", self.accel))
        if isinstance(self.uuid, str):
            try:
                object.__setattr__(self, "uuid", uuidlib.UUID(self.uuid))
            except ValueError:
                raise _fail("uuid", f"{_show(self.uuid)} is not a UUID") from None
        elif not isinstance(self.uuid, uuidlib.UUID):
            raise _fail("uuid", f"expected a UUID, got {_show(self.uuid)}")
        memory = parse_memory(self.memory)
        object.__setattr__(self, "memory", memory)
        if memory < MIN_MEMORY_MIB:
            raise _fail("memory",
                        f"{_show(memory)} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise _fail("vcpus", f"expected a positive integer, got {_show(self.vcpus)}")
        if self.vcpus > 255:
            raise _fail("vcpus", f"{_show(self.vcpus)} is more than 255")
        if backend is not Backend.QEMU and self.vcpus != 1:
            raise _fail("vcpus", f"the {backend} backend runs exactly 1 vcpu")
        object.__setattr__(self, "kernel", _path("kernel", self.kernel))
        if self.initrd is not None:
            object.__setattr__(self, "initrd", _path("initrd", self.initrd))
            if backend is not Backend.QEMU and re.search(r"\s", str(self.initrd)):
                raise _fail("initrd", f"{show_path(self.initrd)}: spaces cannot pass on a "
                            "kernel command line")
        if not isinstance(self.cmdline, str) or "\n" in self.cmdline or "\0" in self.cmdline:
            raise _fail("cmdline", "expected a single-line string")
        if isinstance(self.shutdown_timeout, bool) or not isinstance(
            self.shutdown_timeout, int | float
        ):
            raise _fail("shutdown_timeout", f"expected seconds, got {_show(self.shutdown_timeout)}")
        if not 0 < self.shutdown_timeout <= 3600:
            raise _fail("shutdown_timeout", "must be between 0 and 3600 seconds")
        for key, value, cls in (("console", self.console, Console),
                                ("security", self.security, Security),
                                ("limits", self.limits, Limits)):
            if not isinstance(value, cls):
                raise _fail(key, f"expected a {cls.__name__}, got {_show(value)}")
        lists: tuple[tuple[str, object, type], ...] = (
            ("disk", self.disks, Disk), ("nic", self.nics, Nic))
        for key, items, kind in lists:
            if not isinstance(items, tuple | list) or not all(isinstance(i, kind) for i in items):
                raise _fail(key, f"expected a tuple of {kind.__name__}, got {_show(items)}")
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "nics", tuple(self.nics))
        self._check_disks(backend)
        self._check_jail()
        self._check_restart()
        if self.netns is not None:
            _iface_name("netns", self.netns, NETNS_RE, "a network namespace name")

    def _check_jail(self) -> None:
        _bool("jail", self.jail)

    def _check_restart(self) -> None:
        object.__setattr__(self, "restart", _enum(Restart, "restart", self.restart))
        n = self.max_restarts
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1000:
            raise _fail("max_restarts", f"expected an integer 0-1000, got {_show(n)}")
        w = self.restart_window
        if isinstance(w, bool) or not isinstance(w, int | float) or not 1 <= w <= 86400:
            raise _fail("restart_window", f"expected 1-86400 seconds, got {_show(w)}")

    def _check_disks(self, backend: Backend) -> None:
        # the same path twice; the same file under two names (a hard link, a
        # symlink) is found by preflight, which looks at the files
        seen: set[Path] = set()
        for disk in self.disks:
            if disk.path in seen:
                raise _fail("disk.path", f"{show_path(disk.path)} is listed twice (also as "
                            f"{show_path(disk.path)})")
            seen.add(disk.path)
            if backend is Backend.UML and re.search(r"[\s,:=]", str(disk.path)):
                raise _fail(
                    "disk.path",
                    f"{show_path(disk.path)}: UML reads ',' ':' '=' and spaces in disk paths "
                    "as syntax",
                    hint="rename the file or use a symlink-free path without them",
                )
            if disk.ephemeral and backend is Backend.UML and disk.format is not DiskFormat.RAW:
                raise _fail("disk.format", f"{show_path(disk.path)}: an ephemeral uml disk "
                            "needs a raw base (UML's COW file sits on raw images only)",
                            hint="convert it: qemu-img convert -O raw BASE.qcow2 BASE.img")
            if disk.ephemeral and backend is Backend.LGUEST:
                raise _fail("disk.ephemeral", "the lguest backend has no copy-on-write layer",
                            hint="use the qemu or uml backend")
            if backend is not Backend.QEMU and disk.format is not DiskFormat.RAW:
                raise _fail("disk.format", f"the {backend} backend supports raw disks only")
        if len(self.disks) > 16:
            raise _fail("disk", "at most 16 disks")
        if len(self.nics) > 8:
            raise _fail("nic", "at most 8 nics")

    def nic_mac(self, index: int) -> str:
        """The nic's MAC: given, or stable from the uuid (locally administered)."""
        given = self.nics[index].mac
        if given:
            return given
        digest = hashlib.sha256(f"{self.uuid}/{index}".encode()).digest()
        octets = [0x52, 0x54] + list(digest[:4])  # 52: locally administered, unicast
        return ":".join(f"{o:02x}" for o in octets)

    def with_changes(self, **changes: Any) -> GuestSpec:
        return replace(self, **changes)

    def with_ephemeral_disks(self) -> GuestSpec:
        """Every writable disk ephemeral (``svirt run --ephemeral``)."""
        return replace(self, disks=tuple(d.as_ephemeral() for d in self.disks))


# ---------------------------------------------------------------- TOML

_TOP = {f.name for f in fields(GuestSpec)} - {"disks", "nics"} | {"disk", "nic"}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "kernel": (str,),
    "backend": (str,),
    "uuid": (str,),
    "accel": (str,),
    "memory": (int, str),
    "vcpus": (int,),
    "initrd": (str,),
    "cmdline": (str,),
    "netns": (str,),
    "jail": (bool,),
    "restart": (str,),
    "max_restarts": (int,),
    "restart_window": (int, float),
    "shutdown_timeout": (int, float),
    "console": (dict,),
    "security": (dict,),
    "limits": (dict,),
    "disk": (list,),
    "nic": (list,),
}
_SECTION_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "console": {"mode": (str,), "log": (str,), "max_bytes": (int,), "keep": (int,)},
    "security": {
        "model": (str,),
        "type": (str,),
        "label": (str,),
        "relabel": (bool,),
        "image_roots": (list,),
    },
    "disk": {
        "path": (str,),
        "format": (str,),
        "readonly": (bool,),
        "shared": (bool,),
        "relabel": (bool,),
        "backing": (list,),
        "ephemeral": (bool,),
    },
    "nic": {"bridge": (str,), "mac": (str,), "isolated": (bool,), "model": (str,)},
    "limits": {"pids": (int,), "cpu_weight": (int,), "cpus": (str,)},
}


def _check_table(
    table: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]], prefix: str
) -> None:
    for key, value in table.items():
        full = f"{prefix}{show_path(key) if len(str(key)) <= 64 else _show(key)}"
        if key not in allowed:
            raise _fail(full, "unknown key", hint=f"known keys: {', '.join(sorted(allowed))}")
        types = allowed[key]
        if isinstance(value, bool) and bool not in types:
            raise _fail(full, f"expected {_type_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise _fail(full, f"expected {_type_names(types)}, got {type(value).__name__}")


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
             dict: "a table", list: "an array"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def spec_from_mapping(data: Mapping[str, Any], base: Path | None = None) -> GuestSpec:
    """Build a GuestSpec from parsed TOML; relative paths are taken from ``base``."""
    if not isinstance(data, Mapping):
        raise _fail("", f"expected a table, got {type(data).__name__}")
    _check_table(data, {k: _TYPES[k] for k in _TOP}, "")
    for required in ("name", "kernel"):
        if required not in data:
            raise _fail(required, "missing (required)")

    def rel(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() or base is None else base / p

    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("kernel", "initrd"):
            kwargs[key] = rel(value)
        elif key == "console":
            _check_table(value, _SECTION_KEYS["console"], "console.")
            con = dict(value)
            if "log" in con:
                con["log"] = rel(con["log"])
            kwargs["console"] = Console(**con)
        elif key == "security":
            _check_table(value, _SECTION_KEYS["security"], "security.")
            sec = dict(value)
            roots = sec.get("image_roots", [])
            if not all(isinstance(r, str) for r in roots):
                raise _fail("security.image_roots", "expected an array of paths")
            sec["image_roots"] = tuple(rel(r) for r in roots)
            kwargs["security"] = Security(**sec)
        elif key == "limits":
            _check_table(value, _SECTION_KEYS["limits"], "limits.")
            kwargs["limits"] = Limits(**value)
        elif key in ("disk", "nic"):
            items = []
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise _fail(f"{key}[{i}]", f"expected a table ([[{key}]])")
                _check_table(item, _SECTION_KEYS[key], f"{key}[{i}].")
                entry = dict(item)
                if key == "disk":
                    if "path" not in entry:
                        raise _fail(f"disk[{i}].path", "missing (required)")
                    entry["path"] = rel(entry["path"])
                    if "backing" in entry:
                        entry["backing"] = _backing_layers(entry["backing"], rel, i)
                    items.append(_indexed(Disk, entry, f"disk[{i}]"))
                else:
                    items.append(_indexed(Nic, entry, f"nic[{i}]"))
            kwargs[key + "s"] = tuple(items)
        else:
            kwargs[key] = value
    return GuestSpec(**kwargs)


def spec_to_mapping(spec: GuestSpec) -> dict[str, Any]:
    """The TOML keys of ``spec`` (paths absolute): spec_from_mapping's inverse,
    so a spec built in Python can go where a spec file goes (svirt start)."""

    def value(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, Path | uuidlib.UUID):
            return str(v)
        if isinstance(v, tuple | list):
            return [value(i) for i in v]
        if hasattr(v, "__dataclass_fields__"):
            return {f.name: value(getattr(v, f.name)) for f in fields(v)
                    if getattr(v, f.name) is not None}
        return v

    data: dict[str, Any] = value(spec)
    data["disk"] = data.pop("disks")
    data["nic"] = data.pop("nics")
    return data


def _backing_layers(value: list[Any], rel: Any, disk: int) -> tuple[Backing, ...]:
    """``backing = [{path = "base.qcow2", format = "qcow2"}, ...]``, top first."""
    out = []
    for j, layer in enumerate(value):
        where = f"disk[{disk}].backing[{j}]"
        if not isinstance(layer, dict):
            raise _fail(where, "expected a table {path = ..., format = ...}")
        _check_table(layer, {"path": (str,), "format": (str,)}, where + ".")
        if "path" not in layer or "format" not in layer:
            raise _fail(where, "needs both path and format (a format is never probed)")
        out.append(_indexed(Backing, {"path": rel(layer["path"]), "format": layer["format"]},
                            where))
    return tuple(out)


def in_file(err: SpecError, path: Path | str) -> SpecError:
    """``err`` naming the spec file it came from (``path``, shown on one line)."""
    return SpecError(err.detail, source=show_path(path), key=err.key, hint=err.hint)


def _indexed(cls: type[Any], entry: dict[str, Any], where: str) -> Any:
    try:
        return cls(**entry)
    except SpecError as err:
        key = (err.key or "").split(".", 1)[-1]
        raise SpecError(err.detail, key=f"{where}.{key}", hint=err.hint) from None


def _read_spec_file(path: Path) -> str:
    """The text of a spec file: a regular file of at most MAX_SPEC_BYTES, in UTF-8.

    Opened non-blocking (a FIFO must not hang the launcher) and checked on the
    open descriptor, so what is read is what was checked.
    """
    shown = show_path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SpecError(f"{shown}: no such file") from None
    except OSError as err:
        raise SpecError(f"{shown}: {os_reason(err)}") from None
    except ValueError:  # a NUL byte, or a name the file system encoding cannot take
        raise SpecError(f"{shown}: not a valid file name") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(f"{shown}: is a directory, not a spec file")
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{shown}: not a regular file")
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{shown}: {st.st_size} bytes, more than a spec may have "
                            f"({MAX_SPEC_BYTES} bytes)")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SPEC_BYTES:  # st_size can lie (/proc, a file still growing)
            chunk = os.read(fd, MAX_SPEC_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{shown}: more than a spec may have ({MAX_SPEC_BYTES} bytes)")
    except OSError as err:
        raise SpecError(f"{shown}: {os_reason(err)}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise SpecError(f"{shown}: not valid TOML: not UTF-8 (byte {err.start}, line {line})") \
            from None


def load_spec(path: Path | str) -> GuestSpec:
    """Load and validate a guest spec from a TOML file."""
    data, base, _shown = read_spec_data(path)
    try:
        return spec_from_mapping(data, base=base)
    except SpecError as err:
        raise in_file(err, path) from None


def read_spec_data(path: Path | str) -> tuple[dict[str, Any], Path, str]:
    """A spec file's TOML as data, the directory its relative paths are
    relative to, and its name as errors show it (not yet validated)."""
    if not isinstance(path, Path):
        if not isinstance(path, str) or not path:
            raise SpecError(f"expected the path of a spec file, got {_show(path)}")
        path = Path(path)
    text = _read_spec_file(path)
    shown = show_path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{shown}: not valid TOML: {err}") from None
    except RecursionError:
        raise SpecError(f"{shown}: not valid TOML: nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise SpecError(f"{shown}: not valid TOML: a number too long to read") from None
    try:
        base = Path(os.path.realpath(path)).parent
    except (OSError, ValueError) as err:
        raise SpecError(f"{shown}: {err}") from None
    return data, base, shown


def absolute_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (a spec's TOML, already valid) with every relative path made
    absolute against ``base``, exactly as :func:`spec_from_mapping` would
    resolve it: the same spec, readable from any directory (``svirt enable``)."""
    def rel(value: str) -> str:
        return value if Path(value).is_absolute() else str(base / value)

    out = dict(data)
    for key in ("kernel", "initrd"):
        if key in out:
            out[key] = rel(out[key])
    if "console" in out and "log" in out["console"]:
        out["console"] = {**out["console"], "log": rel(out["console"]["log"])}
    if "security" in out and "image_roots" in out["security"]:
        out["security"] = {**out["security"],
                           "image_roots": [rel(r) for r in out["security"]["image_roots"]]}
    if "disk" in out:
        disks = []
        for disk in out["disk"]:
            disk = {**disk, "path": rel(disk["path"])}
            if "backing" in disk:
                disk["backing"] = [{**layer, "path": rel(layer["path"])}
                                   for layer in disk["backing"]]
            disks.append(disk)
        out["disk"] = disks
    return out
