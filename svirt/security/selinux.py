"""SELinux: svirt_t with a category pair of its own, sVirt style.

A guest's process runs as the policy's virtual domain context (``svirt_t``,
or ``svirt_tcg_t`` under TCG where the policy defines it, or the spec's own
type) at ``s0:cA,cB``: a pair no other live process holds, picked at random
inside the launcher's own category range.  ``a < b`` always: an equal pair
gives ``s0:cN``, which every pair holding cN dominates (CVE-2021-3631).

Private writable objects get the image context (``svirt_image_t``) at the
guest's level; read-only objects the content context (``virt_content_t:s0``)
and shared writable objects the image type with no categories.  Labels are
written as the ``security.selinux`` xattr through the object's fd.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from svirt.errors import SecurityError, SlotsExhausted
from svirt.host import HostInfo, SELinuxMode
from svirt.procfs import LiveProcesses, pid_exists
from svirt.resources import Access
from svirt.security.base import (
    NOT_RELABELLED,
    ConfinementWarning,
    DriverPlan,
    ExecFinding,
    Label,
    ObjectPlan,
    Original,
    PlannedObject,
    level_pair,
    mcs_pair,
)
from svirt.security.files import get_xattr, set_xattr
from svirt.security.libselinux import libselinux
from svirt.spec import Accel, GuestSpec

XATTR = "security.selinux"
MAX_CATEGORIES = 1024


@dataclass(frozen=True)
class Context:
    user: str
    role: str
    type: str
    level: str  # "s0", "s0:c1,c2", "s0-s0:c0.c1023"

    @classmethod
    def parse(cls, text: str) -> Context:
        parts = text.strip().rstrip("\0").split(":", 3)
        if len(parts) < 3:
            raise SecurityError(f"{text!r} is not an SELinux context")
        level = parts[3] if len(parts) == 4 else "s0"
        return cls(parts[0], parts[1], parts[2], level)

    def __str__(self) -> str:
        return f"{self.user}:{self.role}:{self.type}:{self.level}"

    def with_type(self, type_: str) -> Context:
        return Context(self.user, self.role, type_, self.level)

    def with_level(self, level: str) -> Context:
        return Context(self.user, self.role, self.type, level)


def parse_categories(text: str) -> set[int]:
    """``c0.c3,c7`` -> {0, 1, 2, 3, 7}."""
    cats: set[int] = set()
    if not text:
        return cats
    for part in text.split(","):
        m = re.fullmatch(r"c(\d+)(?:\.c(\d+))?", part.strip())
        if not m:
            raise SecurityError(f"{part!r} is not a category or category range")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo or hi >= MAX_CATEGORIES:
            raise SecurityError(f"bad category range {part!r}")
        cats.update(range(lo, hi + 1))
    return cats


def parse_range(level: str) -> tuple[str, str, set[int]]:
    """``s0-s0:c0.c1023`` -> ("s0", "s0", {0..1023}): low and high
    sensitivity and the high level's categories (what a guest may be given)."""
    low, _, high = level.partition("-")
    high = high or low
    low_sens = low.split(":", 1)[0]
    high_sens, _, cats = high.partition(":")
    if not re.fullmatch(r"s\d+", low_sens) or not re.fullmatch(r"s\d+", high_sens):
        raise SecurityError(f"{level!r} is not an MLS level or range")
    return low_sens, high_sens, parse_categories(cats)


def pair_of(level: str) -> tuple[int, int] | None:
    """The category pair of a guest level like ``s0:c1,c2`` (else None)."""
    return level_pair(level)


def pick_pair(
    categories: Sequence[int], used: set[tuple[int, int]], rng: random.Random | None = None
) -> tuple[int, int]:
    """A random pair (a < b) of ``categories`` not in ``used``."""
    rng = rng or random.SystemRandom()
    cats = sorted(set(categories))
    n = len(cats)
    total = n * (n - 1) // 2
    if n < 2:
        raise SlotsExhausted(
            "the launcher's category range has fewer than two categories: no pair to give",
            hint="run the launcher with an MCS range such as s0-s0:c0.c1023",
        )
    # pairs outside our categories are never generated, so membership tests can
    # use ``used`` as is; only counting needs the pairs inside our range
    if len(used) >= total:
        catset = set(cats)
        used = {p for p in used if p[0] in catset and p[1] in catset}
    if len(used) >= total:
        raise SlotsExhausted(
            f"all {total} category pairs of c{cats[0]}..c{cats[-1]} are in use",
            hint="stop a guest, or run the launcher with a wider category range",
        )
    for _ in range(64):
        i, j = sorted(rng.sample(range(n), 2))
        pair = (cats[i], cats[j])
        if pair not in used:
            return pair
    free = [(cats[i], cats[j]) for i in range(n) for j in range(i + 1, n)
            if (cats[i], cats[j]) not in used]
    return rng.choice(free)


