"""The one flow: preflight, reserve a slot, label, spawn, supervise, release.

Every step is undone by ``release`` in reverse order, whether the guest ended
well, crashed, or the launcher itself was killed (then the next svirt
command's reconcile finishes it).  Backends and security drivers never call
each other: this module passes data between them.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from svirt.backends.base import (
    CONSOLE_FD,
    CONTROL_FD,
    FIRST_EXTRA_FD,
    Access,
    Backend,
    Prepared,
    Resource,
    ResourceKind,
)
from svirt.deadline import Deadline
from svirt.errors import HostError, LaunchError, SecurityError, SvirtError
from svirt.host import QEMU_BINARY, HostInfo, probe_host
from svirt.images.chain import chain_resources
from svirt.launcher.bounds import file_size_limit
from svirt.launcher.cgroups import GuestCgroup
from svirt.launcher.channels import connect_control, console_fifos, listen_control
from svirt.launcher.child import CLEAN_PATH, spawn
from svirt.launcher.state import ProcessId, Record, Registry
from svirt.launcher.storage import GuestStorage
from svirt.launcher.supervisor import (
    SIGKILL_SECONDS,
    Console,
    Outcome,
    Supervisor,
    file_sink,
    terminal_sink,
)
from svirt.preflight import preflight
from svirt.security.base import (
    ConfinementWarning,
    Driver,
    Label,
    LiveProcesses,
    PlannedObject,
    build_stack,
)
from svirt.security.files import launch_roots, open_resource
from svirt.spec import Accel, ConsoleMode, GuestSpec


class Guest:
    """A running guest, as the Python API hands it out."""

    def __init__(self, spec: GuestSpec, backend: Backend, record: Record, run_dir: Path,
                 supervisor: Supervisor, control: socket.socket | None) -> None:
        self.spec = spec
        self.name = spec.name
        self.backend = backend
        self.record = record
        self._run_dir = run_dir
        self.supervisor = supervisor
        self._control = control
        self._outcome: Outcome | None = None
        self.drivers: list[Driver] = []
        self.console_pty: str | None = None  # the pty's path with console mode "pty"
        self._control_dir = run_dir
        self.cgroup: GuestCgroup | None = None  # cgroups: limits and usage()
        self.storage: GuestStorage | None = None  # its storage mount: caps and usage()
        #: a detached QEMU's QMP: a listening socket, connected to when needed
        self._control_path: Path | None = None
        #: what this launch could not confine as its labels say (also issued as
        #: ConfinementWarning): SELinux permissive, a label the kernel did not take
        self.warnings: list[str] = []

    @property
    def run_dir(self) -> Path:
        """The guest's own directory (UML's uml_dir)."""
        return self._run_dir

    @property
    def control_dir(self) -> Path:
        return self._control_dir

    @property
    def guest_uid(self) -> int | None:
        dac = self.record.labels.get("dac")
        return int(dac.process.split(":")[0]) if dac is not None else None

    def control_socket(self, deadline: Deadline | None = None) -> object:
        """The QMP socket; a detached guest's is connected to (within
        ``deadline``) on first use."""
        if self._control is None and self._control_path is not None:
            self._control = connect_control(self._control_path, deadline)
        return self._control

    @contextmanager
    def creating_sockets(self) -> Iterator[None]:
        with ExitStack() as stack:
            for d in self.drivers:
                stack.enter_context(d.creating_sockets(self.record.labels[d.name]))
            yield

    @property
    def console(self) -> Console:
        return self.supervisor.console

    @property
    def pid(self) -> int:
        return self.supervisor.pid

    @property
    def labels(self) -> dict[str, str]:
        return {n: lab.process for n, lab in self.record.labels.items()}

    @property
    def running(self) -> bool:
        return self.supervisor.running

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome or self.supervisor.outcome()

    def shell(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` in the shell on the guest's console: (exit status,
        output).  See :meth:`Console.shell`."""
        return self.console.shell(command, timeout)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        self.supervisor.wait(timeout)
        return self.outcome

    def stop(self, timeout: float | None = None) -> Outcome:
        """Stop the guest with the shutdown ladder; return how it ended."""
        if self._outcome is None:
            graceful = self.spec.shutdown_timeout if timeout is None else timeout
            if not math.isfinite(graceful):  # an API caller's inf or nan: the longest
                graceful = MAX_SHUTDOWN_SECONDS
            graceful = min(max(graceful, 0.0), MAX_SHUTDOWN_SECONDS)
            self._outcome = self.supervisor.stop(self.backend, self, graceful)
        return self._outcome


