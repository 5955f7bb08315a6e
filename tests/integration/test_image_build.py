"""``svirt image build debian`` and ``svirt image info`` with the real parts.

One build per session (the ``debian_image`` fixture: cached across
sessions in the image cache), one boot per firmware per module (plain QEMU
under TCG, see debian_guest.py).  The timings go to the terminal summary
(``-rP`` or ``-s`` shows them): build (cold or cached), image size,
QEMU start to qemu-ga and to cloud-init's hostname, per firmware.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.images.firmware import OVMF_CODE, SEABIOS
from svirt.testing import DebianImage

from .debian_guest import HOSTNAME, MARKER, DebianGuest, debian_guest

SVIRT = [sys.executable, "-m", "svirt"]


def _report(what: str) -> None:
    print(f"[image-build] {what}", file=sys.stderr)


def test_info_of_the_built_image(debian_image: DebianImage) -> None:
    size = debian_image.path.stat().st_size
    _report(f"image {'built' if debian_image.built else 'cached'} in "
            f"{debian_image.seconds:.1f} s; {size / 2**20:.0f} MiB")
    out = subprocess.run([*SVIRT, "image", "info", "--json", str(debian_image.path)],
                         capture_output=True, text=True, timeout=60, check=True,
                         user=65534)  # nobody: info needs no root
    info = json.loads(out.stdout)
    assert info["format"] == "qcow2"
    assert info["virtual_size"] == 4 << 30
    assert info["chain"] == []
    assert info["partition_table"] == "gpt"
    assert [p["type"] for p in info["partitions"]] == ["bios-boot", "esp",
                                                        "linux-root-x86-64"]
    assert info["bios"] and "GRUB" in info["bios_detail"]
    assert info["uefi"] and "EFI/BOOT/BOOTX64.EFI" in info["uefi_detail"]
    text = subprocess.run([*SVIRT, "image", "info", str(debian_image.path)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "boots via BIOS:  yes" in text and "boots via UEFI:  yes" in text


def test_build_from_the_cache_is_quick_and_atomic(debian_image: DebianImage,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "mine.qcow2"
    start = time.monotonic()
    proc = subprocess.run([*SVIRT, "image", "build", "debian", str(out)],
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # quiet in a pipe
    assert out.stat().st_size == debian_image.path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["mine.qcow2"]  # no temporary left
    _report(f"build from the cache (a copy): {seconds:.1f} s")


def test_build_refusals(tmp_path: Path) -> None:
    for args, words in ((["--size", "10M"], "size"), (["--release", "Bad;rel"], "release"),
                        (["--packages", "ok,--evil"], "package name")):
        proc = subprocess.run([*SVIRT, "image", "build", "debian", *args,
                               str(tmp_path / "x.qcow2")], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1
        assert words in proc.stderr and len(proc.stderr.splitlines()) <= 2
    proc = subprocess.run([*SVIRT, "image", "build", "debian", str(tmp_path / "x.qcow2")],
                          capture_output=True, text=True, timeout=60, user=65534)
    assert proc.returncode == 1 and "needs root" in proc.stderr


def _boot(image: DebianImage, firmware: str) -> Iterator[DebianGuest]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if not (OVMF_CODE if firmware == "uefi" else SEABIOS).is_file():
        pytest.skip(f"no {firmware} firmware (apt-get install ovmf seabios)")
    with debian_guest(image.path, firmware) as guest:
        _report(f"{firmware}: qemu-ga answered {guest.agent_seconds:.1f} s after QEMU "
                f"started; cloud-init's hostname at {guest.hostname_seconds:.1f} s")
        yield guest


@pytest.fixture(scope="module")
def bios_guest(debian_image: DebianImage) -> Iterator[DebianGuest]:
    yield from _boot(debian_image, "bios")


@pytest.fixture(scope="module")
def uefi_guest(debian_image: DebianImage) -> Iterator[DebianGuest]:
    yield from _boot(debian_image, "uefi")


def _check(guest: DebianGuest) -> None:
    assert guest.client.exec(["hostname"]).stdout == HOSTNAME.encode() + b"\n"
    assert guest.client.exec(["cat", "/run/svirt-cloud-init"]).stdout == MARKER.encode()
    firmware = guest.client.exec(["test", "-d", "/sys/firmware/efi"]).returncode == 0
    assert firmware == (guest.firmware == "uefi")
    cmdline = guest.client.exec(["cat", "/proc/cmdline"]).stdout.decode()
    assert "console=ttyS0" in cmdline
    shadow = guest.client.exec(["getent", "shadow", "root"]).stdout.decode()
    assert shadow.split(":")[1].startswith(("!", "*"))  # no password login
    assert guest.console.stat().st_size > 0  # the serial console carried the boot


def test_boots_through_seabios(bios_guest: DebianGuest) -> None:
    _check(bios_guest)


def test_boots_through_ovmf(uefi_guest: DebianGuest) -> None:
    _check(uefi_guest)
    assert os.path.exists(OVMF_CODE)
