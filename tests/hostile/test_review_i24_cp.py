"""Review of issue 24: ``svirt cp``'s host side checks only the owner of the
*last* directory (svirt/cli/exec.py:_host_dir).  The parent is opened by
path, following every symlink on the way, so a directory a guest uid owns
anywhere higher up lets the guest point root's O_CREAT at any root-owned
directory (``/etc/cron.d`` in real life): the final directory is root's, the
check passes, and root writes the guest's bytes there.

Attack: the admin runs ``svirt cp vm:/etc/hostname /srv/vm/out/planted``
where ``/srv/vm`` is the guest's (its image directory).  The guest has
replaced ``out`` with a symlink to a root-only directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .helpers import UID_BASE
from .test_exec_hostile import NAME, Channel, channel, open_dir, svirt  # noqa: F401


def test_review_i24_cp_follows_a_symlink_in_a_guest_owned_directory(
        channel: Channel, open_dir: Path) -> None:  # noqa: F811
    victim = open_dir / "etc-cron.d"  # root's, 0755: stands for /etc/cron.d
    victim.mkdir(mode=0o755)
    guests = open_dir / "guest-owned"
    guests.mkdir()
    (guests / "out").symlink_to(victim)  # what the guest's uid may do in its dir
    os.lchown(guests / "out", UID_BASE + 3, UID_BASE + 3)
    os.chown(guests, UID_BASE + 3, UID_BASE + 3)
    channel.scenario[0] = "honest"
    done, _ = svirt("cp", f"{NAME}:/etc/hostname", str(guests / "out" / "planted"))
    planted = list(victim.iterdir())
    assert planted == [], (f"root wrote the guest's file into a root-only directory through "
                           f"a guest-owned symlink: {planted} (exit {done.returncode})")
    assert done.returncode == 125


def test_review_i24_cp_reads_through_a_symlink_in_a_guest_owned_directory(
        channel: Channel, open_dir: Path) -> None:  # noqa: F811
    """The same on the way in: a root-only file sent to the guest."""
    secret_dir = open_dir / "root-only"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "config").write_bytes(b"root's secret")
    guests = open_dir / "guest-owned"
    guests.mkdir()
    (guests / "share").symlink_to(secret_dir)
    os.lchown(guests / "share", UID_BASE + 3, UID_BASE + 3)
    os.chown(guests, UID_BASE + 3, UID_BASE + 3)
    channel.scenario[0] = "honest"
    done, _ = svirt("cp", str(guests / "share" / "config"), f"{NAME}:/tmp/config")
    assert done.returncode == 125, ("root read a root-only file through a guest-owned "
                                    f"symlink and sent it to the guest: {done.stderr!r}")


def test_review_i24_cp_follows_a_symlink_in_a_local_users_directory(
        channel: Channel, open_dir: Path) -> None:  # noqa: F811
    """The same from a hostile local user: ``svirt cp vm:F ~alice/dl/F``
    run by the admin; alice has turned ``dl`` into a symlink to a root-only
    directory.  Root creates the guest's file there (``/etc/cron.d/F``)."""
    victim = open_dir / "etc-cron.d"
    victim.mkdir(mode=0o755)
    home = open_dir / "alice"
    home.mkdir()
    (home / "dl").symlink_to(victim)
    os.lchown(home / "dl", 65534, 65534)
    os.chown(home, 65534, 65534)
    channel.scenario[0] = "honest"
    done, _ = svirt("cp", f"{NAME}:/etc/hostname", str(home / "dl" / "planted"))
    assert list(victim.iterdir()) == [], (
        f"root followed a local user's symlink and wrote into a root-only directory "
        f"(exit {done.returncode})")
