"""UML host options are the backend's, never the spec's.

The ``linux`` binary reads its own argv before the guest kernel sees it:
``ubd0=FILE``, ``hostfs=DIR``, ``con0=CHANNEL``, ``eth0=tuntap,...``,
``umid=``, ``uml_dir=``, ``mem=`` and the rest open, map or name *host*
objects, and ``--help``/``--version``/``--showconfig`` are host actions.  The
uml backend sets the ones it needs itself (``build_uml_argv``) and appends
``spec.cmdline`` word by word after them, so a spec word such as
``ubd1=/etc/shadow`` would reach UML, not the guest kernel.
:func:`refuse_host_options` rejects such words before anything is touched.

Where the list comes from
-------------------------

``linux --help`` prints one entry for every option this build registers
(arch options such as ``mem=``, drivers such as ``ubd``, ``con``, ``eth``).
An entry starts at column 0 (``ubd<n><flags>=<filename>...``,
``con[0-9]*=<channel description>``, ``noreboot``); its name is turned into
a pattern: literal text (``-`` and ``_`` alike, as the kernel compares
them), ``[0-9]*``-style classes kept, ``<n>`` = a unit number or letter,
other ``<...>`` = any word characters; then the ``=`` or ``:`` the entry
shows.  An entry without one is a flag and matches as a prefix, as UML's
own ``strncmp`` does.  A leading ``"`` is ignored (the generic kernel
strips it before it looks a parameter up).

The help of the host's UML binary (found on root's PATH, the same one the
host probe reports) is parsed once per binary path, size and mtime and
cached beside the host probe cache.  The binary named by ``spec.kernel`` is
never run for this: it is a file from an image root, and the launcher does
not execute spec-named files as root.  :data:`FALLBACK_HELP` (Debian 12's
UML 6.1 plus options other UML versions register) is always added, so a
binary that cannot be run, a different kernel build or a bad cache entry can
only add patterns, never remove one.

Which listed options a spec may still use
-----------------------------------------

UML's help also lists a few **generic kernel parameters**:
:data:`GUEST_KERNEL_OPTIONS` (``root=``, ``console=``, ``quiet``, ``debug``).
UML only notes them and leaves the word on the command line for the guest
kernel, which reads them as any kernel does; they name no host object.
Every other listed entry is host-side: it names a host file, directory,
socket, channel or terminal (``ubd``, ``hostfs=``, ``con``, ``ssl``,
``eth``, ``vec``, ``iomem=``, ``initrd=``, ``mconsole=``, ``umid=``,
``uml_dir=``, ``xterm=``, ``virtio_uml.device=``), sizes the host process
(``mem=``) or changes how UML runs on the host (``noreboot``, ``nosysemu``,
``ssl-non-raw``, ``udb``, ``fake_ide``, the ``--`` actions).  Any word that
starts with ``-`` is refused too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.errors import SpecError
from svirt.host import UML_BINARY, HostInfo, _cache_file, write_cache
from svirt.spec import GuestSpec

#: help entries that are generic kernel parameters UML passes on unchanged
GUEST_KERNEL_OPTIONS = frozenset({"root=", "console=", "quiet", "debug"})

#: ``linux --help`` entry lines (the part before any value) of Debian 12's
#: UML 6.1, plus host options other UML versions register
FALLBACK_HELP = (
    # user-mode-linux 6.1 (Debian 12)
    "--showconfig", "iomem=<name>", "mem=<amount>", "--help", "console=<console>",
    "debug", "root=<file>", "--version", "umid=<name>", "initrd=<image>",
    "con[0-9]*=<channel>", "ssl-non-raw", "ssl[0-9]*=<channel>", "vec[0-9]+:<option>",
    "eth[0-9]+=<transport>", "mconsole=notify:<socket>", "udb",
    "ubd<n><flags>=<filename>", "fake_ide", "xterm=<terminal>",
    "virtio_uml.device=<socket>", "nosysemu", "uml_dir=<directory>", "quiet",
    "noreboot", "hostfs=<root dir>",
    # older UMLs and other configurations (hostaudio built in, time travel)
    "dsp=<dsp device>", "mixer=<mixer device>", "time-travel", "tty_log_dir=<dir>",
    "tty_log_fd=<fd>", "aio=<mode>", "ncpus=<n>", "honeypot",
)

_HELP_TIMEOUT = 5.0
_HELP_MAX = 256 * 1024
_CACHE_NAME = "uml-options.json"
_CACHE_KEEP = 8
_memo: dict[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class HostOption:
    """One ``--help`` entry: its name as printed and the pattern of its words."""

    heading: str
    pattern: re.Pattern[str]


_TOKEN = re.compile(
    r"(?P<lit>[A-Za-z0-9_.-]+)|(?P<cls>\[[0-9A-Za-z-]+\][*+?]?)|(?P<ph><[^<>=:]*>)"
    r"|(?P<sep>[=:])|(?P<end>\s*$)"
)


def _entry(line: str) -> tuple[str, str] | None:
    """``(heading, regex)`` for one column-0 help line, or None if it is not an option."""
    parts: list[str] = []
    heading = ""
    pos = 0
    while True:
        m = _TOKEN.match(line, pos)
        if m is None:
            return None  # a space or other text before '=': prose, not an option
        pos = m.end()
        kind = m.lastgroup
        text = m.group()
        if kind == "end" or kind == "sep":
            if not parts or not heading[:1].isalpha() and not heading.startswith("-"):
                return None
            if kind == "sep":
                heading += text
                parts.append(re.escape(text))
            return heading, "".join(parts)
        heading += text
        if kind == "lit":
            parts.append("".join("[-_]" if c in "-_" else re.escape(c) for c in text))
        elif kind == "cls":
            parts.append(text)
        elif text == "<n>":
            parts.append(r"(?:\d+|[a-z])")  # ubd0 or ubda
        elif text == "<flags>":
            parts.append("[a-z]*")
        else:
            parts.append(r"[\w.-]*")


def parse_help(text: str) -> list[HostOption]:
    """Every option entry of a ``linux --help`` text, generic kernel ones included."""
    options: list[HostOption] = []
    seen: set[str] = set()
    for line in text[:_HELP_MAX].splitlines():
        if not line or line[0].isspace():
            continue  # description
        entry = _entry(line)
        if entry is None or entry[0] in seen:
            continue
        heading, regex = entry
        seen.add(heading)
        options.append(HostOption(heading, re.compile('"*' + regex)))
    return options


def help_text(binary: str | Path) -> str:
    """What ``BINARY --help`` prints, read from the binary without running it
    (running UML from the launcher needs execmem, which SELinux denies to the
    launcher's domain): the strings its ``.uml.help.init`` section points to.
    Empty when the file is not such an ELF binary."""
    import mmap

    try:
        with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return "\n".join(_elf_help_strings(data))[:_HELP_MAX]
    except (OSError, ValueError, struct.error, IndexError):
        return ""


def _elf_help_strings(data: Any) -> list[str]:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # ELF64, little-endian
        return []
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize < 64 or shnum > 4096 or shstrndx >= shnum:
        return []
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]  # sh_offset

    def name(index: int) -> bytes:
        start = names_at + index
        return bytes(data[start:data.find(b"\0", start)])

    def offset_of(address: int) -> int | None:
        for _n, kind, _flags, addr, offset, size in sections:
            if kind != 8 and addr <= address < addr + size:  # 8: SHT_NOBITS
                return int(offset + address - addr)
        return None

    out: list[str] = []
    for n, _kind, _flags, _addr, offset, size in sections:
        if name(n) != b".uml.help.init":
            continue
        for at in range(offset, offset + min(size, 8 * 512), 8):
            (pointer,) = struct.unpack_from("<Q", data, at)
            start = offset_of(pointer)
            if start is None:
                continue
            end = data.find(b"\0", start, start + 8192)
            if end > start:
                out.append(bytes(data[start:end]).decode(errors="replace"))
    return out


def _binary_headings(binary: str | Path) -> tuple[str, ...]:
    """The option headings ``binary --help`` lists, cached per path, size and mtime."""
    try:
        path = os.path.realpath(binary)
        st = os.stat(path)
    except (OSError, ValueError):
        return ()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    if key in _memo:
        return _memo[key]
    cache_path = _cache_file().with_name(_CACHE_NAME)
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    cached = cache.get(key)
    if (isinstance(cached, list) and cached
            and all(isinstance(h, str) and len(h) <= 200 for h in cached)):
        _memo[key] = tuple(cached)
        return _memo[key]
    headings = tuple(o.heading for o in parse_help(help_text(path)))
    if not headings:
        return ()  # not cached: asked again next time (a fix of the host may help)
    _memo[key] = headings
    kept = [(k, v) for k, v in cache.items() if k != key][-(_CACHE_KEEP - 1):]
    write_cache(cache_path, {**dict(kept), key: list(headings)})
    return headings


def host_options(binary: str | Path | None) -> list[HostOption]:
    """The host-side options of ``binary`` (the host's UML), plus the built-in list.

    Generic kernel parameters (:data:`GUEST_KERNEL_OPTIONS`) are left out.
    """
    headings = (*(_binary_headings(binary) if binary is not None else ()), *FALLBACK_HELP)
    options: dict[str, HostOption] = {}
    for option in parse_help("\n".join(headings)):
        if option.heading not in GUEST_KERNEL_OPTIONS:
            options.setdefault(option.pattern.pattern, option)
    return list(options.values())


def host_option_patterns(binary: str | Path | None) -> list[re.Pattern[str]]:
    """Patterns of the words UML ``binary`` would take as host options.

    ``None``, a missing binary or one that cannot be run: the built-in list.
    """
    return [o.pattern for o in host_options(binary)]


def _host_uml(host: HostInfo | None) -> str | None:
    """The host's UML binary, as the host probe found it on root's PATH."""
    if host is None:
        return shutil.which(UML_BINARY)
    binary = host.binary(UML_BINARY)
    return binary.path if binary is not None else None


def _show(word: str) -> str:
    return repr(word if len(word) <= 60 else word[:57] + "...")


def refuse_host_options(spec: GuestSpec, host: HostInfo | None = None) -> None:
    """Raise :class:`SpecError` (key ``cmdline``) for a word UML would read itself."""
    words = spec.cmdline.split()
    if not words:
        return
    hint = ("the uml backend sets UML's host options itself (mem=, umid=, uml_dir=, con=, "
            "ssl=, con0=, initrd=, ubdN=, ethN=) from memory, name, console, initrd, disk "
            "and nic; leave them out of cmdline")
    for word in words:
        if word.startswith("-"):
            raise SpecError(
                f"{_show(word)}: UML would take a word starting with '-' as a host "
                "option (--help, --version, --showconfig), not pass it to the guest kernel",
                key="cmdline", hint="no cmdline word may start with '-'")
    options = host_options(_host_uml(host))
    for word in words:
        for option in options:
            if option.pattern.match(word):
                raise SpecError(
                    f"{_show(word)}: UML would take this as a host option "
                    f"({option.heading}), not pass it to the guest kernel",
                    key="cmdline", hint=hint)
