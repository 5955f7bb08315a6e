"""Host-wide claims: no two guests on the host share a uid or a category pair.

A registry allocates under its own lock, but a host may hold several
registries at once (test harnesses give each worker a state directory of its
own).  Every identity a guest must hold alone (its DAC uid, its MCS category
pair, its SMACK slot label) is therefore also claimed in one directory for
the whole host, under one lock::

    /run/svirt-claims/       root's, 0700 ($SVIRT_CLAIMS_DIR overrides it)
        lock                 flock: every change below happens under it
        uid-1500003          one file per claimed identity, named by it, so
        mcs-c17-c942         checking a candidate is one open: JSON with the
        smack-svirt-3        owner (state dir, guest name, uuid, created,
                             launcher pid + start time, boot id)
        hint.uid-1500000     where the next slot scan starts (only a hint)

``/run`` is a tmpfs, so claims die with the boot; a claim of another boot
(a claims directory elsewhere) is stale.

Lock order: a registry's lock first, then this one; never the other way
round, and never another registry's lock while holding this one (another
registry's record is only read, and records are written whole by rename).

A claim is **held** while a process runs with its identity, or its owner's
registry still has the record (same uuid and creation time; the launcher
may be dead and the guest still running: the record stays until that
registry's gc), or the launcher that wrote it still runs (it is between
writing the claim and writing the record).  Otherwise it is **stale** (the
record released or wiped, the registry directory deleted, another boot) and
the next reservation takes it over.  A claim file that cannot be read (not a
regular file, garbled JSON) is named in ``problems`` and counts as held: only
root writes here, whole files, so it is left for a person to inspect.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from svirt.claims.owner import (
    LiveTable,
    Owner,
    boot_id,
    launcher_alive,
    record_matches,
    registry_dir,
)
from svirt.errors import StateError
from svirt.security.base import mcs_pair

CLAIMS_DIR = Path("/run/svirt-claims")
_KEY = re.compile(r"[a-z]+-[A-Za-z0-9_.-]{1,200}")
_MAX_CLAIM = 4096


def default_claims_dir() -> Path:
    return Path(os.environ.get("SVIRT_CLAIMS_DIR") or CLAIMS_DIR)


def valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key)) and ".." not in key


class HostClaims:
    """The claim store of this host (a directory; see the module docstring)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_claims_dir()

    @contextmanager
    def locked(self, live: LiveTable | None = None) -> Iterator[ClaimSession]:
        """Hold the host lock; take it only while holding a registry's lock
        (or none), never the other way round."""
        dirfd = self._open_dir()
        try:
            try:
                lockfd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=dirfd)
            except OSError as err:
                raise StateError(f"cannot open the host claims lock in {self.directory}: "
                                 f"{err.strerror}") from err
            try:
                fcntl.flock(lockfd, fcntl.LOCK_EX)
                yield ClaimSession(dirfd, self.directory, live)
            finally:
                os.close(lockfd)
        finally:
            os.close(dirfd)

    def _open_dir(self) -> int:
        path = self.directory
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise StateError(f"cannot open the host claims directory {path}: {err.strerror}",
                             hint="svirt needs root; /run must be writable"
                             if err.errno in (errno.EACCES, errno.EPERM) else None) from err
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            os.close(fd)
            raise StateError(f"{path} is not a directory of this user's",
                             hint="remove it; svirt creates it")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
        return fd


