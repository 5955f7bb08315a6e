"""The spec's dataclasses: what a guest is, as frozen data validated once.

Each field is declared once, with :func:`~svirt.spec.keys.key` (its doc and
what its annotation does not say); ``__post_init__`` checks the values.
"""

from __future__ import annotations

import hashlib
import re
import uuid as uuidlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from svirt.spec.boot import MAX_CDROMS, BootFrom, Cdrom, Firmware, check_boot
from svirt.spec.guest_services import CloudInit
from svirt.spec.keys import bounds, key
from svirt.spec.values import (
    BRIDGE_RE,
    CPUS_RE,
    MAC_RE,
    MAX_BACKING,
    MAX_DISKS,
    MAX_NICS,
    MAX_PIDS,
    MAX_SHUTDOWN_TIMEOUT,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    MIN_PIDS,
    NAME_RE,
    NETNS_RE,
    NIC_MODELS,
    Accel,
    Backend,
    ConsoleMode,
    DiskFormat,
    Restart,
    SecurityModel,
    _bool,
    _enum,
    _fail,
    _iface_name,
    _path,
    _show,
    apparmor_profile_problem,
    parse_cpus,
    parse_memory,
    show_path,
    smack_label_valid,
)


@dataclass(frozen=True)
class Backing:
    """One lower layer of a qcow2 disk, declared in the spec: the image header
    is guest-writable, so the chain comes from here and the header must match."""

    path: Path = key("the lower layer's file")
    format: DiskFormat = key("its format: never probed, so required in TOML",
                             DiskFormat.RAW, required=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("disk.backing.path", self.path))
        object.__setattr__(self, "format",
                           _enum(DiskFormat, "disk.backing.format", self.format))


@dataclass(frozen=True)
class Disk:
    path: Path = key("the image file (or a block device below a block_device_root)")
    format: DiskFormat = key("the image format", DiskFormat.RAW)
    readonly: bool = key("the guest may only read it", False)
    shared: bool = key("other guests may use it at the same time (a shared label)", False)
    relabel: bool = key("false: leave its label alone (a static label)", True)
    backing: tuple[Backing, ...] = key(
        "the chain below a qcow2 image, top first; the image header must match it", (),
        schema={"maxItems": MAX_BACKING},
        not_a_table="expected a table {path = ..., format = ...}",
        missing="needs both path and format (a format is never probed)")
    #: the guest writes to a copy-on-write layer in its run directory, deleted
    #: when it ends; ``path`` is then the base, read-only and shared
    #: (svirt/images/layers.py)
    ephemeral: bool = key("the guest writes to a throw-away copy-on-write layer; path "
                          "stays read-only and shared", False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("disk.path", self.path))
        object.__setattr__(self, "format", _enum(DiskFormat, "disk.format", self.format))
        for flag in ("readonly", "shared", "relabel", "ephemeral"):
            _bool(f"disk.{flag}", getattr(self, flag))
        if self.ephemeral:
            self._check_ephemeral()
        if isinstance(self.backing, list):
            object.__setattr__(self, "backing", tuple(self.backing))
        if not isinstance(self.backing, tuple) or not all(
                isinstance(b, Backing) for b in self.backing):
            raise _fail("disk.backing", "expected a list of backing files (path, format)")
        if len(self.backing) > MAX_BACKING:
            raise _fail("disk.backing", f"at most {MAX_BACKING} backing files")
        layers = [self.format, *(b.format for b in self.backing)]
        for i, upper in enumerate(layers[:-1]):
            if upper is not DiskFormat.QCOW2:
                raise _fail("disk.backing", f"layer {i} is {upper}: only a qcow2 image has a "
                            "backing file")
        paths = [self.path, *(b.path for b in self.backing)]
        if len(set(paths)) != len(paths):
            raise _fail("disk.backing", "a backing chain may not name a file twice")

    def _check_ephemeral(self) -> None:
        if self.readonly:
            raise _fail("disk.ephemeral", "a read-only disk has no writes to throw away",
                        hint="drop one of readonly and ephemeral")
        if self.shared:
            raise _fail("disk.ephemeral", "a shared disk is written for other guests to see; "
                        "an ephemeral one keeps its writes to itself",
                        hint="drop one of shared and ephemeral")

    def as_ephemeral(self) -> Disk:
        """This disk with a throw-away layer (``svirt run --ephemeral``): a
        read-only disk stays as it is, a shared one becomes private."""
        if self.readonly or self.ephemeral:
            return self
        return replace(self, ephemeral=True, shared=False)


