"""A launch's planned steps: each journalled in the guest's record, then made.

The guest's storage mount, its cgroup, its taps, the security drivers'
extras (AppArmor's profile, SMACK's rules) and its jail are made here, each
the way :mod:`svirt.launcher.cgroups` made the first: computed, its journal
entry written (``Registry.save``), then created, so that ``release`` (or
``svirt gc`` after a killed launcher) undoes exactly what was made.  The
objects the guest opens are held here too (:func:`hold_objects`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from svirt.backends.base import Backend
from svirt.errors import HostError
from svirt.host import CLEAN_PATH
from svirt.images.chain import chain_resources
from svirt.launcher import journal
from svirt.launcher.cgroups import GuestCgroup
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.launcher.storage import GuestStorage
from svirt.procfs import LiveProcesses
from svirt.resources import Resource, ResourceKind
from svirt.security.base import LaunchObjects, guest_ids
from svirt.security.files import open_resource
from svirt.security.stack import SecurityStack
from svirt.spec import Accel, GuestSpec


def journal_then(registry: Registry, record: Record, entry: dict[str, object] | None,
                 create: Callable[[], None]) -> None:
    """One planned step: its journal entry saved first (None: nothing to
    undo), then the step made."""
    if entry is not None:
        record.journal.append(journal.checked(entry))
        registry.save(record)
    create()


def create_storage(spec: GuestSpec, record: Record, registry: Registry,
                   roots: tuple[Path, ...]) -> tuple[GuestStorage, dict[int, int]]:
    """The guest's storage mount (svirt/launcher/storage.py), sized from the
    host config and its ephemeral disks' bases: journalled, then mounted over
    its run directory; release unmounts it (Registry._undo, op "storage").
    Also the bases' virtual sizes, which the layers are made with."""
    import svirt.config as config
    from svirt.launcher import cgroupfs, storage

    sizes: dict[int, int] = {}
    if any(d.ephemeral for d in spec.disks):
        from svirt.images.layers import layer_sizes

        sizes = layer_sizes(spec, roots)
    host = config.load()
    planned = storage.plan(registry.run_dir(spec.name), list(sizes.values()),
                           cgroupfs.registry_tag(registry.state), host.guest_storage_mib,
                           host.guest_storage_inodes)
    # the host's budget for every guest's storage: checked and taken in one
    # step under the host claims lock (two launches never both fit the last)
    with registry.locked(), registry.claims.locked():
        storage.check_budget(planned, host.guest_storage_budget_percent)
        journal_then(registry, record, planned.journal_entry(), planned.create)
    return planned, sizes


def create_cgroup(spec: GuestSpec, record: Record, registry: Registry,
                  storage_mib: int = 0) -> GuestCgroup:
    """The guest's cgroup (svirt/launcher/cgroups.py): journalled, then made;
    release removes it (Registry._undo, op "cgroup").  ``storage_mib``: the
    guest's storage mount, whose tmpfs pages it is charged for, on top of its
    RAM (see svirt/launcher/storage.py)."""
    from svirt.launcher import cgroupfs, cgroups

    cg = cgroups.plan(spec.name, record.slot, spec.memory + storage_mib, str(spec.backend),
                      cgroupfs.registry_tag(registry.state), spec.limits.pids,
                      spec.limits.cpu_weight, spec.limits.cpus)
    record.journal.append(journal.checked(cg.journal_entry()))
    registry.save(record)
    return cgroups.create(spec.name, record.slot, spec.memory + storage_mib, str(spec.backend),
                          cgroup=cg)


