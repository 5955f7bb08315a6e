"""Debian packages into the cache: which version apt would pick, and its
files unpacked (``apt-get download`` + ``dpkg-deb -x``, never installed).

The host tools run with a fixed argv and ``LC_ALL=C``; a failure is an
:class:`ImageBuildError` carrying the tool's last lines.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from svirt.errors import ImageBuildError

__all__ = ["APT_HINT", "depended_on", "run_tool", "tool", "unpack_package"]

APT_HINT = "run 'apt-get update' (Debian's archive must be reachable)"


def tool(name: str, package: str) -> str:
    """The path of host tool ``name``; the hint names the package that has it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise ImageBuildError(f"{name} not found", hint=f"apt-get install {package}")
    return path


def run_tool(
    argv: Sequence[str], *, what: str, hint: str, cwd: Path | None = None, timeout: float = 120
) -> str:
    """Run ``argv`` (stdin /dev/null, C locale); its stdout, or an ImageBuildError."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, resolved tool paths
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{what} failed: {exc}", hint=hint) from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        detail = "; ".join(tail) or f"exit status {proc.returncode}"
        raise ImageBuildError(f"{what} failed: {detail}", hint=hint)
    return proc.stdout


def depended_on(metapackage: str, prefix: str, what: str = "package") -> tuple[str, str]:
    """(package, version): the first dependency of ``metapackage`` whose name
    starts with ``prefix`` (a ``what``, for messages), at the version apt
    would install."""
    apt_cache = tool("apt-cache", "apt")
    out = run_tool(
        [
            apt_cache,
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            metapackage,
        ],
        what=f"apt-cache depends {metapackage}",
        hint=APT_HINT,
    )
    package = None
    for line in out.splitlines():
        m = re.fullmatch(rf"\s*\|?Depends:\s*({re.escape(prefix)}[^\s<>]+)\s*", line)
        if m:
            package = m.group(1)
            break
    if package is None:
        raise ImageBuildError(f"cannot tell which {what} {metapackage} depends on",
                              hint=APT_HINT)
    out = run_tool(
        [apt_cache, "show", "--no-all-versions", package],
        what=f"apt-cache show {package}",
        hint=APT_HINT,
    )
    m = re.search(r"^Version:\s*(\S+)\s*$", out, re.MULTILINE)
    if m is None:
        raise ImageBuildError(f"apt-cache shows no version for {package}", hint=APT_HINT)
    return package, m.group(1)


def _normalise_tree(root: Path) -> None:
    """Directories 0755, files 0644 (0755 if executable): guests run unprivileged."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - guests (other uids) read the cache
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def unpack_package(package: str, version: str, dest: Path, *,
                   check: Callable[[Path, str], None]) -> None:
    """Download ``package=version`` and unpack its files into ``dest`` (a new
    directory, renamed into place whole, readable by every uid).

    Works in ``.tmp-*`` next to ``dest``; the caller holds the lock, so ones
    left by killed builds are removed first.  ``check(root, deb_name)``
    raises an ImageBuildError when the unpacked tree is not what was wanted.
    """
    apt_get = tool("apt-get", "apt")
    dpkg_deb = tool("dpkg-deb", "dpkg")
    for stale in dest.parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        run_tool(
            [apt_get, "download", f"{package}={version}"],
            cwd=tmp,
            what=f"apt-get download {package}={version}",
            hint=APT_HINT,
            timeout=900,
        )
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ImageBuildError(
                f"apt-get download {package} left {len(debs)} .deb files", hint=APT_HINT
            )
        root = tmp / "root"
        run_tool(
            [dpkg_deb, "-x", str(debs[0]), str(root)],
            what=f"dpkg-deb -x {debs[0].name}",
            hint="is there room in the cache?",
            timeout=600,
        )
        check(root, debs[0].name)
        _normalise_tree(root)
        os.rename(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