#: the longest graceful stop (a spec's shutdown_timeout is at most this too)
MAX_SHUTDOWN_SECONDS = 3600.0


def plan(spec: GuestSpec, host: HostInfo | None = None) -> tuple[Backend, Accel, list[Driver]]:
    """Preflight only: the backend, the resolved accel and the security stack."""
    host = host or probe_host()
    backend, accel = preflight(spec, host)
    drivers = build_stack(spec, host)
    return backend, accel, drivers


@contextmanager
def launch(
    spec: GuestSpec,
    *,
    registry: Registry | None = None,
    host: HostInfo | None = None,
    drivers: list[Driver] | None = None,
    pdeathsig: bool = True,
    on_started: Callable[[Guest], None] | None = None,
    detached: dict[str, Any] | None = None,
    sink: Callable[[bytes], None] | None = None,
    previous: Record | None = None,
    settle: float = 0.0,
) -> Iterator[Guest]:
    """Launch a confined guest; stop it (if still running) and release on exit.

    ``detached`` (what :mod:`svirt.service` needs to adopt it again, kept in
    its record) makes a guest that outlives this process: no PDEATHSIG, its
    console on FIFOs and QEMU's QMP on a listening socket in its run
    directory (both root's, opened again by path by the next supervisor).
    ``sink`` takes the console output (else the spec's console setting).
    ``previous``: the record of this guest's last run (a restart): a fresh
    slot, uid and category pair, never the last ones.
    ``settle``: wait up to that long for the guest's first console output; a
    hypervisor that exits before it says anything raises LaunchError (its
    outcome, argv and console tail), and nothing is left behind."""
    if detached is not None:
        pdeathsig = False
    host = host or probe_host()
    backend, accel = preflight(spec, host)
    if accel is not spec.accel and spec.backend == "qemu":
        spec = spec.with_changes(accel=accel)
    stack = drivers if drivers is not None else build_stack(spec, host)
    registry = registry or Registry()
    record = registry.reserve(spec, stack, previous)
    if detached is not None:
        record.detached = detached
        registry.save(record)
    supervisor: Supervisor | None = None
    issued: list[str] = []
    try:
        _require_own_profile(stack, spec, record)  # before its warnings: refused, not warned
        for problem in confinement_warnings(spec, stack, record.labels):
            _warn(issued, problem)
        with ExitStack() as cleanup:
            roots = launch_roots(spec.security.image_roots)  # host config, narrowed by the spec
            # the run directory becomes the guest's capped tmpfs before anything is
            # made in it (svirt/launcher/storage.py): journalled first
            storage, layer_sizes = _create_storage(spec, record, registry, roots)
            # cgroups: journalled first; the storage's pages are the guest's to pay
            guest_cgroup = _create_cgroup(spec, record, registry, storage.size_mib)
            run_dir = registry.home(spec.name)
            if sink is None and spec.console.log is not None:
                sink, close_log = file_sink(spec.console.log, roots)
                cleanup.callback(close_log)
            elif sink is None and spec.console.mode is ConsoleMode.STDIO:
                sink = terminal_sink()  # filtered when stdout is a terminal
            pty_master: int | None = None
            if spec.console.mode is ConsoleMode.PTY:
                pty_master, pty_slave = os.openpty()
                sink = _pty_sink(pty_master)
                console_pty = os.ttyname(pty_slave)
                cleanup.callback(os.close, pty_slave)  # kept open: no EIO while detached
            resources = backend.resources(spec, run_dir) + chain_resources(spec.disks)
            if any(d.ephemeral for d in spec.disks):  # in the run dir: release removes them
                from svirt.images.layers import prepare_layers  # only for ephemeral disks

                prepare_layers(spec, registry.run_dir(spec.name), run_dir, roots, layer_sizes)
            _check_reachable(stack, resources)
            live = LiveProcesses()
            for resource in resources:
                registry.hold(record, resource, stack, roots, live)
            tap_names, tap_fds = _setup_taps(spec, backend, record, registry, cleanup)
            control_path: Path | None = None
            with ExitStack() as labelled:
                for d in stack:
                    labelled.enter_context(d.creating_sockets(record.labels[d.name]))
                if detached is None:
                    console_parent, console_child = socket.socketpair()
                    control_parent, control_child = (
                        socket.socketpair() if backend.uses_control_socket() else (None, None))
                else:
                    control_parent = None
                    control_child, control_path = (
                        listen_control(registry.run_dir(spec.name))
                        if backend.uses_control_socket() else (None, None))
            parents = ExitStack()  # the launcher's ends, until the supervisor owns them
            hyp_ends = ExitStack()  # the hypervisor's ends, closed here once it has them
            cleanup.enter_context(hyp_ends)
            if detached is None:
                console_io: socket.socket | tuple[int, int] = console_parent
                parents.callback(console_parent.close)
                hyp_ends.callback(console_child.close)
                hyp_in = hyp_out = console_child.fileno()
            else:
                hyp_in, hyp_out, sup_read, sup_write = console_fifos(registry.run_dir(spec.name),
                                                                     create=True)
                console_io = (sup_read, sup_write)
                parents.callback(os.close, sup_read)
                parents.callback(os.close, sup_write)
                hyp_ends.callback(os.close, hyp_in)
                hyp_ends.callback(os.close, hyp_out)
            if control_parent is not None:
                parents.callback(control_parent.close)
            if pty_master is not None:
                parents.callback(os.close, pty_master)
            cleanup.enter_context(parents)
            fds = {CONSOLE_FD: hyp_in}
            if control_child is not None:
                cleanup.callback(control_child.close)
                fds[CONTROL_FD] = control_child.fileno()
            for i, fd in enumerate(tap_fds):
                fds[FIRST_EXTRA_FD + i] = fd
            qemu = host.binary(QEMU_BINARY)
            uml_fallback = backend.name == "uml" and host.uml_xstate_fallback
            prepared = Prepared(
                run_dir=run_dir, accel=accel, sandbox=bool(qemu and "sandbox" in qemu.features),
                tap_fds=tuple(FIRST_EXTRA_FD + i for i in range(len(tap_fds))),
                tap_names=tuple(tap_names),
                nic_macs=tuple(spec.nic_mac(i) for i in range(len(spec.nics))),
                no_avx=uml_fallback,
                console_out_fd=CONSOLE_FD if detached is None else 1,
                control_listening=detached is not None,
            )
            command = backend.command(spec, prepared)
            init = _jail_init(registry.run_dir(spec.name)) if spec.jail else None
            _load_apparmor(stack, spec, record, registry, resources, command.argv[0], init,
                           accel)
            _prepare_smack(stack, spec, record, registry, resources, accel)
            # in the child, in this order: seccomp (root), network namespace and
            # tun node, the jail, then the security drivers (DAC's uid switch last)
            setups: list[Callable[[], None]] = []
            if uml_fallback:
                from svirt.launcher.seccomp import hide_xstate_in_child

                setups.append(hide_xstate_in_child())
            setups += _network_child_setups(spec, backend, record)
            if spec.jail:
                setups.append(_jail_setup(spec, registry, record, resources, roots, accel,
                                          fds, cleanup))
            else:
                # the jail's seccomp filter needs no namespace: a jail = false
                # hypervisor gets it too (as root, before the uid switch), so
                # it makes no user namespace, no keyring key (the uid's, it
                # outlives the guest), no io_uring, no foreign-ABI call
                from svirt.launcher.seccomp import install_in_child, jail_filter

                setups.append(install_in_child(jail_filter(), "the hypervisor (jail = false)"))
            setups += [d.child_setup(record.labels[d.name], spec) for d in stack]
            # cgroups: the very first step in the child, as root (before seccomp,
            # namespaces, the jail and the uid switch)
            setups.insert(0, guest_cgroup.enter_in_child())
            # nothing of svirt's in its environment: registries tell their guests
            # apart by cgroup (root's), never by what a process carries.
            # What it may write is bounded: no file past its largest disk's bound
            # (svirt/launcher/bounds.py)
            fsize = file_size_limit(spec, roots, layer_sizes)
            pid = spawn(command.argv, command.env, fds, stdout_fd=hyp_out,
                        setups=setups, cwd=str(run_dir), pdeathsig=pdeathsig, name=spec.name,
                        pid_namespace=spec.jail, init=init,
                        stdin_fd=hyp_in if command.console_stdin else None,
                        fsize_limit=fsize)
            hyp_ends.close()
            if control_child is not None:
                control_child.close()
            untaken = _label_not_taken(spec, record.labels, pid)
            if untaken:
                _warn(issued, untaken)
            record.hypervisor = ProcessId.of(pid) if _alive(pid) else ProcessId(pid, 0)
            record.status = "running"
            registry.save(record)
            _require_profile_taken(spec, record.labels, pid)  # recorded: release kills it
            supervisor = Supervisor(spec.name, pid, console_io, Console(spec.name), sink,
                                    pty_master, init_wrapped=spec.jail)
            parents.pop_all()  # closed by supervisor.close() and below
            guest = Guest(spec, backend, record, run_dir, supervisor, control_parent)
            guest._control_path = control_path
            guest.drivers = stack
            guest.warnings = issued
            guest.cgroup = guest_cgroup  # cgroups
            guest.storage = storage
            guest._control_dir = registry.control_dir
            if pty_master is not None:
                guest.console_pty = console_pty
            if settle:
                _settle(guest, command.argv, settle)
            if on_started is not None:
                on_started(guest)
            try:
                yield guest
            finally:
                if supervisor.running:
                    guest.stop()
                supervisor.close()
                if control_parent is not None:
                    control_parent.close()
    except BaseException as err:
        if supervisor is not None and supervisor.running:  # pragma: no cover - defensive
            supervisor.signal(9)
            supervisor.wait(SIGKILL_SECONDS)  # bounded: release goes on regardless
        try:
            registry.release(record)
        except SvirtError as release_err:
            # the first real error is the one the caller sees
            err.add_note(f"svirt: and then: {release_err.message}")
        raise
    else:
        registry.release(record)


