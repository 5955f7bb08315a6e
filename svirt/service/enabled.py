"""Guests enabled at boot: copies of their specs in ``/etc/svirt/guests``.

``svirt enable SPEC`` validates the spec (the errors of ``svirt start``) and
copies it to ``ENABLED_DIR/NAME.toml`` (0600 root; ``$SVIRT_ENABLED_DIR``
moves the directory, for tests).  ``svirt start --enabled`` starts each copy
through the supervisor, as ``svirt start`` would; the boot unit
(:mod:`svirt.service.units`) runs that command.

- **Relative paths** (kernel, initrd, console log, image roots, disks and
  their backing layers) are made absolute against the original spec's
  directory (the directory of the file a symlink points to, as ``svirt
  start`` resolves them), so the copy means what the original meant.  A
  spec with none is copied byte for byte; one with some is rewritten as
  TOML (its comments are not kept) with a header saying so.  Either way the
  copy is read back and must give the same spec.
- **One identity across boots.**  A spec without a ``uuid`` would get a new
  one at every start (a new AppArmor profile name, new default MACs, so new
  DHCP leases); the copy pins one: the earlier copy's when the guest was
  enabled before, else a new one, as a ``uuid = ...`` line put first.
- **Only root writes there.**  The directory and each directory above it
  are opened one component at a time from ``/``, ``O_NOFOLLOW``: a symlink
  on the way, a directory not owned by root, or one that group or others
  may write (a sticky one such as ``/tmp`` is accepted above the last
  component) is refused.  The copy is written to a new temporary name
  (``O_EXCL | O_NOFOLLOW``) and renamed over ``NAME.toml``: a symlink
  planted there is replaced, never followed.  ``NAME`` is a guest name
  (``[A-Za-z0-9_.-]``), so no ``/`` reaches a file name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tomllib
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from svirt.errors import SpecError, StateError, SvirtError
from svirt.spec import (
    NAME_RE,
    GuestSpec,
    _read_spec_file,  # the reader svirt start uses: bounded, regular files only
    absolute_paths,
    load_spec,
    spec_from_mapping,
)

DEFAULT_DIR = Path("/etc/svirt/guests")
SUFFIX = ".toml"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def enabled_dir() -> Path:
    """Where enabled guests' specs are: ``/etc/svirt/guests`` or ``$SVIRT_ENABLED_DIR``."""
    env = os.environ.get("SVIRT_ENABLED_DIR")
    return Path(env) if env else DEFAULT_DIR


@dataclass(frozen=True)
class Enabled:
    """An enabled guest: its name and the copy of its spec."""

    name: str
    path: Path


@dataclass(frozen=True)
class EnableResult:
    name: str
    path: Path
    #: the copy replaced an earlier one of the same name
    replaced: bool
    #: relative paths were made absolute (the copy is rewritten TOML)
    rewritten: bool
    #: the spec had no uuid: the copy pins this one (None: the spec's own)
    pinned_uuid: str | None = None


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StateError(f"{name!r} is not a guest name",
                         hint="a guest name is 1-64 of A-Z a-z 0-9 _ . -")


# ---------------------------------------------------------------- directory
def _refuse(path: str, why: str) -> StateError:
    return StateError(f"enabled-guests directory: {path}: {why}",
                      hint="it and every directory above it must be root's and not "
                           "writable by group or others (chown root, chmod go-w)")


