"""The one flow: plan, reserve, hold, create steps, open channels, spawn, supervise, release.

``launch()`` reads as its phases (DESIGN.md "The one flow"), each handing its
value to the next: :func:`~svirt.launcher.plan.plan_launch` (backend, accel,
security stack), ``Registry.reserve`` (slot, labels, claims),
:func:`~svirt.launcher.steps.hold_objects` and the other planned steps of
:mod:`svirt.launcher.steps` (each journalled before it is made), the
channels of :mod:`svirt.launcher.guestio`, the spawn, and a :class:`Guest`
built whole.  Every step is undone by ``release`` in reverse order, whether
the guest ended well, crashed, or the launcher itself was killed (then the
next svirt command's reconcile finishes it).  Backend differences are
``Backend`` methods and driver differences ``SecurityStack`` hooks: this
module names neither a backend nor a driver.
"""

from __future__ import annotations

import math
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svirt.agent import EXEC_SECONDS, ExecResult
from svirt.backends.base import Backend
from svirt.deadline import Deadline
from svirt.errors import LaunchError, SvirtError
from svirt.host import HostInfo
from svirt.launcher import steps
from svirt.launcher.bounds import file_size_limit
from svirt.launcher.cgroups import GuestCgroup
from svirt.launcher.channels import connect_control, run_in_guest
from svirt.launcher.child import spawn
from svirt.launcher.console import Console
from svirt.launcher.guestio import ConsoleOutput, GuestChannels, console_output
from svirt.launcher.plan import JAIL_OFF as JAIL_OFF
from svirt.launcher.plan import LaunchPlan, plan_launch, prepared
from svirt.launcher.plan import describe as describe
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.launcher.storage import GuestStorage
from svirt.launcher.supervisor import SIGKILL_SECONDS, Outcome, Supervisor
from svirt.procfs import ProcessId, pid_exists
from svirt.resources import Resource
from svirt.security.base import ConfinementWarning, Driver, Label, guest_ids
from svirt.security.files import launch_roots
from svirt.security.stack import SecurityStack, refuse
from svirt.spec import Accel, GuestSpec


