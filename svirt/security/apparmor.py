"""AppArmor: a profile of its own per guest, ``svirt-<uuid>``, made from its objects.

AppArmor is path-based, so the driver changes nothing on the objects (they
keep their DAC relabel, which this driver is always stacked with).  Instead,
before exec, the launcher renders a profile from the guest's own objects
(:func:`plan_profile`, :func:`render_profile`): each disk read-write or
read-only as the spec gives it, kernel and initrd read-only, its run
directory, UML's control directory and memory file, /dev/kvm under KVM,
/dev/net/tun for UML's taps, the hypervisor binary and tini.  What every
guest needs from /usr, /proc and /sys is ``policy/apparmor/svirt-base``,
inlined into each profile (shipped as ``svirt/data/apparmor-svirt-base``):
the loaded profile then depends on no include path a person may edit, and
the generator and the abstraction cannot drift apart.

The profile is written in the guest's run directory (root's; only its
``home/`` is the guest's), journalled in the record, loaded with
``apparmor_parser --replace`` and entered at exec: the child writes
``exec svirt-<uuid>`` to ``/proc/self/attr/apparmor/exec`` (else
``/proc/self/attr/exec``), which is what libapparmor's
``aa_change_onexec()`` does.  Release, and ``svirt gc`` for a launcher that
was killed, remove it with ``apparmor_parser --remove``.

In the jail every object is bound at its own path and AppArmor resolves a
path relative to the jail's root (the root of its mount namespace after
``pivot_root``), so the same rules fit a jailed and an unjailed guest.

libvirt's ``virt-aa-helper`` is the model for which objects get which
rules; the code is svirt's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

from svirt.errors import LaunchError, SecurityError
from svirt.host import HostInfo
from svirt.resources import Access, ResourceKind
from svirt.security.base import (
    DriverPlan,
    ExecFinding,
    Label,
    LaunchObjects,
    LiveProcesses,
    ObjectPlan,
    Original,
    PlannedObject,
    PlannedStep,
)
from svirt.spec import APPARMOR_GENERATED_PREFIX, GuestSpec, SecurityModel

PROFILE_PREFIX = APPARMOR_GENERATED_PREFIX
SECURITYFS = Path("/sys/kernel/security/apparmor")
#: the profile's file in the guest's run directory (root's)
PROFILE_FILE = "apparmor.profile"
PARSER = "apparmor_parser"
#: AppArmor's own pid pattern: 1 to 4194304 without leading zeros
PID_PATTERN = ("{[1-9],[1-9][0-9],[1-9][0-9][0-9],[1-9][0-9][0-9][0-9],"
               "[1-9][0-9][0-9][0-9][0-9],[1-9][0-9][0-9][0-9][0-9][0-9],"
               "[1-4][0-9][0-9][0-9][0-9][0-9][0-9]}")
#: profile modes (securityfs "profiles") that refuse what the profile does
#: not allow ("kill" also kills), and those that do not
STRICT_MODES = frozenset({"enforce", "kill"})
WEAK_MODES = {"complain": "it logs what it would refuse and refuses nothing",
              "unconfined": "it refuses nothing"}
#: characters AppArmor reads as a pattern inside a path, escaped with "\"
_GLOB = frozenset('*?[]{}^\\"')

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


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


def current_profile(pid: int, proc: str = "/proc") -> str:
    """The AppArmor confinement of ``pid`` (``NAME (mode)``, or ``unconfined``);
    empty when it cannot be read."""
    for attr in (f"{proc}/{pid}/attr/apparmor/current", f"{proc}/{pid}/attr/current"):
        try:
            with open(attr, "rb") as f:
                return f.read().rstrip(b"\0\n").decode(errors="replace")
        except FileNotFoundError:
            continue
        except OSError:
            return ""
    return ""


def profile_not_taken(spec: GuestSpec, label: Label, pid: int, proc: str = "/proc"
                      ) -> str | None:
    """Why the exec'd guest ``pid`` is not in its profile, if it is not (the
    profile was removed meanwhile: the kernel then runs it unconfined)."""
    now = current_profile(pid, proc)
    if not now or now.rpartition(" (")[0] == label.process:
        return None  # gone already (nothing to read), or confined as planned
    return (f"guest {spec.name} runs as {now!r}, not in its AppArmor profile "
            f"{label.process}")


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
        return tree(path, "rwk" if access is not Access.RO else "r", f"{kind} ({access})")
    perms = "rk" if access is Access.RO else "rwk"
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


# ------------------------------------------------------------------- kernel
def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed argv, no shell
        list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        check=False)


def parser_path() -> str:
    from svirt.launcher.child import CLEAN_PATH

    found = shutil.which(PARSER, path=CLEAN_PATH)
    if found is None:
        raise SecurityError(f"{PARSER} not found", hint="apt-get install apparmor")
    return found


def loaded_profiles(securityfs: Path = SECURITYFS) -> dict[str, str]:
    """{profile name: mode} of the profiles in the kernel."""
    try:
        text = (securityfs / "profiles").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, _, mode = line.rpartition(" (")
        if name:
            out[name] = mode.rstrip(")")
    return out


def write_profile(text: str, path: Path) -> None:
    """Replace ``path`` (in a root-only directory) whole; a symlink in its
    place is replaced, never followed."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    tmp = f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path.name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise
    finally:
        os.close(parent)