def confinement_warnings(spec: GuestSpec, stack: Sequence[Driver],
                         labels: dict[str, Label]) -> list[str]:
    """What the drivers say they cannot enforce for these labels on this host
    (SELinux permissive, an AppArmor profile in complain mode): every launch
    issues them, and ``svirt check`` shows them."""
    return [w for d in stack for w in d.plan(spec, labels[d.name], ()).warnings]


def _warn(issued: list[str], problem: str) -> None:
    """One confinement warning: kept on the guest, and issued the way the
    library issues warnings (the CLI prints them, the service answers them)."""
    issued.append(problem)
    warnings.warn(problem, ConfinementWarning, stacklevel=4)


def _label_not_taken(spec: GuestSpec, labels: dict[str, Label], pid: int) -> str | None:
    """Why the hypervisor (exec'd by now) runs without its SELinux label, if it
    does: the child's setexeccon may only fail quietly under a permissive host."""
    se = labels.get("selinux")
    if se is None:
        return None
    from svirt.security.selinux import process_label

    now = process_label(pid)
    if not now or now == se.process or not _alive(pid):
        return None  # no SELinux in this kernel (a test's contexts), or gone already
    return (f"guest {spec.name} runs as {now}, not {se.process}: the kernel did not take "
            "its SELinux label, so it is confined by the other drivers alone")


