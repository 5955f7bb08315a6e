"""Backing chains: which lower layers a qcow2 disk pulls in.

``qemu-img info --backing-chain --output=json`` is run with the format the
spec names (``-f``), never letting qemu-img probe the top image.  A backing
file whose format the image header does not record is refused: probing it
would let a guest that wrote a qcow2 header into a raw image name any host
file as its backing store (CVE-2010-2237).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from svirt.backends.base import Access, Resource, ResourceKind
from svirt.errors import HostError, SecurityError
from svirt.spec import Disk, DiskFormat

KNOWN_FORMATS = {"raw", "qcow2"}


def backing_chain(disk: Disk) -> list[Path]:
    """The backing files below ``disk`` (top first), empty for raw disks."""
    if disk.format is DiskFormat.RAW:
        return []
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise HostError("qemu-img is not installed (needed for qcow2 disks)",
                        hint="apt-get install --no-install-recommends qemu-utils")
    proc = subprocess.run(  # noqa: S603 - fixed argv
        [qemu_img, "info", "--backing-chain", "--output=json", "-f", str(disk.format),
         "-U", str(disk.path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if proc.returncode != 0:
        raise SecurityError(f"{disk.path}: qemu-img info failed: {proc.stderr.strip()}",
                            path=disk.path)
    return parse_chain(json.loads(proc.stdout), disk.path)


def parse_chain(info: Any, top: Path) -> list[Path]:
    layers = info if isinstance(info, list) else [info]
    out: list[Path] = []
    for layer in layers:
        backing = layer.get("full-backing-filename") or layer.get("backing-filename")
        if not backing:
            break
        fmt = layer.get("backing-filename-format")
        if fmt not in KNOWN_FORMATS:
            raise SecurityError(
                f"{layer.get('filename', top)}: backing file {backing} has "
                f"{'no recorded format' if fmt is None else f'format {fmt}'}; "
                "svirt will not let its format be probed",
                path=top,
                hint="record it: qemu-img rebase -u -F raw|qcow2 -b BACKING IMAGE",
            )
        out.append(Path(str(backing)))
    return out


def chain_resources(disks: tuple[Disk, ...]) -> list[Resource]:
    """Read-only resources for every lower layer of every disk."""
    out: list[Resource] = []
    for disk in disks:
        for layer in backing_chain(disk):
            out.append(Resource(layer, Access.RO, ResourceKind.BACKING, relabel=disk.relabel))
    return out
