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
from pathlib import Path
from typing import Any

from svirt.errors import LaunchError, SecurityError
from svirt.host import CLEAN_PATH, HostInfo
from svirt.procfs import LiveProcesses
from svirt.resources import Access, ResourceKind

# the profile's text: svirt/security/apparmor_profile.py (re-exported here)
from svirt.security.apparmor_profile import PID_PATTERN as PID_PATTERN
from svirt.security.apparmor_profile import PROFILE_PREFIX as PROFILE_PREFIX
from svirt.security.apparmor_profile import ProfilePlan as ProfilePlan
from svirt.security.apparmor_profile import Rule as Rule
from svirt.security.apparmor_profile import base_rules as base_rules
from svirt.security.apparmor_profile import generated as generated
from svirt.security.apparmor_profile import object_rules as object_rules
from svirt.security.apparmor_profile import plan_profile as plan_profile
from svirt.security.apparmor_profile import profile_name as profile_name
from svirt.security.apparmor_profile import quote_path as quote_path
from svirt.security.apparmor_profile import render_profile as render_profile
from svirt.security.apparmor_profile import tree as tree
from svirt.security.base import (
    DriverPlan,
    ExecFinding,
    Label,
    LaunchObjects,
    ObjectPlan,
    Original,
    PlannedObject,
    PlannedStep,
)
from svirt.spec import GuestSpec

SECURITYFS = Path("/sys/kernel/security/apparmor")
#: the profile's file in the guest's run directory (root's)
PROFILE_FILE = "apparmor.profile"
PARSER = "apparmor_parser"
#: profile modes (securityfs "profiles") that refuse what the profile does
#: not allow ("kill" also kills), and those that do not
STRICT_MODES = frozenset({"enforce", "kill"})
WEAK_MODES = {"complain": "it logs what it would refuse and refuses nothing",
              "unconfined": "it refuses nothing"}
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


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


# ------------------------------------------------------------------- kernel
def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed argv, no shell
        list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        check=False)


def parser_path() -> str:
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
