"""The catalogue of attack primitives: one entry per thing a hostile
hypervisor can do, as data.

Every feature that touches something a guest controls adds its primitives
here (and, when the stand-in performs them, a ``prim_NAME`` function in
hypervisor.py): the chaos driver draws from this table, so a new entry is
attacked by every later run, on every verb, at random points.

An entry says which backend shapes can perform it, whether it needs the
jail (a primitive whose "breach" is only a breach inside the jail), and the
function that performs it.  ``KNOWN_OPEN`` names primitives and invariants
whose fix is on another branch of issue 22: the default run leaves them out
(with that reason printed) so the suite runs on main today; remove an entry
once its fix is merged.  ``python -m tests.hostile.chaos --all`` runs them
anyway.

To add a primitive:

1. a function ``prim_NAME(ctx)`` in hypervisor.py (stdlib only: it runs in
   the jail as the guest's uid); it starts its attack (``_later`` runs it at a
   random point) and returns; anything it achieves that it must not, it
   reports with ``ctx.breach(what, detail)`` (a ``BREACH`` console line the
   driver fails on);
2. an entry below (shapes, ``needs_jail``), and in KNOWN_OPEN while its fix
   is on another branch;
3. if no invariant can see it go wrong, a ``check_*`` in invariants.py,
   called from ``Chaos._invariants`` (runner.py).

A primitive the hypervisor cannot perform by itself (something done to the
host as the guest's uid) can still be an entry: its ``perform`` is then any
function of the stand-in's context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.hostile.chaos import hypervisor

UML = "uml"
QEMU = "qemu"
BOTH = frozenset({UML, QEMU})


@dataclass(frozen=True)
class Primitive:
    name: str
    description: str
    shapes: frozenset[str]
    perform: Callable[[hypervisor.Ctx], None]
    #: meaningful only in a jailed guest (the jail is what it attacks)
    needs_jail: bool = False
    #: the stand-in reports a ``BREACH`` line when it worked
    reports_breach: bool = False
    #: performed in every run it is drawn for at start (not at a random point)
    weight: float = 1.0


def _p(name: str, description: str, shapes: frozenset[str] = BOTH, **kw: object) -> Primitive:
    return Primitive(name, description, shapes, hypervisor.PRIMITIVES[name], **kw)  # type: ignore[arg-type]


CATALOGUE: tuple[Primitive, ...] = (
    _p("symlink_swap", "rename symlinks to canaries (root-only file, another guest's files, "
       "the registry's lock) over every name in its own home, for 30 s", frozenset({UML})),
    _p("ctl_garbage", "control replies that no honest hypervisor sends: random bytes, runts, "
       "lengths past the datagram, nested JSON, endless lines, event floods"),
    _p("ctl_trickle", "control replies trickled: QMP one byte every 2 s, mconsole a "
       "'more' reply every 1.9 s: no single read ever times out"),
    _p("ctl_silent", "never answer the control channel"),
    _p("qmp_noaccept", "a detached QEMU that never accepts on its QMP listener",
       frozenset({QEMU})),
    _p("deaf", "ignore SIGTERM and every stop request (only SIGKILL ends it)"),
    _p("backing_rewrite", "rewrite the backing-file name in its own qcow2 header "
       "(a canary, /etc/shadow, /dev/zero, //etc/../etc/passwd)", frozenset({QEMU})),
    _p("backing_fifo", "name a FIFO in an image root as the backing file in its own qcow2 "
       "header (a chain opened by path before the walk blocks on it)", frozenset({QEMU})),
    _p("nvram_resize", "truncate its UEFI NVRAM store (0, 4 KiB) or extend it to a sparse "
       "GiB while it owns it", frozenset({QEMU})),
    _p("nvram_chmod", "chmod its NVRAM store 04777 (a setuid-root file if release gave it "
       "back to root without its mode)", frozenset({QEMU})),
    _p("nvram_link", "hard-link its NVRAM store into every directory it can write (home, "
       "/tmp, /var/tmp, the store's own)", frozenset({QEMU})),
    _p("table_lies", "make its own disk lie to `svirt image info`: a GPT claiming 2^32 "
       "entries or 2^31-byte entries (CRC right), an MBR extended chain that loops, a qcow2 "
       "header with a 2^62-byte virtual size, a 2^32-entry L1 table or itself as backing"),
    _p("mconsole_swap", "replace its own mconsole socket by a symlink to a canary or by a "
       "directory", frozenset({UML})),
    _p("deep_tree", "1,500-4,000 nested directories in its own home", frozenset({UML})),
    _p("disk_fill", "write until ENOSPC (at most SVIRT_CHAOS_FILL_MAX, 64 MiB) to its "
       "home or its writable disk or layer"),
    _p("inode_fill", "5,000-20,000 empty files in its home", frozenset({UML})),
    _p("close_console", "close its console fds at a random point"),
    _p("forged_markers", "forged shell frames on the console: the real token (it was typed "
       "on the guest's console) in 1,000-4,000 BEGIN lines, an exit status of 4,300-6,000 "
       "digits; bursts of BEGIN/END lines with made-up tokens"),
    _p("escapes", "OSC 52 (clipboard), DCS, terminal queries (CSI 6n, DA, OSC 4 ?), "
       "8-bit CSI, title changes on the console"),
    _p("forged_audit", "an audit/AVC line on the console, and a segfault of a file named "
       "after an AVC record (the kernel logs that name in kmsg)"),
    _p("syscalls32", "int $0x80 and x32 forms of unshare(CLONE_NEWUSER), clone, ptrace of "
       "pid 1, pidfd_open(1), process_vm_readv(1) (compiled helper)",
       needs_jail=True, reports_breach=True),
    _p("fork_chain", "a process chain in a new session that forks and exits every 2 ms, "
       "deaf to SIGTERM, to outrun a kill loop"),
    _p("env_forge", "a child in a new session whose environment says SVIRT_STATE_DIR "
       "(another registry), SVIRT_RUN_DIR, SVIRT_UID_BASE, deaf to SIGTERM"),
    _p("escape_session", "a double-forked helper in a new session, deaf to SIGTERM"),
    _p("crash", "die at a random point: SIGKILL, SIGSEGV, SIGABRT or exit 1"),
    _p("early_exit", "exit before the first console output"),
    _p("flood", "3-25 MiB on the console as fast as it can"),
    _p("agent_flood", "on the agent port: up to 64 MiB with no newline and no 0xFF "
       "sentinel, then silence (svirt exec/cp must end in 125 within --timeout)",
       frozenset({QEMU})),
    _p("agent_garbage", "on the agent port: random bytes, stray sentinels, stale replies, "
       "deep JSON for every request", frozenset({QEMU})),
    _p("agent_stall", "accept on the agent port, never answer", frozenset({QEMU})),
    _p("agent_escapes", "terminal orders (OSC 52, CSI 6n, DA, DCS, 8-bit CSI) in a command's "
       "stdout and in a copied file", frozenset({QEMU})),
)

BY_NAME: dict[str, Primitive] = {p.name: p for p in CATALOGUE}

#: primitives and invariants whose fix is not merged yet (name or
#: ``inv:NAME`` -> why): left out of the default run, the reason printed.
#: Empty: every fix of issue 22 is merged, so every run attacks everything
KNOWN_OPEN: dict[str, str] = {}


def drawable(shape: str, jailed: bool, include_open: bool) -> list[Primitive]:
    """The primitives a guest of ``shape`` may draw."""
    return [p for p in CATALOGUE
            if shape in p.shapes and (jailed or not p.needs_jail)
            and (include_open or p.name not in KNOWN_OPEN)]


def open_reason(name: str, include_open: bool) -> str | None:
    """Why ``name`` (a primitive, or ``inv:NAME``) is left out of this run."""
    return None if include_open else KNOWN_OPEN.get(name)
