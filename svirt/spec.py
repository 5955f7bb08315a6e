"""GuestSpec: what a guest is, as frozen data validated once.

A spec is built in Python (``GuestSpec(name=..., ...)``) or loaded from TOML
(:func:`load_spec`); both give the same object.  Every later step trusts it.
Errors name the source file (when there is one), the key and what is wrong.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
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
MIN_MEMORY_MIB = 16
E = TypeVar("E", bound=enum.StrEnum)


class Backend(enum.StrEnum):
    QEMU = "qemu"
    UML = "uml"
    LGUEST = "lguest"


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
    DAC = "dac"
    NONE = "none"


def _fail(key: str, message: str, hint: str | None = None) -> SpecError:
    return SpecError(message, key=key, hint=hint)


def _path(key: str, value: object) -> Path:
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str) and value:
        path = Path(value)
    else:
        raise _fail(key, f"expected a path, got {value!r}")
    if "\0" in str(path):
        raise _fail(key, "path contains a NUL byte")
    return Path(os.path.abspath(path))


def _regular_file(key: str, path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _fail(key, f"{path} does not exist") from None
    except OSError as err:
        raise _fail(key, f"{path}: {err.strerror}") from None
    if not (st.st_mode & 0o170000 == 0o100000 or st.st_mode & 0o170000 == 0o060000):
        raise _fail(key, f"{path} is not a regular file or block device")


def _enum(cls: type[E], key: str, value: object) -> E:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise _fail(key, f"{value!r} is not one of: {choices}") from None


def host_memory_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0  # pragma: no cover - every Linux has MemTotal


def parse_memory(value: object, key: str = "memory") -> int:
    """Memory in MiB from an int (MiB) or a string like ``256M`` / ``1G``."""
    if isinstance(value, bool):
        raise _fail(key, f"expected MiB or a size like '256M', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:([KMGT])(?:i?B)?)?\s*", value, re.IGNORECASE)
        if m:
            n, unit = int(m.group(1)), (m.group(2) or "").upper()
            scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
            return int(n * scale)
    raise _fail(key, f"expected MiB or a size like '256M', got {value!r}")


@dataclass(frozen=True)
class Disk:
    path: Path
    format: DiskFormat = DiskFormat.RAW
    readonly: bool = False
    shared: bool = False
    relabel: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("disk.path", self.path))
        object.__setattr__(self, "format", _enum(DiskFormat, "disk.format", self.format))
        _regular_file("disk.path", self.path)


@dataclass(frozen=True)
class Console:
    mode: ConsoleMode = ConsoleMode.NONE
    log: Path | None = None

    def __post_init__(self) -> None:
        mode = _enum(ConsoleMode, "console.mode", self.mode)
        if self.log is not None:
            object.__setattr__(self, "log", _path("console.log", self.log))
            if mode is ConsoleMode.NONE:
                mode = ConsoleMode.LOG
        if mode is ConsoleMode.LOG and self.log is None:
            raise _fail("console.log", "mode 'log' needs a log file path")
        object.__setattr__(self, "mode", mode)
        if self.log is not None and not self.log.parent.is_dir():
            raise _fail("console.log", f"directory {self.log.parent} does not exist")


@dataclass(frozen=True)
class Nic:
    bridge: str | None = None
    mac: str | None = None
    isolated: bool = False
    model: str = "virtio"

    def __post_init__(self) -> None:
        if self.bridge is not None and not BRIDGE_RE.fullmatch(self.bridge):
            raise _fail("nic.bridge", f"{self.bridge!r} is not a valid interface name")
        if self.mac is not None:
            mac = self.mac.lower()
            if not MAC_RE.fullmatch(mac):
                raise _fail("nic.mac", f"{self.mac!r} is not a MAC address like 52:54:00:12:34:56")
            if int(mac[:2], 16) & 1:
                raise _fail("nic.mac", f"{self.mac!r} is a multicast address")
            object.__setattr__(self, "mac", mac)
        if self.model not in ("virtio", "e1000", "rtl8139"):
            raise _fail("nic.model", f"{self.model!r} is not one of: virtio, e1000, rtl8139")


@dataclass(frozen=True)
class Security:
    model: SecurityModel = SecurityModel.AUTO
    type: str | None = None  # process type, e.g. a webserver guest type
    label: str | None = None  # static process label: no category pair is allocated
    relabel: bool = True  # False: leave resource labels alone (static labels)
    image_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _enum(SecurityModel, "security.model", self.model))
        if self.type is not None and not re.fullmatch(r"[a-z][a-z0-9_]*_t", self.type):
            raise _fail("security.type", f"{self.type!r} is not an SELinux type name (xxx_t)")
        if self.label is not None and self.label.count(":") < 3:
            raise _fail("security.label", f"{self.label!r} is not user:role:type:level")
        roots = tuple(_path("security.image_roots", r) for r in self.image_roots)
        object.__setattr__(self, "image_roots", roots)


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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise _fail(
                "name",
                f"{self.name!r} is not 1-64 characters of A-Z a-z 0-9 _ . -",
                hint="names may not contain '/', ',' or spaces",
            )
        if self.name.startswith("."):
            raise _fail("name", f"{self.name!r} may not start with a dot")
        backend = _enum(Backend, "backend", self.backend)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "accel", _enum(Accel, "accel", self.accel))
        if isinstance(self.uuid, str):
            try:
                object.__setattr__(self, "uuid", uuidlib.UUID(self.uuid))
            except ValueError:
                raise _fail("uuid", f"{self.uuid!r} is not a UUID") from None
        memory = parse_memory(self.memory)
        object.__setattr__(self, "memory", memory)
        if memory < MIN_MEMORY_MIB:
            raise _fail("memory", f"{memory} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")
        host = host_memory_mib()
        if memory > host:
            raise _fail("memory", f"{memory} MiB is more than this host's {host} MiB")
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise _fail("vcpus", f"expected a positive integer, got {self.vcpus!r}")
        if self.vcpus > 255:
            raise _fail("vcpus", f"{self.vcpus} is more than 255")
        if backend is not Backend.QEMU and self.vcpus != 1:
            raise _fail("vcpus", f"the {backend} backend runs exactly 1 vcpu")
        object.__setattr__(self, "kernel", _path("kernel", self.kernel))
        _regular_file("kernel", self.kernel)
        if self.initrd is not None:
            object.__setattr__(self, "initrd", _path("initrd", self.initrd))
            _regular_file("initrd", self.initrd)
            if backend is not Backend.QEMU and re.search(r"\s", str(self.initrd)):
                raise _fail("initrd", f"{self.initrd}: spaces cannot pass on a kernel command line")
        if not isinstance(self.cmdline, str) or "\n" in self.cmdline or "\0" in self.cmdline:
            raise _fail("cmdline", "expected a single-line string")
        if isinstance(self.shutdown_timeout, bool) or not isinstance(
            self.shutdown_timeout, int | float
        ):
            raise _fail("shutdown_timeout", f"expected seconds, got {self.shutdown_timeout!r}")
        if not 0 < self.shutdown_timeout <= 3600:
            raise _fail("shutdown_timeout", "must be between 0 and 3600 seconds")
        self._check_disks(backend)
        if self.netns is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.netns):
            raise _fail("netns", f"{self.netns!r} is not a network namespace name")

    def _check_disks(self, backend: Backend) -> None:
        seen: dict[tuple[int, int], Path] = {}
        for disk in self.disks:
            st = disk.path.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise _fail(
                    "disk.path", f"{disk.path} is listed twice (also as {seen[key]})"
                )
            seen[key] = disk.path
            if backend is Backend.UML and re.search(r"[\s,:=]", str(disk.path)):
                raise _fail(
                    "disk.path",
                    f"{disk.path}: UML reads ',' ':' '=' and spaces in disk paths as syntax",
                    hint="rename the file or use a symlink-free path without them",
                )
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
    "shutdown_timeout": (int, float),
    "console": (dict,),
    "security": (dict,),
    "disk": (list,),
    "nic": (list,),
}
_SECTION_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "console": {"mode": (str,), "log": (str,)},
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
    },
    "nic": {"bridge": (str,), "mac": (str,), "isolated": (bool,), "model": (str,)},
}


def _check_table(
    table: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]], prefix: str
) -> None:
    for key, value in table.items():
        full = f"{prefix}{key}"
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
                    items.append(_indexed(Disk, entry, f"disk[{i}]"))
                else:
                    items.append(_indexed(Nic, entry, f"nic[{i}]"))
            kwargs[key + "s"] = tuple(items)
        else:
            kwargs[key] = value
    return GuestSpec(**kwargs)


def _indexed(cls: type[Any], entry: dict[str, Any], where: str) -> Any:
    try:
        return cls(**entry)
    except SpecError as err:
        key = (err.key or "").split(".", 1)[-1]
        raise SpecError(err.detail, key=f"{where}.{key}", hint=err.hint) from None


def load_spec(path: Path | str) -> GuestSpec:
    """Load and validate a guest spec from a TOML file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML: {err}") from None
    except OSError as err:
        raise SpecError(f"{path}: {err.strerror}") from None
    try:
        return spec_from_mapping(data, base=path.resolve().parent)
    except SpecError as err:
        raise SpecError(err.detail, source=str(path), key=err.key, hint=err.hint) from None
