"""``svirt explain``: which guest a kernel denial concerns, and what it means.

Three steps, each testable alone:

1. **Sources** (:func:`gather`): the kernel ring buffer (``/dev/kmsg``, read
   non-blocking: every record it holds now), the audit log
   (``/var/log/audit/audit.log`` when present), or a file / stdin.  Lines are
   read with a length cap; a longer one is skipped, never held whole.
2. **Parsing** (:func:`parse_lines`): pure functions over lines.  A line
   counts only when its message *starts* as an audit record (:func:`audit_head`):
   a kmsg ``PRI,SEQ,USEC,FLAGS;`` record of the kernel facility whose message
   is ``audit: type=N audit(STAMP): ``; an audit.log / ausearch line
   ``type=T msg=audit(STAMP): ``; dmesg text (``[ 1.23] ``, ``-T``, ``-r``,
   ``-x``) or journal / syslog text (``TIME HOST kernel: `` or the audit
   transport's ``TIME HOST audit[PID]: TYPE ``) followed by the same.  The
   body must then begin with SELinux ``avc:  denied``, AppArmor
   ``apparmor="DENIED"`` or SMACK ``lsm=SMACK``: never a match in the middle
   of another message (a process that segfaults in a file it named after an
   AVC record gets its name into kmsg, after its comm and fixed text).
   Audit ``PATH``/``CWD``/``SYSCALL`` records of the same event (the same
   rule) add the full path, the device and the uids.  DAC denials never
   reach the log (a plain EACCES): they are not explained.  Journal text
   cannot show the transport: a local user may write a ``kernel:`` line to
   syslog; a jailed guest has no syslog socket.
3. **Mapping** (:class:`Explainer`): records and object tables of the
   registry in, one :class:`Finding` per denial out: the guest (by MCS pair,
   AppArmor profile ``svirt-<uuid>``, SMACK label, then the hypervisor pid,
   then the DAC uid), the object (path from the record, else by inode from
   the object tables), and a classification: ``cross-guest`` (the object is
   another guest's: confinement working), ``policy gap`` (the guest's own or
   a shared/system object: the rule that would allow it, written as
   audit2allow or an AppArmor profile would, never by running a tool) or
   ``mislabelled`` (the guest's object carries a label svirt never gave it).

Nothing here prints; ``svirt/cli.py`` does.

The package: :mod:`~svirt.explain.parse` (kernel log text to denials),
:mod:`~svirt.explain.sources` (reading the logs, ``--since``),
:mod:`~svirt.explain.lookup` (which guest and object a denial concerns) and
:mod:`~svirt.explain.report` (the findings and the verb).
"""

from svirt.explain.lookup import (
    MAX_TABLE,
    GuestLookup,
    LiveTable,
    ObjectEntry,
    Processes,
    block_device,
    label_uid,
    load_tables,
    mcs_pair,
)
from svirt.explain.parse import (
    DENIAL_TYPES,
    DISCONNECTED,
    MAX_LINE,
    UNTRUSTED,
    AuditHead,
    Denial,
    audit_head,
    fields_of,
    parse_line,
    parse_lines,
)
from svirt.explain.report import (
    APPARMOR_FILE_OPS,
    CROSS_GUEST,
    MISLABELLED,
    POLICY_GAP,
    Explainer,
    Finding,
    explain,
    explain_host,
    policy_rule,
)
from svirt.explain.sources import (
    AUDIT_LOG,
    KMSG,
    MAX_RECORDS,
    ExplainError,
    boot_time,
    gather,
    parse_since,
    read_kmsg,
    read_lines,
)

__all__ = [
    "APPARMOR_FILE_OPS", "AUDIT_LOG", "CROSS_GUEST", "DENIAL_TYPES", "DISCONNECTED", "KMSG",
    "MAX_LINE", "MAX_RECORDS", "MAX_TABLE", "MISLABELLED", "POLICY_GAP", "UNTRUSTED",
    "AuditHead", "Denial", "ExplainError", "Explainer", "Finding", "GuestLookup",
    "LiveTable", "ObjectEntry", "Processes", "audit_head", "block_device", "boot_time",
    "explain", "explain_host", "fields_of", "gather", "label_uid", "load_tables", "mcs_pair",
    "parse_line", "parse_lines", "parse_since", "policy_rule", "read_kmsg", "read_lines",
]
