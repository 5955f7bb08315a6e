"""The spec's value vocabulary: its enums, limits and the checks of one value.

Each check raises :class:`~svirt.errors.SpecError` naming the key it was
given; the dataclasses in :mod:`svirt.spec.model` call them, and other
modules reuse them (``parse_memory``, ``show_path``) so that one value is
judged and shown the same way everywhere.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import reprlib
from pathlib import Path
from typing import TypeVar

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
MAX_VCPUS = 255
MAX_SHUTDOWN_TIMEOUT = 3600  # seconds
NIC_MODELS = ("virtio", "e1000", "rtl8139")
MAX_DISKS, MAX_NICS, MAX_BACKING = 16, 8, 16  # per guest; backing files per disk
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


