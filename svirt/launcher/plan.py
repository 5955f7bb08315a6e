"""A launch's first phase: what will run, computed before anything is reserved.

:func:`plan_launch` preflights the spec (:mod:`svirt.preflight`: the backend
and the resolved accel), lets the backend settle the spec it runs, and builds
the security stack; :func:`prepared` computes the argv's inputs once the
launch knows its taps and channels.  ``svirt check`` (:func:`describe`) is
this phase alone: the plan, the slot a launch would get and what every
driver would do, with nothing reserved, claimed or changed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.backends.base import CONSOLE_FD, FIRST_EXTRA_FD, Backend, Prepared
from svirt.errors import SvirtError
from svirt.host import HostInfo, probe_host
from svirt.images.chain import chain_resources
from svirt.launcher.registry import Registry
from svirt.preflight import preflight
from svirt.resources import Resource, ResourceKind
from svirt.security.base import Driver, PlannedObject
from svirt.security.files import launch_roots, open_resource
from svirt.security.stack import SecurityStack, build_stack
from svirt.spec import Accel, GuestSpec


@dataclass(frozen=True)
class LaunchPlan:
    """A spec preflighted: the backend, the resolved accel, the spec as the
    backend runs it, the security stack and the host they were chosen for."""

    spec: GuestSpec
    backend: Backend
    accel: Accel
    stack: SecurityStack
    host: HostInfo


def plan_launch(spec: GuestSpec, host: HostInfo | None = None,
                drivers: Sequence[Driver] | None = None) -> LaunchPlan:
    """Preflight ``spec`` (nothing reserved yet); ``drivers``: a stack of the
    caller's (tests, the lab), else the host's."""
    host = host or probe_host()
    backend, accel = preflight(spec, host)
    spec = backend.with_accel(spec, accel)
    stack = SecurityStack.of(drivers) if drivers is not None else build_stack(spec, host)
    return LaunchPlan(spec, backend, accel, stack, host)


def prepared(p: LaunchPlan, run_dir: Path, tap_names: Sequence[str], tap_count: int, *,
             detached: bool) -> Prepared:
    """What the argv is built from, once the taps and channels are known."""
    spec = p.spec
    return p.backend.for_host(Prepared(
        run_dir=run_dir, accel=p.accel,
        tap_fds=tuple(FIRST_EXTRA_FD + i for i in range(tap_count)),
        tap_names=tuple(tap_names),
        nic_macs=tuple(spec.nic_mac(i) for i in range(len(spec.nics))),
        console_out_fd=1 if detached else CONSOLE_FD,
        control_listening=detached,
    ), p.host)


def resources_of(p: LaunchPlan, run_dir: Path) -> list[Resource]:
    """Every object the guest opens: the backend's, and every declared lower
    layer of its disks (checked against the image headers)."""
    return p.backend.resources(p.spec, run_dir) + chain_resources(p.spec.disks)


#: what ``svirt check`` says of ``jail = false`` (a launch says nothing: the spec asked)
JAIL_OFF = ("jail = false: a breached hypervisor sees the whole host filesystem, every "
            "world-readable file and 0666 socket, and every process")


def describe(spec: GuestSpec, host: HostInfo | None = None,
             registry: Registry | None = None) -> dict[str, Any]:
    """What `svirt check` prints: argv, the slot a launch would get now, and
    what each driver would give the process and each object, computed by the
    drivers from the labels of that slot (:meth:`Registry.peek`: nothing is
    reserved, claimed or changed; objects are only opened ``O_PATH``)."""
    p = plan_launch(spec, host)
    spec, accel, stack = p.spec, p.accel, p.stack
    registry = registry or Registry()
    run_dir = registry.home(spec.name)
    command = p.backend.command(spec, prepared(
        p, run_dir, [f"tap{i}" for i in range(len(spec.nics))], len(spec.nics),
        detached=False))
    resources = resources_of(p, run_dir)
    slot, labels = registry.peek(spec, stack) if stack else (None, {})
    with ExitStack() as opened:
        objects, refusals, made = _planned_objects(spec, resources, opened)
        plans = stack.plans(spec, labels, objects)
    problems = [w for plan in plans for w in plan.warnings]
    problems += [f"a launch would refuse {r.path}: {why}"
                 for r, why in zip(resources, refusals, strict=True) if why]
    if not spec.jail:
        problems.append(JAIL_OFF)
    return {
        "name": spec.name,
        "backend": str(spec.backend),
        "accel": str(accel),
        "security": stack.names,
        "jail": spec.jail,
        "argv": list(command.argv),
        "env": dict(command.env),
        "slot": slot,  # if launched now
        "process": {d.driver: {"identity": d.process, "note": d.process_note} for d in plans},
        "resources": [
            {"path": str(r.path), "access": str(r.access), "kind": str(r.kind),
             "relabel": r.relabel, "made_by_launch": made[i], "refused": refusals[i],
             "plan": {d.driver: d.objects[i].to_dict() for d in plans}}
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
        # a log or a persistent NVRAM store not there yet: the launch makes it
        new = res.path in (spec.console.log, spec.nvram) and not os.path.lexists(res.path)
        if res.kind in (ResourceKind.RUN_DIR, ResourceKind.LAYER, ResourceKind.SEED) or new:
            # reserve makes the run dir root's 0700, open_log a log 0600, the
            # firmware module a store 0600, the seed step the seed 0400; then labelled
            mode = {ResourceKind.RUN_DIR: stat.S_IFDIR | 0o700, ResourceKind.LAYER: None,
                    ResourceKind.SEED: stat.S_IFREG | 0o400}.get(res.kind, stat.S_IFREG | 0o600)
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