def unload_profile(name: str, path: Path, *, runner: Runner = _run,
                   securityfs: Path = SECURITYFS) -> bool:
    """Remove profile ``name`` from the kernel; True when it was loaded.

    ``apparmor_parser --remove`` of the file it was loaded from; when that
    file is gone (a person removed it), the name is written to AppArmor's
    ``.remove``.  A profile that is not loaded (a reboot) is no error."""
    if not name.startswith(PROFILE_PREFIX):
        raise SecurityError(f"{name!r} is not a profile of svirt's: not removed")
    if name not in loaded_profiles(securityfs):
        return False
    if path.is_file():
        proc = runner([parser_path(), "--remove", "--skip-cache", str(path)])
        if proc.returncode == 0:
            return True
        error = (proc.stderr or proc.stdout).strip()
    else:
        error = f"{path} is gone"
    try:
        (securityfs / ".remove").write_text(name)
    except OSError as err:
        raise SecurityError(f"cannot remove AppArmor profile {name}: {error}; "
                            f".remove: {err.strerror}", label=name) from err
    return True


class AppArmorDriver:
    name = "apparmor"

    def __init__(self, complain: bool = False, runner: Runner | None = None,
                 securityfs: Path = SECURITYFS) -> None:
        self.complain = complain  # bring-up: log what the profile lacks, refuse nothing
        self._runner = runner or _run
        self._securityfs = securityfs

    # ---------------------------------------------------------------- host
    def check_available(self, host: HostInfo) -> None:
        if not host.apparmor:
            raise SecurityError(
                "security model apparmor asked for, but AppArmor is not active here",
                hint="boot with security=apparmor (or lsm=...,apparmor), or use "
                     "security.model = \"auto\"")
        parser_path()

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return True

    def label_for(
        self, spec: GuestSpec, slot: int, taken: Sequence[Label], live: LiveProcesses
    ) -> Label:
        name = profile_name(spec)
        return Label(self.name, name, name, name, name)

    def slot_claim(self, slot: int) -> str | None:
        return None

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        if not generated(spec):
            return None  # the spec's own profile is the user's choice, and may be shared
        # two guests with one uuid (two registries) would replace each other's profile
        return f"apparmor-{label.process}"

    # ------------------------------------------------------------- objects
    # path-based: the objects themselves are not changed (DAC relabels them)
    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        return False

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        return None

    def snapshot(self, fd: int) -> Original:
        return {}

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        return None

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        return None

    # ------------------------------------------------------------- profile
    def load(self, plan: ProfilePlan, path: Path) -> str:
        """Write the profile to ``path`` and load it (replacing one of the
        same name); return its text."""
        text = render_profile(plan)
        write_profile(text, path)
        proc = self._runner([parser_path(), "--replace", "--skip-cache", str(path)])
        if proc.returncode != 0:
            raise SecurityError(
                f"apparmor_parser could not load profile {plan.name}: "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}", label=plan.name,
                path=path)
        return text

    # ------------------------------------------------------- launch hooks
    def check_label(self, spec: GuestSpec, label: Label) -> None:
        """A spec's own profile (``security.label``) is loaded and confines:
        svirt enters it at exec and never loads or removes it."""
        if not generated(spec):
            self.check_loaded(label.process)

    def launch_steps(self, objects: LaunchObjects, label: Label) -> list[PlannedStep]:
        """The guest's profile, made from the objects it holds: journalled,
        then loaded; release unloads it (a spec's own profile: nothing)."""
        spec = objects.spec
        if not generated(spec):
            return []
        argv0 = objects.hypervisor
        found = argv0 if "/" in argv0 else shutil.which(argv0, path=objects.search_path)
        if found is None:
            raise LaunchError(f"{argv0}: command not found", guest=spec.name, argv=[argv0])
        held = [(r.path, r.access, r.kind, r.kind is ResourceKind.RUN_DIR)
                for r in objects.resources]
        plan = plan_profile(spec, held, hypervisor=os.path.realpath(found), init=objects.init,
                            kvm=objects.kvm, control_dir=objects.control_dir,
                            complain=self.complain)
        # in the run directory, root's: the guest cannot change it
        return [ProfileStep(self, plan, objects.run_dir / PROFILE_FILE)]

    def after_exec(self, spec: GuestSpec, label: Label, pid: int) -> ExecFinding | None:
        """The exec'd guest runs in its profile; a profile removed before the
        exec leaves it unconfined, and such a guest is not run."""
        why = profile_not_taken(spec, label, pid)
        if not why:
            return None
        return ExecFinding(f"{why}: refused", refuse=True, label=label.process,
                           hint="was the profile removed while the guest started?")

    def unload(self, name: str, path: Path) -> bool:
        return unload_profile(name, path, runner=self._runner, securityfs=self._securityfs)

    def check_loaded(self, name: str) -> str:
        """The mode of the spec's own profile ``name``, which must be loaded
        and confine: svirt enters it at exec, never loads, changes or removes it."""
        mode = loaded_profiles(self._securityfs).get(name)
        if mode is None:
            raise SecurityError(
                f"AppArmor profile {name} (security.label) is not loaded", label=name,
                hint="load it first (apparmor_parser --replace FILE); a profile svirt "
                     "generated (NAME.d/apparmor.profile, renamed) is a starting point")
        if mode == "unconfined":
            raise SecurityError(
                f"AppArmor profile {name} (security.label) is loaded with flags=(unconfined): "
                "no confinement", label=name,
                hint="use security.model = \"dac\" to run without a profile")
        return mode

    # ---------------------------------------------------------------- plan
    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        warns: list[str] = []
        if generated(spec):
            mode: str | None = "complain" if self.complain else "enforce"
            note = f"profile loaded at launch ({mode} mode), entered at exec"
            rules = tuple(self._plan_object(o) for o in objects)
        else:
            mode = loaded_profiles(self._securityfs).get(label.process)
            note = ("the spec's own profile, entered at exec; svirt neither generates, "
                    f"loads nor removes it ({f'loaded, {mode} mode' if mode else 'not loaded'})")
            rules = tuple(ObjectPlan(False, "no rule", "the spec's own profile decides")
                          for _ in objects)
            if mode is None:
                warns.append(f"AppArmor profile {label.process} of guest {spec.name} is not "
                             "loaded: a launch is refused until it is")
        if mode is not None and mode not in STRICT_MODES:
            what = WEAK_MODES.get(mode, "svirt does not know what it refuses")
            warns.append(f"AppArmor profile {label.process} of guest {spec.name} is in "
                         f"{mode} mode: {what}")
        return DriverPlan(self.name, label.process, note, rules, tuple(warns))

    @staticmethod
    def _plan_object(obj: PlannedObject) -> ObjectPlan:
        """The profile's rule lines for the object, as the launch generates them
        (a path rule: relabel = false objects get one too)."""
        res = obj.resource
        rules = object_rules(res.path, res.access, res.kind, res.kind is ResourceKind.RUN_DIR)
        if not rules:
            return ObjectPlan(False, "no rule", "the launcher writes it; the guest never opens it")
        return ObjectPlan(True, "\n".join(r.line().strip() for r in rules),
                          "the object itself is not changed")

    # --------------------------------------------------------------- child
    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        request = f"exec {label.process}".encode()

        def setup() -> None:
            change_onexec(request)

        return setup

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class ProfileStep:
    """A guest's generated profile as a planned step of its launch."""

    driver: AppArmorDriver
    plan: ProfilePlan
    path: Path

    def journal_entry(self) -> dict[str, Any] | None:
        return {"op": "apparmor", "profile": self.plan.name, "path": str(self.path)}

    def create(self) -> None:
        self.driver.load(self.plan, self.path)


def change_onexec(request: bytes, proc: str = "/proc/self/attr") -> None:
    """aa_change_onexec(): the next exec enters the profile.  The interface of
    AppArmor's own directory first (kernels with LSM stacking), else the
    shared one."""
    for attr in (f"{proc}/apparmor/exec", f"{proc}/exec"):
        try:
            fd = os.open(attr, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise SecurityError(f"{attr}: {err.strerror}") from err
        try:
            os.write(fd, request)
            return
        except OSError as err:
            raise SecurityError(f"{request.decode()!r} to {attr}: {err.strerror}") from err
        finally:
            os.close(fd)
    raise SecurityError("no AppArmor exec attribute in /proc/self/attr")
