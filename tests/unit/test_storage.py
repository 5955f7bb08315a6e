"""The storage step's sizes, journal entry and host config keys (no mounts here:
tests/hostile/test_storage.py mounts, fills and unmounts for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svirt import config
from svirt.errors import ConfigError
from svirt.launcher import storage

MIB = 1 << 20


def test_size_is_the_config_plus_each_layers_bound() -> None:
    planned = storage.plan(Path("/run/svirt/guests/g.d"), [1 << 30, 8 * MIB], "abcdef01",
                           16, 4096)
    layers = (1 << 30) + (1 << 30) // 256 + MIB + 8 * MIB + 8 * MIB // 256 + MIB
    assert planned.size == 16 * MIB + layers
    assert planned.size_mib == -(-planned.size // MIB)
    assert planned.options().startswith(f"size={planned.size_mib}m,nr_inodes=4096,")
    assert planned.journal_entry() == {
        "op": "storage", "path": "/run/svirt/guests/g.d", "source": "svirt-storage.abcdef01",
        "size": planned.size, "inodes": 4096}


def test_a_layer_bound_covers_qcow2_and_uml_cow_metadata() -> None:
    for size in (MIB, 1 << 30, 1 << 40):
        l2_and_refcounts = size // 8192 + size // 32768 + 4 * 65536  # 64 KiB clusters
        uml_bitmap = size // 4096 + 4096
        assert storage.layer_bound(size) >= size + max(l2_and_refcounts, uml_bitmap)


def test_config_keys_parse_and_are_bounded() -> None:
    got = config.parse({"guest_storage_mib": 64, "guest_storage_inodes": 100_000})
    assert (got.guest_storage_mib, got.guest_storage_inodes) == (64, 100_000)
    defaults = config.parse({})
    assert (defaults.guest_storage_mib, defaults.guest_storage_inodes) == (16, 4096)
    for key, bad in (("guest_storage_mib", 0), ("guest_storage_mib", True),
                     ("guest_storage_inodes", 10), ("guest_storage_inodes", 1 << 30),
                     ("guest_storage_mib", "16")):
        with pytest.raises(ConfigError) as info:
            config.parse({key: bad})
        assert info.value.key == key


def test_mountinfo_paths_are_unescaped() -> None:
    assert storage._unescape(r"/run/a\040b\011c") == "/run/a b\tc"
    table = storage.mounts()
    # /proc, not "/": in a chroot (fresh-debian) the root is no mount point
    assert any(point == Path("/proc") for point, _fstype, _src in table)
    assert storage.mounted(Path("/nonexistent/x.d"), table) is None


def test_a_mount_point_is_found_through_a_symlinked_parent(tmp_path: Path) -> None:
    """/var/run is a link to /run on most hosts: mountinfo names the real path."""
    real = tmp_path / "real"
    (real / "g.d").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    table = [(real / "g.d", "tmpfs", "svirt-storage.0")]
    assert storage.mounted(tmp_path / "link" / "g.d", table) == "svirt-storage.0"
    assert storage.mounted(real / "g.d", table) == "svirt-storage.0"
