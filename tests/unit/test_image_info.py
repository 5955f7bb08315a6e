"""``svirt image info`` on small disks made here: svirt's GPT writer, a real
FAT ESP, raw, qcow2, compressed qcow2 and an overlay; and the build's pure
parts (GRUB's boot sector patching, sizes, recipe checks, cache keys)."""

from __future__ import annotations

import struct
import uuid
import zlib
from pathlib import Path

import pytest

from svirt.errors import ImageBuildError
from svirt.images import debian
from svirt.images.disk import BLOCKLIST, patch_boot_img, patch_core_img
from svirt.images.info import format_text, inspect_image
from svirt.images.parttable import SECTOR, gpt_layout, gpt_sectors, protective_mbr
from tests import diskcraft

pytestmark = pytest.mark.skipif(diskcraft.have_tools() is not None,
                                reason=str(diskcraft.have_tools()))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return diskcraft.make_disk(tmp_path_factory.mktemp("disk") / "disk.raw")


def _boots(path: Path) -> tuple[bool, bool]:
    info = inspect_image(path)
    return info.bios, info.uefi


def test_raw_gpt_disk(raw: Path) -> None:
    info = inspect_image(raw)
    assert (info.format, info.virtual_size, info.partition_table) == ("raw", 64 << 20, "gpt")
    assert [p["type"] for p in info.partitions] == ["bios-boot", "esp", "linux-root-x86-64"]
    assert info.bios and info.bios_detail == "GRUB (core image at sector 2048)"
    assert info.uefi and "partition 2" in info.uefi_detail
    text = "\n".join(format_text(info))
    assert "boots via BIOS:  yes" in text and "boots via UEFI:  yes" in text


@pytest.mark.parametrize("compress", [(), ("-c",)])
def test_qcow2_and_compressed(raw: Path, tmp_path: Path, compress: tuple[str, ...]) -> None:
    q = diskcraft.to_qcow2(raw, tmp_path / "d.qcow2", *compress)
    info = inspect_image(q)
    assert info.format == "qcow2" and info.virtual_size == 64 << 20
    assert (info.bios, info.uefi) == (True, True)


def test_overlay_reads_through_its_chain(raw: Path, tmp_path: Path) -> None:
    base = diskcraft.to_qcow2(raw, tmp_path / "base.qcow2", "-c")
    mid = diskcraft.overlay(base, tmp_path / "mid.qcow2")
    top = diskcraft.overlay(mid, tmp_path / "top.qcow2")
    info = inspect_image(top)
    assert [(c.path, c.format) for c in info.chain] == [(str(mid), "qcow2"),
                                                        (str(base), "qcow2")]
    assert (info.bios, info.uefi) == (True, True)
    raw_top = diskcraft.overlay(raw, tmp_path / "rawtop.qcow2", fmt="raw")
    assert inspect_image(raw_top).chain[0].format == "raw"


def test_what_does_not_boot(tmp_path: Path) -> None:
    plain = diskcraft.make_disk(tmp_path / "plain.raw", loader=None, grub=False)
    info = inspect_image(plain)
    assert (info.bios, info.uefi) == (False, False)
    assert "no boot code" in info.bios_detail and "no EFI/BOOT/BOOTX64.EFI" in info.uefi_detail
    notpe = diskcraft.make_disk(tmp_path / "notpe.raw", loader=b"#!/bin/sh\n" * 10)
    assert "not a PE file" in inspect_image(notpe).uefi_detail
    empty = tmp_path / "empty.raw"
    empty.write_bytes(bytes(1 << 20))
    info = inspect_image(empty)
    assert (info.partition_table, info.bios, info.uefi) == ("none", False, False)


def test_gpt_written_is_valid() -> None:
    size = 64 << 20
    parts = gpt_layout(size, esp=32 << 20)
    primary, backup = gpt_sectors(size, parts, uuid.UUID(int=1), b"k")
    header, array = primary[:92], primary[SECTOR:]
    assert header[:8] == b"EFI PART"
    assert struct.unpack_from("<I", header, 16)[0] == zlib.crc32(
        header[:16] + bytes(4) + header[20:92])
    assert struct.unpack_from("<I", header, 88)[0] == zlib.crc32(array)
    assert backup[:len(array)] == array and backup[-SECTOR:-SECTOR + 8] == b"EFI PART"
    assert protective_mbr(size)[450] == 0xEE
    # the same key gives the same disk: reproducible images
    assert gpt_sectors(size, parts, uuid.UUID(int=1), b"k") == (primary, backup)


def test_grub_boot_sector_patching() -> None:
    boot = patch_boot_img(bytes(range(256)) * 2, 2048)
    assert struct.unpack_from("<Q", boot, 0x5C)[0] == 2048
    assert boot[0x64] == 0xFF and boot[0x66:0x68] == b"\x90\x90"
    core = patch_core_img(b"\x01" * 1500, 2048)
    assert len(core) == 1536
    assert struct.unpack_from("<QH", core, BLOCKLIST) == (2049, 2)
    with pytest.raises(ImageBuildError):
        patch_boot_img(b"short", 1)


def test_sizes_and_recipe_checks() -> None:
    assert debian.parse_size("4G") == 4 << 30
    assert debian.parse_size("512MiB") == 512 << 20
    assert debian.parse_size("2t") == 2 << 40
    for bad in ("", "4X", "-1G", "1e9"):
        with pytest.raises(ImageBuildError):
            debian.parse_size(bad)
    for kwargs in ({"size": 1 << 20}, {"release": "../x"}, {"packages": ("-o",)},
                   {"bios": False, "uefi": False}, {"mirror": "ftp://x y"}):
        with pytest.raises(ImageBuildError):
            debian.DebianRecipe(**kwargs)


def test_cache_key_covers_the_inputs() -> None:
    base = debian.image_key(debian.DebianRecipe())
    assert base == debian.image_key(debian.DebianRecipe())
    for kwargs in ({"release": "trixie"}, {"size": 8 << 30}, {"packages": ("vim",)},
                   {"uefi": False}, {"bios": False}):
        assert debian.image_key(debian.DebianRecipe(**kwargs)) != base
    # the order and repetition of --packages does not matter
    assert debian.image_key(debian.DebianRecipe(packages=("a1", "b1"))) == \
        debian.image_key(debian.DebianRecipe(packages=("b1", "a1", "a1")))


def test_terminal_progress_line(tmp_path: Path) -> None:
    import io
    import time

    from svirt.cli.image import TerminalProgress

    out = io.StringIO()
    target = tmp_path / "out.qcow2"
    (tmp_path / ".out.qcow2.abc.tmp").write_bytes(b"x" * (3 << 20))  # the file being written
    with TerminalProgress(out) as progress:
        progress("copy", target)
        time.sleep(1.2)
    text = out.getvalue()
    assert "copy" in text and "3.0 MiB" in text and text.endswith("\r\x1b[K")
