"""Reading a spec file: a bounded, non-blocking read, TOML, then the schema.

Errors name the file (shown on one line, escaped when it is not printable).
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from svirt.errors import SpecError
from svirt.spec.model import GuestSpec
from svirt.spec.schema import spec_from_mapping
from svirt.spec.values import MAX_SPEC_BYTES, _show, os_reason, show_path


def in_file(err: SpecError, path: Path | str) -> SpecError:
    """``err`` naming the spec file it came from (``path``, shown on one line)."""
    return SpecError(err.detail, source=show_path(path), key=err.key, hint=err.hint)


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