def hold_objects(spec: GuestSpec, backend: Backend, stack: SecurityStack, record: Record,
                 registry: Registry, roots: tuple[Path, ...],
                 layer_sizes: dict[int, int]) -> list[Resource]:
    """Every object the guest opens, made ready (ephemeral layers) and held:
    labelled by the stack, journalled and ref-counted by the registry."""
    run_dir = registry.home(spec.name)
    resources = backend.resources(spec, run_dir) + chain_resources(spec.disks)
    if any(d.ephemeral for d in spec.disks):  # in the run dir: release removes them
        from svirt.images.layers import prepare_layers  # only for ephemeral disks

        prepare_layers(spec, registry.run_dir(spec.name), run_dir, roots, layer_sizes)
    prepare_nvram(spec, registry, roots)
    if spec.cloud_init is not None:  # in the run dir: gone with the storage mount
        create_seed(spec, registry.run_dir(spec.name), roots)
    stack.check_objects(resources)  # DAC: the guest's uid can walk to each
    live = LiveProcesses()
    for resource in resources:
        registry.hold(record, resource, stack, roots, live)
    return resources


def prepare_nvram(spec: GuestSpec, registry: Registry, roots: tuple[Path, ...]) -> None:
    """A UEFI guest's variables store, made ready to be held like any object
    (svirt/images/firmware.py): a fresh copy of the template in its run
    directory (root's; gone with its storage mount at release, or at gc),
    or its persistent store checked (a link, a FIFO, a store of the wrong
    size refused), made from the template the first time."""
    from svirt.spec import Firmware, firmware_of

    if firmware_of(spec) is not Firmware.UEFI:
        return
    from svirt.images import firmware as fw

    if spec.nvram is not None:
        fw.persistent_nvram(spec.nvram, roots, fw.OVMF_VARS).close()
        return
    run_dir = registry.run_dir(spec.name)
    run_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fw.transient_nvram(run_fd, run_dir, fw.OVMF_VARS).close()
    finally:
        os.close(run_fd)


def create_seed(spec: GuestSpec, run_dir: Path, roots: tuple[Path, ...]) -> None:
    """The guest's cloud-init seed (svirt/images/seed.py): built from the
    spec, written by fd into its run directory (root's, ``O_EXCL``, 0400),
    then held like every object (private read-only: this guest alone reads
    it).  Nothing to journal: it lives on the guest's storage mount, which
    release (and gc) unmounts."""
    from svirt.images.seed import CloudInit, make_seed

    ci = spec.cloud_init
    assert ci is not None  # noqa: S101 - called for a spec with [cloud_init]
    seed = CloudInit(ci.user_data, ci.user_data_file, dict(ci.meta_data), ci.network_config,
                     ci.network_config_file, ci.ssh_authorized_keys)
    dfd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        make_seed(seed, uuid=str(spec.uuid), name=spec.name, dirfd=dfd, directory=run_dir,
                  roots=roots)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Taps:
    """The guest's taps: names (one per nic) and, for a backend that takes
    them, the launcher's open fds (closed by the launch's cleanup)."""

    names: tuple[str, ...] = ()
    fds: tuple[int, ...] = ()


def create_taps(spec: GuestSpec, backend: Backend, record: Record, registry: Registry,
                cleanup: ExitStack) -> Taps:
    """Create one tap per nic (journalled first); a backend that takes tap
    fds (QEMU) also gets an open fd each."""
    if not spec.nics:
        return Taps()
    from svirt.launcher import network  # pyroute2: only for guests with nics

    uid, gid = guest_ids(record.labels) or (-1, -1)
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
                record.journal.append(journal.entry("tap", name=name, netns=spec.netns))
                registry.save(record)
                network.create_tap(name, uid, gid)
                network.attach_tap(ipr, name, nic.bridge, nic.isolated)
                names.append(name)
                if backend.passes_tap_fds():
                    fd = network.open_tap(name)
                    cleanup.callback(os.close, fd)
                    fds.append(fd)
        finally:
            ipr.close()
    return Taps(tuple(names), tuple(fds))