class SELinuxDriver:
    name = "selinux"

    def __init__(
        self,
        launcher_context: str | None = None,
        domain_context: str | None = None,
        image_context: str | None = None,
        content_context: str | None = None,
        enforcing: bool | None = None,
    ) -> None:
        self._launcher = launcher_context
        self._domain = domain_context
        self._image = image_context
        self._content = content_context
        self._enforcing = enforcing

    # ---------------------------------------------------------------- host
    def check_available(self, host: HostInfo) -> None:
        if host.selinux is SELinuxMode.DISABLED and self._launcher is None:
            raise SecurityError(
                "security model selinux asked for, but SELinux is disabled on this host",
                hint="use security.model = \"auto\" or \"dac\"",
            )
        if self._enforcing is None:
            self._enforcing = host.selinux is SELinuxMode.ENFORCING
        self._load_defaults()

    def _load_defaults(self) -> None:
        selinux = libselinux()
        if self._launcher is None:
            rc, con = selinux.getcon()
            self._launcher = con
        if self._domain is None:
            with open(selinux.selinux_virtual_domain_context_path()) as f:
                self._domain = f.readline().strip()
        if self._image is None or self._content is None:
            with open(selinux.selinux_virtual_image_context_path()) as f:
                lines = [line.strip() for line in f if line.strip()]
            self._image = self._image or lines[0]
            self._content = self._content or (lines[1] if len(lines) > 1 else lines[0])

    def _contexts(self) -> tuple[Context, Context, Context, Context]:
        if None in (self._launcher, self._domain, self._image, self._content):
            self._load_defaults()
        assert self._launcher and self._domain and self._image and self._content  # noqa: S101
        return (Context.parse(self._launcher), Context.parse(self._domain),
                Context.parse(self._image), Context.parse(self._content))

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return True  # pairs are picked at random, independently of the slot

    def label_for(
        self, spec: GuestSpec, slot: int, taken: Sequence[Label], live: LiveProcesses
    ) -> Label:
        launcher, domain, image, content = self._contexts()
        sec = spec.security
        if sec.label is not None:
            process = Context.parse(sec.label)
            level = process.level
            _refuse_held_pair(sec.label, level, taken, live)
        else:
            low, _high, cats = parse_range(launcher.level)
            used = {p for lab in taken if (p := pair_of(Context.parse(lab.process).level))}
            used |= {p for ctx in live.contexts if (p := mcs_pair(ctx))}
            a, b = pick_pair(sorted(cats), used)
            level = f"{low}:c{a},c{b}"
            ptype = sec.type or self._tcg_type(domain.type, spec)
            process = domain.with_type(ptype).with_level(level)
        base_sens = level.split(":", 1)[0]
        if sec.type is not None or sec.label is not None:
            # a custom domain made with refpolicy's virt_domain_template(x)
            # comes with its own x_image_t, and may not use svirt_image_t
            own = image.with_type(process.type.removesuffix("_t") + "_image_t")
            if _context_valid(str(own.with_level("s0"))):
                image = own
        return Label(
            self.name,
            str(process),
            str(image.with_level(level)),
            str(content.with_level(base_sens)),
            str(image.with_level(base_sens)),
        )

    def slot_claim(self, slot: int) -> str | None:
        return None  # pairs are picked at random, independently of the slot

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        # a static pair is claimed like a dynamic one: no other guest of this
        # host (or the cluster) is given it while this one holds it
        pair = pair_of(Context.parse(label.process).level)
        return f"mcs-c{pair[0]}-c{pair[1]}" if pair else None

    def _tcg_type(self, domain_type: str, spec: GuestSpec) -> str:
        if spec.accel is Accel.KVM or spec.backend != "qemu":
            return domain_type
        candidate = domain_type.replace("_t", "_tcg_t") if domain_type == "svirt_t" else ""
        if candidate and _context_valid(f"system_u:system_r:{candidate}:s0"):
            return candidate
        return domain_type

    # ------------------------------------------------------------- objects
    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        return True

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        raw = get_xattr(fd, XATTR)
        if raw is None:
            return None
        current = raw.rstrip(b"\0").decode(errors="replace")
        pair = mcs_pair(current)
        ours = pair_of(Context.parse(label.process).level)
        if pair is None or pair == ours:
            return None
        for ctx in live.contexts:
            if mcs_pair(ctx) == pair:
                return f"it is labelled {current}, the level of running process {ctx}"
        return None

    def snapshot(self, fd: int) -> Original:
        raw = get_xattr(fd, XATTR)
        return {"context": raw.rstrip(b"\0").decode() if raw is not None else None}

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        context = label.for_access(access)
        try:
            set_xattr(fd, XATTR, context.encode() + b"\0")
        except OSError as err:
            raise SecurityError(f"cannot label as {context}: {err.strerror}",
                                label=context) from err

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        if not last:
            return  # shared objects keep the shared label until the last guest ends
        ctx = original.get("context")
        want = ctx.encode() + b"\0" if ctx else None
        if get_xattr(fd, XATTR) != want:  # nothing to write: nothing to fail
            set_xattr(fd, XATTR, want)

    # --------------------------------------------------------------- child
    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        process = label.process
        fatal = self._enforcing is not False
        selinux = libselinux()  # loaded before fork: the child only calls it

        def setup() -> None:
            try:
                selinux.setexeccon(process)
            except OSError as err:
                if fatal:
                    raise SecurityError(f"setexeccon({process}): {err.strerror}",
                                        label=process) from err

        return setup

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        selinux = libselinux()
        try:
            selinux.setsockcreatecon(label.process)
        except OSError as err:
            if self._enforcing is not False:
                raise SecurityError(f"setsockcreatecon({label.process}): {err.strerror}",
                                    label=label.process) from err
            warnings.warn(f"SELinux cannot label the guest's sockets {label.process} "
                          f"({err.strerror}): they keep the launcher's context",
                          ConfinementWarning, stacklevel=3)
            yield  # permissive: the sockets keep the launcher's label
            return
        try:
            # a socket bound to a path (the mconsole client) gets a file at the
            # guest's level too, so the guest may write to it and no other may
            selinux.setfscreatecon(label.image)
            try:
                yield
            finally:
                selinux.setfscreatecon(None)
        finally:
            selinux.setsockcreatecon(None)

    # ------------------------------------------------------- launch hooks
    def tmpfs_options(self, label: Label) -> str:
        """The jail's tmpfs mounts as the guest's own: SELinux's tmpfs type
        at its level (svirt_t -> svirt_tmpfs_t)."""
        if label.process.count(":") < 3 or not os.path.exists("/sys/fs/selinux/enforce"):
            return ""  # a kernel without SELinux refuses the context= option
        process = Context.parse(label.process)
        tmpfs = process.type.removesuffix("_t") + "_tmpfs_t"
        return f'context="system_u:object_r:{tmpfs}:{process.level}"'

    def after_exec(self, spec: GuestSpec, label: Label, pid: int) -> ExecFinding | None:
        """Why the hypervisor (exec'd by now) runs without its label, if it
        does: the child's setexeccon may only fail quietly under a permissive
        host."""
        now = process_label(pid)
        if not now or now == label.process or not pid_exists(pid):
            return None  # no SELinux in this kernel (a test's contexts), or gone already
        return ExecFinding(
            f"guest {spec.name} runs as {now}, not {label.process}: the kernel did not "
            "take its SELinux label, so it is confined by the other drivers alone")

    # ---------------------------------------------------------------- plan
    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        note = ("the spec's own label" if spec.security.label is not None else
                "a category pair free now; each launch picks its own at random")
        warns: list[str] = []
        if self._enforcing is False:
            warns.append(
                f"SELinux is permissive on this host: guest {spec.name} gets {label.process}, "
                "but nothing it does is refused (denials are only logged), and a label the "
                "kernel does not take leaves it in the launcher's context")
        return DriverPlan(self.name, label.process, note,
                          tuple(self._plan_object(o, label) for o in objects), tuple(warns))

    def _plan_object(self, obj: PlannedObject, label: Label) -> ObjectPlan:
        if not obj.resource.relabel:
            return NOT_RELABELLED
        access = obj.resource.access
        note = {Access.RW: "the guest's own level", Access.RO: "read-only content",
                Access.SHARED: "no categories: shared by the guests that share it",
                Access.PRIVATE_RO: "the guest's own level; read-only by DAC"}[access]
        if obj.fd is not None:
            raw = get_xattr(obj.fd, XATTR)
            now = raw.rstrip(b"\0").decode(errors="replace") if raw is not None else "none"
            note += f"; now {now}"
        return ObjectPlan(True, label.for_access(access), note)


