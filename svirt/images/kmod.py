"""Kernel modules of an unpacked kernel package: find them, read their
dependencies from ``.modinfo``, and order them so that each comes after what
it needs (what ``/init`` loads with ``insmod``, which resolves nothing)."""

from __future__ import annotations

import lzma
from collections.abc import Sequence
from pathlib import Path

from svirt.errors import ImageBuildError
from svirt.images import elf

__all__ = ["kernel_modules", "module_depends"]

_DAMAGED_HINT = "the kernel package looks damaged: empty the cache"


def module_depends(name: str, data: bytes) -> list[str]:
    """The modules ``data`` (an uncompressed ``.ko``) depends on, ``-`` read as ``_``."""
    modinfo = elf.section(data, ".modinfo")
    if modinfo is None:
        raise ImageBuildError(f"kernel module {name} has no .modinfo section",
                              hint=_DAMAGED_HINT)
    for field in modinfo.split(b"\0"):
        if field.startswith(b"depends="):
            value = field[len(b"depends=") :].decode()
            return [d.replace("-", "_") for d in value.split(",") if d]
    return []


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    return data


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        if path.name.endswith(".ko") or path.name.endswith(".ko.xz"):
            index[path.name.split(".ko")[0].replace("-", "_")] = path
    return index


def _modules_dir(tree: Path) -> Path:
    """``lib/modules/<release>`` (or under ``usr/``) of an unpacked kernel package."""
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        releases = sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
        if releases:
            return releases[-1]
    raise ImageBuildError(f"no lib/modules/<release> in {tree}", hint=_DAMAGED_HINT)


def kernel_modules(tree: Path, wanted: Sequence[str]) -> tuple[str, list[tuple[str, bytes]]]:
    """(kernel release, [(module name, .ko bytes)] in load order) for ``wanted``
    and everything they depend on, from the unpacked kernel package ``tree``."""
    moddir = _modules_dir(tree)
    index = _module_index(moddir)
    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise ImageBuildError(f"module dependency loop: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise ImageBuildError(
                f"kernel module {name} not found in {moddir}",
                hint="the kernel may have it built in; update "
                     "svirt.images.initramfs.QEMU_MODULES",
            )
        data = _read_module(path)
        for dep in module_depends(name, data):
            visit(dep, (*chain, name))
        done.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return moddir.name, ordered
