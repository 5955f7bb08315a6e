"""The report: one :class:`Finding` per denial, classified, with the rule
that would allow a policy gap; and the verb's two entry points.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from svirt.explain.lookup import (
    GuestLookup,
    ObjectEntry,
    Processes,
    _type_of,
    load_tables,
    mcs_pair,
)
from svirt.explain.parse import DISCONNECTED, Denial, _int, parse_lines
from svirt.explain.sources import boot_time, gather, parse_since
from svirt.launcher.record import Record

CROSS_GUEST = "cross-guest"
POLICY_GAP = "policy gap"
MISLABELLED = "mislabelled"


@dataclass(frozen=True)
class Finding:
    """A denial explained."""

    denial: Denial
    guest: str | None  # the guest that was denied (None: no guest, e.g. the launcher)
    guest_by: str  # how it was found: "MCS pair s0:c1,c2", "profile", "pid 123", ...
    target_guest: str | None  # whose object it was, when another guest's
    object: str  # a path when it resolves, else what the record names
    classification: str  # CROSS_GUEST, POLICY_GAP, MISLABELLED
    summary: str
    rule: str | None = None  # policy gap: what would allow it
    label: str | None = None  # mislabelled: the label the object has
    wanted: str | None = None  # mislabelled: the label svirt gives it

    def to_json(self) -> dict[str, Any]:
        d = self.denial
        return {
            "time": d.time, "source": d.source, "event": d.event, "lsm": d.lsm,
            "guest": self.guest, "guest_by": self.guest_by, "pid": d.pid, "comm": d.comm,
            "subject": d.subject, "target": d.target, "permissions": list(d.perms),
            "class": d.tclass, "object": self.object, "ino": d.ino, "dev": d.dev,
            "target_guest": self.target_guest, "classification": self.classification,
            "summary": self.summary, "rule": self.rule, "label": self.label,
            "wanted": self.wanted, "permissive": d.fields.get("permissive") == "1",
        }


#: AppArmor's file operations (security/apparmor/include/audit.h OP_*): what
#: a record without ``class=`` (kernels before 6.2 or so) was about
APPARMOR_FILE_OPS = frozenset({
    "open", "getattr", "mkdir", "rmdir", "mknod", "truncate", "link", "symlink",
    "rename_src", "rename_dest", "chmod", "chown", "unlink", "file_perm", "file_lock",
    "file_mmap", "file_mprotect", "file_inherit", "file_receive", "exec"})


class Explainer(GuestLookup):
    """Maps denials to guests through records and object tables."""

    def explain(self, d: Denial) -> Finding:
        guest, by = self.guest_of(d)
        entry = self.object_of(d)
        obj = entry.path if entry else d.path or _name(d)
        noun = d.tclass if d.lsm == "selinux" else d.fields.get("class") or (
            "file" if d.lsm == "apparmor" and d.tclass in APPARMOR_FILE_OPS else "object")
        how = "" if d.lsm == "selinux" else f" ({d.tclass})"
        what = f"{_perms(d)}{how} on {noun} {obj}"
        owner = self._owner_by_label(d)
        if entry is not None and entry.holders:
            if guest in entry.holders:  # its own: another guest's label on it is a mislabel
                owner = owner if owner in entry.holders else None
            else:
                owner = owner or sorted(entry.holders)[0]
        confined = guest is not None or self._confined(d)
        who = f"guest {guest}" if guest else "an unknown guest" if confined else "no guest"
        if owner is not None and owner != guest and confined:
            tried = _perms(d) + (f", {d.tclass}" if how else "")
            return Finding(d, guest, by, owner, obj, CROSS_GUEST,
                           f"sVirt stopped {who} from reaching guest {owner}'s {noun} "
                           f"{obj} ({tried}): expected, this is the confinement working")
        wrong = self._mislabel(d, guest, entry)
        if wrong is not None:
            has, wanted, why = wrong
            return Finding(d, guest, by, None, obj, MISLABELLED,
                           f"{who} was denied {what}: it is labelled {has}, {why} {wanted}",
                           label=has, wanted=wanted)
        rule = policy_rule(d)
        whose = ("its own" if entry is not None and guest in entry.holders
                 else f"guest {owner}'s" if owner else "a shared or system")
        return Finding(d, guest, by, None, obj, POLICY_GAP,
                       f"{who} was denied {what} ({whose} object): the policy lacks a rule"
                       + ("" if rule else f" (none derived for {d.tclass})"), rule=rule)

    def _confined(self, d: Denial) -> bool:
        """The subject is a guest's confinement, even if no record is left."""
        if d.lsm == "selinux":
            return mcs_pair(d.subject) is not None
        return d.subject.startswith("svirt-")

    def _mislabel(self, d: Denial, guest: str | None, entry: ObjectEntry | None
                  ) -> tuple[str, str, str] | None:
        """(label it has, label svirt gives, why) when the guest's object is mislabelled."""
        if d.lsm == "selinux" and "trawcon" in d.fields:
            return (d.fields["trawcon"], "a context the loaded policy defines",
                    "a context the policy does not know; it should have")
        if guest is None or d.target is None or d.lsm not in ("selinux", "smack"):
            return None
        record = self._by_name.get(guest)
        label = record.labels.get(d.lsm) if record else None
        if label is None:
            return None
        if entry is not None and guest in entry.holders:
            access = str(entry.holders[guest].get("access", "rw"))
            wanted = {"ro": label.content, "shared": label.shared}.get(access, label.image)
            if not _same_label(d.lsm, d.target, wanted):
                return d.target, wanted, f"svirt gives {guest}'s {access} objects"
            return None
        if d.lsm == "selinux":
            pair, ours = mcs_pair(d.target), mcs_pair(label.process)
            svirt_types = {_type_of(x) for x in (label.image, label.content, label.shared)}
            if pair is not None and pair != ours and _type_of(d.target) in svirt_types:
                return (d.target, label.image,
                        "a level no guest svirt knows holds (left from an earlier run, or "
                        f"another tool's); {guest}'s own objects get")
        return None


