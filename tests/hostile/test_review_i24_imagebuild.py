"""Review of issue 24: ``svirt image build debian OUT.qcow2`` runs as root
and finishes with :func:`svirt.images.disk.copy_atomic` (svirt/images/disk.py:
188-199): a ``mkstemp`` in OUT's directory, a copy of GiBs, then
``os.chmod(tmp, 0o644)`` and ``os.replace`` *by name*.  When OUT's directory
is a user's (``sudo svirt image build debian ~/vm.qcow2``), the user renames
the temporary file away during the long copy and puts a symlink at its name:
root's chmod follows it (``/etc/shadow`` becomes 0644).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from svirt.errors import ImageBuildError
from svirt.images import disk

from ..integration.helpers import as_uid

USER = 65534  # a local non-root user (nobody)


def test_review_i24_copy_atomic_chmods_through_a_users_symlink() -> None:
    base = Path(tempfile.mkdtemp(prefix="svirt-rv24-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        secret = base / "root-only" / "shadow"  # stands for /etc/shadow
        secret.parent.mkdir(mode=0o755)
        secret.write_bytes(b"root:$6$hash")
        secret.chmod(0o600)
        home = base / "home"  # the user's directory, where OUT goes
        home.mkdir()
        os.chown(home, USER, USER)
        cached = base / "cached.fifo"  # the cached image: a FIFO holds the copy open
        os.mkfifo(cached, 0o600)
        out = home / "vm.qcow2"
        errors: list[BaseException] = []

        def build() -> None:
            try:
                disk.copy_atomic(cached, out)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        with open(cached, "wb") as feed:  # noqa: PTH123 - the copy is now under way
            feed.write(b"QFI\xfb" + b"\0" * 4096)
            feed.flush()
            deadline = time.monotonic() + 10
            while not (tmps := list(home.glob(".vm.qcow2.*.tmp"))):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            tmp = tmps[0]

            def swap() -> None:  # the user, in their own directory
                os.rename(tmp, home / "moved")
                os.symlink(secret, tmp)

            assert as_uid(USER, swap) == 0
        thread.join(10)
        mode = stat.S_IMODE(os.stat(secret).st_mode)
        assert mode == 0o600, (f"root chmod'ed a root-only file to {mode:04o} through the "
                               f"user's symlink (errors: {errors})")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_review_i24_build_writes_through_a_symlink_in_a_users_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``ensure_debian`` takes ``$SVIRT_CACHE`` (or ``cache=``) as it is: it
    never checks that the directory is root's (svirt/images/cache.py:
    ensure_dir), then root writes the manifest by name
    (svirt/images/debian.py:_build_locked, ``write_text`` of
    ``cache/debian/RELEASE-KEY.json``) and runs qemu-img on a name there.
    The cache's owner plants a symlink at the manifest's name: root
    overwrites the file it points at.  (The heavy steps are stubbed: only
    root's writes in the cache are exercised.)"""
    from svirt.images import debian

    base = Path(tempfile.mkdtemp(prefix="svirt-rv24c-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        victim = base / "root-only" / "passwd"
        victim.parent.mkdir(mode=0o755)
        victim.write_text("root:x:0:0::/root:/bin/bash\n")
        victim.chmod(0o644)
        cache = base / "cache"  # a CI user's workspace, say
        (cache / "debian").mkdir(parents=True)
        for d in (cache, cache / "debian"):
            os.chown(d, USER, USER)
        recipe = debian.DebianRecipe()
        name = f"{recipe.release}-{debian.image_key(recipe)}"
        assert as_uid(USER, lambda: os.symlink(victim, cache / "debian" / f"{name}.json")) == 0
        monkeypatch.setattr(debian, "check_host", lambda: {n: n for n, _ in debian.HOST_TOOLS})
        monkeypatch.setattr(debian, "bootstrap", lambda *a, **k: None)
        monkeypatch.setattr(debian, "configure_tree", lambda *a, **k: None)
        monkeypatch.setattr(debian, "installed_versions", lambda *a, **k: {})
        monkeypatch.setattr(disk, "assemble", lambda *a, **k: None)
        monkeypatch.setattr(disk, "to_qcow2",
                            lambda raw, dest, tool: dest.write_bytes(b"QFI\xfb"))
        with contextlib.suppress(ImageBuildError):  # a refusal is the fix
            debian.ensure_debian(recipe, cache=cache)
        assert victim.read_text() == "root:x:0:0::/root:/bin/bash\n", (
            "root wrote the build manifest through a symlink in a user's cache directory")
    finally:
        shutil.rmtree(base, ignore_errors=True)