def _settle(guest: Guest, argv: Sequence[str], seconds: float) -> None:
    """Until the first console output (or ``seconds``), then a moment more: a
    hypervisor that is gone by then never ran (bad argv, a missing device)."""
    deadline = time.monotonic() + seconds
    while guest.console.total == 0 and time.monotonic() < deadline:
        if guest.supervisor.wait(0.02):
            break
    if guest.supervisor.wait(0.05):
        outcome = guest.supervisor.outcome()
        guest.supervisor.close()
        raise LaunchError(f"guest {guest.name}: the hypervisor ended at once ({outcome})",
                          guest=guest.name, argv=argv, log_tail=guest.console.tail(),
                          hint="its argv and console tail are in the error; svirt check "
                               "shows the argv")


def _jail_init(run_dir: Path) -> str:
    """tini: PID 1 of the jail, so that the hypervisor is not (a PID 1 ignores
    signals it has no handler for: UML's abort() after a panic would spin).
    The jail execs an execute-only copy of it, which the kernel makes
    non-dumpable: out of the hypervisor's reach through /proc/1 (jail.py's
    ``init_copy``, in the guest's run directory).  Its path in the jail is
    returned."""
    from svirt.launcher.jail import JAIL_INIT, init_copy

    init = shutil.which("tini", path=CLEAN_PATH)
    if init is None:
        raise HostError("the jail needs tini as PID 1 of its PID namespace",
                        hint="apt-get install --no-install-recommends tini "
                             "(or jail = false in the spec)")
    init_copy(os.path.realpath(init), run_dir)
    return JAIL_INIT