@dataclass(frozen=True)
class Console:
    mode: ConsoleMode = key("log: to a file; stdio: to svirt's stdout; pty: a terminal to "
                            "attach to; none: kept in memory only", ConsoleMode.NONE)
    log: Path | None = key("the console log (its mode is then log)", None)
    #: a detached guest's rotated console log (svirt start): bytes per file and
    #: files kept; None: the host config's (2 MiB x 3 by default)
    max_bytes: int | None = key("svirt start: bytes per rotated console log file "
                                "(default: the host config's)", None,
                                minimum=4096, maximum=1 << 40)
    keep: int | None = key("svirt start: rotated console log files kept", None,
                           minimum=1, maximum=100)

    def __post_init__(self) -> None:
        for attr in ("max_bytes", "keep"):
            low, high = bounds(Console, attr)
            v = getattr(self, attr)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not low <= v <= high):
                raise _fail(f"console.{attr}", f"expected an integer {low}-{high}, got {_show(v)}")
        mode = _enum(ConsoleMode, "console.mode", self.mode)
        if self.log is not None:
            object.__setattr__(self, "log", _path("console.log", self.log))
            if mode is ConsoleMode.NONE:
                mode = ConsoleMode.LOG
        if mode is ConsoleMode.LOG and self.log is None:
            raise _fail("console.log", "mode 'log' needs a log file path")
        object.__setattr__(self, "mode", mode)


@dataclass(frozen=True)
class Nic:
    bridge: str | None = key("an existing bridge; none: a tap with no uplink", None,
                             schema={"pattern": f"^{BRIDGE_RE.pattern}$"})
    mac: str | None = key("default: stable, derived from the uuid", None,
                          schema={"pattern": "^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$"})
    isolated: bool = key("bridge port isolation: isolated guests cannot reach each other",
                         False)
    model: str = key("the emulated network card (qemu)", "virtio",
                     schema={"enum": list(NIC_MODELS)})

    def __post_init__(self) -> None:
        if self.bridge is not None:
            _iface_name("nic.bridge", self.bridge, BRIDGE_RE, "a valid interface name")
        if self.mac is not None:
            if not isinstance(self.mac, str) or not MAC_RE.fullmatch(mac := self.mac.lower()):
                raise _fail("nic.mac",
                            f"{_show(self.mac)} is not a MAC address like 52:54:00:12:34:56")
            if int(mac[:2], 16) & 1:
                raise _fail("nic.mac", f"{self.mac!r} is a multicast address")
            object.__setattr__(self, "mac", mac)
        _bool("nic.isolated", self.isolated)
        if not isinstance(self.model, str) or self.model not in NIC_MODELS:
            raise _fail("nic.model", f"{_show(self.model)} is not one of: "
                        f"{', '.join(NIC_MODELS)}")

@dataclass(frozen=True)
class Security:
    model: SecurityModel = key("the MAC model (auto: the host's, with dac)",
                               SecurityModel.AUTO)
    type: str | None = key("SELinux: the guest's process type (xxx_t)", None)
    label: str | None = key("a static process label (SELinux context, AppArmor profile or "
                            "SMACK label): no category pair is allocated", None)
    relabel: bool = key("false: leave resource labels alone (static labels)", True)
    image_roots: tuple[Path, ...] = key("narrows the host config's image roots", ())

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _enum(SecurityModel, "security.model", self.model))
        if self.type is not None and (
            not isinstance(self.type, str) or len(self.type) > 255
            or not re.fullmatch(r"[a-z][a-z0-9_]*_t", self.type)
        ):
            raise _fail("security.type", f"{_show(self.type)} is not an SELinux type name (xxx_t)")
        if self.type is not None and self.model not in (SecurityModel.AUTO,
                                                         SecurityModel.SELINUX):
            raise _fail("security.type", f"an SELinux type means nothing to model {self.model}",
                        hint="label = \"...\" names an AppArmor profile or a SMACK label")
        if self.label is not None and self.model is SecurityModel.SMACK:
            if not isinstance(self.label, str) or not smack_label_valid(self.label):
                raise _fail("security.label", f"{_show(self.label)} is not a SMACK label "
                            "(1-255 characters, no white space, slash or quote)")
        elif self.label is not None and self.model is SecurityModel.APPARMOR:
            problem = (apparmor_profile_problem(self.label) if isinstance(self.label, str)
                       else "is not a string")
            if problem:
                raise _fail("security.label", f"{_show(self.label)} {problem}")
        elif self.label is not None and (
            not isinstance(self.label, str) or len(self.label) > 4096
            or self.label.count(":") < 3 or not self.label.isprintable()
            or re.search(r"\s", self.label)
        ):
            raise _fail("security.label", f"{_show(self.label)} is not user:role:type:level",
                        hint="an AppArmor profile or a SMACK label needs its security.model "
                             "(\"apparmor\", \"smack\")")
        _bool("security.relabel", self.relabel)
        if not isinstance(self.image_roots, tuple | list):
            raise _fail("security.image_roots",
                        f"expected a list of paths, got {_show(self.image_roots)}")
        roots = tuple(_path("security.image_roots", r) for r in self.image_roots)
        object.__setattr__(self, "image_roots", roots)