def _refuse_held_pair(static: str, level: str, taken: Sequence[Label],
                      live: LiveProcesses) -> None:
    """A spec's own context whose category pair another guest holds (the
    registry's labels: dynamic pairs, and other static contexts) or a live
    process runs with (guests of other registries and tools) is refused: two
    processes at one level reach each other's objects.  The same static
    context in ``taken`` is this guest's own last run (a restart); a second
    guest with it is refused by the live process table or the claim."""
    pair = pair_of(level)
    if pair is None:
        return
    holder = None
    for lab in taken:
        try:
            other = Context.parse(lab.process)
        except SecurityError:
            continue
        if pair_of(other.level) == pair and lab.process != static:
            holder = f"held by another guest ({lab.process})"
            break
    if holder is None:
        for ctx in sorted(live.contexts):
            if mcs_pair(ctx) == pair:
                holder = f"the level of running process context {ctx}"
                break
    if holder is not None:
        raise SecurityError(
            f"security.label {static}: its category pair c{pair[0]},c{pair[1]} is {holder}; "
            "two guests at one level reach each other's objects",
            label=static,
            hint="give this guest a pair no other guest holds, or leave security.label out "
                 "for a pair of its own picked at each launch")


def _context_valid(context: str) -> bool:
    try:
        return bool(libselinux().security_check_context(context) == 0)
    except (ImportError, OSError, SecurityError):
        return False



def process_label(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            return f.read().rstrip(b"\0\n").decode()
    except OSError:
        return ""