def _jail_setup(spec: GuestSpec, registry: Registry, record: Record,
                resources: list[Resource],
                roots: tuple[Path, ...], accel: Accel, fds: dict[int, int],
                cleanup: ExitStack) -> Callable[[], None]:
    """The jail's child step: each object is bound from an fd opened here by the
    same root walk that checked it (the fds go to the child at fixed numbers)."""
    from svirt.launcher.jail import INIT_COPY, JailPlan, plan_binds
    from svirt.launcher.jail import build_in_child as jail_in_child
    from svirt.security.files import open_resource

    objects: list[tuple[int, Path, bool, bool]] = []

    def add(fd: int, path: Path, is_dir: bool, writable: bool) -> None:
        cleanup.callback(os.close, fd)
        objects.append((fd, path, is_dir, writable))

    for res in resources:
        if res.kind is ResourceKind.CONSOLE_LOG:
            continue  # written by the launcher, never opened by the guest
        obj = open_resource(res, roots)
        add(obj.fd, obj.path, res.kind is ResourceKind.RUN_DIR, res.access is not Access.RO)
    kernel = Path(os.path.realpath(spec.kernel))
    if spec.backend == "uml" and not kernel.is_relative_to("/usr"):
        # the UML "kernel" is the hypervisor binary itself, not a held object
        add(os.open(kernel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC), kernel, False, False)
    if spec.backend == "uml":  # the launcher's mconsole client sockets
        ctl = registry.control_dir
        add(os.open(ctl, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC), ctl,
            True, False)
    binds = plan_binds(objects)
    for bind, (fd, *_rest) in zip(binds, objects, strict=True):
        fds[bind.fd] = fd
    devices = _guest_devices(spec, accel)
    jail_root = registry.run_dir(spec.name) / "jail"
    jail_root.mkdir(mode=0o755, exist_ok=True)  # in the run dir: root's alone
    shm = spec.memory + 64 if spec.backend == "uml" else 64
    cwd = registry.home(spec.name) if spec.backend == "uml" else Path("/")
    return jail_in_child(JailPlan(jail_root, binds, tuple(devices), shm, cwd,
                                  _tmpfs_options(record),
                                  new_netns=not (spec.nics and spec.backend == "uml"),
                                  init=registry.run_dir(spec.name) / INIT_COPY))


def _load_apparmor(stack: list[Driver], spec: GuestSpec, record: Record, registry: Registry,
                   resources: list[Resource], argv0: str, init: str | None,
                   accel: Accel) -> None:
    """The guest's AppArmor profile (svirt/security/apparmor.py), made from the
    objects it holds, journalled, then loaded; release unloads it."""
    from svirt.security.apparmor import PROFILE_FILE, AppArmorDriver, generated, plan_profile

    driver = next((d for d in stack if isinstance(d, AppArmorDriver)), None)
    if driver is None or not generated(spec):  # a spec's own: _require_own_profile
        return
    found = argv0 if "/" in argv0 else shutil.which(argv0, path=CLEAN_PATH)
    if found is None:
        raise LaunchError(f"{argv0}: command not found", guest=spec.name, argv=[argv0])
    objects = [(r.path, r.access, r.kind, r.kind is ResourceKind.RUN_DIR) for r in resources]
    plan = plan_profile(spec, objects, hypervisor=os.path.realpath(found), init=init,
                        kvm=accel is Accel.KVM,
                        control_dir=registry.control_dir if spec.backend == "uml" else None,
                        complain=driver.complain)
    path = registry.run_dir(spec.name) / PROFILE_FILE  # root's: the guest cannot change it
    record.journal.append({"op": "apparmor", "profile": plan.name, "path": str(path)})
    registry.save(record)
    driver.load(plan, path)