class ClaimSession:
    """The claim store while the host lock is held (from :meth:`HostClaims.locked`)."""

    def __init__(self, dirfd: int, directory: Path, live: LiveTable | None) -> None:
        self._dirfd = dirfd
        self.directory = directory
        self._live = live
        self.problems: list[str] = []
        self.taken_over: list[str] = []
        self._names: set[str] | None = None

    @property
    def live(self) -> LiveTable:
        """The live process table the session was opened with (:meth:`HostClaims.locked`);
        a claim check without one is a caller's mistake."""
        if self._live is None:
            raise StateError("a host claim check needs the live process table: "
                             "HostClaims.locked(live)")
        return self._live

    # -------------------------------------------------------------- reading
    def read(self, key: str) -> Owner | None:
        """The owner of ``key``'s claim; None when there is none.  Raises
        ValueError for a claim that cannot be read (not followed if a symlink)."""
        try:
            fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dirfd)
        except FileNotFoundError:
            return None
        except OSError as err:  # ELOOP: a symlink
            raise ValueError(f"cannot open it: {err.strerror}") from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            raw = os.read(fd, _MAX_CLAIM + 1)
        finally:
            os.close(fd)
        if len(raw) > _MAX_CLAIM:
            raise ValueError("too large")
        try:
            data = json.loads(raw)
            claim = data["owner"]
            if data.get("key") != key:
                raise ValueError("it names another key")
            return Owner.from_json(claim)
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise ValueError(f"{type(err).__name__}: {err}") from err

    def _slot_of(self, key: str) -> tuple[str, int] | None:
        """The (hint space, slot) a slot claim records, if any."""
        try:
            fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dirfd)
        except OSError:
            return None
        try:
            data = json.loads(os.read(fd, _MAX_CLAIM))
            space, slot = data.get("space"), data.get("slot")
        except (OSError, ValueError, AttributeError):
            return None
        finally:
            os.close(fd)
        if isinstance(space, str) and valid_key(space) and type(slot) is int and slot >= 0:
            return space, slot
        return None

    def list_names(self) -> None:
        """Read the directory's names once: :meth:`exists` then answers from
        them (exact while the lock is held and only this session writes)."""
        self._names = set(os.listdir(self._dirfd))

    def exists(self, key: str) -> bool:
        """Some file (a claim, held or stale) has the name ``key``: one lstat,
        or a set lookup after :meth:`list_names`."""
        if self._names is not None:
            return key in self._names
        _check_key(key)
        try:
            os.stat(key, dir_fd=self._dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def free(self, key: str, owner: Owner | None = None) -> bool:
        """No claim holds ``key`` (none, a stale one, or ``owner``'s own)."""
        _check_key(key)
        try:
            holder = self.read(key)
        except ValueError as err:
            self._problem(key, str(err))
            return False
        if holder is None or (owner is not None and holder.same_record(owner)):
            return True
        return self.stale(key, holder)

    def stale(self, key: str, holder: Owner) -> bool:
        """Whether ``holder``'s claim on ``key`` may be taken over."""
        this_boot = holder.boot == boot_id()
        if this_boot and record_matches(holder):
            return False  # its launcher may be dead, its guest still runs: until gc
        if self.in_use(key):
            return False  # a guest (maybe an orphan) still runs with it
        if not this_boot:
            return True
        if not registry_dir(holder.state):
            return True  # the registry is gone (a test removed its directory)
        return not launcher_alive(holder.pid, holder.start)  # alive: between claim and record

    def in_use(self, key: str) -> bool:
        """A live process runs with the identity ``key`` names."""
        kind, _, value = key.partition("-")
        if kind == "uid":
            return value.isdigit() and int(value) in self.live.uids
        if kind == "mcs":
            m = re.fullmatch(r"c(\d+)-c(\d+)", value)
            if not m:
                return False
            pair = (int(m.group(1)), int(m.group(2)))
            return any(mcs_pair(ctx) == pair for ctx in self.live.contexts)
        if kind == "smack":
            return value in self.live.contexts
        return False

    # -------------------------------------------------------------- writing
    def claim(self, keys: Iterable[str], owner: Owner, *, space: str | None = None,
              slot: int | None = None, hinted: Collection[str] = ()) -> None:
        """Write ``owner``'s claims on ``keys``; each must be :meth:`free`
        (a stale claim is replaced).  All or nothing.  The ``hinted`` keys
        record (``space``, ``slot``): their release lowers that hint."""
        written: list[str] = []
        try:
            for key in keys:
                _check_key(key)
                try:
                    holder = self.read(key)
                except ValueError as err:  # the caller checked free() first
                    raise StateError(f"host claim {key} is unreadable: {err}") from err
                if holder is not None and not holder.same_record(owner):
                    if not self.stale(key, holder):
                        raise StateError(f"host claim {key} is held by guest {holder.name} "
                                         f"of {holder.state}")
                    self.taken_over.append(f"{key}: was {holder.name} of {holder.state}")
                    os.unlink(key, dir_fd=self._dirfd)
                    if self._names is not None:
                        self._names.discard(key)
                elif holder is not None:
                    continue  # ours already
                data: dict[str, Any] = {"key": key, "owner": owner.to_json()}
                if space is not None and slot is not None and key in hinted:
                    data["space"], data["slot"] = space, slot
                self._create(key, json.dumps(data).encode())
                written.append(key)
        except BaseException:
            self.release(written, owner)
            raise

    def _create(self, key: str, data: bytes) -> None:
        """Create ``key`` whole or not at all: a temp file linked to its name
        (link refuses an existing name, symlinks included)."""
        tmp = f".{key}.{os.getpid()}.tmp"
        try:
            try:
                os.unlink(tmp, dir_fd=self._dirfd)
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self._dirfd)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.link(tmp, key, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd,
                    follow_symlinks=False)
            if self._names is not None:
                self._names.add(key)
        except OSError as err:
            raise StateError(f"cannot write host claim {self.directory / key}: {err.strerror}"
                             ) from err
        finally:
            try:
                os.unlink(tmp, dir_fd=self._dirfd)
            except OSError:
                pass

    def release(self, keys: Iterable[str], owner: Owner) -> list[str]:
        """Remove the claims on ``keys`` that ``owner`` still holds; which."""
        removed = []
        for key in keys:
            if not valid_key(key):
                continue
            try:
                holder = self.read(key)
            except ValueError as err:
                self._problem(key, str(err))
                continue
            if holder is None or not holder.same_record(owner):
                continue  # taken over meanwhile: not ours to remove
            slot = self._slot_of(key)
            try:
                os.unlink(key, dir_fd=self._dirfd)
            except FileNotFoundError:
                continue
            if self._names is not None:
                self._names.discard(key)
            removed.append(key)
            if slot is not None and slot[1] < self.hint(slot[0]):
                self.set_hint(*slot)
        return removed

    def sweep(self) -> list[str]:
        """Remove every stale claim (``svirt gc``); a report line each."""
        report = []
        for name in sorted(os.listdir(self._dirfd)):
            if name.startswith(".") and name.endswith(".tmp"):
                pid = name[:-4].rsplit(".", 1)[-1]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    try:
                        os.unlink(name, dir_fd=self._dirfd)
                    except OSError:
                        pass
                continue
            if not valid_key(name) or name.startswith("hint."):
                continue
            try:
                holder = self.read(name)
            except ValueError as err:
                self._problem(name, str(err))
                continue
            if holder is not None and self.stale(name, holder):
                self.release([name], holder)
                report.append(f"host claim {name}: stale (guest {holder.name} of "
                              f"{holder.state}), removed")
        return report

    # ---------------------------------------------------------------- hints
    def hint(self, space: str) -> int:
        """Where a slot scan in ``space`` starts: slots below it were all
        taken when last looked (a hint: every candidate is still checked)."""
        try:
            fd = os.open(f"hint.{space}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._dirfd)
        except OSError:
            return 0
        try:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
        except OSError:
            return 0
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else 0

    def set_hint(self, space: str, slot: int) -> None:
        if not valid_key(space):
            return  # only a hint
        tmp = f".hint.{space}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self._dirfd)
            try:
                os.write(fd, str(slot).encode())
            finally:
                os.close(fd)
            os.replace(tmp, f"hint.{space}", src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
        except OSError:
            try:
                os.unlink(tmp, dir_fd=self._dirfd)
            except OSError:
                pass  # only a hint

    def _problem(self, key: str, why: str) -> None:
        problem = (f"host claim {self.directory / key} is unreadable ({why}); counted as "
                   "held, left for a person to inspect")
        if problem not in self.problems:
            self.problems.append(problem)


def _check_key(key: str) -> None:
    if not valid_key(key):
        raise StateError(f"{key!r} is not a host claim name")