def _same_label(lsm: str, has: str, wanted: str) -> bool:
    if lsm == "selinux":  # the SELinux user of a file does not matter under MCS
        return has.split(":", 2)[2:] == wanted.split(":", 2)[2:]
    return has == wanted


def _name(d: Denial) -> str:
    cap = d.fields.get("capname") or d.fields.get("capability")
    if d.name:
        bits = [d.name]
    elif cap:
        bits = [f"capability {_CAPABILITIES.get(_int(cap) or -1, cap)}"]
    else:
        bits = ["(unnamed)"]
    if d.ino is not None:
        bits.append(f"(inode {d.ino}{' on ' + d.dev if d.dev else ''})")
    return " ".join(bits)


def _perms(d: Denial) -> str:
    if d.lsm == "selinux":
        return "{ " + " ".join(d.perms) + " }"
    return "".join(d.perms) or d.fields.get("requested_mask") or "labels_differ"


_CAPABILITIES = {0: "chown", 1: "dac_override", 2: "dac_read_search", 3: "fowner",
                 4: "fsetid", 5: "kill", 6: "setgid", 7: "setuid", 8: "setpcap",
                 10: "net_bind_service", 12: "net_admin", 13: "net_raw", 14: "ipc_lock",
                 19: "sys_ptrace", 21: "sys_admin", 23: "sys_nice", 24: "sys_resource",
                 27: "mknod", 33: "mac_admin"}


def policy_rule(d: Denial) -> str | None:
    """What would allow ``d``: an SELinux allow rule (audit2allow's form), an
    AppArmor profile line, or a SMACK rule (``/sys/fs/smackfs/load2`` form)."""
    if d.lsm == "selinux":
        if not d.perms or not d.target:
            return None
        stype, ttype = _type_of(d.subject), _type_of(d.target)
        if d.subject == d.target:
            ttype = "self"
        perms = sorted(set(d.perms))
        shown = perms[0] if len(perms) == 1 else "{ " + " ".join(perms) + " }"
        return f"allow {stype} {ttype}:{d.tclass} {shown};"
    if d.lsm == "apparmor":
        f = d.fields
        if f.get("capname") or (d.tclass == "capable" and "capability" in f):
            cap = f.get("capname") or _CAPABILITIES.get(_int(f.get("capability")) or -1)
            return f"capability {cap}," if cap else None
        if f.get("family") and f.get("sock_type"):
            return f"network {f['family']} {f['sock_type']},"
        if f.get("info") == DISCONNECTED:
            # no path rule can name it: the profile's flag names it from its
            # mount instead (what the object is, the record does not say)
            return "flags=(attach_disconnected)"
        if d.tclass == "mount" and d.name and d.name.startswith("/"):
            fstype = f" fstype={f['fstype']}" if f.get("fstype") else ""
            source = f" {f['srcname']}" if f.get("srcname") else ""
            return f"mount{fstype}{source} -> {_apparmor_path(d.name)},"
        if d.name and d.name.startswith("/") and d.perms:
            return f"{_apparmor_path(d.name)} {_apparmor_mask(d.perms)},"
        return None
    if d.lsm == "smack":
        if not d.perms or not d.target:
            return None
        return f"{d.subject} {d.target} {''.join(d.perms)}"
    return None


def _apparmor_path(path: str) -> str:
    return f'"{path}"' if re.search(r'[\s"#]', path) else path


def _apparmor_mask(letters: Sequence[str]) -> str:
    got = set(letters)
    if got & {"c", "d"}:  # create and delete are covered by w
        got = (got - {"c", "d"}) | {"w"}
    if "w" in got:
        got.discard("a")
    order = "rwamlk"
    mask = "".join(c for c in order if c in got)
    return mask + ("ix" if "x" in got else "")


# ------------------------------------------------------------------ the verb
def explain(lines: Iterable[tuple[str, str]], records: Sequence[Record],
            tables: Sequence[ObjectEntry], *, since: float | None = None,
            guest: str | None = None, boot: float | None = None,
            processes: Processes | None = None) -> list[Finding]:
    """Every denial in ``lines`` explained; ``since`` drops older ones (one
    without any time is kept), ``guest`` keeps those of that guest, as the
    one denied or as the one whose object it was."""
    explainer = Explainer(records, tables, processes)
    out = []
    for d in parse_lines(lines, boot):
        if since is not None and d.time is not None and d.time < since:
            continue
        finding = explainer.explain(d)
        if guest is not None and guest not in (finding.guest, finding.target_guest):
            continue
        out.append(finding)
    return out


def explain_host(file: str | None, *, since: str | None = None, guest: str | None = None,
                 stdin: IO[bytes] | None = None) -> tuple[list[Finding], list[str]]:
    """``svirt explain``: the host's registry, the host's logs (or ``file``)."""
    from svirt.launcher.registry import Registry

    cutoff = parse_since(since) if since is not None else None
    lines, problems = gather(file, stdin=stdin)
    registry = Registry()
    records = registry.records()
    tables, table_problems = load_tables(registry.objects)
    try:
        boot: float | None = boot_time()
    except (OSError, ValueError, IndexError):
        boot = None
    findings = explain(lines, records, tables, since=cutoff, guest=guest, boot=boot)
    return findings, [*problems, *registry.problems, *table_problems]
