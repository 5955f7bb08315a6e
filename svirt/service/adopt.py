"""A running detached guest, adopted by a new supervisor from its record."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svirt.backends import get_backend
from svirt.errors import ControlError, StateError, SvirtError
from svirt.host import HostInfo
from svirt.launcher.channels import QMP_SOCKET, console_fifos
from svirt.launcher.console import Console
from svirt.launcher.launch import Guest
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import Supervisor
from svirt.procfs import ProcessId, kill_process
from svirt.security.stack import build_stack
from svirt.spec import GuestSpec, spec_from_mapping


def detached_info(spec_data: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """What a detached record keeps: the spec as given (its TOML keys) and the
    directory its relative paths are relative to."""
    return {"spec": spec_data, "base": str(base) if base is not None else None}


def spec_of(record: Record) -> GuestSpec:
    return spec_of_detached(record.detached or {})


def spec_of_detached(info: dict[str, Any]) -> GuestSpec:
    """The spec of what :func:`detached_info` returned."""
    base = info.get("base")
    return spec_from_mapping(info.get("spec") or {}, Path(base) if base else None)


def adopt(registry: Registry, record: Record, host: HostInfo,
          sink: Callable[[bytes], None] | None) -> Guest:
    """Take over ``record``'s running hypervisor: pidfd (checked against its
    start time, so a reused pid is never adopted), console FIFOs, QMP socket;
    the record then names this process as its supervisor.

    Nothing the guest does refuses adoption: the console FIFOs are opened
    read-write (never ENXIO, whatever the guest closed); should they still
    not open, the guest is adopted without a console (``adopt_problem`` on
    the guest, and its record's status, say why) and is stopped and fenced
    through its pidfd like any other (QMP or mconsole first, then signals)."""
    hv = record.hypervisor
    if hv is None or not hv.alive():
        raise StateError(f"guest {record.name}: its hypervisor is gone")
    pidfd = os.pidfd_open(hv.pid)
    try:
        if not hv.alive():  # the pid was reused between the check and the open
            raise StateError(f"guest {record.name}: its hypervisor is gone")
        spec = spec_of(record)
        run_root = registry.run_dir(record.name)
        problem = ""
        try:
            _, _, sup_read, sup_write = console_fifos(run_root, create=False)
        except (ControlError, OSError) as err:
            problem = f"adopted without its console ({err})"
            sup_read, sup_write = _no_console()
    except BaseException:
        os.close(pidfd)
        raise
    supervisor = Supervisor(record.name, hv.pid, (sup_read, sup_write), Console(record.name),
                            sink, init_wrapped=spec.jail, pidfd=pidfd, adopted=True)
    backend = get_backend(spec.backend)
    guest = Guest(spec, backend, record, registry.home(record.name), supervisor, None)
    guest.adopt_problem = problem  # type: ignore[attr-defined]
    if backend.uses_control_socket():
        guest._control_path = run_root / QMP_SOCKET
    guest.drivers = build_stack(spec, host)
    guest._control_dir = registry.control_dir
    with registry.locked():
        record.supervisor = ProcessId.of(os.getpid())
        if problem:
            record.status = f"running, {problem}"
        registry.save(record)
    if registry.cluster is not None:  # this process keeps the host's lease alive now
        registry.cluster.keep(registry.claims, registry.claim_of(record))
    return guest


def _no_console() -> tuple[int, int]:
    """A console that is closed both ways: reads end at once (EOF), writes
    fail (EPIPE): the supervisor's pump then watches only the pidfd."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    os.close(out_w)
    os.close(in_r)
    return out_r, in_w


def fence_unadoptable(registry: Registry, record: Record, why: str) -> str:
    """A detached guest no supervisor can take over (its spec no longer
    loads, ...): killed through a pidfd of its hypervisor (start time
    checked), its cgroup killed whole, then released, so it never runs
    unsupervised (in a cluster: never past its keys).  What happened."""
    hv = record.hypervisor
    if hv is not None:
        kill_process(hv)  # pidfd_open, start time checked, SIGKILL
    try:
        registry.release(record)  # its cgroup first (kill_guest_leftovers)
    except SvirtError as err:
        return f"could not be adopted ({why}); killed, but not released: {err.message}"
    return f"could not be adopted ({why}); killed through its pidfd and released"