class Guest:
    """A running guest, as the Python API hands it out."""

    def __init__(self, spec: GuestSpec, backend: Backend, record: Record, run_dir: Path,
                 supervisor: Supervisor, control: socket.socket | None, *,
                 drivers: Sequence[Driver] = (), warnings: Sequence[str] = (),
                 cgroup: GuestCgroup | None = None, storage: GuestStorage | None = None,
                 console_pty: str | None = None, control_path: Path | None = None,
                 control_dir: Path | None = None, agent_path: Path | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.backend = backend
        self.record = record
        self._run_dir = run_dir
        self.supervisor = supervisor
        self._control = control
        self._launch_control = control  # the launcher's end of the socketpair, if any
        self._outcome: Outcome | None = None
        self._stack = SecurityStack.of(drivers)
        self.console_pty = console_pty  # the pty's path with console mode "pty"
        self._control_dir = control_dir or run_dir
        self.cgroup = cgroup  # cgroups: limits and usage()
        self.storage = storage  # its storage mount: caps and usage()
        #: a detached QEMU's QMP: a listening socket, connected to when needed
        self._control_path = control_path
        self._agent_path = agent_path  # the agent port's socket (agent = true)
        #: what this launch could not confine as its labels say (also issued as
        #: ConfinementWarning): SELinux permissive, a label the kernel did not take
        self.warnings = list(warnings)

    @property
    def drivers(self) -> SecurityStack:
        """The guest's security stack."""
        return self._stack

    @drivers.setter
    def drivers(self, drivers: Sequence[Driver]) -> None:
        self._stack = SecurityStack.of(drivers)

    @property
    def run_dir(self) -> Path:
        """The guest's own directory (UML's uml_dir)."""
        return self._run_dir

    @property
    def control_dir(self) -> Path:
        return self._control_dir

    @property
    def guest_uid(self) -> int | None:
        ids = guest_ids(self.record.labels)
        return ids[0] if ids is not None else None

    def control_socket(self, deadline: Deadline | None = None) -> socket.socket | None:
        """The QMP socket; a detached guest's is connected to (within
        ``deadline``) on first use."""
        if self._control is None and self._control_path is not None:
            self._control = connect_control(self._control_path, deadline)
        return self._control

    @contextmanager
    def creating_sockets(self) -> Iterator[None]:
        with self._stack.creating_sockets(self.record.labels):
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

    def exec(self, argv: Sequence[str], *, input: bytes | None = None,
             timeout: float = EXEC_SECONDS) -> ExecResult:
        """Run ``argv`` (a list, never a shell string) in the guest through its
        agent (``agent = true``): a CompletedProcess with the command's
        status and its stdout and stderr apart (bytes); the whole exchange,
        waiting for another client included, within ``timeout``.
        AgentError (GuestCommandNotFound, GuestCommandNotExecutable) when it
        cannot; see :func:`svirt.agent.exit_status`."""
        return run_in_guest(self._agent_path, self.name, argv, input=input, timeout=timeout)

    def wait(self, timeout: float | None = None) -> Outcome | None:
        self.supervisor.wait(timeout)
        return self.outcome

    def _end(self) -> None:
        """Stop it if it still runs; close what the launch handed it."""
        if self.supervisor.running:
            self.stop()
        self.supervisor.close()
        if self._launch_control is not None:
            self._launch_control.close()

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
    p = plan_launch(spec, host)
    return p.backend, p.accel, list(p.stack)


@contextmanager
def launch(
    spec: GuestSpec,
    *,
    registry: Registry | None = None,
    host: HostInfo | None = None,
    drivers: Sequence[Driver] | None = None,
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
    p = plan_launch(spec, host, drivers)  # 1. plan: backend, accel, security stack
    registry = registry or Registry()
    record = registry.reserve(p.spec, p.stack, previous)  # 2. reserve: slot, labels, claims
    if detached is not None:
        record.detached = detached
        registry.save(record)
    guest: Guest | None = None
    try:
        with ExitStack() as cleanup:
            run = _Launch(p, registry, record, cleanup, detached is not None,
                          pdeathsig and detached is None)
            guest, argv = _start(run, sink)  # 3.-7. hold, steps, channels, spawn, Guest
            if settle:
                _settle(guest, argv, settle)
            if on_started is not None:
                on_started(guest)
            try:
                yield guest
            finally:
                guest._end()
    except BaseException as err:
        if guest is not None and guest.supervisor.running:  # pragma: no cover - defensive
            guest.supervisor.signal(9)
            guest.supervisor.wait(SIGKILL_SECONDS)  # bounded: release goes on regardless
        try:
            registry.release(record)
        except SvirtError as release_err:
            # the first real error is the one the caller sees
            err.add_note(f"svirt: and then: {release_err.message}")
        raise
    else:
        registry.release(record)  # 8. release: every journalled step, in reverse


@dataclass
class _Launch:
    """One launch's values, handed down its phases."""

    plan: LaunchPlan
    registry: Registry
    record: Record
    cleanup: ExitStack  # the launcher's fds: closed when the launch ends
    detached: bool
    pdeathsig: bool
    issued: list[str] = field(default_factory=list)  # confinement warnings

    @property
    def spec(self) -> GuestSpec:
        return self.plan.spec


def _start(run: _Launch, sink: Callable[[bytes], None] | None) -> tuple[Guest, Sequence[str]]:
    """Everything between the reservation and a supervised guest: the
    hypervisor's argv comes back too (for :func:`_settle`)."""
    spec, stack, registry, record = run.spec, run.plan.stack, run.registry, run.record
    stack.check_labels(spec, record.labels)  # before its warnings: refused, not warned
    for problem in stack.warnings(spec, record.labels):
        _warn(run.issued, problem, 5)
    roots = launch_roots(spec.security.image_roots)  # host config, narrowed by the spec
    # the run directory becomes the guest's capped tmpfs before anything is
    # made in it (svirt/launcher/storage.py): journalled first
    storage, layer_sizes = steps.create_storage(spec, record, registry, roots)
    # cgroups: journalled first; the storage's pages are the guest's to pay
    cgroup = steps.create_cgroup(spec, record, registry, storage.size_mib)
    output = console_output(spec, roots, sink, run.cleanup)  # a log is held below
    resources = steps.hold_objects(spec, run.plan.backend, stack, record, registry, roots,
                                   layer_sizes)
    taps = steps.create_taps(spec, run.plan.backend, record, registry, run.cleanup)
    channels = GuestChannels.open(run.plan.backend, stack, record.labels,
                                  registry.run_dir(spec.name), detached=run.detached,
                                  pty_master=output.pty_master, cleanup=run.cleanup,
                                  agent=spec.agent)
    pid, argv = _spawn(run, resources, roots, layer_sizes, taps, channels, cgroup)
    return _guest(run, pid, output, channels, cgroup, storage), argv


def _spawn(run: _Launch, resources: list[Resource], roots: tuple[Path, ...],
           layer_sizes: dict[int, int], taps: steps.Taps, channels: GuestChannels,
           cgroup: GuestCgroup) -> tuple[int, Sequence[str]]:
    """The argv, the drivers' steps, the child's steps, then fork and exec;
    the hypervisor is recorded before anything can refuse it (release then
    kills it)."""
    spec, stack, registry, record = run.spec, run.plan.stack, run.registry, run.record
    run_dir = registry.home(spec.name)
    fds = channels.child_fds(taps.fds)
    inputs = prepared(run.plan, run_dir, taps.names, len(taps.fds), detached=run.detached)
    command = run.plan.backend.command(spec, inputs)
    init = steps.jail_init(registry.run_dir(spec.name)) if spec.jail else None
    objects = steps.launch_objects(spec, run.plan.backend, run.plan.accel, registry, resources,
                                   command.argv[0], init)
    steps.create_driver_steps(stack, objects, record, registry)
    setups = _child_setups(run, inputs.no_avx, resources, roots, fds)
    # cgroups: the very first step in the child, as root (before seccomp,
    # namespaces, the jail and the uid switch)
    setups.insert(0, cgroup.enter_in_child())
    # nothing of svirt's in its environment: registries tell their guests
    # apart by cgroup (root's), never by what a process carries.
    # What it may write is bounded: no file past its largest disk's bound
    # (svirt/launcher/bounds.py)
    fsize = file_size_limit(spec, roots, layer_sizes)
    pid = spawn(command.argv, command.env, fds, stdout_fd=channels.hyp_out,
                setups=setups, cwd=str(run_dir), pdeathsig=run.pdeathsig, name=spec.name,
                pid_namespace=spec.jail, init=init,
                stdin_fd=channels.hyp_in if command.console_stdin else None,
                fsize_limit=fsize)
    channels.hypervisor_has_them()
    findings = stack.after_exec(spec, record.labels, pid)
    for finding in findings:
        if not finding.refuse:
            _warn(run.issued, finding.message, 6)
    record.hypervisor = ProcessId.of(pid) if pid_exists(pid) else ProcessId(pid, 0)
    record.status = "running"
    registry.save(record)
    refuse(findings)  # recorded: release kills it
    return pid, command.argv


def _child_setups(run: _Launch, no_avx: bool, resources: list[Resource],
                  roots: tuple[Path, ...], fds: dict[int, int]) -> list[Callable[[], None]]:
    """In the child, in this order: seccomp (root), network namespace and tun
    node, the jail, then the security drivers (DAC's uid switch last)."""
    spec, backend, stack = run.spec, run.plan.backend, run.plan.stack
    setups: list[Callable[[], None]] = []
    if no_avx:
        from svirt.launcher.seccomp import hide_xstate_in_child

        setups.append(hide_xstate_in_child())
    setups += steps.network_child_setups(spec, backend, run.record)
    if spec.jail:
        setups.append(steps.jail_setup(spec, backend, stack, run.registry, run.record,
                                       resources, roots, run.plan.accel, fds, run.cleanup))
    else:
        # the jail's seccomp filter needs no namespace: a jail = false
        # hypervisor gets it too (as root, before the uid switch), so
        # it makes no user namespace, no keyring key (the uid's, it
        # outlives the guest), no io_uring, no foreign-ABI call
        from svirt.launcher.seccomp import install_in_child, jail_filter

        setups.append(install_in_child(jail_filter(), "the hypervisor (jail = false)"))
    return setups + stack.child_setups(spec, run.record.labels)


def _guest(run: _Launch, pid: int, output: ConsoleOutput, channels: GuestChannels,
           cgroup: GuestCgroup, storage: GuestStorage) -> Guest:
    """The running guest, built whole: its supervisor owns the launcher's
    ends of its channels from now on."""
    spec = run.spec
    supervisor = Supervisor(spec.name, pid, channels.console, Console(spec.name), output.sink,
                            output.pty_master, init_wrapped=spec.jail)
    channels.hand_over()  # closed by supervisor.close() and Guest._end()
    return Guest(spec, run.plan.backend, run.record, run.registry.home(spec.name), supervisor,
                 channels.control_parent, drivers=run.plan.stack, warnings=run.issued,
                 cgroup=cgroup, storage=storage, console_pty=output.pty_path,
                 control_path=channels.control_path, control_dir=run.registry.control_dir,
                 agent_path=channels.agent_path)


def confinement_warnings(spec: GuestSpec, stack: Sequence[Driver],
                         labels: dict[str, Label]) -> list[str]:
    """What the drivers say they cannot enforce for these labels on this host
    (SELinux permissive, an AppArmor profile in complain mode): every launch
    issues them, and ``svirt check`` shows them."""
    return SecurityStack.of(stack).warnings(spec, labels)


def _warn(issued: list[str], problem: str, stacklevel: int) -> None:
    """One confinement warning: kept on the guest, and issued the way the
    library issues warnings (the CLI prints them, the service answers them);
    ``stacklevel`` points at the caller of ``launch()``."""
    issued.append(problem)
    warnings.warn(problem, ConfinementWarning, stacklevel=stacklevel)



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


__all__ = ["Guest", "launch", "plan", "describe", "confinement_warnings", "LaunchError"]
