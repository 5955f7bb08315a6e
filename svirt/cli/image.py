"""``svirt image build debian ... OUT.qcow2`` and ``svirt image info IMG``.

build needs root (mmdebstrap, chroot) and says so itself; info reads the
image as any user.  Progress goes to a terminal only: the step, the bytes
it has written so far and the time, on one line redrawn twice a second;
in a pipe the build is silent unless it fails.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from svirt.cli.common import one_line, print_json

# typing is not imported at run time (see svirt/cli/__init__.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import TextIO


class TerminalProgress:
    """The build's steps on one redrawn line of ``out`` (a terminal)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start = time.monotonic()
        self.step, self.base = "starting", 0
        self.watched: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.out.write("\r\x1b[K")
        self.out.flush()

    def __call__(self, step: str, watched: Path | None) -> None:
        with self._lock:
            self.step, self.watched = step, watched
            self.base = _fs_used(watched) if watched is not None and not _is_file(watched) \
                else 0

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                step, watched, base = self.step, self.watched, self.base
            done = ""
            if watched is not None:
                size = _size(watched) if _is_file(watched) else _fs_used(watched) - base
                done = f"  {max(size, 0) / 2**20:8.1f} MiB"
            elapsed = time.monotonic() - self.start
            self.out.write(f"\r\x1b[K[{elapsed:6.1f}s] {step}{done}")
            self.out.flush()


def _is_file(path: Path) -> bool:
    return path.suffix in (".qcow2", ".raw", ".img")


def _size(path: Path) -> int:
    """Bytes written to ``path``, or to the temporary file that becomes it
    (``.NAME.*.tmp`` beside it, as every atomic write here names it)."""
    candidates = [path] if path.exists() else list(path.parent.glob(f".{path.name}.*.tmp"))
    total = 0
    for candidate in candidates[:4]:
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        total += min(st.st_size, st.st_blocks * 512)
    return total


def _fs_used(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def cmd_build(args: argparse.Namespace) -> int:
    from svirt.images.debian import DebianRecipe, build_debian, parse_size

    packages = tuple(p.strip() for p in (args.packages or "").split(",") if p.strip())
    bios, uefi = (args.bios or not args.uefi), (args.uefi or not args.bios)
    recipe = DebianRecipe(release=args.release, size=parse_size(args.size),
                          packages=packages, bios=bios, uefi=uefi)
    out = Path(args.out)
    start = time.monotonic()
    if sys.stderr.isatty():
        with TerminalProgress(sys.stderr) as progress:
            cached = build_debian(recipe, out, rebuild=args.rebuild, progress=progress)
        print(f"svirt: {one_line(out)}: Debian {recipe.release}, "
              f"{'BIOS and UEFI' if bios and uefi else 'BIOS' if bios else 'UEFI'}, "
              f"{_size(out) / 2**20:.0f} MiB, in {time.monotonic() - start:.0f} s "
              f"(cached as {one_line(cached)})", file=sys.stderr)
    else:
        build_debian(recipe, out, rebuild=args.rebuild)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from svirt.images.info import format_text, inspect_image

    info = inspect_image(Path(args.image))
    if args.json:
        print_json(info.to_json())
    else:
        for line in format_text(info):
            print(one_line(line))
    return 0


def add_verbs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="build a bootable disk image, or say what one is")
    verbs = p.add_subparsers(dest="image_verb", required=True)
    b = verbs.add_parser("build", help="build a bootable image from a distribution's archive")
    b.add_argument("distribution", choices=["debian"])
    b.add_argument("--release", default="bookworm", help="the release (default: bookworm)")
    b.add_argument("--size", default="4G", help="the disk's virtual size (default: 4G)")
    b.add_argument("--packages", metavar="P,...", help="more packages, comma-separated")
    b.add_argument("--bios", action="store_true", help="BIOS boot only (default: both)")
    b.add_argument("--uefi", action="store_true", help="UEFI boot only (default: both)")
    b.add_argument("--rebuild", action="store_true",
                   help="build again even when the cache has it (newer packages)")
    b.add_argument("out", metavar="OUT.qcow2")
    b.set_defaults(func=cmd_build)  # root: said by the build itself
    i = verbs.add_parser("info", help="format, size, backing chain, BIOS/UEFI boot")
    i.add_argument("image", metavar="IMG")
    i.add_argument("--json", action="store_true", help="JSON instead of text")
    i.set_defaults(func=cmd_info)
