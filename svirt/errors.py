"""The svirt error tree.

Every failure the library reports is an :class:`SvirtError`; only the
command line (:mod:`svirt.cli`) turns one into a message and an exit code,
the error's :attr:`~SvirtError.exit_code` (2 for a :class:`SpecError`, 1 for
every other).  Each carries a ``message`` (one
line, what went wrong), an optional ``hint`` (what to do about it) and the
fields a person needs (guest name, path, label, argv, log tail).

SvirtError
├── SpecError            a guest spec is invalid (file, key, what is wrong)
├── HostError            the host cannot do what the spec asks (no binary,
│   │                    KVM unusable, LSM missing, /dev/lguest absent)
│   └── ConfigError      the host config file (/etc/svirt/svirt.toml) is bad
├── ImageBuildError      building a tiny guest or a disk image from Debian
│                        packages failed
├── StateError           the registry: name taken, slots exhausted, bad record
│   ├── SlotsExhausted   every slot / category pair / uid is in use
│   └── ClusterError     the cluster (etcd) refused or cannot be reached
│       └── NoQuorum     no etcd member answered with a quorum behind it
├── SecurityError        a security driver refused or failed
│   └── RelabelRefused   a resource may not be relabelled (symlink, hard
│                        link, deny-listed, outside roots, in use)
├── NetworkError         a tap or bridge could not be set up
├── LaunchError          the hypervisor could not be started (argv, log tail)
├── ControlError         the control channel (QMP, mconsole) failed
│   └── AgentError       the guest agent failed, stalled or answered out of
│       │                bounds (svirt exec/cp: exit 125)
│       ├── GuestCommandNotExecutable  the agent could not run the command (126)
│       └── GuestCommandNotFound       the command does not exist in the guest (127)
└── ConsoleTimeout       a pattern did not show on the console in time
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class SvirtError(Exception):
    """Root of every error svirt raises on purpose."""

    #: the command line's exit status for this failure (``svirt`` exits with
    #: it; a subclass that means something else to a script sets its own)
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class SpecError(SvirtError):
    """An invalid guest spec: names the source file and the key."""

    exit_code = 2  # as a usage error: the command was given something it cannot take

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.detail = message
        self.source = source
        self.key = key


class HostError(SvirtError):
    """The host cannot run what was asked."""


class ConfigError(HostError):
    """The host config file is invalid: names the file and the key."""

    def __init__(self, message: str, *, source: str, key: str | None = None,
                 hint: str | None = None) -> None:
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}", hint=hint)
        self.detail = message
        self.source = source
        self.key = key


class ImageBuildError(SvirtError):
    """Building a tiny guest or a disk image (``svirt image build``) failed."""


class StateError(SvirtError):
    """The guest registry refused or is inconsistent."""


class SlotsExhausted(StateError):
    """No free slot (category pair, uid) is left."""


class ClusterError(StateError):
    """The cluster store (etcd) refused an allocation or failed."""

    def __init__(self, message: str, *, endpoints: Sequence[str] = (),
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.endpoints = list(endpoints)


class NoQuorum(ClusterError):
    """No etcd member could answer with a quorum: nothing is allocated."""


class SecurityError(SvirtError):
    """A security driver failed."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        label: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.path = str(path) if path is not None else None
        self.label = label


class RelabelRefused(SecurityError):
    """A resource may not be relabelled."""


class NetworkError(SvirtError):
    """A tap device or bridge could not be set up."""


class LaunchError(SvirtError):
    """The hypervisor could not be started or died before it was up."""

    def __init__(
        self,
        message: str,
        *,
        guest: str | None = None,
        argv: Sequence[str] = (),
        log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.guest = guest
        self.argv = list(argv)
        self.log_tail = log_tail


class ControlError(SvirtError):
    """Talking to the hypervisor's control channel failed."""


class ServiceError(SvirtError):
    """svirt's supervisor of detached guests could not be reached or refused."""


class ConsoleClosed(ControlError):
    """The guest's console cannot take input (it ended, or stopped reading)."""


class AgentError(ControlError):
    """The guest agent (qemu-ga) failed, stalled or answered out of bounds.

    ``exit_status`` is what ``svirt exec`` exits with, as ``podman exec``
    does: 125 for svirt's own failure, 126 and 127 in the subclasses."""

    exit_status = 125


class GuestCommandNotExecutable(AgentError):
    """The agent found the command but could not run it (permission, format)."""

    exit_status = 126


class GuestCommandNotFound(AgentError):
    """The command does not exist in the guest."""

    exit_status = 127


class ConsoleTimeout(SvirtError):
    """A pattern did not appear on the guest console in time."""

    def __init__(self, message: str, *, log_tail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.log_tail = log_tail
