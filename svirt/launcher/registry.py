"""The registry: shared by every svirt process on the host.

Two directories.  The state directory (``/var/lib/svirt``, or
``$SVIRT_STATE_DIR``) survives a reboot and is root's alone (0700)::

    lock                 fcntl lock: every change below happens under it
    guests/NAME.json     one record per guest (launcher/record.py)
    objects/KEY.json     every host object some guest holds: its original
                         state per driver, and which guests hold it how
                         (launcher/objects.py)

The run directory (``/run/svirt``, or ``$SVIRT_RUN_DIR``) holds what dies
with the boot::

    guests/NAME.d/       root's (0755): nothing in it is the guest's but
        home/            the guest's own directory (UML's uml_dir)
                         (while the guest runs NAME.d is a tmpfs of its own,
                         with a size and an inode cap: launcher/storage.py)
    ctl/                 root's (0711): the launcher's control sockets

A registry given only a run directory (tests) keeps its state in
``RUN/state`` unless ``$SVIRT_STATE_DIR`` says otherwise.

Slots and labels are unique on the host, not only here: every registry
claims them in the host-wide claims directory (:mod:`svirt.claims.host`)
under the host lock, always taken after this registry's lock.

Every step taken for a guest is journalled in its record before it is made
(launcher/journal.py); release undoes the journal in reverse.  A launcher
killed at any point leaves state that :meth:`Registry.reconcile` (every
``run``, ``list`` and ``gc``) finishes; object tables whose holders have no
record any more are restored by its sweep.  A restore that fails keeps its
record (``restore-failed: ...``) and is retried; nothing is forgotten.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from svirt.claims.cluster import ClusterClaims, allocate_claims
from svirt.claims.host import ClaimSession, HostClaims
from svirt.claims.owner import Claim
from svirt.errors import StateError
from svirt.launcher import journal, slots, sweep, uidstate
from svirt.launcher.objects import ObjectTables
from svirt.launcher.record import Record, hint_for, load_records, why, write_json
from svirt.procfs import LiveProcesses, ProcessId, kill_process
from svirt.resources import Resource
from svirt.safefs import remove_tree
from svirt.security.base import Driver, Label
from svirt.security.files import open_resource
from svirt.security.stack import SecurityStack
from svirt.spec import GuestSpec


def default_root() -> Path:
    return Path(os.environ.get("SVIRT_RUN_DIR", "/run/svirt"))


def default_state(root: Path | None = None) -> Path:
    env = os.environ.get("SVIRT_STATE_DIR")
    if env:
        return Path(env)
    if root is not None or os.environ.get("SVIRT_RUN_DIR"):
        return (root or default_root()) / "state"
    from svirt import config

    return config.load().state_dir


class Registry:
    """One registry (a state and a run directory): records and allocates."""

    def __init__(self, root: Path | None = None, state: Path | None = None,
                 claims: HostClaims | None = None,
                 cluster: ClusterClaims | None | bool = True) -> None:
        self.root = root or default_root()
        self.state = (state or default_state(root)).absolute()
        self.claims = claims or HostClaims()
        #: allocations also unique across hosts (svirt/cluster/): True = as the
        #: host config's [cluster] says, False = this host alone
        self.cluster = _cluster_from_config() if cluster is True else cluster or None
        self.guests = self.state / "guests"
        self.objects = self.state / "objects"
        self.run_dirs = self.root / "guests"
        self.control_dir = self.root / "ctl"
        self.problems: list[str] = []  # corrupt records and tables, by name
        #: records that cannot be read (guest name: why), from the last records()
        self.unreadable: dict[str, str] = {}
        self.tables = ObjectTables(
            self.objects, record_exists=lambda name: self.record_path(name).exists(),
            save_record=self.save, problem=self._problem)
        self._lock_depth = 0
        self._lock_fd = -1
        # the flock is per open file, so it cannot exclude this process's own
        # threads (svirt's supervisor serves requests in threads, on one
        # Registry): they take turns here first, and _lock_depth counts the
        # nesting of the one thread that holds the registry
        self._thread_lock = threading.RLock()

    # ---------------------------------------------------------------- lock
    def _ensure(self) -> None:
        # the state dir is 0711, not 0700: the default image root
        # (/var/lib/svirt/images) is below it and guest uids walk to their
        # images; they can list nothing here, and lock, guests/ and objects/
        # are root's alone
        for d, mode in ((self.state, 0o711), (self.guests, 0o700), (self.objects, 0o700),
                        (self.root, 0o755), (self.run_dirs, 0o755), (self.control_dir, 0o711)):
            try:
                d.mkdir(mode=mode, parents=True, exist_ok=True)
                st = os.lstat(d)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                    raise StateError(f"{d} is not a directory of this user's",
                                     hint="remove it; svirt creates it")
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(d, mode)
            except OSError as err:
                raise StateError(f"cannot create the registry directory {d}: {err.strerror}",
                                 hint=hint_for(err.errno, registry=True)) from err

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._thread_lock, self._locked():
            yield

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self._ensure()
        try:
            fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(f"cannot open the registry lock: {err.strerror}",
                             hint=hint_for(err.errno, registry=True)) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd, self._lock_depth = fd, 1
            yield
        finally:
            self._lock_depth = 0
            os.close(fd)

    # ------------------------------------------------------------- records
    def record_path(self, name: str) -> Path:
        return self.guests / f"{name}.json"

    def run_dir(self, name: str) -> Path:
        """The guest's run directory: root's; only its ``home`` is the guest's."""
        return self.run_dirs / f"{name}.d"

    def home(self, name: str) -> Path:
        """The guest's own directory (UML's uml_dir), below its run directory."""
        return self.run_dir(name) / "home"

    def records(self) -> list[Record]:
        """Every readable record; unreadable ones are named in ``problems``
        and in ``unreadable`` (guest name: why), and left for a person: a
        record that cannot be read cannot be released (its journal is what
        says what to undo), so it is kept, never dropped."""
        # read again: the records' problems are replaced, the tables' kept
        self.problems = [p for p in self.problems if not p.startswith("record ")]
        out, self.unreadable = load_records(self.guests)
        self.problems += [f"record {self.record_path(name)} is unreadable ({problem}); "
                          "left for a person to inspect"
                          for name, problem in self.unreadable.items()]
        return out

    def save(self, record: Record) -> None:
        with self.locked():
            write_json(self.record_path(record.name), record.to_json())

    def _problem(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    # ------------------------------------------------------------- reserve
    def reserve(self, spec: GuestSpec, drivers: Sequence[Driver],
                previous: Record | None = None) -> Record:
        """Reserve the name and a slot, allocate labels, create the run dir.
        ``previous`` (the guest's last run, restarted): its slot and labels are
        not handed out again, so each run is a new sVirt instance."""
        with self.locked():
            records = self._reconcile()[1]
            self._check_name_free(spec.name, records)
            remembered = self.tables.remembered_labels()
            used = {r.slot for r in records} | {slot for slot, _ in remembered}
            if previous is not None:
                used.add(previous.slot)
                remembered = [*remembered, (previous.slot, previous.labels)]
            live = LiveProcesses()
            # lock order: this registry's lock (held), then the host's
            with self.claims.locked(live) as host:
                def pick(taken: frozenset[str]) -> tuple[Record, Claim]:
                    picked = self._allocate(spec, drivers, records, remembered, set(used),
                                            live, host, taken)
                    return picked, self.claim_of(picked)

                # picked again while another host takes a key (the cluster's too)
                record = allocate_claims(host, self.cluster, pick)
                self.problems += host.problems
            run_dir = self.run_dir(spec.name)
            record.journal.append(journal.entry("dir", path=str(run_dir)))
            try:
                self.save(record)
            except BaseException:
                self.release_claims(record)
                raise
            self._make_run_dir(record, run_dir)
            return record

    def _check_name_free(self, name: str, records: list[Record]) -> None:
        """StateError unless no record (readable or not) has guest ``name``."""
        if name in self.unreadable:
            raise StateError(
                f"the record of guest {name} is unreadable ({self.unreadable[name]})",
                hint=f"inspect {self.record_path(name)}: what it holds is not "
                     "restored until a person repairs or removes it")
        if self.record_path(name).exists():
            taken = next((r for r in records if r.name == name), None)
            if taken is not None and taken.restore_failed:
                raise StateError(
                    f"guest {name} ended but could not be restored: {taken.status}",
                    hint="fix the cause, then run svirt gc (it retries)")
            raise StateError(
                f"a guest named {name} is already running",
                hint="pick another name, or stop it first (svirt list)",
            )

    def _make_run_dir(self, record: Record, run_dir: Path) -> None:
        """Make ``run_dir`` (root's) and its ``home``; on failure release
        ``record`` (a long-lived caller, the supervisor, keeps nothing)."""
        try:
            parent = os.open(self.run_dirs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                remove_tree(parent, run_dir.name)  # an earlier run's, left over
                os.mkdir(run_dir.name, 0o755, dir_fd=parent)
                os.mkdir(f"{run_dir.name}/home", 0o700, dir_fd=parent)
            finally:
                os.close(parent)
        except (OSError, StateError) as err:
            cause = err.message if isinstance(err, StateError) else err.strerror
            try:
                self.release(record)
            except StateError as release_err:  # kept as restore-failed, retried
                cause = f"{cause}; and then: {release_err.message}"
            raise StateError(f"cannot make the run directory {run_dir}: {cause}",
                             hint=hint_for(getattr(err, "errno", None))) from err

    def peek(self, spec: GuestSpec, drivers: Sequence[Driver]) -> tuple[int, dict[str, Label]]:
        """The slot and labels :meth:`reserve` would give ``spec``'s guest now,
        by the same scan, reserving and claiming nothing (``svirt check``).
        An approximation in three ways: a record of a guest that is gone still
        counts (reserve releases it first), the cluster's claims are not read,
        and a driver that picks at random (SELinux's pair) picks again."""
        with self.locked():
            records = self.records()
            remembered = self.tables.remembered_labels()
            used = {r.slot for r in records} | {slot for slot, _ in remembered}
            live = LiveProcesses()
            with self.claims.locked(live) as host:
                record = self._allocate(spec, drivers, records, remembered, used, live, host,
                                        claim=False)
            return record.slot, record.labels

    def _allocate(self, spec: GuestSpec, drivers: Sequence[Driver], records: list[Record],
                  remembered: slots.Remembered, used: set[int],
                  live: LiveProcesses, host: ClaimSession,
                  taken: frozenset[str] = frozenset(), *, claim: bool = True) -> Record:
        """Pick a slot and labels no record here, no live process and no
        host-wide claim holds (nor the cluster: ``taken``); claim them (unless
        ``claim`` is False: :meth:`peek`).  Under both locks."""
        stack = SecurityStack.of(drivers)
        space = stack.slot_space()
        slot = slots.free_slot(stack, used, live, host, space, taken)
        slot_keys = stack.slot_claims(slot)
        labels, label_keys = slots.pick_labels(spec, stack, slot, records, remembered,
                                               live, host, taken)
        record = Record(spec.name, str(spec.uuid), str(spec.backend), slot,
                        ProcessId.of(os.getpid()), labels, claims=slot_keys + label_keys)
        if not claim:
            return record
        host.claim(record.claims, record.claim_owner(self.state),
                   space=space or None, slot=slot, hinted=slot_keys)
        if space:
            host.set_hint(space, slot + 1)
        return record

    def claim_of(self, record: Record) -> Claim:
        """``record``'s claims as the claims package takes them: the keys, the
        owner, and the fence that stops the guest (plain data, never the registry)."""
        state = self.state
        return Claim(tuple(record.claims), record.claim_owner(state),
                     lambda: uidstate.fence_guest(state, record.name))

    def release_claims(self, record: Record) -> list[str]:
        """Drop ``record``'s host-wide claims (those still its own)."""
        if not record.claims:
            return []
        with self.claims.locked() as host:
            removed = host.release(record.claims, record.claim_owner(self.state))
            if self.cluster is not None:
                self.problems += self.cluster.release(host, self.claim_of(record))
            self.problems += host.problems
        return removed

    def sweep_claims(self) -> list[str]:
        """Remove every stale host-wide claim, of any registry (``svirt gc``)."""
        with self.claims.locked(LiveProcesses()) as host:
            report = host.sweep()
            self.problems += host.problems
        return report

    # ------------------------------------------------------------- objects
    def hold(self, record: Record, resource: Resource, drivers: Sequence[Driver],
             roots: tuple[Path, ...], live: LiveProcesses | None = None) -> None:
        """Label one object for ``record``'s guest, journalled and ref-counted."""
        cluster = self.cluster
        lock_image = (None if cluster is None else  # refused if another host writes it
                      lambda obj: cluster.lock_image(self.claims, record.claim_owner(self.state),
                                                     record.claims, obj,
                                                     lambda: self.save(record)))
        with self.locked():
            # walked from the root for its kind (roots: launch_roots(), or spec roots)
            obj = open_resource(resource, roots)
            try:
                self.tables.hold(record, resource, drivers, obj, live, lock_image)
            finally:
                obj.close()

    # ------------------------------------------------------------- release
    def release(self, record: Record) -> list[str]:
        """Undo everything the journal says, in reverse order; drop the record.

        What cannot be undone stays journalled: the record is kept with status
        ``restore-failed: <the first error>`` and every reconcile retries it.
        Raises nothing but StateError: whatever one step raises (an OSError, a
        guest's mess in its own directory, a bug) is that step's failure, kept
        for the next try, and the other steps still run.
        """
        report: list[str] = []
        with self.locked():
            errors = uidstate.release_processes(record, self.state, report)
            failed: list[journal.Entry] = []
            for entry in reversed(record.journal):
                try:
                    self._undo(record, entry, report)
                except Exception as err:  # noqa: BLE001 - kept in the record, retried
                    what = entry.get("path") or entry.get("name") or entry.get("op")
                    errors.append(f"{what}: {why(err)}")
                    failed.insert(0, entry)
            if not errors:
                try:
                    self.release_claims(record)
                except Exception as err:  # noqa: BLE001 - kept in the record, retried
                    errors.append(f"claims: {why(err)}")
            self._drop_record(record, failed, errors)
        if errors:
            raise StateError(f"guest {record.name}: could not restore: " + "; ".join(errors),
                             hint="svirt gc retries; svirt list shows it until then")
        return report

    def _drop_record(self, record: Record, failed: list[journal.Entry],
                     errors: list[str]) -> None:
        """Remove ``record`` once everything is undone; else keep what
        failed as ``restore-failed`` (the claims stay: objects may still
        carry the guest's uid or level)."""
        if errors:
            record.journal = failed
            record.status = f"restore-failed: {errors[0]}"
            try:
                self.save(record)
            except StateError as err:  # the old record stays: retried as it was
                errors.append(f"and its record could not be updated: {err.message}")
        else:
            try:
                self.record_path(record.name).unlink(missing_ok=True)
            except OSError as err:  # every step is undone: a retry finds nothing
                errors.append(f"its record could not be removed: {err.strerror}")

    def _undo(self, record: Record, entry: journal.Entry, report: list[str]) -> None:
        """Undo one of ``record``'s journal entries (launcher/journal.py)."""
        journal.undo(entry, report, journal.Undoing(
            self.run_dirs, lambda step, out: self.tables.release(record.name, step, out)))

    # ----------------------------------------------------------- reconcile
    def reconcile_records(self) -> list[Record]:
        """Reconcile, then the records that are left (read once, not again)."""
        return self._reconcile()[1]

    def reconcile(self) -> list[tuple[str, list[str]]]:
        """Release every record whose processes are gone; restore objects no
        record holds any more; kill orphans.  Never raises for one bad entry:
        what failed is in the report (and stays for the next try)."""
        return self._reconcile()[0]

    def _reconcile(self) -> tuple[list[tuple[str, list[str]]], list[Record]]:
        """Reconcile; also return the records still kept (read once).  One
        record's or one table's trouble stays its own: it is reported (and a
        record that cannot be released is kept as ``restore-failed``), and
        every other record is reconciled all the same."""
        done: list[tuple[str, list[str]]] = []
        kept: list[Record] = []
        with self.locked():
            self.problems = []  # this reconcile's (a long-lived supervisor keeps none)
            for directory in (self.guests, self.objects):
                sweep.temp_files(directory)
            for record in self.records():
                try:
                    if self._reconcile_one(record):
                        kept.append(record)
                    else:
                        done.append((record.name, self.release(record)))
                except Exception as err:  # noqa: BLE001 - this record's alone
                    done.append((record.name, [f"restore failed: {why(err)}"]))
                    kept.append(record)
                    self._mark_failed(record, why(err))
            try:
                swept = self.tables.sweep()
            except Exception as err:  # noqa: BLE001 - tried again by the next reconcile
                swept = []
                self._problem(f"the sweep of object tables failed: {why(err)}")
            if swept:
                done.append(("(objects no record holds)", swept))
            done += sweep.host_leftovers(
                self.state, self.run_dirs, kept, lambda name: self.record_path(name).exists(),
                self._problem)
        return done, kept

    def _mark_failed(self, record: Record, cause: str) -> None:
        if not record.restore_failed:  # failed before release marked it
            record.status = f"restore-failed: {cause}"
            try:
                self.save(record)
            except StateError as save_err:
                self._problem(f"guest {record.name}: {save_err.message}")

    def _reconcile_one(self, record: Record) -> bool:
        """True when ``record``'s guest is still there (kept); else its
        hypervisor, if it outlived its supervisor, is killed (to be released).
        A failed release is retried whoever ran it: its supervisor (a
        long-lived one: the service's) is done with it."""
        hv = record.hypervisor
        if not record.restore_failed:
            if record.this_boot() and record.supervisor.alive():
                return True
            if (record.detached is not None and hv is not None and record.this_boot()
                    and hv.alive()):
                return True  # a detached guest: the next supervisor adopts it
        if hv is not None and record.this_boot() and hv.alive():
            kill_process(hv)
        return False

    def sweep_control(self) -> list[str]:
        """Remove the mconsole reply sockets of launchers that are gone
        (``svirt gc``; launcher/sweep.py)."""
        return sweep.control_sockets(self.control_dir, self.problems)

    # ------------------------------------------------------------- orphans
    def orphans(self, uid_range: range | None = None,
                records: Sequence[Record] | None = None) -> list[tuple[int, int]]:
        """(pid, uid) of live processes that no record of this registry
        accounts for: guests whose record was lost (uidstate.find_orphans:
        found by what root controls, never by what the process carries).
        ``uid_range``: the DAC driver's; ``records``: this registry's, when
        the caller just read them."""
        return [(pid, uid) for pid, uid, _leaf in self._orphans(uid_range, records)]

    def _orphans(self, uid_range: range | None = None,
                 records: Sequence[Record] | None = None
                 ) -> list[tuple[int, int, str | None]]:
        records = self.records() if records is None else records
        return uidstate.find_orphans(self.state, records, uid_range)

    def kill_orphans(self) -> list[str]:
        """SIGKILL every orphan: a whole cgroup at once where it is in one of
        this registry's (so a fork chain cannot outrun it), else the process."""
        # under the lock: a launch journals its cgroup in its record (under the
        # lock) before it creates it, so no new guest looks like an orphan here
        with self.locked():
            return uidstate.kill_orphans(self._orphans())


def _cluster_from_config() -> ClusterClaims | None:
    from svirt import config

    cluster = config.load().cluster
    return None if cluster is None else ClusterClaims(cluster)