def _require_own_profile(stack: list[Driver], spec: GuestSpec, record: Record) -> None:
    """A spec's own AppArmor profile (``security.label``) is loaded and
    confines: svirt enters it at exec and never loads or removes it."""
    from svirt.security.apparmor import AppArmorDriver, generated

    driver = next((d for d in stack if isinstance(d, AppArmorDriver)), None)
    if driver is not None and not generated(spec):
        driver.check_loaded(record.labels[driver.name].process)


def _require_profile_taken(spec: GuestSpec, labels: dict[str, Label], pid: int) -> None:
    """The exec'd guest runs in its AppArmor profile; a profile removed before
    the exec leaves it unconfined, and such a guest is not run."""
    if "apparmor" not in labels:
        return
    from svirt.security.apparmor import profile_not_taken

    why = profile_not_taken(spec, labels["apparmor"], pid)
    if why:
        raise SecurityError(f"{why}: refused", label=labels["apparmor"].process,
                            hint="was the profile removed while the guest started?")


def _guest_devices(spec: GuestSpec, accel: Accel) -> list[str]:
    """The device nodes under /dev a guest opens beyond the jail's usual ones."""
    devices = ["kvm"] if accel is Accel.KVM else []
    if spec.nics and spec.backend == "uml":
        devices.append("net/tun")
    return devices


def _prepare_smack(stack: list[Driver], spec: GuestSpec, record: Record, registry: Registry,
                   resources: list[Resource], accel: Accel) -> None:
    """The device nodes the hypervisor opens labelled for every guest, and the
    SMACK rules this guest needs (svirt/security/smack.py), journalled, then
    loaded; release removes the rules."""
    from svirt.launcher.jail import DEVICES
    from svirt.security.smack import SmackDriver

    driver = next((d for d in stack if isinstance(d, SmackDriver)), None)
    if driver is None:
        return
    # QEMU's tap fds are the host's /dev/net/tun opened by the launcher: the
    # hypervisor's ioctls on them are checked against that node's label
    tun = ["net/tun"] if spec.nics else []
    driver.label_devices(list(dict.fromkeys([*DEVICES, *_guest_devices(spec, accel), *tun])))
    rules = driver.rules_for(record.labels[driver.name],
                             [r.access for r in resources if r.relabel])
    if rules:
        record.journal.append({"op": "smack-rules", "rules": [list(r) for r in rules]})
        registry.save(record)
        driver.load_rules(rules)


def _tmpfs_options(record: Record) -> str:
    """The jail's tmpfs mounts labelled as the guest's own: SELinux's tmpfs
    type at its level (svirt_t -> svirt_tmpfs_t), SMACK's label."""
    if (sm := record.labels.get("smack")) is not None:
        from svirt.security.smack import tmpfs_options

        return tmpfs_options(sm)
    se = record.labels.get("selinux")
    if se is None or se.process.count(":") < 3 or not os.path.exists("/sys/fs/selinux/enforce"):
        return ""  # a kernel without SELinux refuses the context= option
    _user, _role, domain, level = se.process.split(":", 3)
    tmpfs = domain.removesuffix("_t") + "_tmpfs_t"
    return f'context="system_u:object_r:{tmpfs}:{level}"'


def _create_storage(spec: GuestSpec, record: Record, registry: Registry,
                    roots: tuple[Path, ...]) -> tuple[GuestStorage, dict[int, int]]:
    """The guest's storage mount (svirt/launcher/storage.py), sized from the
    host config and its ephemeral disks' bases: journalled, then mounted over
    its run directory; release unmounts it (Registry._undo, op "storage").
    Also the bases' virtual sizes, which the layers are made with."""
    from svirt import config
    from svirt.launcher import cgroups, storage

    sizes: dict[int, int] = {}
    if any(d.ephemeral for d in spec.disks):
        from svirt.images.layers import layer_sizes

        sizes = layer_sizes(spec, roots)
    host = config.load()
    planned = storage.plan(registry.run_dir(spec.name), list(sizes.values()),
                           cgroups.registry_tag(registry.state), host.guest_storage_mib,
                           host.guest_storage_inodes)
    # the host's budget for every guest's storage: checked and taken in one
    # step under the host claims lock (two launches never both fit the last)
    with registry.locked(), registry.claims.locked():
        storage.check_budget(planned, host.guest_storage_budget_percent)
        record.journal.append(planned.journal_entry())
        registry.save(record)
        planned.create()
    return planned, sizes


