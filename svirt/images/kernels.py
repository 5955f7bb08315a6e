"""The kernels tiny guests boot.

QEMU guests use Debian's ``linux-image-cloud-amd64`` kernel, fetched with
``apt-get download`` and unpacked (never installed) into the cache once per
version (:mod:`svirt.images.apt`); offline, any version unpacked before
will do.  UML guests use the host's ``/usr/bin/linux``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from svirt.errors import ImageBuildError
from svirt.images import apt
from svirt.images.cache import ensure_dir, locked, resolve_cache

__all__ = ["QEMU_KERNEL_PACKAGE", "qemu_kernel", "qemu_kernel_tree", "uml_kernel"]

QEMU_KERNEL_PACKAGE = "linux-image-cloud-amd64"
"""Debian metapackage naming the kernel QEMU guests boot."""

# (cache dir) -> extracted kernel tree, for this process
_kernel_trees: dict[Path, Path] = {}


def _kernel_tree_ok(tree: Path) -> bool:
    return any((tree / "boot").glob("vmlinuz-*"))


def _check_unpacked(root: Path, deb_name: str) -> None:
    if not _kernel_tree_ok(root):
        raise ImageBuildError(
            f"{deb_name} contains no boot/vmlinuz-*",
            hint=f"check what {QEMU_KERNEL_PACKAGE} depends on",
        )


def _cached_kernel_trees(kdir: Path) -> list[Path]:
    if not kdir.is_dir():
        return []
    trees = [p for p in kdir.iterdir() if not p.name.startswith(".") and _kernel_tree_ok(p)]
    return sorted(trees, key=lambda p: p.stat().st_mtime, reverse=True)


def qemu_kernel_tree(cache: Path) -> Path:
    """The unpacked kernel package (``boot/``, ``lib/modules/``), downloading it once."""
    known = _kernel_trees.get(cache)
    if known is not None and _kernel_tree_ok(known):
        return known
    kdir = cache / "kernel"
    try:
        package, version = apt.depended_on(QEMU_KERNEL_PACKAGE, "linux-image-", "kernel")
    except ImageBuildError:
        # No package lists (offline, before apt-get update): any kernel
        # unpacked before will do.
        trees = _cached_kernel_trees(kdir)
        if not trees:
            raise
        _kernel_trees[cache] = trees[0]
        return trees[0]
    dest = kdir / f"{package}_{version.replace(':', '%3a')}"
    if not _kernel_tree_ok(dest):
        ensure_dir(kdir)
        with locked(cache, "kernel"):
            if not _kernel_tree_ok(dest):
                if dest.exists():  # not ours: a tree without a kernel
                    shutil.rmtree(dest)
                apt.unpack_package(package, version, dest, check=_check_unpacked)
    _kernel_trees[cache] = dest
    return dest


def qemu_kernel(cache: Path | None = None) -> Path:
    """The ``vmlinuz`` of Debian's cloud kernel, unpacked in the cache (downloaded once)."""
    tree = qemu_kernel_tree(resolve_cache(cache))
    return sorted((tree / "boot").glob("vmlinuz-*"))[-1]


def uml_kernel() -> Path:
    """The host's User-Mode-Linux kernel binary (``/usr/bin/linux``)."""
    path = shutil.which("linux") or shutil.which("linux", path="/usr/bin:/bin")
    if path is None:
        raise ImageBuildError(
            "the User-Mode-Linux kernel 'linux' is not installed",
            hint="apt-get install user-mode-linux",
        )
    return Path(path)
