"""An AppArmor profile's text, made from a guest's objects (pure: no kernel).

:func:`plan_profile` turns what the launcher holds for a guest into a
:class:`ProfilePlan` (data); :func:`render_profile` writes it out with
``policy/apparmor/svirt-base`` inlined.  :mod:`svirt.security.apparmor`
loads, enters and removes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path

from svirt.errors import SecurityError
from svirt.resources import Access, ResourceKind
from svirt.spec import APPARMOR_GENERATED_PREFIX, GuestSpec, SecurityModel

PROFILE_PREFIX = APPARMOR_GENERATED_PREFIX
#: AppArmor's own pid pattern: 1 to 4194304 without leading zeros
PID_PATTERN = ("{[1-9],[1-9][0-9],[1-9][0-9][0-9],[1-9][0-9][0-9][0-9],"
               "[1-9][0-9][0-9][0-9][0-9],[1-9][0-9][0-9][0-9][0-9][0-9],"
               "[1-4][0-9][0-9][0-9][0-9][0-9][0-9]}")
#: characters AppArmor reads as a pattern inside a path, escaped with "\"
_GLOB = frozenset('*?[]{}^\\"')


def profile_name(spec: GuestSpec) -> str:
    """The guest's profile: the spec's own (``security.label`` under ``model =
    "apparmor"``, loaded by the administrator), else the one svirt
    generates, ``svirt-<uuid>``."""
    return f"{PROFILE_PREFIX}{spec.uuid}" if generated(spec) else str(spec.security.label)


def generated(spec: GuestSpec) -> bool:
    """svirt writes, loads and removes the guest's profile: the spec names
    none of its own (a label under another model, such as ``auto`` on an
    SELinux host, is an SELinux context, not a profile)."""
    return spec.security.label is None or spec.security.model is not SecurityModel.APPARMOR


def quote_path(path: Path | str) -> str:
    """``path`` as a literal AppArmor path in double quotes: pattern
    characters escaped, so that a file named ``*`` grants that file alone;
    control characters, a relative path and a variable (``@{``) refused."""
    text = str(path)
    if not text.startswith("/"):
        raise SecurityError(f"{text!r} is not an absolute path: no AppArmor rule for it",
                            path=Path(text))
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) or "@{" in text:
        raise SecurityError(
            f"{text!r}: AppArmor cannot name this path in a profile "
            "(a control character or \"@{\" in it)", path=Path(text),
            hint="rename the file")
    return '"' + "".join(f"\\{c}" if c in _GLOB else c for c in text) + '"'


@dataclass(frozen=True)
class Rule:
    """One file rule: a literal path, its permissions and why it is there;
    ``below`` is a pattern put after the literal ("**": everything under a
    directory, "*": every name with that prefix)."""

    path: str
    perms: str
    why: str
    below: str = ""
    owner: bool = False  # only files of the process's own fsuid
    deny: bool = False  # refused, and not logged (a known, harmless probe)

    def line(self) -> str:
        target = quote_path(self.path)
        if self.below:
            target = f'{target[:-1]}{self.below}"'
        qualifiers = ("deny " if self.deny else "") + ("owner " if self.owner else "")
        return f"  {qualifiers}{target} {self.perms},  # {self.why}"


def tree(path: Path | str, perms: str, why: str, *, owner: bool = False) -> list[Rule]:
    """A directory (read) and everything below it (``perms``; with ``owner``
    only the guest uid's own files below it)."""
    top = str(path).rstrip("/") + "/"
    return [Rule(top, "r", why), Rule(top, perms, why, below="**", owner=owner)]


@dataclass(frozen=True)
class ProfilePlan:
    """What one guest's profile allows beyond svirt-base, as data."""

    name: str  # svirt-<uuid>
    guest: str
    backend: str
    executables: tuple[tuple[str, str], ...]  # (path, "mr" or "mrix")
    rules: tuple[Rule, ...]
    uml: bool = False  # signals and ptrace between UML's own processes
    complain: bool = False  # log instead of refuse (bring-up only)


def object_rules(path: Path, access: Access, kind: ResourceKind, is_dir: bool) -> list[Rule]:
    """The profile's rules for one of the guest's objects (none for the console
    log: the launcher writes it through its own fd, the guest never opens it)."""
    if kind is ResourceKind.CONSOLE_LOG:
        return []
    if is_dir:
        return tree(path, "r" if access.read_only else "rwk", f"{kind} ({access})")
    perms = "rk" if access.read_only else "rwk"
    return [Rule(str(path), perms, f"{kind} ({access})")]


def plan_profile(spec: GuestSpec, objects: Sequence[tuple[Path, Access, ResourceKind, bool]],
                 *, hypervisor: str, init: str | None, kvm: bool,
                 control_dir: Path | None = None, complain: bool = False) -> ProfilePlan:
    """The profile of ``spec``'s guest: ``objects`` are (path, access, kind,
    is_dir) of what the launcher holds for it; ``hypervisor`` the binary's
    real path; ``init`` the path in the jail of tini's execute-only copy
    (jailed guests: svirt/launcher/jail.py ``JAIL_INIT``)."""
    uml = spec.backend == "uml"
    rules: list[Rule] = []
    for path, access, kind, is_dir in objects:
        rules += object_rules(path, access, kind, is_dir)
    if kvm:
        rules.append(Rule("/dev/kvm", "rw", "KVM"))
    if uml:
        if spec.nics:
            rules.append(Rule("/dev/net/tun", "rw", "UML opens its taps by name"))
        # UML's guest memory: a file it makes and unlinks in /dev/shm (the
        # jail's private tmpfs; the host's for an unjailed guest, hence
        # "owner"), mapped read-write-execute
        rules += tree("/dev/shm", "rwmk", "UML's memory file",  # noqa: S108 - a rule
                      owner=True)
        if control_dir is not None:
            # mconsole answers go to the launcher's client socket (mc.PID.HEX,
            # the guest's uid, 0600, in a root-only directory)
            rules.append(Rule(f"{control_dir}/mc.", "w", "mconsole replies", below="*"))
        # UML probes for ptys at boot; its consoles are the launcher's fds, and
        # the jail has no ptmx: refused without a log line when unjailed
        rules.append(Rule("/dev/ptmx", "rw", "UML's pty probe: not needed", deny=True))
    executables: list[tuple[str, str]] = []
    if init is not None:
        executables.append((init, "mr"))  # the first exec, into this profile
    executables.append((hypervisor, "mrix"))
    return ProfilePlan(profile_name(spec), spec.name, str(spec.backend), tuple(executables),
                       tuple(rules), uml=uml, complain=complain)


def base_rules() -> str:
    """policy/apparmor/svirt-base, as shipped with the package."""
    return (importlib_resources.files("svirt") / "data" / "apparmor-svirt-base").read_text()


def render_profile(plan: ProfilePlan, base: str | None = None) -> str:
    """The profile's text: svirt-base inlined, then one rule per object."""
    base = base_rules() if base is None else base
    flags = " flags=(complain)" if plan.complain else ""
    name = plan.name
    lines = [
        f"# AppArmor profile of svirt guest {plan.guest!r} ({plan.backend}), generated by svirt",
        "# when it started; removed when it is released.  Do not edit it here: the next",
        "# start writes it anew (a profile of your own: a copy under another name, named",
        "# by the spec's security.label).",
        "abi <abi/3.0>,",
        "",
        f"@{{pid}}={PID_PATTERN}",
        "",
        f"profile {name}{flags} {{",
        "  # ---- svirt-base (policy/apparmor/svirt-base)",
        *(line for line in base.splitlines() if line.strip() and not line.startswith("#")),
        "",
        "  # ---- this guest's processes: signals among themselves and from the",
        "  # launcher (unconfined); nothing to or from another profile",
        f"  signal (send, receive) peer={name},",
        "  signal (receive) peer=unconfined,",
    ]
    if plan.uml:
        lines.append(f"  ptrace (trace, tracedby, read, readby) peer={name},  "
                     "# UML runs its processes under ptrace")
    lines += ["", "  # ---- the hypervisor and its init (tini, in the jail)"]
    lines += [f"  {quote_path(path)} {perms}," for path, perms in plan.executables]
    lines += ["", "  # ---- this guest's objects"]
    lines += [rule.line() for rule in plan.rules]
    lines.append("}")
    return "\n".join(lines) + "\n"
