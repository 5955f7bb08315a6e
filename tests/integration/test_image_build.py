"""``svirt image build debian`` and ``svirt image info`` with the real parts.

One build per session (the ``debian_image`` fixture: cached across
sessions in the image cache).  The image's boots, through SeaBIOS and OVMF
with a cloud-init seed, are svirt's own: test_real_guest.py (one boot per
firmware for the suite).  The timings go to the terminal summary (``-rP``
or ``-s`` shows them): build (cold or cached), image size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from svirt.testing import DebianImage

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