def _create_cgroup(spec: GuestSpec, record: Record, registry: Registry,
                   storage_mib: int = 0) -> GuestCgroup:
    """The guest's cgroup (svirt/launcher/cgroups.py): journalled, then made;
    release removes it (Registry._undo, op "cgroup").  ``storage_mib``: the
    guest's storage mount, whose tmpfs pages it is charged for, on top of its
    RAM (see svirt/launcher/storage.py)."""
    from svirt.launcher import cgroups

    cg = cgroups.plan(spec.name, record.slot, spec.memory + storage_mib, str(spec.backend),
                      cgroups.registry_tag(registry.state), spec.limits.pids,
                      spec.limits.cpu_weight, spec.limits.cpus)
    record.journal.append(cg.journal_entry())
    registry.save(record)
    return cgroups.create(spec.name, record.slot, spec.memory + storage_mib, str(spec.backend),
                          cgroup=cg)


def _setup_taps(spec: GuestSpec, backend: Backend, record: Record, registry: Registry,
                cleanup: ExitStack) -> tuple[list[str], list[int]]:
    """Create one tap per nic (journalled first); QEMU also gets an open fd each."""
    if not spec.nics:
        return [], []
    from svirt.launcher import network  # pyroute2: only for guests with nics

    dac = record.labels.get("dac")
    uid, gid = (int(x) for x in dac.process.split(":")) if dac else (-1, -1)
    names: list[str] = []
    fds: list[int] = []
    with network.in_netns(spec.netns):
        ipr = network.iproute()
        try:
            for i, nic in enumerate(spec.nics):
                name = network.tap_name(spec.name, record.slot, i)
                if nic.bridge is not None:
                    network.check_bridge(ipr, nic.bridge)
                network.check_free(ipr, name)
                record.journal.append({"op": "tap", "name": name, "netns": spec.netns})
                registry.save(record)
                network.create_tap(name, uid, gid)
                network.attach_tap(ipr, name, nic.bridge, nic.isolated)
                names.append(name)
                if backend.name == "qemu":
                    fd = network.open_tap(name)
                    cleanup.callback(os.close, fd)
                    fds.append(fd)
        finally:
            ipr.close()
    return names, fds


def _network_child_setups(spec: GuestSpec, backend: Backend, record: Record
                           ) -> list[Callable[[], None]]:
    """Steps that need root in the child, before the security drivers run."""
    if spec.netns is None and not spec.nics:
        return []
    from svirt.launcher import network

    steps = []
    if spec.netns is not None:
        steps.append(network.enter_netns_in_child(spec.netns))
    dac = record.labels.get("dac")
    if spec.nics and backend.name == "uml" and dac is not None:
        uid, gid = (int(x) for x in dac.process.split(":"))
        steps.append(network.private_tun_in_child(uid, gid))
    return steps