@dataclass(frozen=True)
class Limits:
    """``[limits]``: the guest's cgroup (svirt/launcher/cgroups.py).  ``pids``
    None is the backend's default; memory comes from ``memory``."""

    pids: int | None = key("pids.max: host tasks (threads too) of the hypervisor "
                           "(default: the backend's)", None,
                           minimum=MIN_PIDS, maximum=MAX_PIDS)
    cpu_weight: int | None = key("cpu.weight (v1: cpu.shares = weight*1024/100)", None,
                                 minimum=1, maximum=10_000)
    cpus: str | None = key("cpuset.cpus, e.g. \"0-1\" or \"0,2-3\"", None,
                           schema={"pattern": f"^\\s*{CPUS_RE.pattern}\\s*$"})

    def __post_init__(self) -> None:
        for attr in ("pids", "cpu_weight"):
            low, high = bounds(Limits, attr)
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(f"limits.{attr}", f"expected an integer, got {_show(value)}")
            if not low <= value <= high:
                raise _fail(f"limits.{attr}", f"{_show(value)} is not between {low} and {high}")
        if self.cpus is not None:
            object.__setattr__(self, "cpus", parse_cpus(self.cpus))

@dataclass(frozen=True)
class GuestSpec:
    name: str = key("1-64 characters of A-Z a-z 0-9 _ . -, not starting with . or -",
                    schema={"pattern": f"^{NAME_RE.pattern}$"})
    kernel: Path | None = key("the kernel (lguest; qemu: none boots through firmware) or the "
                              "UML binary (uml)", None)
    backend: Backend = key("the hypervisor", Backend.QEMU)
    uuid: uuidlib.UUID = key("default: a new one at every load", factory=uuidlib.uuid4,
                             schema={"format": "uuid"})
    accel: Accel = key("qemu: kvm (required), tcg, or auto (KVM if it works, else TCG)",
                       Accel.AUTO)
    memory: int = key("MiB, or a size like \"256M\" / \"1G\"", 256, toml=(int, str),
                      minimum=MIN_MEMORY_MIB)
    vcpus: int = key("virtual cpus (uml and lguest run exactly 1)", 1,
                     minimum=1, maximum=MAX_VCPUS)
    initrd: Path | None = key("an initial ramdisk", None)
    cmdline: str = key("the guest kernel's command line (one line)", "")
    disks: tuple[Disk, ...] = key("[[disk]]: the guest's disks", (), name="disk",
                                  schema={"maxItems": MAX_DISKS})
    # firmware boot (qemu): svirt/spec/boot.py
    firmware: Firmware | None = key("qemu: bios or uefi (default: bios without a kernel)",
                                    None)
    nvram: Path | None = key("uefi: a persistent variables store under an image root "
                             "(default: a fresh copy per run)", None)
    boot: BootFrom = key("firmware boots the first disk or the first cdrom", BootFrom.DISK)
    cdroms: tuple[Cdrom, ...] = key("[[cdrom]]: read-only ISO images (qemu)", (), name="cdrom",
                                    schema={"maxItems": MAX_CDROMS})
    nics: tuple[Nic, ...] = key("[[nic]]: the guest's network cards", (), name="nic",
                                schema={"maxItems": MAX_NICS})
    netns: str | None = key("run the hypervisor and its taps in this network namespace",
                            None)
    console: Console = key("[console]: where the guest's console goes", factory=Console)
    shutdown_timeout: float = key("seconds a guest has to power off when asked", 30.0,
                                  exclusive_minimum=0, maximum=MAX_SHUTDOWN_TIMEOUT)
    security: Security = key("[security]: the MAC model and labels", factory=Security)
    limits: Limits = key("[limits]: the guest's cgroup", factory=Limits)
    jail: bool = key("the namespace jail (svirt/launcher/jail.py); false only when asked "
                     "for", True)
    #: detached guests (svirt start): restart policy; at most max_restarts
    #: restarts within restart_window seconds, then the guest is "failed"
    restart: Restart = key("svirt start: when the supervisor starts the guest again",
                           Restart.NO)
    max_restarts: int = key("svirt start: restarts within restart_window, then the guest "
                            "is failed", 5, minimum=0, maximum=1000)
    restart_window: float = key("svirt start: seconds", 300.0, minimum=1, maximum=86400)
    agent: bool = key("qemu: a guest agent port (qemu-ga's org.qemu.guest_agent.0) for "
                      "svirt exec and svirt cp", False)
    cloud_init: CloudInit | None = key("[cloud_init]: a NoCloud seed built for the guest "
                                       "(qemu)", None)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise _fail(
                "name",
                f"{_show(self.name)} is not 1-64 characters of A-Z a-z 0-9 _ . -",
                hint="names may not contain '/', ',' or spaces",
            )
        if self.name.startswith("."):
            raise _fail("name", f"{self.name!r} may not start with a dot")
        if self.name.startswith("-"):
            raise _fail("name", f"{self.name!r} may not start with '-'",
                        hint="a leading '-' reads as an option to the tools svirt runs")
        backend = _enum(Backend, "backend", self.backend)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "accel", _enum(Accel, "accel", self.accel))
        if isinstance(self.uuid, str):
            try:
                object.__setattr__(self, "uuid", uuidlib.UUID(self.uuid))
            except ValueError:
                raise _fail("uuid", f"{_show(self.uuid)} is not a UUID") from None
        elif not isinstance(self.uuid, uuidlib.UUID):
            raise _fail("uuid", f"expected a UUID, got {_show(self.uuid)}")
        memory = parse_memory(self.memory)
        object.__setattr__(self, "memory", memory)
        if memory < MIN_MEMORY_MIB:
            raise _fail("memory",
                        f"{_show(memory)} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise _fail("vcpus", f"expected a positive integer, got {_show(self.vcpus)}")
        if self.vcpus > MAX_VCPUS:
            raise _fail("vcpus", f"{_show(self.vcpus)} is more than {MAX_VCPUS}")
        if backend is not Backend.QEMU and self.vcpus != 1:
            raise _fail("vcpus", f"the {backend} backend runs exactly 1 vcpu")
        if self.initrd is not None:
            object.__setattr__(self, "initrd", _path("initrd", self.initrd))
            if backend is not Backend.QEMU and re.search(r"\s", str(self.initrd)):
                raise _fail("initrd", f"{show_path(self.initrd)}: spaces cannot pass on a "
                            "kernel command line")
        if not isinstance(self.cmdline, str) or "\n" in self.cmdline or "\0" in self.cmdline:
            raise _fail("cmdline", "expected a single-line string")
        if isinstance(self.shutdown_timeout, bool) or not isinstance(
            self.shutdown_timeout, int | float
        ):
            raise _fail("shutdown_timeout", f"expected seconds, got {_show(self.shutdown_timeout)}")
        if not 0 < self.shutdown_timeout <= MAX_SHUTDOWN_TIMEOUT:
            raise _fail("shutdown_timeout",
                        f"must be between 0 and {MAX_SHUTDOWN_TIMEOUT} seconds")
        for table, value, cls in (("console", self.console, Console),
                                  ("security", self.security, Security),
                                  ("limits", self.limits, Limits)):
            if not isinstance(value, cls):
                raise _fail(table, f"expected a {cls.__name__}, got {_show(value)}")
        lists: tuple[tuple[str, object, type], ...] = (
            ("disk", self.disks, Disk), ("nic", self.nics, Nic))
        for table, items, kind in lists:
            if not isinstance(items, tuple | list) or not all(isinstance(i, kind) for i in items):
                raise _fail(table, f"expected a tuple of {kind.__name__}, got {_show(items)}")
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "nics", tuple(self.nics))
        self._check_disks(backend)
        check_boot(self, backend)
        self._check_jail()
        self._check_restart()
        self._check_guest_services(backend)
        if self.netns is not None:
            _iface_name("netns", self.netns, NETNS_RE, "a network namespace name")

    def _check_guest_services(self, backend: Backend) -> None:
        """The agent port and the cloud-init seed: QEMU's devices."""
        _bool("agent", self.agent)
        if self.cloud_init is not None and not isinstance(self.cloud_init, CloudInit):
            raise _fail("cloud_init", f"expected a CloudInit, got {_show(self.cloud_init)}")
        if backend is Backend.QEMU:
            return
        if self.agent:
            raise _fail("agent", f"the {backend} backend has no guest agent port",
                        hint="svirt run SPEC -- CMD runs a command on the console shell")
        if self.cloud_init is not None:
            raise _fail("cloud_init", f"the {backend} backend has no CD-ROM for a seed",
                        hint="configure the guest in its image or initrd instead")

    def _check_jail(self) -> None:
        _bool("jail", self.jail)

    def _check_restart(self) -> None:
        object.__setattr__(self, "restart", _enum(Restart, "restart", self.restart))
        n, (low, high) = self.max_restarts, bounds(GuestSpec, "max_restarts")
        if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
            raise _fail("max_restarts", f"expected an integer {low}-{high}, got {_show(n)}")
        w, (low, high) = self.restart_window, bounds(GuestSpec, "restart_window")
        if isinstance(w, bool) or not isinstance(w, int | float) or not low <= w <= high:
            raise _fail("restart_window", f"expected {low}-{high} seconds, got {_show(w)}")

    def _check_disks(self, backend: Backend) -> None:
        # the same path twice; the same file under two names (a hard link, a
        # symlink) is found by preflight, which looks at the files
        seen: set[Path] = set()
        for disk in self.disks:
            if disk.path in seen:
                raise _fail("disk.path", f"{show_path(disk.path)} is listed twice (also as "
                            f"{show_path(disk.path)})")
            seen.add(disk.path)
            if backend is Backend.UML and re.search(r"[\s,:=]", str(disk.path)):
                raise _fail(
                    "disk.path",
                    f"{show_path(disk.path)}: UML reads ',' ':' '=' and spaces in disk paths "
                    "as syntax",
                    hint="rename the file or use a symlink-free path without them",
                )
            if disk.ephemeral and backend is Backend.UML and disk.format is not DiskFormat.RAW:
                raise _fail("disk.format", f"{show_path(disk.path)}: an ephemeral uml disk "
                            "needs a raw base (UML's COW file sits on raw images only)",
                            hint="convert it: qemu-img convert -O raw BASE.qcow2 BASE.img")
            if disk.ephemeral and backend is Backend.LGUEST:
                raise _fail("disk.ephemeral", "the lguest backend has no copy-on-write layer",
                            hint="use the qemu or uml backend")
            if backend is not Backend.QEMU and disk.format is not DiskFormat.RAW:
                raise _fail("disk.format", f"the {backend} backend supports raw disks only")
        if len(self.disks) > MAX_DISKS:
            raise _fail("disk", f"at most {MAX_DISKS} disks")
        if len(self.nics) > MAX_NICS:
            raise _fail("nic", f"at most {MAX_NICS} nics")

    def nic_mac(self, index: int) -> str:
        """The nic's MAC: given, or stable from the uuid (locally administered)."""
        given = self.nics[index].mac
        if given:
            return given
        digest = hashlib.sha256(f"{self.uuid}/{index}".encode()).digest()
        octets = [0x52, 0x54] + list(digest[:4])  # 52: locally administered, unicast
        return ":".join(f"{o:02x}" for o in octets)

    def kernel_path(self) -> Path:
        """The kernel, which uml and lguest always have (qemu may boot firmware)."""
        if self.kernel is None:
            raise _fail("kernel", f"guest {self.name} has no kernel")
        return self.kernel

    def with_changes(self, **changes: Any) -> GuestSpec:
        return replace(self, **changes)

    def with_ephemeral_disks(self) -> GuestSpec:
        """Every writable disk ephemeral (``svirt run --ephemeral``)."""
        return replace(self, disks=tuple(d.as_ephemeral() for d in self.disks))