def open_dir(*, create: bool) -> int | None:
    """An fd of the enabled-guests directory, every component checked; None
    when it does not exist and ``create`` is false."""
    path = enabled_dir()
    if not path.is_absolute() or "\0" in str(path):
        raise StateError(f"SVIRT_ENABLED_DIR must be an absolute path, not {str(path)!r}")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    shown = ""
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            shown += "/" + part
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(part, 0o700 if last else 0o755, dir_fd=fd)
                nfd = os.open(part, flags, dir_fd=fd)
                os.fchown(nfd, 0, 0)
                os.fchmod(nfd, 0o700 if last else 0o755)  # whatever the umask
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse(shown, "a symbolic link or not a directory") from None
                raise
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            if st.st_uid != 0:
                raise _refuse(shown, f"owned by uid {st.st_uid}, not root")
            if st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
                raise _refuse(shown, f"mode {stat.S_IMODE(st.st_mode):o}: "
                                     "writable by group or others")
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _entry(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name + SUFFIX, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _file_problem(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a symlink?)"
    if st.st_uid != 0 or st.st_mode & 0o022:
        return f"not root's alone (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
    return None


# ---------------------------------------------------------------- the verbs
def enable(source: Path | str) -> EnableResult:
    """Validate ``source`` and copy it to the enabled-guests directory."""
    source = Path(source)
    spec = load_spec(source)  # the errors of svirt start, exit code 2
    shown = str(source)
    try:
        text = _read_spec_file(source)
        data = tomllib.loads(text)
        base = Path(os.path.realpath(source)).parent
    except (SpecError, tomllib.TOMLDecodeError, OSError) as err:
        raise SpecError(f"{shown}: changed while it was being enabled ({err})") from None
    absolute = absolute_paths(data, base)
    header = f"# svirt enable: a copy of {json.dumps(str(source.absolute()))}\n"
    rewritten = absolute != data
    if rewritten:
        header += (f"# relative paths made absolute against {json.dumps(str(base))};"
                   " the original's comments are not kept\n")
        text = to_toml(absolute)
    pinned = None
    if "uuid" not in data:
        spec = replace(spec, uuid=_earlier_uuid(spec.name) or spec.uuid)
        pinned = str(spec.uuid)
        header += "# uuid pinned by svirt enable: the same profile name and MACs at every boot\n"
        text = f'uuid = "{pinned}"\n' + text
    copy = header + text
    again = spec_from_mapping(tomllib.loads(copy), None)
    if again != spec:
        raise SpecError(f"{shown}: changed while it was being enabled",
                        hint="run svirt enable again")
    dfd = open_dir(create=True)
    assert dfd is not None  # noqa: S101 - create=True
    try:
        replaced = _entry(dfd, spec.name) is not None
        _write(dfd, spec.name + SUFFIX, copy.encode())
    finally:
        os.close(dfd)
    return EnableResult(spec.name, enabled_dir() / (spec.name + SUFFIX), replaced, rewritten,
                        pinned)


def _earlier_uuid(name: str) -> uuidlib.UUID | None:
    """The uuid of guest ``name``'s enabled copy, if it has a readable one."""
    try:
        _path, spec = enabled_spec(name)
    except SvirtError:
        return None
    return spec.uuid


def _write(dfd: int, final: str, data: bytes) -> None:
    """``data`` into a new 0600 root file, renamed over ``final`` (whatever it was)."""
    tmp = f".{final}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dfd)
    try:
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        raise
    os.fsync(dfd)


def disable(name: str) -> Path:
    """Remove guest ``name``'s enabled copy; StateError when it has none."""
    check_name(name)
    dfd = open_dir(create=False)
    try:
        if dfd is None or _entry(dfd, name) is None:
            raise StateError(f"guest {name} is not enabled",
                             hint="svirt enable --list shows the enabled guests")
        os.unlink(name + SUFFIX, dir_fd=dfd)
        os.fsync(dfd)
    finally:
        if dfd is not None:
            os.close(dfd)
    return enabled_dir() / (name + SUFFIX)


def enabled_guests() -> tuple[list[Enabled], list[str]]:
    """The enabled guests by name, and a line for each entry skipped (a
    symlink, a file not root's alone, a name that is no guest name)."""
    dfd = open_dir(create=False)
    if dfd is None:
        return [], []
    guests: list[Enabled] = []
    problems: list[str] = []
    try:
        for entry in sorted(os.listdir(dfd)):
            if not entry.endswith(SUFFIX) or entry.startswith("."):
                continue
            name = entry[: -len(SUFFIX)]
            path = enabled_dir() / entry
            st = _entry(dfd, name)
            if st is None:
                continue  # removed meanwhile
            problem = _file_problem(st) if NAME_RE.fullmatch(name) else "not a guest name"
            if problem:
                problems.append(f"{path}: {problem}: skipped")
            else:
                guests.append(Enabled(name, path))
    finally:
        os.close(dfd)
    return guests, problems


def enabled_spec(name: str) -> tuple[Path, GuestSpec]:
    """Guest ``name``'s enabled copy and its spec; StateError when it has none."""
    check_name(name)
    guests, problems = enabled_guests()
    for guest in guests:
        if guest.name == name:
            spec = load_spec(guest.path)
            if spec.name != name:
                raise SpecError(f"{guest.path}: names guest {spec.name}, not {name}")
            return guest.path, spec
    bad = [p for p in problems if p.startswith(f"{enabled_dir() / (name + SUFFIX)}:")]
    raise StateError(bad[0] if bad else f"guest {name} is not enabled",
                     hint="svirt enable --list shows the enabled guests")


# ---------------------------------------------------------------- TOML out
def to_toml(data: Mapping[str, Any]) -> str:
    """A spec's data as TOML: one ``key = value`` line per top-level key,
    tables inline.  Read back, it must be ``data`` again (checked)."""
    text = "".join(f"{_key(k)} = {_value(v)}\n" for k, v in data.items())
    if tomllib.loads(text) != data:
        raise SpecError("the spec cannot be written back as TOML unchanged",
                        hint="use absolute paths in the spec instead")
    return text


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(value: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX) are TOML's; DEL is not escaped by JSON
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf, -inf, nan and 1e+16 are TOML too
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise SpecError(f"cannot write {type(value).__name__} values back as TOML")