def network_child_setups(spec: GuestSpec, backend: Backend, record: Record
                         ) -> list[Callable[[], None]]:
    """Steps that need root in the child, before the security drivers run."""
    if spec.netns is None and not spec.nics:
        return []
    from svirt.launcher import network

    steps = []
    if spec.netns is not None:
        steps.append(network.enter_netns_in_child(spec.netns))
    ids = guest_ids(record.labels)
    if spec.nics and backend.opens_tun() and ids is not None:
        steps.append(network.private_tun_in_child(*ids))
    return steps


def guest_devices(spec: GuestSpec, backend: Backend, accel: Accel) -> list[str]:
    """The device nodes under /dev a guest opens beyond the jail's usual ones."""
    devices = ["kvm"] if accel is Accel.KVM else []
    if spec.nics and backend.opens_tun():
        devices.append("net/tun")
    return devices


def create_driver_steps(stack: SecurityStack, objects: LaunchObjects, record: Record,
                        registry: Registry) -> None:
    """The drivers' own steps (AppArmor's profile, SMACK's rules), each
    journalled, then made; release undoes them."""
    for step in stack.launch_steps(objects, record.labels):
        journal_then(registry, record, step.journal_entry(), step.create)


def launch_objects(spec: GuestSpec, backend: Backend, accel: Accel, registry: Registry,
                   resources: list[Resource], argv0: str, init: str | None) -> LaunchObjects:
    """What the drivers' steps are made from (see :class:`LaunchObjects`)."""
    from svirt.launcher.jail import DEVICES

    needs = backend.jail_needs(spec, registry.home(spec.name))
    return LaunchObjects(
        spec, tuple(resources), argv0, init, accel is Accel.KVM,
        tuple(dict.fromkeys([*DEVICES, *guest_devices(spec, backend, accel)])),
        registry.run_dir(spec.name),
        registry.control_dir if needs.control_dir else None, CLEAN_PATH)


def jail_init(run_dir: Path) -> str:
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


def jail_setup(spec: GuestSpec, backend: Backend, stack: SecurityStack, registry: Registry,
               record: Record, resources: list[Resource], roots: tuple[Path, ...],
               accel: Accel, fds: dict[int, int], cleanup: ExitStack) -> Callable[[], None]:
    """The jail's child step: each object is bound from an fd opened here by the
    same root walk that checked it (the fds go to the child at fixed numbers)."""
    from svirt.launcher.jail import INIT_COPY, JailPlan, plan_binds
    from svirt.launcher.jail import build_in_child as jail_in_child

    objects: list[tuple[int, Path, bool, bool]] = []

    def add(fd: int, path: Path, is_dir: bool, writable: bool) -> None:
        cleanup.callback(os.close, fd)
        objects.append((fd, path, is_dir, writable))

    for res in resources:
        if res.kind is ResourceKind.CONSOLE_LOG:
            continue  # written by the launcher, never opened by the guest
        obj = open_resource(res, roots)
        add(obj.fd, obj.path, res.kind is ResourceKind.RUN_DIR, not res.access.read_only)
    home = registry.home(spec.name)
    needs = backend.jail_needs(spec, home)
    for binary in needs.binaries:
        add(os.open(binary, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC), binary, False, False)
    if needs.control_dir:  # the launcher's client sockets
        ctl = registry.control_dir
        add(os.open(ctl, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC), ctl,
            True, False)
    binds = plan_binds(objects)
    for bind, (fd, *_rest) in zip(binds, objects, strict=True):
        fds[bind.fd] = fd
    jail_root = registry.run_dir(spec.name) / "jail"
    jail_root.mkdir(mode=0o755, exist_ok=True)  # in the run dir: root's alone
    return jail_in_child(JailPlan(jail_root, binds,
                                  tuple(guest_devices(spec, backend, accel)), needs.shm_mib,
                                  home if needs.home_cwd else Path("/"),
                                  stack.tmpfs_options(record.labels),
                                  new_netns=not (spec.nics and backend.opens_tun()),
                                  init=registry.run_dir(spec.name) / INIT_COPY))