def _pty_sink(master: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        try:
            os.write(master, data)
        except BlockingIOError:
            pass  # nobody reads the pty: drop, never stall the guest

    os.set_blocking(master, False)
    return write


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _check_reachable(stack: list[Driver], resources: list[Resource]) -> None:
    """Under DAC the guest's uid must be able to walk to each object."""
    if not any(d.name == "dac" for d in stack):
        return
    for res in resources:
        for parent in res.path.parents:
            try:
                st = parent.stat()
            except OSError as err:
                raise SecurityError(f"{parent}: {err.strerror}", path=parent) from err
            if not st.st_mode & 0o001:
                raise SecurityError(
                    f"{res.path}: directory {parent} is not searchable by other users, "
                    "so the guest's own uid cannot reach the file",
                    path=res.path,
                    hint=f"keep images in a directory others may traverse (chmod o+x {parent})",
                )


#: what ``svirt check`` says of ``jail = false`` (a launch says nothing: the spec asked)
JAIL_OFF = ("jail = false: a breached hypervisor sees the whole host filesystem, every "
            "world-readable file and 0666 socket, and every process")


def describe(spec: GuestSpec, host: HostInfo | None = None,
             registry: Registry | None = None) -> dict[str, Any]:
    """What `svirt check` prints: argv, the slot a launch would get now, and
    what each driver would give the process and each object, computed by the
    drivers from the labels of that slot (:meth:`Registry.peek`: nothing is
    reserved, claimed or changed; objects are only opened ``O_PATH``)."""
    host = host or probe_host()
    backend, accel, drivers = plan(spec, host)
    if accel is not spec.accel and spec.backend == "qemu":
        spec = spec.with_changes(accel=accel)
    registry = registry or Registry()
    run_dir = registry.home(spec.name)
    qemu = host.binary(QEMU_BINARY)
    prepared = Prepared(run_dir=run_dir, accel=accel,
                        sandbox=bool(qemu and "sandbox" in qemu.features),
                        tap_fds=tuple(range(5, 5 + len(spec.nics))),
                        tap_names=tuple(f"tap{i}" for i in range(len(spec.nics))),
                        nic_macs=tuple(spec.nic_mac(i) for i in range(len(spec.nics))),
                        no_avx=backend.name == "uml" and host.uml_xstate_fallback)
    command = backend.command(spec, prepared)
    resources = backend.resources(spec, run_dir) + chain_resources(spec.disks)
    slot, labels = registry.peek(spec, drivers) if drivers else (None, {})
    with ExitStack() as opened:
        objects, refusals, made = _planned_objects(spec, resources, opened)
        plans = [d.plan(spec, labels[d.name], objects) for d in drivers]
    problems = [w for p in plans for w in p.warnings]
    problems += [f"a launch would refuse {r.path}: {why}"
                 for r, why in zip(resources, refusals, strict=True) if why]
    if not spec.jail:
        problems.append(JAIL_OFF)
    return {
        "name": spec.name,
        "backend": str(spec.backend),
        "accel": str(accel),
        "security": [d.name for d in drivers],
        "jail": spec.jail,
        "argv": list(command.argv),
        "env": dict(command.env),
        "slot": slot,  # if launched now
        "process": {p.driver: {"identity": p.process, "note": p.process_note} for p in plans},
        "resources": [
            {"path": str(r.path), "access": str(r.access), "kind": str(r.kind),
             "relabel": r.relabel, "made_by_launch": made[i], "refused": refusals[i],
             "plan": {p.driver: p.objects[i].to_dict() for p in plans}}
            for i, r in enumerate(resources)
        ],
        "warnings": problems,
    }


def _planned_objects(spec: GuestSpec, resources: Sequence[Resource], opened: ExitStack
                     ) -> tuple[list[PlannedObject], list[str | None], list[bool]]:
    """Each resource as a launch finds it: opened ``O_PATH`` by the same root
    walk (its fd closed by ``opened``), or made by the launch, or refused
    (why); and whether the launch makes it."""
    roots = launch_roots(spec.security.image_roots)
    objects: list[PlannedObject] = []
    refusals: list[str | None] = []
    made: list[bool] = []
    for res in resources:
        new_log = res.kind is ResourceKind.CONSOLE_LOG and not os.path.lexists(res.path)
        if res.kind in (ResourceKind.RUN_DIR, ResourceKind.LAYER) or new_log:
            # reserve makes the run dir root's 0700, open_log a log 0600; then labelled
            mode = {ResourceKind.RUN_DIR: stat.S_IFDIR | 0o700,
                    ResourceKind.CONSOLE_LOG: stat.S_IFREG | 0o600}.get(res.kind)
            objects.append(PlannedObject(res, None, mode))
            refusals.append(None)
            made.append(True)
            continue
        made.append(False)
        try:
            obj = open_resource(res, roots)
        except (SvirtError, OSError) as err:  # OSError: svirt check as another user
            objects.append(PlannedObject(res))
            refusals.append(err.message if isinstance(err, SvirtError)
                            else f"{res.path}: {err.strerror}")
            continue
        opened.callback(obj.close)
        objects.append(PlannedObject(res, obj.fd, obj.st_mode))
        refusals.append(None)
    return objects, refusals, made


__all__ = ["Guest", "launch", "plan", "describe", "confinement_warnings", "LaunchError"]
